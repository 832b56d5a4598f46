//! What the agent holds from the control plane: the resources of each type with their versions,
//! how a batch of updates is merged into them, and the copy kept on disk.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::Path,
};

use serde::{Deserialize, Serialize};
use ward_policy::service::Service;
use ward_proto::{resource::Body, ResourceType, Update};

/// One identity the control plane allocated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteIdentity {
    pub spiffe_id: String,
    /// In the workload range (`256..=0x00FF_FFFF`).
    pub identity: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_labels: BTreeMap<String, String>,
}

impl RemoteIdentity {
    /// The key the control plane allocated its number for, which names its IDENTITY resource.
    pub fn key(&self) -> String {
        crate::policy::identity::key(&self.spiffe_id, self.namespace.as_deref(), &self.labels)
    }
}

/// One of this node's pods as the control plane reads it from the cluster (`workloads:
/// fromControlPlane`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteWorkload {
    /// `<namespace>/<pod name>`.
    pub name: String,
    pub pod_uid: String,
    pub spiffe_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<crate::policy::NamedPort>,
    /// Uses the node's network: its cgroup is mapped to the host, it has no identity of its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
}

/// Everything the control plane gave this agent, merged: the complete desired state after an
/// update, not the difference.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteState {
    /// (policy name, YAML of one document), sorted by name.
    pub policies: Vec<(String, String)>,
    /// Every identity any node reported (this node's own included), sorted by key.
    pub identities: Vec<RemoteIdentity>,
    /// Address → identity for every workload address any node reported, sorted by address.
    pub ipcache: Vec<(IpAddr, u32)>,
    /// Address → the tunnel listener of the node that owns it (nodes that run a tunnel only).
    #[serde(default)]
    pub tunnels: Vec<(IpAddr, SocketAddr)>,
    /// PEM certificates of the control plane's CA (for verifying peers' certificates).
    #[serde(default)]
    pub trust_bundle: String,
    /// Serials of revoked workload certificates, as the control plane wrote them.
    #[serde(default)]
    pub revoked_serials: Vec<String>,
    /// This node's pods (WORKLOAD resources: a control plane that reads a cluster), by pod UID.
    #[serde(default)]
    pub workloads: Vec<RemoteWorkload>,
    /// The cluster's Services (SERVICE resources: a control plane that reads a cluster), sorted by
    /// `<namespace>/<name>`.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Resource type (`policy`, `identity`, `ipcache`, `trust_bundle`, `workload`, `service`) →
    /// version held.
    pub versions: BTreeMap<String, String>,
}

/// The same content keyed for merging.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    policies: BTreeMap<String, String>,
    identities: BTreeMap<String, RemoteIdentity>,
    ipcache: BTreeMap<IpAddr, u32>,
    tunnels: BTreeMap<IpAddr, SocketAddr>,
    /// Name → (PEM, revoked serials).
    trust_bundle: BTreeMap<String, (String, Vec<String>)>,
    /// By pod UID.
    workloads: BTreeMap<String, RemoteWorkload>,
    /// By `<namespace>/<name>`.
    services: BTreeMap<String, Service>,
    versions: BTreeMap<ResourceType, String>,
}

/// Why a batch cannot be merged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    /// The server computed the difference from another version than the one held: the two
    /// disagree about what the agent has, and only a new stream (with a new Hello) resolves it.
    #[error("update of {kind} is relative to version {base:?}, but this agent holds {held:?}")]
    BaseMismatch {
        kind: &'static str,
        base: String,
        held: String,
    },
    /// The batch itself is malformed; NACKed without asking the agent to apply it.
    #[error("{0}")]
    Invalid(String),
}

