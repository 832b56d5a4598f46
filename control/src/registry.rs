//! The workload registry: what every node reported (workload, SPIFFE ID, labels, addresses), the
//! numeric identity allocated to each identity key (a SPIFFE ID with its namespace and labels,
//! [`ward_policy::identity::key`]), and the IDENTITY and IPCACHE resources derived from them.
//!
//! Identities are allocated with the agent's scheme ([`ward_policy::identity::allocate`]), so a
//! key gets the same number in local mode and under the control plane unless two keys collide.
//! Unlike the agent, the control plane remembers every allocation, so a number never moves once
//! given, whichever keys appear later.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use ward_policy::identity;
use ward_proto::{resource::Body, Identity, IpCacheEntry, Resource, Workload};

pub const MAX_WORKLOADS_PER_NODE: usize = 10_000;
pub const MAX_ADDRESSES_PER_WORKLOAD: usize = 64;
pub const MAX_LABELS_PER_WORKLOAD: usize = 64;
const MAX_TEXT: usize = 512;
const MAX_SPIFFE_ID: usize = 2048;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("{count} workloads reported; at most {MAX_WORKLOADS_PER_NODE} per node")]
    TooManyWorkloads { count: usize },
}

/// One workload of a report that was not registered, or registered in part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub workload: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRecord {
    pub name: String,
    pub spiffe_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The labels of the workload's namespace (the cluster's; agents' reports carry none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_labels: BTreeMap<String, String>,
    /// A pod's UID (workloads read from the cluster).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
    /// Named container ports (workloads read from the cluster).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ward_policy::NamedPort>,
    /// The port of the workload's own tunnel listener at its addresses (a pod's network
    /// namespace); 0 when the node's tunnel serves it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tunnel_port: u16,
}

fn is_zero(port: &u16) -> bool {
    *port == 0
}

