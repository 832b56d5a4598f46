//! Versioned resource sets: what the control plane serves of one resource type, and the difference
//! between any version an agent holds and the current one.
//!
//! A version reads `<epoch>-<counter>-<digest>`. The epoch names this run of the server, the
//! counter grows with every change, and the digest is an order-independent hash of the whole set's
//! content. Within one epoch the difference from an older counter comes from the change index.
//! Across epochs (the server restarted, or the agent moved to another replica) equal digests mean
//! the agent already holds the content and only adopts the new version string; anything else is
//! sent whole with `replace`.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    sync::Arc,
};

use prost::Message as _;
use ward_proto::{Resource, ResourceType};

/// A resource set never keeps more tombstones than this many plus its live resources; an agent
/// further behind than the oldest kept tombstone receives the whole set.
const MIN_TOMBSTONES: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub epoch: u64,
    pub counter: u64,
    pub digest: u128,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016x}-{}-{:032x}",
            self.epoch, self.counter, self.digest
        )
    }
}

impl Version {
    /// `None` for anything this server did not produce; such a holder receives the whole set.
    pub fn parse(text: &str) -> Option<Version> {
        let mut parts = text.splitn(3, '-');
        let epoch = u64::from_str_radix(parts.next()?, 16).ok()?;
        let counter = parts.next()?.parse().ok()?;
        let digest = u128::from_str_radix(parts.next()?, 16).ok()?;
        Some(Version {
            epoch,
            counter,
            digest,
        })
    }
}

/// What one agent must receive to move from the version it holds to the current one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub version: String,
    /// Empty when `replace` is set.
    pub base_version: String,
    pub replace: bool,
    pub resources: Vec<Arc<Resource>>,
    pub removed: Vec<String>,
}

impl Delta {
    /// Rough encoded size, for splitting large batches.
    pub fn encoded_len(&self) -> usize {
        self.resources
            .iter()
            .map(|r| r.encoded_len() + 4)
            .sum::<usize>()
            + self.removed.iter().map(|n| n.len() + 2).sum::<usize>()
    }
}

struct Entry {
    resource: Arc<Resource>,
    hash: u128,
    changed_at: u64,
}

pub struct ResourceSet {
    kind: ResourceType,
    epoch: u64,
    counter: u64,
    digest: u128,
    /// Until the first complete set arrives nothing is served, so agents keep what they hold
    /// (a control plane that starts with an unreadable policy directory must not empty them).
    ready: bool,
    live: HashMap<String, Entry>,
    /// Tombstones: name → counter of its removal.
    removed: HashMap<String, u64>,
    /// The latest change of each name, live or removed, ordered by counter.
    changes: BTreeSet<(u64, String)>,
    /// Differences can be computed from counters at or above this one.
    floor: u64,
}

fn hash_of(resource: &Resource) -> u128 {
    let digest = ring::digest::digest(&ring::digest::SHA256, &resource.encode_to_vec());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest.as_ref()[..16]);
    u128::from_le_bytes(first)
}

impl ResourceSet {
    pub fn new(kind: ResourceType, epoch: u64) -> Self {
        ResourceSet {
            kind,
            epoch,
            counter: 0,
            digest: 0,
            ready: false,
            live: HashMap::new(),
            removed: HashMap::new(),
            changes: BTreeSet::new(),
            floor: 0,
        }
    }