impl Held {
    pub fn from_state(state: &RemoteState) -> Held {
        Held {
            policies: state.policies.iter().cloned().collect(),
            identities: state
                .identities
                .iter()
                .map(|i| (i.key(), i.clone()))
                .collect(),
            ipcache: state.ipcache.iter().copied().collect(),
            tunnels: state.tunnels.iter().copied().collect(),
            trust_bundle: if state.trust_bundle.is_empty() {
                BTreeMap::new()
            } else {
                BTreeMap::from([(
                    "ca".to_string(),
                    (state.trust_bundle.clone(), state.revoked_serials.clone()),
                )])
            },
            workloads: state
                .workloads
                .iter()
                .map(|w| (w.pod_uid.clone(), w.clone()))
                .collect(),
            services: state
                .services
                .iter()
                .map(|s| (s.key(), s.clone()))
                .collect(),
            versions: state
                .versions
                .iter()
                .filter_map(|(k, v)| Some((ResourceType::from_short_name(k)?, v.clone())))
                .collect(),
        }
    }

    pub fn to_state(&self) -> RemoteState {
        RemoteState {
            policies: self
                .policies
                .iter()
                .map(|(n, y)| (n.clone(), y.clone()))
                .collect(),
            identities: self.identities.values().cloned().collect(),
            ipcache: self.ipcache.iter().map(|(a, i)| (*a, *i)).collect(),
            tunnels: self.tunnels.iter().map(|(a, t)| (*a, *t)).collect(),
            trust_bundle: self
                .trust_bundle
                .values()
                .map(|(pem, _)| pem.as_str())
                .collect(),
            revoked_serials: self
                .trust_bundle
                .values()
                .flat_map(|(_, revoked)| revoked.iter().cloned())
                .collect(),
            workloads: self.workloads.values().cloned().collect(),
            services: self.services.values().cloned().collect(),
            versions: self
                .versions
                .iter()
                .map(|(k, v)| (k.short_name().to_string(), v.clone()))
                .collect(),
        }
    }

    pub fn version(&self, kind: ResourceType) -> Option<&str> {
        self.versions.get(&kind).map(String::as_str)
    }

    pub fn versions(&self) -> &BTreeMap<ResourceType, String> {
        &self.versions
    }

    /// Whether two holds have the same resources, whatever their versions.
    pub fn same_content(&self, other: &Held) -> bool {
        self.policies == other.policies
            && self.identities == other.identities
            && self.ipcache == other.ipcache
            && self.tunnels == other.tunnels
            && self.trust_bundle == other.trust_bundle
            && self.workloads == other.workloads
            && self.services == other.services
    }

    fn clear(&mut self, kind: ResourceType) {
        match kind {
            ResourceType::Policy => self.policies.clear(),
            ResourceType::Identity => self.identities.clear(),
            ResourceType::Ipcache => {
                self.ipcache.clear();
                self.tunnels.clear();
            }
            ResourceType::TrustBundle => self.trust_bundle.clear(),
            ResourceType::Workload => self.workloads.clear(),
            ResourceType::Service => self.services.clear(),
            ResourceType::Unspecified => {}
        }
    }

    fn remove(&mut self, kind: ResourceType, name: &str) -> Result<(), MergeError> {
        match kind {
            ResourceType::Policy => {
                self.policies.remove(name);
            }
            ResourceType::Identity => {
                self.identities.remove(name);
            }
            ResourceType::Ipcache => {
                let address: IpAddr = name.parse().map_err(|_| {
                    MergeError::Invalid(format!("ipcache: removed name {name:?} is not an address"))
                })?;
                self.ipcache.remove(&address);
                self.tunnels.remove(&address);
            }
            ResourceType::TrustBundle => {
                self.trust_bundle.remove(name);
            }
            ResourceType::Workload => {
                self.workloads.remove(name);
            }
            ResourceType::Service => {
                self.services.remove(name);
            }
            ResourceType::Unspecified => {}
        }
        Ok(())
    }