impl WorkloadRecord {
    /// Its identity's key ([`identity::key`]).
    pub fn key(&self) -> String {
        identity::key(&self.spiffe_id, self.namespace.as_deref(), &self.labels)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegistryFile {
    identities: BTreeMap<String, u32>,
    nodes: BTreeMap<String, Vec<WorkloadRecord>>,
    /// Absent from files written before nodes announced tunnel addresses.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    tunnels: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
pub struct Registry {
    trust_domain: String,
    identities: BTreeMap<String, u32>,
    taken: BTreeSet<u32>,
    nodes: BTreeMap<String, Vec<WorkloadRecord>>,
    /// The tunnel address (`host:port`) each node announced in its last Hello; nodes without a
    /// tunnel have no entry.
    tunnels: BTreeMap<String, String>,
    /// When each node last had a stream or reported; not persisted: a node read from the
    /// registry file counts as seen when this control plane started, so a restart of the control
    /// plane gives every node a full lease to come back.
    last_seen: HashMap<String, Instant>,
    /// Numbers come from the store replicas share ([`crate::etcd_store`]), adopted before a
    /// report is registered: a key without one is refused, never numbered here.
    shared: bool,
}

fn text_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TEXT && !s.chars().any(char::is_control)
}

impl Registry {
    pub fn new(trust_domain: &str) -> Self {
        Registry {
            trust_domain: trust_domain.into(),
            ..Registry::default()
        }
    }

    pub fn from_json(trust_domain: &str, text: &str) -> Result<Self, serde_json::Error> {
        let file: RegistryFile = serde_json::from_str(text)?;
        let mut registry = Registry::new(trust_domain);
        registry.taken = file.identities.values().copied().collect();
        registry.identities = file.identities;
        let now = Instant::now();
        registry.last_seen = file
            .nodes
            .keys()
            .chain(file.tunnels.keys())
            .map(|n| (n.clone(), now))
            .collect();
        registry.nodes = file.nodes;
        registry.tunnels = file.tunnels;
        Ok(registry)
    }

    pub fn to_json(&self) -> String {
        let file = RegistryFile {
            identities: self.identities.clone(),
            nodes: self.nodes.clone(),
            tunnels: self.tunnels.clone(),
        };
        serde_json::to_string_pretty(&file).expect("the registry serializes")
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&str, &[WorkloadRecord])> {
        self.nodes.iter().map(|(n, w)| (n.as_str(), w.as_slice()))
    }

    /// The tunnel address `node` announced, if any.
    pub fn tunnel(&self, node: &str) -> Option<&str> {
        self.tunnels.get(node).map(String::as_str)
    }

    /// Records the tunnel address `node` announced in its Hello (empty: it runs no tunnel).
    /// Checking the address is the session's job. Returns whether it changed.
    pub fn set_tunnel(&mut self, node: &str, tunnel: &str) -> bool {
        if tunnel.is_empty() {
            return self.tunnels.remove(node).is_some();
        }
        if self.tunnels.get(node).map(String::as_str) == Some(tunnel) {
            return false;
        }
        self.tunnels.insert(node.into(), tunnel.into());
        true
    }

    /// Records that `node` is alive (it has a stream, or just reported or disconnected).
    pub fn touch(&mut self, node: &str, now: Instant) {
        self.last_seen.insert(node.into(), now);
    }

    /// Removes the workloads of every node that is not in `connected` and was last seen `lease`
    /// or longer before `now`, so that a node gone for good leaves the IP cache of the others.
    /// Allocated identities stay (a number never moves). Returns the nodes removed.
    pub fn expire(
        &mut self,
        now: Instant,
        lease: Duration,
        connected: &BTreeSet<String>,
    ) -> Vec<String> {
        let known: BTreeSet<&String> = self.nodes.keys().chain(self.tunnels.keys()).collect();
        let gone: Vec<String> = known
            .into_iter()
            .filter(|node| !connected.contains(*node))
            .filter(|node| {
                self.last_seen
                    .get(*node)
                    .is_none_or(|seen| now.saturating_duration_since(*seen) >= lease)
            })
            .cloned()
            .collect();
        for node in &gone {
            self.remove_node(node);
        }
        gone
    }

    /// Forgets `node`'s workloads and tunnel; its identities stay allocated. Whether it was known.
    pub fn remove_node(&mut self, node: &str) -> bool {
        let workloads = self.nodes.remove(node).is_some();
        let tunnel = self.tunnels.remove(node).is_some();
        self.last_seen.remove(node);
        workloads || tunnel
    }

    /// The numeric identity of identity key `key`, allocating one on first sight.
    pub fn allocate(&mut self, key: &str) -> u32 {
        if let Some(id) = self.identities.get(key) {
            return *id;
        }
        let id = identity::allocate(key, |id| self.taken.contains(&id));
        self.taken.insert(id);
        self.identities.insert(key.into(), id);
        id
    }

    /// From now on numbers come from the shared store ([`Registry::adopt_identity`]).
    pub fn share_allocation(&mut self) {
        self.shared = true;
    }

    /// The identity keys of `workloads` that have no number yet (malformed workloads
    /// included: the report refuses them afterwards).
    pub fn missing_identities<'a>(
        &self,
        workloads: impl IntoIterator<Item = &'a Workload>,
    ) -> Vec<String> {
        let keys: BTreeSet<String> = workloads
            .into_iter()
            .map(|w| {
                let labels: BTreeMap<String, String> = w
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                identity::key(&w.spiffe_id, w.namespace.as_deref(), &labels)
            })
            .filter(|key| !self.identities.contains_key(key))
            .collect();
        keys.into_iter().collect()
    }

    /// The numbers in use.
    pub fn taken(&self) -> BTreeSet<u32> {
        self.taken.clone()
    }

    /// Records that the shared store gave `number` to `key`. Whether it is new; an error when
    /// it contradicts what is known (the store is then wrong, and nothing is changed).
    pub fn adopt_identity(&mut self, key: &str, number: u32) -> Result<bool, String> {
        match self.identities.get(key) {
            Some(known) if *known == number => return Ok(false),
            Some(known) => {
                return Err(format!(
                    "identity {key:?} is {known} here, {number} in the store"
                ))
            }
            None => {}
        }
        if self.taken.contains(&number) {
            return Err(format!(
                "number {number} of identity {key:?} is another identity's here"
            ));
        }
        self.taken.insert(number);
        self.identities.insert(key.into(), number);
        Ok(true)
    }

    /// What `node` reported and its tunnel address, as the shared store keeps them.
    pub fn node_record(&self, node: &str) -> crate::etcd_store::NodeRecord {
        crate::etcd_store::NodeRecord {
            workloads: self.nodes.get(node).cloned().unwrap_or_default(),
            tunnel: self.tunnels.get(node).cloned().unwrap_or_default(),
            enforces: None,
        }
    }

    /// Replaces `node`'s workloads and tunnel with what another replica stored (`None`: the
    /// store deleted it). Workloads whose identity has no number here, or whose addresses
    /// another node holds, are left out and returned. Returns whether anything changed.
    pub fn set_node_record(
        &mut self,
        node: &str,
        record: Option<crate::etcd_store::NodeRecord>,
    ) -> (bool, Vec<Refusal>) {
        let Some(record) = record else {
            return (self.remove_node(node), Vec::new());
        };
        let others = self.others(node);
        let mut refusals = Vec::new();
        let mut workloads = Vec::with_capacity(record.workloads.len());
        for w in record.workloads {
            if !self.identities.contains_key(&w.key()) {
                refusals.push(Refusal {
                    workload: w.name.chars().take(80).collect(),
                    reason: "its identity has no number in the store".into(),
                });
            } else if let Some(owner) = w.addresses.iter().find_map(|a| others.get(a)) {
                refusals.push(Refusal {
                    workload: w.name.chars().take(80).collect(),
                    reason: format!("an address belongs to a workload of node {owner:?}"),
                });
            } else {
                workloads.push(w);
            }
        }
        drop(others);
        let mut changed = if workloads.is_empty() {
            self.nodes.remove(node).is_some()
        } else {
            self.nodes.get(node) != Some(&workloads) && {
                self.nodes.insert(node.into(), workloads);
                true
            }
        };
        changed |= self.set_tunnel(node, &record.tunnel);
        (changed, refusals)
    }

    /// The number allocated to `w`'s identity (every registered workload has one).
    fn identity_of(&self, w: &WorkloadRecord) -> u32 {
        self.identities[&w.key()]
    }

    /// Which other node holds each address, built once per report so a report costs time
    /// linear in the registry, not quadratic.
    fn others(&self, node: &str) -> HashMap<IpAddr, &str> {
        let mut addresses = HashMap::new();
        for (n, workloads) in self.nodes.iter().filter(|(n, _)| n.as_str() != node) {
            for w in workloads {
                for address in &w.addresses {
                    addresses.entry(*address).or_insert(n.as_str());
                }
            }
        }
        addresses
    }

    /// Replaces what `node` reported before with `workloads`. Workloads that are malformed or
    /// conflict with another node's are left out (or lose the conflicting addresses) and listed
    /// in the returned refusals; the rest is registered. Returns whether anything changed.
    pub fn report(
        &mut self,
        node: &str,
        workloads: Vec<Workload>,
    ) -> Result<(bool, Vec<Refusal>), ReportError> {
        if workloads.len() > MAX_WORKLOADS_PER_NODE {
            return Err(ReportError::TooManyWorkloads {
                count: workloads.len(),
            });
        }
        let prefix = format!("spiffe://{}/", self.trust_domain);
        let others = self.others(node);
        let mut refusals = Vec::new();
        let mut accepted: Vec<WorkloadRecord> = Vec::with_capacity(workloads.len());
        let mut seen_addresses = BTreeSet::new();
        for w in workloads {
            let name: String = w.name.chars().take(80).collect();
            let mut refuse = |reason: String| {
                refusals.push(Refusal {
                    workload: name.clone(),
                    reason,
                })
            };
            if !text_ok(&w.name) {
                refuse("the name must be 1 to 512 printable characters".into());
                continue;
            }
            if accepted.iter().any(|a| a.name == w.name) {
                refuse("reported twice".into());
                continue;
            }
            if !w.spiffe_id.starts_with(&prefix)
                || w.spiffe_id.len() == prefix.len()
                || w.spiffe_id.len() > MAX_SPIFFE_ID
                || w.spiffe_id
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace())
            {
                refuse(format!(
                    "SPIFFE ID {:?} is not in trust domain {:?}",
                    w.spiffe_id.chars().take(120).collect::<String>(),
                    self.trust_domain
                ));
                continue;
            }
            if w.labels.len() > MAX_LABELS_PER_WORKLOAD
                || w.labels
                    .iter()
                    .any(|(k, v)| !text_ok(k) || v.len() > MAX_TEXT)
                || w.namespace.as_deref().is_some_and(|n| !text_ok(n))
            {
                refuse(format!(
                    "at most {MAX_LABELS_PER_WORKLOAD} labels of printable text up to {MAX_TEXT} bytes"
                ));
                continue;
            }
            if w.addresses.len() > MAX_ADDRESSES_PER_WORKLOAD {
                refuse(format!(
                    "{} addresses; at most {MAX_ADDRESSES_PER_WORKLOAD}",
                    w.addresses.len()
                ));
                continue;
            }
            let labels: BTreeMap<String, String> = w.labels.into_iter().collect();
            let mut ports = Vec::with_capacity(w.ports.len());
            for p in &w.ports {
                let protocol = (!p.protocol.is_empty()).then_some(p.protocol.as_str());
                match ward_policy::NamedPort::parse(p.name.clone(), p.port.into(), protocol) {
                    Ok(port) => ports.push(port),
                    Err((field, reason)) => refuse(format!("ports {:?}{field}: {reason}", p.name)),
                }
            }
            let Ok(tunnel_port) = u16::try_from(w.tunnel_port) else {
                refuse(format!("tunnel port {} is not a port", w.tunnel_port));
                continue;
            };
            let mut addresses = Vec::with_capacity(w.addresses.len());
            for text in &w.addresses {
                let Ok(address) = text.parse::<IpAddr>() else {
                    refuse(format!(
                        "{:?} is not an IP address",
                        text.chars().take(60).collect::<String>()
                    ));
                    continue;
                };
                if let Some(owner) = others.get(&address) {
                    refuse(format!(
                        "address {address} belongs to a workload of node {owner:?}"
                    ));
                    continue;
                }
                if !seen_addresses.insert(address) {
                    refuse(format!("address {address} is reported by two workloads"));
                    continue;
                }
                addresses.push(address);
            }
            accepted.push(WorkloadRecord {
                name: w.name,
                spiffe_id: w.spiffe_id,
                namespace: w.namespace,
                labels,
                addresses,
                namespace_labels: w.namespace_labels.into_iter().collect(),
                pod_uid: w.pod_uid,
                ports,
                tunnel_port,
            });
        }
        drop(others);
        accepted.sort_by(|a, b| a.name.cmp(&b.name));
        if self.shared {
            accepted.retain(|w| {
                let numbered = self.identities.contains_key(&w.key());
                if !numbered {
                    refusals.push(Refusal {
                        workload: w.name.chars().take(80).collect(),
                        reason: "the shared store has allocated no identity for it yet".into(),
                    });
                }
                numbered
            });
        } else {
            for w in &accepted {
                self.allocate(&w.key());
            }
        }
        let changed = self.nodes.get(node) != Some(&accepted);
        if accepted.is_empty() {
            self.nodes.remove(node);
        } else {
            self.nodes.insert(node.into(), accepted);
        }
        Ok((changed, refusals))
    }

