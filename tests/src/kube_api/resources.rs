//! The resources the stand-in serves and how a request path names one of them.

/// One resource type: where the API server serves it and what its objects are called.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Resource {
    /// `v1` for the core group, `<group>/<version>` otherwise (an object's `apiVersion`).
    pub api_version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

/// Everything the stand-in serves. Events are kept as a log of what was written
/// ([`Resource::is_event`]), never listed or watched.
const RESOURCES: &[Resource] = &[
    Resource {
        api_version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
    },
    Resource {
        api_version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
    },
    Resource {
        api_version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
    },
    Resource {
        api_version: "discovery.k8s.io/v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    Resource {
        api_version: "networking.k8s.io/v1",
        plural: "networkpolicies",
        kind: "NetworkPolicy",
        namespaced: true,
    },
    Resource {
        api_version: "ward.dev/v1",
        plural: "policies",
        kind: "Policy",
        // ward's CRD is cluster-scoped.
        namespaced: false,
    },
    Resource {
        api_version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
    },
    Resource {
        api_version: "events.k8s.io/v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
    },
];

impl Resource {
    /// The resource of objects with this `apiVersion` and `kind`.
    pub fn of(api_version: &str, kind: &str) -> Option<&'static Resource> {
        RESOURCES
            .iter()
            .find(|r| r.api_version == api_version && r.kind == kind)
    }

    /// Every `apiVersion`/`kind` served, for a message naming what a test may use.
    pub fn known() -> String {
        let names: Vec<String> = RESOURCES
            .iter()
            .map(|r| format!("{} {}", r.api_version, r.kind))
            .collect();
        names.join(", ")
    }

    /// `/api/v1` for the core group, `/apis/<group>/<version>` otherwise.
    fn path_prefix(&self) -> String {
        if self.api_version.contains('/') {
            format!("/apis/{}", self.api_version)
        } else {
            format!("/api/{}", self.api_version)
        }
    }

    pub fn is_event(&self) -> bool {
        self.kind == "Event"
    }
}

/// What a request path addresses: a collection (`name` none), an object, or an object's
/// subresource, cluster-wide or in one namespace.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

/// The target of `path`, or none for a path the API server would answer 404.
///
/// Namespaced resources: `<prefix>/<plural>` (every namespace) and
/// `<prefix>/namespaces/<ns>/<plural>[/<name>[/<subresource>]]`; cluster-scoped ones:
/// `<prefix>/<plural>[/<name>[/<subresource>]]`. The only subresource served is `status`, which
/// also keeps `/api/v1/namespaces/<ns>/pods` from reading as a subresource of a Namespace.
pub(super) fn parse(path: &str) -> Option<Target> {
    RESOURCES.iter().find_map(|resource| {
        let prefix = resource.path_prefix();
        let rest = path.strip_prefix(prefix.as_str())?.strip_prefix('/')?;
        let segments: Vec<&str> = rest.split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return None;
        }
        let (namespace, after_plural) = match segments.as_slice() {
            ["namespaces", ns, plural, after @ ..]
                if resource.namespaced && *plural == resource.plural =>
            {
                (Some(ns.to_string()), after)
            }
            [plural] if *plural == resource.plural => (None, &[][..]),
            [plural, after @ ..] if *plural == resource.plural && !resource.namespaced => {
                (None, after)
            }
            _ => return None,
        };
        let (name, subresource) = match after_plural {
            [] => (None, None),
            [name] => (Some(name.to_string()), None),
            [name, sub @ "status"] => (Some(name.to_string()), Some(sub.to_string())),
            _ => return None,
        };
        Some(Target {
            resource,
            namespace,
            name,
            subresource,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(path: &str) -> (&'static str, Option<String>, Option<String>, Option<String>) {
        let t = parse(path).unwrap_or_else(|| panic!("{path} should name a resource"));
        (t.resource.kind, t.namespace, t.name, t.subresource)
    }

    #[test]
    fn paths_name_collections_objects_and_subresources() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(target("/api/v1/pods"), ("Pod", None, None, None));
        assert_eq!(
            target("/api/v1/namespaces/a/pods"),
            ("Pod", s("a"), None, None)
        );
        assert_eq!(
            target("/api/v1/namespaces"),
            ("Namespace", None, None, None)
        );
        assert_eq!(
            target("/api/v1/namespaces/a"),
            ("Namespace", None, s("a"), None)
        );
        assert_eq!(
            target("/apis/ward.dev/v1/policies/p/status"),
            ("Policy", None, s("p"), s("status"))
        );
        assert_eq!(
            target("/apis/networking.k8s.io/v1/networkpolicies"),
            ("NetworkPolicy", None, None, None)
        );
        assert_eq!(
            target("/api/v1/namespaces/a/services/s"),
            ("Service", s("a"), s("s"), None)
        );
        assert_eq!(
            target("/apis/discovery.k8s.io/v1/endpointslices"),
            ("EndpointSlice", None, None, None)
        );
        let event = parse("/apis/events.k8s.io/v1/namespaces/a/events").expect("events");
        assert_eq!(event.resource.api_version, "events.k8s.io/v1");
    }

    #[test]
    fn paths_outside_the_table_name_nothing() {
        for path in [
            "/api/v1/endpoints",
            "/api/v1/pods/p",
            "/api/v1/namespaces/a/pods/p/status/x",
            "/apis/ward.dev/v2/policies",
            "/api/v1/pods/",
            "/version",
        ] {
            assert_eq!(parse(path), None, "{path}");
        }
    }
}