    fn insert(
        &mut self,
        kind: ResourceType,
        name: String,
        body: Option<Body>,
    ) -> Result<(), MergeError> {
        let invalid = |reason: String| {
            Err(MergeError::Invalid(format!(
                "{}: resource {name:?}: {reason}",
                kind.short_name()
            )))
        };
        match (kind, body) {
            (ResourceType::Policy, Some(Body::Policy(p))) => {
                self.policies.insert(name, p.yaml);
            }
            (ResourceType::Identity, Some(Body::Identity(i))) => {
                if !crate::policy::identity::is_workload(i.identity) {
                    return invalid(format!(
                        "identity {} is outside the workload range",
                        i.identity
                    ));
                }
                let identity = RemoteIdentity {
                    spiffe_id: i.spiffe_id,
                    identity: i.identity,
                    labels: i.labels.into_iter().collect(),
                    namespace: i.namespace,
                    namespace_labels: i.namespace_labels.into_iter().collect(),
                };
                if identity.key() != name {
                    return invalid(format!(
                        "is not the key of SPIFFE ID {:?} with its namespace and labels",
                        identity.spiffe_id
                    ));
                }
                self.identities.insert(name, identity);
            }
            (ResourceType::Ipcache, Some(Body::Ipcache(entry))) => {
                let Ok(address) = entry.address.parse::<IpAddr>() else {
                    return invalid(format!("{:?} is not an address", entry.address));
                };
                if !crate::policy::identity::is_workload(entry.identity) {
                    return invalid(format!(
                        "identity {} is outside the workload range",
                        entry.identity
                    ));
                }
                let tunnel = match entry.tunnel.as_str() {
                    "" => None,
                    text => match text.parse::<SocketAddr>() {
                        Ok(tunnel) => Some(tunnel),
                        Err(_) => return invalid(format!("tunnel {text:?} is not ip:port")),
                    },
                };
                self.ipcache.insert(address, entry.identity);
                match tunnel {
                    Some(tunnel) => self.tunnels.insert(address, tunnel),
                    None => self.tunnels.remove(&address),
                };
            }
            (ResourceType::TrustBundle, Some(Body::TrustBundle(bundle))) => {
                if let Some(bad) = bundle
                    .revoked_serials
                    .iter()
                    .find(|s| ward_tunnel::Serial::from_hex(s).is_err())
                {
                    return invalid(format!("revoked serial {bad:?} is not hexadecimal"));
                }
                self.trust_bundle
                    .insert(name, (bundle.pem, bundle.revoked_serials));
            }
            (ResourceType::Workload, Some(Body::Workload(w))) => {
                if w.pod_uid != name {
                    return invalid(format!("names pod UID {:?}", w.pod_uid));
                }
                let mut addresses = Vec::with_capacity(w.addresses.len());
                for text in &w.addresses {
                    match text.parse::<IpAddr>() {
                        Ok(address) => addresses.push(address),
                        Err(_) => return invalid(format!("{text:?} is not an address")),
                    }
                }
                let mut ports = Vec::with_capacity(w.ports.len());
                for p in w.ports {
                    let protocol = (!p.protocol.is_empty()).then_some(p.protocol.as_str());
                    match crate::policy::NamedPort::parse(p.name.clone(), p.port.into(), protocol) {
                        Ok(port) => ports.push(port),
                        Err((field, reason)) => {
                            return invalid(format!("ports {:?}{field}: {reason}", p.name))
                        }
                    }
                }
                let workload = RemoteWorkload {
                    name: w.name,
                    pod_uid: w.pod_uid,
                    spiffe_id: w.spiffe_id,
                    namespace: w.namespace,
                    namespace_labels: w.namespace_labels.into_iter().collect(),
                    labels: w.labels.into_iter().collect(),
                    addresses,
                    ports,
                    host_network: w.host_network,
                };
                self.workloads.insert(name, workload);
            }
            (ResourceType::Service, Some(Body::Service(s))) => {
                let service = match service_of(s) {
                    Ok(service) => service,
                    Err(reason) => return invalid(reason),
                };
                if service.key() != name {
                    return invalid(format!("names Service {:?}", service.key()));
                }
                self.services.insert(name, service);
            }
            _ => return invalid("body does not match the resource type".into()),
        }
        Ok(())
    }