    /// Replaces every node's workloads at once (a control plane that reads the cluster: the
    /// cluster says where every pod runs). Done at once, not node by node, so an address that
    /// moved from one node's pod to another's is not refused as the first node's. Returns
    /// whether anything changed, and each node's refusals.
    pub fn replace_nodes(
        &mut self,
        nodes: BTreeMap<String, Vec<Workload>>,
    ) -> Result<(bool, Vec<(String, Refusal)>), ReportError> {
        let before = std::mem::take(&mut self.nodes);
        let mut refusals = Vec::new();
        for (node, workloads) in nodes {
            let (_, refused) = match self.report(&node, workloads) {
                Ok(done) => done,
                Err(e) => {
                    self.nodes = before;
                    return Err(e);
                }
            };
            refusals.extend(refused.into_iter().map(|r| (node.clone(), r)));
        }
        Ok((self.nodes != before, refusals))
    }

    /// This node's workloads that came from the cluster, as WORKLOAD resources by pod UID.
    pub fn workload_resources(&self, node: &str) -> BTreeMap<String, Resource> {
        let Some(workloads) = self.nodes.get(node) else {
            return BTreeMap::new();
        };
        workloads
            .iter()
            .filter(|w| !w.pod_uid.is_empty())
            .map(|w| {
                let body = Workload {
                    name: w.name.clone(),
                    spiffe_id: w.spiffe_id.clone(),
                    namespace: w.namespace.clone(),
                    labels: w.labels.clone().into_iter().collect(),
                    addresses: w.addresses.iter().map(ToString::to_string).collect(),
                    namespace_labels: w.namespace_labels.clone().into_iter().collect(),
                    pod_uid: w.pod_uid.clone(),
                    ports: w
                        .ports
                        .iter()
                        .map(|p| ward_proto::NamedPort {
                            name: p.name.clone(),
                            port: p.port.into(),
                            protocol: ward_policy::protocol_name(p.protocol).to_ascii_uppercase(),
                        })
                        .collect(),
                    host_network: false,
                    tunnel_port: 0,
                };
                let resource = Resource {
                    name: w.pod_uid.clone(),
                    body: Some(Body::Workload(body)),
                };
                (w.pod_uid.clone(), resource)
            })
            .collect()
    }