    pub fn kind(&self) -> ResourceType {
        self.kind
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Resource> {
        self.live.get(name).map(|e| e.resource.as_ref())
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The current version; `None` until the set is ready.
    pub fn version(&self) -> Option<Version> {
        self.ready.then_some(Version {
            epoch: self.epoch,
            counter: self.counter,
            digest: self.digest,
        })
    }

    /// Makes `resources` (keyed by their names) the whole set. Returns whether the version changed.
    pub fn replace_all(&mut self, resources: BTreeMap<String, Resource>) -> bool {
        let next = self.counter + 1;
        let mut changed = !self.ready;
        let gone: Vec<String> = self
            .live
            .keys()
            .filter(|name| !resources.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            let entry = self.live.remove(&name).expect("name listed from live");
            self.digest = self.digest.wrapping_sub(entry.hash);
            self.changes.remove(&(entry.changed_at, name.clone()));
            self.changes.insert((next, name.clone()));
            self.removed.insert(name, next);
            changed = true;
        }
        for (name, mut resource) in resources {
            resource.name.clone_from(&name);
            let hash = hash_of(&resource);
            if let Some(entry) = self.live.get(&name) {
                if entry.hash == hash {
                    continue;
                }
            }
            if let Some(old) = self.live.remove(&name) {
                self.digest = self.digest.wrapping_sub(old.hash);
                self.changes.remove(&(old.changed_at, name.clone()));
            }
            if let Some(removed_at) = self.removed.remove(&name) {
                self.changes.remove(&(removed_at, name.clone()));
            }
            self.digest = self.digest.wrapping_add(hash);
            self.changes.insert((next, name.clone()));
            self.live.insert(
                name,
                Entry {
                    resource: Arc::new(resource),
                    hash,
                    changed_at: next,
                },
            );
            changed = true;
        }
        if changed {
            self.counter = next;
            self.ready = true;
            self.prune_tombstones();
        }
        changed
    }

    fn prune_tombstones(&mut self) {
        let limit = self.live.len().max(MIN_TOMBSTONES);
        if self.removed.len() <= limit {
            return;
        }
        let mut excess = self.removed.len() - limit;
        let mut pruned = Vec::new();
        for (at, name) in &self.changes {
            if excess == 0 {
                break;
            }
            if self.removed.contains_key(name) {
                pruned.push((*at, name.clone()));
                excess -= 1;
            }
        }
        for (at, name) in pruned {
            self.changes.remove(&(at, name.clone()));
            self.removed.remove(&name);
            // A holder of a counter below `at` could have the pruned resource.
            self.floor = self.floor.max(at);
        }
    }

    /// What a holder of `held` (`None`: nothing) must receive; `None` when it is up to date or
    /// the set is not ready yet.
    pub fn diff(&self, held: Option<&str>) -> Option<Delta> {
        let current = self.version()?;
        let version = current.to_string();
        let parsed = held.and_then(Version::parse);
        match parsed {
            Some(h) if h == current => None,
            Some(h) if h.digest == current.digest => Some(Delta {
                version,
                base_version: h.to_string(),
                ..Delta::default()
            }),
            Some(h)
                if h.epoch == self.epoch && h.counter >= self.floor && h.counter < self.counter =>
            {
                let mut delta = Delta {
                    version,
                    base_version: h.to_string(),
                    ..Delta::default()
                };
                for (_, name) in self.changes.range((h.counter + 1, String::new())..) {
                    match self.live.get(name) {
                        Some(entry) => delta.resources.push(entry.resource.clone()),
                        None => delta.removed.push(name.clone()),
                    }
                }
                Some(delta)
            }
            _ => {
                let mut resources: Vec<_> =
                    self.live.values().map(|e| e.resource.clone()).collect();
                resources.sort_by(|a, b| a.name.cmp(&b.name));
                Some(Delta {
                    version,
                    base_version: String::new(),
                    replace: true,
                    resources,
                    removed: Vec::new(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_proto::{resource::Body, Policy};

    fn policy(name: &str, yaml: &str) -> (String, Resource) {
        let resource = Resource {
            name: name.into(),
            body: Some(Body::Policy(Policy {
                yaml: yaml.into(),
                source: format!("{name}.yaml#1"),
            })),
        };
        (name.into(), resource)
    }

    fn set_of(items: &[(&str, &str)]) -> BTreeMap<String, Resource> {
        items.iter().map(|(n, y)| policy(n, y)).collect()
    }

    fn names(delta: &Delta) -> Vec<&str> {
        let mut n: Vec<&str> = delta.resources.iter().map(|r| r.name.as_str()).collect();
        n.sort_unstable();
        n
    }

    #[test]
    fn nothing_is_served_before_the_first_set() {
        let set = ResourceSet::new(ResourceType::Policy, 1);
        assert_eq!(set.diff(None), None, "an unready set must not empty agents");
    }

    #[test]
    fn an_empty_first_set_is_served_whole() {
        let mut set = ResourceSet::new(ResourceType::Policy, 1);
        assert!(
            set.replace_all(BTreeMap::new()),
            "the first set is a change"
        );
        let delta = set.diff(None).expect("a new agent receives the empty set");
        assert!(delta.replace && delta.resources.is_empty());
    }

    #[test]
    fn holder_of_an_older_version_receives_only_the_difference() {
        let mut set = ResourceSet::new(ResourceType::Policy, 7);
        set.replace_all(set_of(&[("a", "1"), ("b", "1"), ("c", "1")]));
        let v1 = set.version().expect("ready").to_string();
        assert!(set.replace_all(set_of(&[("a", "1"), ("b", "2"), ("d", "1")])));
        let delta = set.diff(Some(&v1)).expect("v1 is behind");
        assert!(!delta.replace);
        assert_eq!(delta.base_version, v1);
        assert_eq!(names(&delta), ["b", "d"]);
        assert_eq!(delta.removed, ["c"]);
        assert_eq!(set.diff(Some(&delta.version)), None, "up to date");
    }

    #[test]
    fn identical_content_is_not_a_new_version() {
        let mut set = ResourceSet::new(ResourceType::Policy, 1);
        set.replace_all(set_of(&[("a", "1")]));
        let v = set.version();
        assert!(!set.replace_all(set_of(&[("a", "1")])));
        assert_eq!(set.version(), v);
    }

    #[test]
    fn changes_accumulate_across_several_versions() {
        let mut set = ResourceSet::new(ResourceType::Policy, 1);
        set.replace_all(set_of(&[("a", "1"), ("b", "1")]));
        let v1 = set.version().expect("ready").to_string();
        set.replace_all(set_of(&[("a", "2"), ("b", "1")]));
        set.replace_all(set_of(&[("a", "2")]));
        set.replace_all(set_of(&[("a", "2"), ("b", "3"), ("c", "1")]));
        let delta = set.diff(Some(&v1)).expect("behind");
        assert_eq!(names(&delta), ["a", "b", "c"]);
        assert!(delta.removed.is_empty(), "b came back: {:?}", delta.removed);
    }

    #[test]
    fn another_epoch_with_the_same_content_only_adopts_the_version() {
        let content = set_of(&[("a", "1"), ("b", "2")]);
        let mut old = ResourceSet::new(ResourceType::Policy, 1);
        old.replace_all(content.clone());
        let held = old.version().expect("ready").to_string();
        let mut restarted = ResourceSet::new(ResourceType::Policy, 2);
        restarted.replace_all(content);
        let delta = restarted
            .diff(Some(&held))
            .expect("the version string differs");
        assert!(!delta.replace && delta.resources.is_empty() && delta.removed.is_empty());
    }

    #[test]
    fn another_epoch_with_other_content_is_sent_whole() {
        let mut old = ResourceSet::new(ResourceType::Policy, 1);
        old.replace_all(set_of(&[("a", "1")]));
        let held = old.version().expect("ready").to_string();
        let mut restarted = ResourceSet::new(ResourceType::Policy, 2);
        restarted.replace_all(set_of(&[("a", "2")]));
        let delta = restarted.diff(Some(&held)).expect("behind");
        assert!(delta.replace);
        assert_eq!(names(&delta), ["a"]);
    }

    #[test]
    fn unparsable_or_future_versions_get_the_whole_set() {
        let mut set = ResourceSet::new(ResourceType::Policy, 1);
        set.replace_all(set_of(&[("a", "1")]));
        for held in ["garbage", "", "0000000000000001-99-0"] {
            let delta = set.diff(Some(held)).expect("unknown version");
            assert!(delta.replace, "{held:?}");
        }
    }

    #[test]
    fn digest_does_not_depend_on_order_of_changes() {
        let mut one = ResourceSet::new(ResourceType::Policy, 1);
        one.replace_all(set_of(&[("a", "1")]));
        one.replace_all(set_of(&[("a", "1"), ("b", "1")]));
        let mut two = ResourceSet::new(ResourceType::Policy, 2);
        two.replace_all(set_of(&[("b", "1"), ("x", "9")]));
        two.replace_all(set_of(&[("b", "1"), ("a", "1")]));
        assert_eq!(
            one.version().expect("ready").digest,
            two.version().expect("ready").digest
        );
    }

    #[test]
    fn pruned_tombstones_force_a_full_resync_for_old_holders() {
        let mut set = ResourceSet::new(ResourceType::Ipcache, 1);
        set.replace_all(set_of(&[("keep", "1")]));
        let ancient = set.version().expect("ready").to_string();
        for round in 0..3 {
            let many: Vec<(String, String)> = (0..MIN_TOMBSTONES)
                .map(|i| (format!("n{round}-{i}"), "x".to_string()))
                .collect();
            let mut next = set_of(&[("keep", "1")]);
            next.extend(many.iter().map(|(n, y)| policy(n, y)));
            set.replace_all(next);
        }
        set.replace_all(set_of(&[("keep", "2")]));
        assert!(set.removed.len() <= MIN_TOMBSTONES.max(set.len()));
        let delta = set.diff(Some(&ancient)).expect("behind");
        assert!(delta.replace, "tombstones it needed are gone");
        assert_eq!(names(&delta), ["keep"]);
    }

    #[test]
    fn version_text_round_trips() {
        let v = Version {
            epoch: 0xdead_beef,
            counter: 42,
            digest: u128::MAX - 5,
        };
        assert_eq!(Version::parse(&v.to_string()), Some(v));
    }
}