    /// This hold with `batch` merged in. The batch is the content of one or more messages (the
    /// pieces of one type share version, nonce and `replace`).
    pub fn merged(&self, batch: &[Update]) -> Result<Held, MergeError> {
        let mut next = self.clone();
        let mut cleared = BTreeSet::new();
        for update in batch {
            let kind = match ResourceType::try_from(update.r#type) {
                Ok(ResourceType::Unspecified) | Err(_) => {
                    return Err(MergeError::Invalid(format!(
                        "unknown resource type {}",
                        update.r#type
                    )))
                }
                Ok(kind) => kind,
            };
            if update.version.is_empty() {
                return Err(MergeError::Invalid(format!(
                    "{}: empty version",
                    kind.short_name()
                )));
            }
            if update.replace {
                if cleared.insert(kind) {
                    next.clear(kind);
                }
            } else {
                let held = self.version(kind).unwrap_or_default();
                if update.base_version != held {
                    return Err(MergeError::BaseMismatch {
                        kind: kind.short_name(),
                        base: update.base_version.clone(),
                        held: held.into(),
                    });
                }
            }
            for name in &update.removed {
                next.remove(kind, name)?;
            }
            for resource in &update.resources {
                if resource.name.is_empty() {
                    return Err(MergeError::Invalid(format!(
                        "{}: resource without a name",
                        kind.short_name()
                    )));
                }
                next.insert(kind, resource.name.clone(), resource.body.clone())?;
            }
            next.versions.insert(kind, update.version.clone());
        }
        Ok(next)
    }
}

/// A SERVICE resource's body as the agent keeps it, or what is wrong with it.
fn service_of(s: ward_proto::Service) -> Result<Service, String> {
    let address = |text: &str| {
        text.parse::<IpAddr>()
            .map_err(|_| format!("{text:?} is not an address"))
    };
    let port = |what: &str, port: u32| {
        u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(format!("{what} {port} is not a port from 1 to 65535"))
    };
    let mut ports = Vec::with_capacity(s.ports.len());
    for p in s.ports {
        let protocol = ward_policy::service::protocol_number(&p.protocol).ok_or(format!(
            "port {:?}: protocol {:?} is not TCP, UDP or SCTP",
            p.name, p.protocol
        ))?;
        let mut backends = Vec::with_capacity(p.backends.len());
        for b in p.backends {
            backends.push(ward_policy::service::Backend {
                address: address(&b.address)?,
                port: port("backend port", b.port)?,
                pod: (!b.pod.is_empty()).then_some(b.pod),
            });
        }
        ports.push(ward_policy::service::ServicePort {
            port: port("port", p.port)?,
            name: p.name,
            protocol,
            backends,
        });
    }
    let service = Service {
        namespace: s.namespace,
        name: s.name,
        cluster_ips: s
            .cluster_ips
            .iter()
            .map(|ip| address(ip))
            .collect::<Result<_, _>>()?,
        ports,
        client_ip_affinity: s.client_ip_affinity,
    };
    match service.invalid() {
        Some(reason) => Err(reason),
        None => Ok(service),
    }
}

pub const LAST_APPLIED_FILE: &str = "last-applied.json";

/// Writes `state` so that a crash leaves the previous file or the new one.
pub fn save(state_dir: &Path, state: &RemoteState) -> std::io::Result<()> {
    let json = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    ward_host::atomic::write(&state_dir.join(LAST_APPLIED_FILE), &json, 0o600)
}