    /// Each node's workloads as the policy compiler sees them, with their identities. Agents'
    /// reports carry no namespace labels or named ports (agents add those of their own workloads
    /// from their configuration); workloads read from the cluster carry both.
    pub fn workload_infos(&self) -> BTreeMap<String, Vec<ward_policy::WorkloadInfo>> {
        let info = |w: &WorkloadRecord| ward_policy::WorkloadInfo {
            identity: self.identity_of(w),
            name: w.name.clone(),
            spiffe_id: w.spiffe_id.clone(),
            namespace: w.namespace.clone(),
            labels: w.labels.clone(),
            addresses: w.addresses.clone(),
            namespace_labels: w.namespace_labels.clone(),
            ports: w.ports.clone(),
        };
        let nodes = self.nodes.iter();
        nodes
            .map(|(node, workloads)| (node.clone(), workloads.iter().map(info).collect()))
            .collect()
    }

    /// One IDENTITY resource per identity some node reports, named by its key.
    pub fn identity_resources(&self) -> BTreeMap<String, Resource> {
        let mut out = BTreeMap::new();
        for w in self.nodes.values().flatten() {
            let key = w.key();
            out.entry(key.clone()).or_insert_with(|| Resource {
                name: key,
                body: Some(Body::Identity(Identity {
                    spiffe_id: w.spiffe_id.clone(),
                    identity: self.identity_of(w),
                    labels: w.labels.clone().into_iter().collect(),
                    namespace: w.namespace.clone(),
                    namespace_labels: w.namespace_labels.clone().into_iter().collect(),
                })),
            });
        }
        out
    }

