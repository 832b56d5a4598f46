//! The objects, as etcd keeps them for the API server: one revision counter for every change,
//! and the history of changes a watch replays until it is compacted.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::resources::Resource;

/// What a watch event says happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One change: the object as it was after it (for a deletion, its last state stamped with the
/// deletion's revision, as the API server sends it).
pub(super) struct Change {
    pub revision: u64,
    pub change_type: ChangeType,
    pub resource: &'static Resource,
    pub object: Value,
}

/// A watch asked to start before the oldest revision still kept.
#[derive(Debug)]
pub(super) struct Expired {
    pub compacted: u64,
}

/// Objects are keyed by resource, namespace (empty for cluster-scoped ones) and name.
type Key = (&'static str, &'static str, String, String);

#[derive(Default)]
pub(super) struct Store {
    revision: u64,
    /// Every change after this revision is in `history`.
    compacted: u64,
    objects: BTreeMap<Key, (&'static Resource, Value)>,
    history: Vec<Change>,
    uids: u64,
}

impl Store {
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Creates or replaces `object`, which must carry `apiVersion`, `kind` and `metadata.name`
    /// (a namespaced one without `metadata.namespace` goes to `default`, as kubectl puts it).
    /// A replacement keeps the stored uid and creation time unless `object` gives its own.
    pub fn apply(&mut self, mut object: Value) -> Value {
        let resource = resource_of(&object);
        if resource.namespaced && object["metadata"]["namespace"].as_str().is_none() {
            object["metadata"]["namespace"] = json!("default");
        }
        let key = key_of(resource, &object);
        let previous = self.objects.get(&key).map(|(_, o)| o["metadata"].clone());
        let metadata = &mut object["metadata"];
        for field in ["uid", "creationTimestamp"] {
            if metadata[field].is_null() {
                metadata[field] = match &previous {
                    Some(p) if !p[field].is_null() => p[field].clone(),
                    _ if field == "uid" => json!(self.new_uid()),
                    _ => json!(rfc3339_now()),
                };
            }
        }
        let change_type = if previous.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        };
        self.record(resource, key, object, change_type)
    }

    /// Removes the object; none when it is not there.
    pub fn delete(
        &mut self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let resource = Resource::of(api_version, kind)?;
        let key = (
            resource.api_version,
            resource.kind,
            namespace_key(resource, namespace),
            name.into(),
        );
        let (_, mut object) = self.objects.remove(&key)?;
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.history.push(Change {
            revision: self.revision,
            change_type: ChangeType::Deleted,
            resource,
            object: object.clone(),
        });
        Some(object)
    }

    pub fn get(
        &self,
        resource: &'static Resource,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<&Value> {
        let key = (
            resource.api_version,
            resource.kind,
            namespace_key(resource, namespace),
            name.into(),
        );
        self.objects.get(&key).map(|(_, o)| o)
    }

    /// Replaces the stored object by `object` (same key), as a write of a subresource does.
    pub fn replace(&mut self, resource: &'static Resource, object: Value) -> Value {
        let key = key_of(resource, &object);
        self.record(resource, key, object, ChangeType::Modified)
    }

    /// Every object of `resource`, in `namespace` if given, in key order.
    pub fn list<'a>(
        &'a self,
        resource: &'static Resource,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .values()
            .filter(move |(r, o)| *r == resource && in_namespace(o, namespace))
            .map(|(_, o)| o)
    }

    /// The changes of `resource` (in `namespace` if given) after revision `after`.
    pub fn changes_after<'a>(
        &'a self,
        after: u64,
        resource: &'static Resource,
        namespace: Option<&'a str>,
    ) -> Result<impl Iterator<Item = &'a Change> + 'a, Expired> {
        if after < self.compacted {
            return Err(Expired {
                compacted: self.compacted,
            });
        }
        let start = self.history.partition_point(|c| c.revision <= after);
        Ok(self.history[start..]
            .iter()
            .filter(move |c| c.resource == resource && in_namespace(&c.object, namespace)))
    }

    /// Forgets the history, as etcd's compaction does: a watch from an older revision now gets
    /// `410 Gone`.
    pub fn compact(&mut self) {
        self.compacted = self.revision;
        self.history.clear();
    }

    fn record(
        &mut self,
        resource: &'static Resource,
        key: Key,
        mut object: Value,
        change_type: ChangeType,
    ) -> Value {
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.objects.insert(key, (resource, object.clone()));
        self.history.push(Change {
            revision: self.revision,
            change_type,
            resource,
            object: object.clone(),
        });
        object
    }

    fn new_uid(&mut self) -> String {
        self.uids += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.uids)
    }
}

fn resource_of(object: &Value) -> &'static Resource {
    let (api_version, kind) = (object["apiVersion"].as_str(), object["kind"].as_str());
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        panic!("an object needs apiVersion and kind: {object}");
    };
    Resource::of(api_version, kind).unwrap_or_else(|| {
        panic!(
            "the stand-in API server serves no {api_version} {kind}; it serves {}",
            Resource::known()
        )
    })
}

fn key_of(resource: &'static Resource, object: &Value) -> Key {
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("an object needs metadata.name: {object}"));
    let namespace = object["metadata"]["namespace"].as_str();
    (
        resource.api_version,
        resource.kind,
        namespace_key(resource, namespace),
        name.into(),
    )
}

fn namespace_key(resource: &Resource, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if resource.namespaced => ns.into(),
        _ => String::new(),
    }
}

fn in_namespace(object: &Value, namespace: Option<&str>) -> bool {
    namespace.is_none_or(|ns| object["metadata"]["namespace"] == ns)
}

/// Now as RFC 3339 in UTC to the second, the form of `metadata.creationTimestamp`.
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "a"}})
    }

    #[test]
    fn every_change_takes_the_next_revision_and_keeps_identity() {
        let mut store = Store::default();
        let first = store.apply(pod("p"));
        let again = store.apply(pod("p"));
        assert_eq!(first["metadata"]["resourceVersion"], "1");
        assert_eq!(again["metadata"]["resourceVersion"], "2");
        assert_eq!(first["metadata"]["uid"], again["metadata"]["uid"]);
        let given = store.apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "q", "uid": "known"}}));
        assert_eq!(given["metadata"]["uid"], "known");
        assert_eq!(given["metadata"]["namespace"], "default");
        let deleted = store
            .delete("v1", "Pod", Some("a"), "p")
            .expect("p was stored");
        assert_eq!(deleted["metadata"]["resourceVersion"], "4");
        let types: Vec<_> = store
            .changes_after(0, first_resource(), None)
            .expect("kept")
            .map(|c| c.change_type)
            .collect();
        assert_eq!(
            types,
            [
                ChangeType::Added,
                ChangeType::Modified,
                ChangeType::Added,
                ChangeType::Deleted
            ]
        );
    }

    #[test]
    fn compaction_expires_older_revisions_only() {
        let mut store = Store::default();
        store.apply(pod("p"));
        store.apply(pod("q"));
        store.compact();
        assert!(store.changes_after(1, first_resource(), None).is_err());
        assert_eq!(
            store
                .changes_after(2, first_resource(), None)
                .expect("current")
                .count(),
            0
        );
    }

    #[test]
    fn creation_timestamps_are_rfc3339() {
        let now = rfc3339_now();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'), "{now}");
    }

    fn first_resource() -> &'static Resource {
        Resource::of("v1", "Pod").expect("pods are served")
    }
}