pub fn load(state_dir: &Path) -> Option<RemoteState> {
    let file = state_dir.join(LAST_APPLIED_FILE);
    let text = match std::fs::read(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read the last applied control-plane state");
            return None;
        }
    };
    match serde_json::from_slice(&text) {
        Ok(state) => Some(state),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "ignoring a corrupt last applied control-plane state");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_proto::{Identity, IpCacheEntry, Policy, Resource, TrustBundle};

    fn policy(name: &str, yaml: &str) -> Resource {
        Resource {
            name: name.into(),
            body: Some(Body::Policy(Policy {
                yaml: yaml.into(),
                source: String::new(),
            })),
        }
    }

    /// An ipcache resource named by its address.
    fn ipcache(address: &str, tunnel: &str) -> Resource {
        Resource {
            name: address.into(),
            body: Some(Body::Ipcache(IpCacheEntry {
                address: address.into(),
                identity: 300,
                node: "n".into(),
                tunnel: tunnel.into(),
            })),
        }
    }

    /// The trust bundle resource `ca` revoking one serial.
    fn trust_bundle(revoked_serial: &str) -> Resource {
        Resource {
            name: "ca".into(),
            body: Some(Body::TrustBundle(TrustBundle {
                pem: "pem".into(),
                revoked_serials: vec![revoked_serial.into()],
            })),
        }
    }

    fn update(
        kind: ResourceType,
        version: &str,
        base: &str,
        replace: bool,
        resources: Vec<Resource>,
        removed: &[&str],
    ) -> Update {
        Update {
            r#type: kind as i32,
            version: version.into(),
            nonce: "1".into(),
            base_version: base.into(),
            replace,
            resources,
            removed: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn replace_then_difference_then_split_pieces() {
        let held = Held::default();
        let v1 = held
            .merged(&[update(
                ResourceType::Policy,
                "v1",
                "",
                true,
                vec![policy("a", "1"), policy("b", "1")],
                &[],
            )])
            .expect("full set");
        let v2 = v1
            .merged(&[update(
                ResourceType::Policy,
                "v2",
                "v1",
                false,
                vec![policy("c", "1")],
                &["a"],
            )])
            .expect("difference");
        let state = v2.to_state();
        assert_eq!(
            state.policies,
            [("b".into(), "1".into()), ("c".into(), "1".into())]
        );
        assert_eq!(state.versions["policy"], "v2");
        let pieces = [
            update(
                ResourceType::Policy,
                "v3",
                "",
                true,
                vec![policy("x", "1")],
                &[],
            ),
            update(
                ResourceType::Policy,
                "v3",
                "",
                true,
                vec![policy("y", "1")],
                &[],
            ),
        ];
        let v3 = v2.merged(&pieces).expect("replace in two pieces");
        let names: Vec<String> = v3.to_state().policies.into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["x", "y"],
            "the second piece must not clear the first"
        );
    }

    fn pod(uid: &str, port_name: &str) -> Resource {
        Resource {
            name: uid.into(),
            body: Some(Body::Workload(ward_proto::Workload {
                name: "shop/web".into(),
                spiffe_id: "spiffe://x/ns/shop/sa/web".into(),
                namespace: Some("shop".into()),
                addresses: vec!["10.0.0.5".into()],
                namespace_labels: [("team".to_string(), "a".to_string())].into(),
                pod_uid: uid.into(),
                ports: vec![ward_proto::NamedPort {
                    name: port_name.into(),
                    port: 8080,
                    protocol: "TCP".into(),
                }],
                ..Default::default()
            })),
        }
    }

    #[test]
    fn this_nodes_pods_are_held_by_uid_and_malformed_ones_refused() {
        let held = Held::default()
            .merged(&[update(
                ResourceType::Workload,
                "w1",
                "",
                true,
                vec![pod("u1", "http")],
                &[],
            )])
            .expect("a pod");
        let state = held.to_state();
        assert_eq!(state.workloads.len(), 1);
        let w = &state.workloads[0];
        assert_eq!((w.pod_uid.as_str(), w.name.as_str()), ("u1", "shop/web"));
        assert_eq!(w.namespace_labels["team"], "a");
        assert_eq!((w.ports[0].name.as_str(), w.ports[0].port), ("http", 8080));
        assert_eq!(
            Held::from_state(&state),
            held,
            "the saved state reads back the same"
        );
        let gone = held
            .merged(&[update(
                ResourceType::Workload,
                "w2",
                "w1",
                false,
                vec![],
                &["u1"],
            )])
            .expect("removed");
        assert!(gone.to_state().workloads.is_empty());
        let mut misnamed = pod("u1", "http");
        misnamed.name = "u2".into();
        for bad in [pod("u1", "Not A Port"), misnamed] {
            let err = Held::default()
                .merged(&[update(
                    ResourceType::Workload,
                    "w1",
                    "",
                    true,
                    vec![bad],
                    &[],
                )])
                .expect_err("refused");
            assert!(matches!(err, MergeError::Invalid(_)), "{err}");
        }
    }

    #[test]
    fn a_difference_from_another_version_is_a_mismatch() {
        let held = Held::default()
            .merged(&[update(ResourceType::Policy, "v1", "", true, vec![], &[])])
            .expect("full set");
        let err = held
            .merged(&[update(ResourceType::Policy, "v3", "v2", false, vec![], &[])])
            .expect_err("base v2 but v1 held");
        assert!(matches!(err, MergeError::BaseMismatch { .. }), "{err}");
    }

    #[test]
    fn malformed_resources_are_refused_before_the_agent_sees_them() {
        let bad_address = ipcache("nope", "");
        let bad_tunnel = ipcache("10.0.0.1", "node-b:15008");
        let bad_serial = trust_bundle("zz");
        let reserved_identity = Resource {
            name: "spiffe://x/a".into(),
            body: Some(Body::Identity(Identity {
                spiffe_id: "spiffe://x/a".into(),
                identity: 2,
                ..Identity::default()
            })),
        };
        let full = |kind, resource| update(kind, "v", "", true, vec![resource], &[]);
        let cases = [
            full(ResourceType::Ipcache, bad_address),
            full(ResourceType::Ipcache, bad_tunnel),
            full(ResourceType::TrustBundle, bad_serial),
            full(ResourceType::Identity, reserved_identity),
            full(ResourceType::Identity, policy("p", "1")),
            update(ResourceType::Policy, "", "", true, vec![], &[]),
            Update {
                r#type: 99,
                ..update(ResourceType::Policy, "v", "", true, vec![], &[])
            },
        ];
        for case in cases {
            let err = Held::default()
                .merged(std::slice::from_ref(&case))
                .expect_err("malformed");
            assert!(matches!(err, MergeError::Invalid(_)), "{case:?}: {err}");
        }
    }

    #[test]
    fn state_round_trips_through_disk() {
        let tmp = super::super::tests::temp_dir("state");
        let ip = ipcache("10.0.0.1", "10.0.0.9:15008");
        let ca = trust_bundle("0a:1b");
        let held = Held::default()
            .merged(&[
                update(
                    ResourceType::Policy,
                    "p1",
                    "",
                    true,
                    vec![policy("a", "kind: Policy")],
                    &[],
                ),
                update(ResourceType::Ipcache, "i1", "", true, vec![ip], &[]),
                update(ResourceType::TrustBundle, "t1", "", true, vec![ca], &[]),
            ])
            .expect("merge");
        let state = held.to_state();
        assert_eq!(
            state.tunnels,
            vec![(
                "10.0.0.1".parse().unwrap(),
                "10.0.0.9:15008".parse().unwrap()
            )]
        );
        assert_eq!(state.revoked_serials, vec!["0a:1b".to_string()]);
        save(&tmp, &held.to_state()).expect("save");
        let loaded = load(&tmp).expect("saved state loads");
        assert_eq!(loaded, held.to_state());
        assert_eq!(Held::from_state(&loaded), held);
        std::fs::write(tmp.join(LAST_APPLIED_FILE), "{corrupt").expect("corrupt");
        assert_eq!(load(&tmp), None);
    }
}