    /// Sets the ports of the tunnel listeners `node`'s agent runs in its workloads' own network
    /// namespaces (`ports`, by workload name; absent is none) on the workloads registered for
    /// that node. Returns whether anything changed.
    pub fn set_tunnel_ports(&mut self, node: &str, ports: &BTreeMap<String, u16>) -> bool {
        let Some(workloads) = self.nodes.get_mut(node) else {
            return false;
        };
        let mut changed = false;
        for w in workloads {
            let port = ports.get(&w.name).copied().unwrap_or(0);
            if w.tunnel_port != port {
                w.tunnel_port = port;
                changed = true;
            }
        }
        changed
    }

    /// One IPCACHE resource per reported workload address, naming the node that reported it and
    /// that node's tunnel address.
    pub fn ipcache_resources(&self) -> BTreeMap<String, Resource> {
        let mut out = BTreeMap::new();
        for (node, workloads) in &self.nodes {
            for w in workloads {
                let identity = self.identity_of(w);
                for address in &w.addresses {
                    let name = address.to_string();
                    out.entry(name.clone()).or_insert_with(|| Resource {
                        name: name.clone(),
                        body: Some(Body::Ipcache(IpCacheEntry {
                            address: name,
                            identity,
                            node: node.clone(),
                            tunnel: match w.tunnel_port {
                                0 => self.tunnels.get(node).cloned().unwrap_or_default(),
                                port => SocketAddr::new(*address, port).to_string(),
                            },
                        })),
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, app: &str, addresses: &[&str]) -> Workload {
        Workload {
            name: name.into(),
            spiffe_id: format!("spiffe://example.org/ns/demo/sa/{app}"),
            namespace: Some("demo".into()),
            labels: [("app".to_string(), app.to_string())].into_iter().collect(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ..Workload::default()
        }
    }

    #[test]
    fn a_cluster_replaces_every_node_at_once_so_an_address_can_move_between_nodes() {
        let mut r = Registry::new("example.org");
        let nodes = |a: &str, b: &str| {
            BTreeMap::from([
                ("a".to_string(), vec![workload("web", "web", &[a])]),
                ("b".to_string(), vec![workload("db", "db", &[b])]),
            ])
        };
        let (changed, refused) = r.replace_nodes(nodes("10.0.0.1", "10.0.0.2")).expect("ok");
        assert!(changed && refused.is_empty(), "{refused:?}");
        // The two pods' addresses swap in one update: neither is refused as the other node's.
        let (changed, refused) = r.replace_nodes(nodes("10.0.0.2", "10.0.0.1")).expect("ok");
        assert!(changed && refused.is_empty(), "{refused:?}");
        let (changed, _) = r.replace_nodes(nodes("10.0.0.2", "10.0.0.1")).expect("ok");
        assert!(!changed, "the same again");
        let (changed, _) = r.replace_nodes(BTreeMap::new()).expect("ok");
        assert!(changed);
        assert!(r.ipcache_resources().is_empty(), "every pod gone");
    }

    #[test]
    fn workload_resources_carry_the_pods_uid_namespace_labels_and_named_ports() {
        let mut r = Registry::new("example.org");
        let mut pod = workload("web", "web", &["10.0.0.1"]);
        pod.pod_uid = "uid-1".into();
        pod.namespace_labels = [("team".to_string(), "a".to_string())]
            .into_iter()
            .collect();
        pod.ports = vec![
            ward_proto::NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: String::new(),
            },
            ward_proto::NamedPort {
                name: "Bad_Name".into(),
                port: 53,
                protocol: "UDP".into(),
            },
        ];
        let (_, refused) = r.report("a", vec![pod]).expect("ok");
        assert_eq!(
            refused.len(),
            1,
            "the bad port is refused, not the pod: {refused:?}"
        );
        let resources = r.workload_resources("a");
        let Some(Body::Workload(w)) = &resources["uid-1"].body else {
            panic!("a workload")
        };
        assert_eq!(w.ports.len(), 1);
        assert_eq!(
            (w.ports[0].protocol.as_str(), w.ports[0].port),
            ("TCP", 8080)
        );
        assert_eq!(w.namespace_labels["team"], "a");
        let infos = r.workload_infos();
        assert_eq!(infos["a"][0].namespace_labels["team"], "a");
        assert_eq!(infos["a"][0].ports[0].name, "http");
        let key = identity::key(
            &w.spiffe_id,
            w.namespace.as_deref(),
            &w.labels.clone().into_iter().collect(),
        );
        let Some(Body::Identity(i)) = &r.identity_resources()[&key].body else {
            panic!("an identity")
        };
        assert_eq!(i.namespace_labels["team"], "a");
        assert!(r.workload_resources("b").is_empty());
    }

    #[test]
    fn allocation_matches_the_agents_hash_and_never_moves() {
        let mut r = Registry::new("example.org");
        let id = r.allocate("spiffe://x/a");
        assert_eq!(id, identity::preferred("spiffe://x/a"));
        let restored = Registry::from_json("example.org", &r.to_json()).expect("round trip");
        let mut restored = restored;
        assert_eq!(restored.allocate("spiffe://x/a"), id);
        assert_ne!(restored.allocate("spiffe://x/b"), id);
    }

    #[test]
    fn collisions_probe_to_the_next_free_number() {
        let mut r = Registry::new("example.org");
        let id = r.allocate("spiffe://x/a");
        // Force a collision by marking the hash slot of a new ID as taken.
        let slot_b = identity::preferred("spiffe://x/b");
        r.taken.insert(slot_b);
        let b = r.allocate("spiffe://x/b");
        assert_ne!(b, slot_b);
        assert_ne!(b, id);
        assert!(identity::is_workload(b));
    }

    #[test]
    fn reports_build_identities_and_the_ip_cache_of_all_nodes() {
        let mut r = Registry::new("example.org");
        let (changed, refusals) = r
            .report("a", vec![workload("web", "web", &["10.0.0.1", "fd00::1"])])
            .expect("report");
        assert!(changed && refusals.is_empty(), "{refusals:?}");
        r.report("b", vec![workload("db", "db", &["10.0.0.2"])])
            .expect("report");
        let ids = r.identity_resources();
        assert_eq!(ids.len(), 2);
        let cache = r.ipcache_resources();
        assert_eq!(
            cache.keys().collect::<Vec<_>>(),
            ["10.0.0.1", "10.0.0.2", "fd00::1"]
        );
        let (changed, _) = r
            .report("a", vec![workload("web", "web", &["10.0.0.1", "fd00::1"])])
            .expect("report");
        assert!(!changed, "the same report changes nothing");
        r.report("a", vec![]).expect("report");
        assert_eq!(
            r.ipcache_resources().len(),
            1,
            "node a's addresses are gone"
        );
    }

    #[test]
    fn a_node_cannot_take_another_nodes_address_and_other_labels_are_another_identity() {
        let mut r = Registry::new("example.org");
        r.report("a", vec![workload("web", "web", &["10.0.0.1"])])
            .expect("report");
        let mut relabelled = workload("web-canary", "web", &["10.0.0.9"]);
        relabelled.labels.insert("track".into(), "canary".into());
        let (_, refusals) = r
            .report(
                "b",
                vec![
                    workload("thief", "thief", &["10.0.0.1", "10.0.0.3"]),
                    relabelled,
                ],
            )
            .expect("report");
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert!(refusals[0]
            .reason
            .contains("belongs to a workload of node \"a\""));
        // One SPIFFE ID, two label sets: two identities, each with its own labels and number.
        let identities: Vec<Identity> = r
            .identity_resources()
            .into_values()
            .filter_map(|r| match r.body {
                Some(Body::Identity(i)) if i.spiffe_id.ends_with("/sa/web") => Some(i),
                _ => None,
            })
            .collect();
        assert_eq!(identities.len(), 2, "{identities:?}");
        assert_ne!(identities[0].identity, identities[1].identity);
        assert_ne!(identities[0].labels, identities[1].labels);
        let cache = r.ipcache_resources();
        let Some(Body::Ipcache(entry)) = &cache["10.0.0.1"].body else {
            panic!("an IP cache entry")
        };
        assert_eq!(entry.node, "a", "the address stays with its first owner");
        assert!(
            cache.contains_key("10.0.0.3"),
            "the thief's own address is kept"
        );
        let number = |address: &str| match &cache[address].body {
            Some(Body::Ipcache(entry)) => entry.identity,
            _ => panic!("an IP cache entry"),
        };
        assert_ne!(number("10.0.0.9"), number("10.0.0.1"), "the canary's own");
    }

    #[test]
    fn a_node_unseen_for_its_lease_leaves_the_ip_cache_unless_connected() {
        let mut r = Registry::new("example.org");
        let start = Instant::now();
        let lease = Duration::from_secs(60);
        r.report("a", vec![workload("web", "web", &["10.0.0.1"])])
            .expect("report");
        r.report("b", vec![workload("db", "db", &["10.0.0.2"])])
            .expect("report");
        r.touch("a", start);
        r.touch("b", start);
        let none = BTreeSet::new();
        assert!(r.expire(start + lease / 2, lease, &none).is_empty());
        let connected = BTreeSet::from(["a".to_string()]);
        assert_eq!(r.expire(start + lease, lease, &connected), ["b"]);
        assert_eq!(
            r.ipcache_resources().keys().collect::<Vec<_>>(),
            ["10.0.0.1"],
            "node b's address is gone, connected node a's stays however old"
        );
        let web = r.allocate("spiffe://example.org/ns/demo/sa/db");
        assert_eq!(
            web,
            identity::preferred("spiffe://example.org/ns/demo/sa/db"),
            "the identity stays allocated"
        );
        let restored = Registry::from_json("example.org", &r.to_json()).expect("round trip");
        let mut restored = restored;
        assert!(
            restored
                .expire(Instant::now(), lease, &BTreeSet::new())
                .is_empty(),
            "a restarted control plane gives every node a full lease"
        );
    }

    #[test]
    fn ip_cache_entries_carry_their_nodes_tunnel_address() {
        let mut r = Registry::new("example.org");
        r.report("a", vec![workload("web", "web", &["10.0.0.1", "fd00::1"])])
            .expect("report");
        r.report("b", vec![workload("db", "db", &["10.0.0.2"])])
            .expect("report");
        assert!(r.set_tunnel("a", "10.0.0.10:4430"));
        assert!(!r.set_tunnel("a", "10.0.0.10:4430"));
        let tunnels = |r: &Registry| -> Vec<(String, String, String)> {
            r.ipcache_resources()
                .values()
                .map(|res| match &res.body {
                    Some(Body::Ipcache(e)) => (e.address.clone(), e.node.clone(), e.tunnel.clone()),
                    _ => panic!("an IP cache entry"),
                })
                .collect()
        };
        assert_eq!(
            tunnels(&r),
            [
                ("10.0.0.1".into(), "a".into(), "10.0.0.10:4430".into()),
                ("10.0.0.2".into(), "b".into(), String::new()),
                ("fd00::1".into(), "a".into(), "10.0.0.10:4430".into()),
            ]
        );
        let restored = Registry::from_json("example.org", &r.to_json()).expect("round trip");
        assert_eq!(tunnels(&restored), tunnels(&r), "persisted");
        assert_eq!(restored.tunnel("a"), Some("10.0.0.10:4430"));
        assert!(r.set_tunnel("a", ""), "no tunnel any more");
        assert_eq!(r.tunnel("a"), None);

        // A node that expires takes its tunnel address along.
        r.set_tunnel("b", "10.0.0.20:4430");
        let start = Instant::now();
        r.touch("a", start);
        r.touch("b", start);
        let lease = Duration::from_secs(1);
        assert_eq!(
            r.expire(start + lease, lease, &BTreeSet::from(["a".to_string()])),
            ["b"]
        );
        assert_eq!(r.tunnel("b"), None);
        assert!(!r.to_json().contains("10.0.0.20"));
    }

    #[test]
    fn a_registry_written_before_tunnels_still_loads() {
        let old = r#"{"identities": {"spiffe://example.org/web": 300},
            "nodes": {"a": [{"name": "web", "spiffeId": "spiffe://example.org/web",
                             "addresses": ["10.0.0.1"]}]}}"#;
        let r = Registry::from_json("example.org", old).expect("an older file loads");
        let cache = r.ipcache_resources();
        let Some(Body::Ipcache(entry)) = &cache["10.0.0.1"].body else {
            panic!("an IP cache entry")
        };
        assert_eq!((entry.node.as_str(), entry.tunnel.as_str()), ("a", ""));
        assert!(
            !r.to_json().contains("tunnels"),
            "nothing new written without tunnels"
        );
    }

    #[test]
    fn malformed_workloads_are_refused_one_by_one() {
        let mut r = Registry::new("example.org");
        let mut foreign = workload("foreign", "x", &[]);
        foreign.spiffe_id = "spiffe://other.org/x".into();
        let bad_address = workload("bad", "bad", &["not-an-ip"]);
        let many = workload(
            "many",
            "many",
            &vec!["10.1.1.1"; MAX_ADDRESSES_PER_WORKLOAD + 1],
        );
        let (_, refusals) = r
            .report(
                "a",
                vec![
                    foreign,
                    bad_address,
                    many,
                    workload("ok", "ok", &["10.0.0.5"]),
                ],
            )
            .expect("report");
        assert_eq!(refusals.len(), 3, "{refusals:?}");
        assert_eq!(
            r.identity_resources().len(),
            2,
            "ok and bad (without its address)"
        );
        let too_many = (0..=MAX_WORKLOADS_PER_NODE)
            .map(|i| workload(&format!("w{i}"), "w", &[]))
            .collect();
        assert!(matches!(
            r.report("a", too_many),
            Err(ReportError::TooManyWorkloads { .. })
        ));
    }

    #[test]
    fn a_shared_registry_numbers_only_what_the_store_gave_and_refuses_contradictions() {
        let mut r = Registry::new("x");
        r.share_allocation();
        let report = vec![Workload {
            name: "a".into(),
            spiffe_id: "spiffe://x/a".into(),
            addresses: vec!["10.0.0.1".into()],
            ..Workload::default()
        }];
        let missing = r.missing_identities(&report);
        assert_eq!(missing, ["spiffe://x/a"]);
        let (_, refusals) = r.report("n", report.clone()).expect("report");
        assert_eq!(refusals.len(), 1, "no number from the store yet");
        assert!(r.nodes().next().is_none());

        assert_eq!(r.adopt_identity("spiffe://x/a", 4242), Ok(true));
        assert_eq!(r.adopt_identity("spiffe://x/a", 4242), Ok(false));
        assert!(
            r.adopt_identity("spiffe://x/a", 4243).is_err(),
            "one key, two numbers"
        );
        assert!(
            r.adopt_identity("spiffe://x/b", 4242).is_err(),
            "one number, two keys"
        );
        let (changed, refusals) = r.report("n", report).expect("report");
        assert!(changed && refusals.is_empty());
        assert_eq!(r.identity_resources().len(), 1);

        // Another replica's record of another node: its address is kept off if this node has it.
        let mut record = r.node_record("n");
        record.workloads[0].name = "other".into();
        let (changed, refusals) = r.set_node_record("m", Some(record.clone()));
        assert!(!changed && refusals.len() == 1, "{refusals:?}");
        record.workloads[0].addresses = vec!["10.0.0.2".parse().expect("address")];
        let (changed, refusals) = r.set_node_record("m", Some(record));
        assert!(changed && refusals.is_empty());
        assert_eq!(r.ipcache_resources().len(), 2);
        let (changed, _) = r.set_node_record("m", None);
        assert!(
            changed && r.nodes().all(|(n, _)| n != "m"),
            "deleted by the store"
        );
    }
}
