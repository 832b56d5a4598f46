//! The state every stream serves from: the resource sets the same for every agent, the workload registry, and which
//! stream currently speaks for which node.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;
use ward_proto::{resource::Body, Resource, ResourceType, TrustBundle, Workload};

use crate::{
    policy_set::{ClusterDocument, ReadSet},
    registry::{Refusal, Registry, ReportError},
    resources::{Delta, ResourceSet, Version},
};

struct Sets {
    policy: ResourceSet,
    identity: ResourceSet,
    ipcache: ResourceSet,
    trust_bundle: ResourceSet,
    /// The cluster's Services ([`Hub::set_services`]); not served until first set.
    services: ResourceSet,
}

impl Sets {
    fn get(&self, kind: ResourceType) -> Option<&ResourceSet> {
        match kind {
            ResourceType::Policy => Some(&self.policy),
            ResourceType::Identity => Some(&self.identity),
            ResourceType::Ipcache => Some(&self.ipcache),
            ResourceType::TrustBundle => Some(&self.trust_bundle),
            ResourceType::Service => Some(&self.services),
            ResourceType::Workload | ResourceType::Unspecified => None,
        }
    }
}

struct State {
    sets: Sets,
    /// The control plane reads a cluster ([`Hub::follow_cluster`]): the cluster, not the agents'
    /// reports, says which workloads run where, and nodes do not expire.
    follows_cluster: bool,
    /// Set once the cluster is first listed ([`Hub::set_cluster_workloads`]): each node's
    /// WORKLOAD set (created when first needed, empty until the node has pods). Until then
    /// agents keep the pods they hold.
    cluster: Option<BTreeMap<String, ResourceSet>>,
    /// Each node's host-network pods (WORKLOAD resources by pod UID): no identity of their own,
    /// so not in the registry.
    host_pods: BTreeMap<String, BTreeMap<String, Resource>>,
    /// What each node's agent last reported of its workloads' own tunnel listeners (workload
    /// name → port), applied to the workloads the cluster places there.
    tunnel_ports: BTreeMap<String, BTreeMap<String, u16>>,
    /// Nodes revoked (`ward-control revoke --node`): no stream, renewal, workload certificate or
    /// join for them.
    revoked_nodes: BTreeSet<String>,
    epoch: u64,
    /// The policies the POLICY set serves.
    policies: Arc<ward_policy::PolicySet>,
    registry: Registry,
    /// The serials (canonical form) in the TRUST_BUNDLE's `revoked_serials`.
    revoked: BTreeSet<String>,
    /// The policy documents read from the cluster, served with the policy directory's.
    cluster_documents: Vec<ClusterDocument>,
}

/// What [`Hub::set_revoked`] changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationChange {
    pub added: usize,
    pub removed: usize,
    pub total: usize,
    pub version: Option<Version>,
}

fn trust_bundle(pem: &str, revoked: &BTreeSet<String>) -> BTreeMap<String, Resource> {
    let bundle = Resource {
        name: "ca".into(),
        body: Some(Body::TrustBundle(TrustBundle {
            pem: pem.into(),
            revoked_serials: revoked.iter().cloned().collect(),
        })),
    };
    BTreeMap::from([("ca".to_string(), bundle)])
}

pub struct Hub {
    state: Mutex<State>,
    trust_bundle_pem: String,
    /// Bumped whenever any set's version changes; every stream watches it.
    changed: watch::Sender<u64>,
    /// Bumped whenever the registry changes; the persister watches it.
    registry_changed: watch::Sender<u64>,
    sessions: Mutex<HashMap<String, (u64, watch::Sender<bool>)>>,
    next_session: AtomicU64,
    /// Set once at shutdown ([`Hub::close`]): every stream ends.
    closing: watch::Sender<bool>,
    /// The policy history, when kept ([`Hub::keep_history`]).
    history: Mutex<Option<crate::history::Writer>>,
    /// The POLICY version each node's agent said it enforces (its Hello, then each ACK), since
    /// this process started; bumps `status_changed`.
    enforced: Mutex<BTreeMap<String, Option<String>>>,
    /// What the nodes of the shared store's records enforce (history versions), by node.
    enforced_elsewhere: Mutex<BTreeMap<String, Option<u64>>>,
    status_changed: watch::Sender<u64>,
    /// The store shared with other replicas, when there are any ([`Hub::share`]).
    store: std::sync::OnceLock<crate::etcd_store::EtcdStore>,
    /// Set while this replica cannot reach the shared store: it serves no stream then, rather
    /// than stale or conflicting state ([`crate::replication`]).
    cut_off: watch::Sender<bool>,
    /// What each source revokes (the revocation file, the shared store); the union is served.
    revocation_sources: Mutex<BTreeMap<&'static str, crate::revocation::Revocations>>,
}

/// A node seen since the start: whether it has a stream, and the POLICY version it enforces.
pub struct Enforcing {
    pub node: String,
    pub connected: bool,
    /// The POLICY version its agent acknowledged to this replica.
    pub policy: Option<String>,
    /// The node is known from the shared store, not from a stream to this replica: another
    /// replica holds its stream, or held it less than a node lease ago.
    pub elsewhere: bool,
    /// The history version its agent acknowledged to that replica.
    pub history_version: Option<u64>,
}

/// Ends a stream when a newer stream of the same node registers.
pub struct SessionGuard<'a> {
    hub: &'a Hub,
    node: String,
    id: u64,
    pub replaced: watch::Receiver<bool>,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        let mut sessions = self.hub.sessions.lock().expect("sessions lock poisoned");
        if sessions
            .get(&self.node)
            .is_some_and(|(id, _)| *id == self.id)
        {
            sessions.remove(&self.node);
        }
        drop(sessions);
        // The lease runs from the end of the node's last stream.
        self.hub.lock().registry.touch(&self.node, Instant::now());
        Hub::bump(&self.hub.status_changed);
    }
}

impl Hub {
    /// A hub serving `registry` and the trust bundle at once, and no policy until
    /// [`Hub::set_policies`] is first called.
    pub fn new(registry: Registry, trust_bundle_pem: &str, epoch: u64) -> Self {
        let mut sets = Sets {
            policy: ResourceSet::new(ResourceType::Policy, epoch),
            identity: ResourceSet::new(ResourceType::Identity, epoch),
            ipcache: ResourceSet::new(ResourceType::Ipcache, epoch),
            trust_bundle: ResourceSet::new(ResourceType::TrustBundle, epoch),
            services: ResourceSet::new(ResourceType::Service, epoch),
        };
        sets.identity.replace_all(registry.identity_resources());
        sets.ipcache.replace_all(registry.ipcache_resources());
        let revoked = BTreeSet::new();
        sets.trust_bundle
            .replace_all(trust_bundle(trust_bundle_pem, &revoked));
        Hub {
            state: Mutex::new(State {
                sets,
                follows_cluster: false,
                cluster: None,
                host_pods: BTreeMap::new(),
                tunnel_ports: BTreeMap::new(),
                revoked_nodes: BTreeSet::new(),
                epoch,
                policies: Arc::default(),
                registry,
                revoked,
                cluster_documents: Vec::new(),
            }),
            trust_bundle_pem: trust_bundle_pem.into(),
            changed: watch::Sender::new(0),
            registry_changed: watch::Sender::new(0),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            closing: watch::Sender::new(false),
            history: Mutex::new(None),
            enforced: Mutex::new(BTreeMap::new()),
            enforced_elsewhere: Mutex::new(BTreeMap::new()),
            status_changed: watch::Sender::new(0),
            store: std::sync::OnceLock::new(),
            cut_off: watch::Sender::new(false),
            revocation_sources: Mutex::new(BTreeMap::new()),
        }
    }

    /// What `source` revokes now.
    pub fn revocations_of(&self, source: &'static str) -> crate::revocation::Revocations {
        self.revocation_sources
            .lock()
            .expect("revocation sources lock poisoned")
            .get(source)
            .cloned()
            .unwrap_or_default()
    }

    /// Records what `source` revokes now; returns what every source revokes together.
    pub fn revocations_from(
        &self,
        source: &'static str,
        revocations: crate::revocation::Revocations,
    ) -> crate::revocation::Revocations {
        let mut sources = self
            .revocation_sources
            .lock()
            .expect("revocation sources lock poisoned");
        sources.insert(source, revocations);
        let mut all = crate::revocation::Revocations::default();
        for r in sources.values() {
            all.serials.extend(r.serials.iter().cloned());
            all.nodes.extend(r.nodes.iter().cloned());
        }
        all
    }

    /// Whether this replica is cut off from the shared store.
    pub fn is_cut_off(&self) -> bool {
        *self.cut_off.borrow()
    }

    /// Marks this replica cut off from the shared store (every stream ends, and new ones are
    /// refused, until it is reachable again) or not.
    pub fn set_cut_off(&self, cut_off: bool) {
        self.cut_off.send_replace(cut_off);
    }

    /// Completes once this replica is cut off from the shared store.
    pub async fn cut_off(&self) {
        let mut cut_off = self.cut_off.subscribe();
        // The sender lives as long as the hub, which outlives this borrow.
        let _ = cut_off.wait_for(|cut_off| *cut_off).await;
    }

    /// The nodes whose workloads are registered.
    pub fn registered_nodes(&self) -> BTreeSet<String> {
        self.lock()
            .registry
            .nodes()
            .map(|(node, _)| node.to_owned())
            .collect()
    }

    /// From now on identity numbers come from `store`, shared with other replicas, and nodes
    /// expire by the store's leases ([`crate::replication`]).
    pub fn share(&self, store: crate::etcd_store::EtcdStore) {
        self.lock().registry.share_allocation();
        let _ = self.store.set(store);
    }

    /// The store shared with other replicas, if any.
    pub fn store(&self) -> Option<&crate::etcd_store::EtcdStore> {
        self.store.get()
    }

    /// Gets from the shared store (if any) the numbers of `workloads`' identities that have
    /// none yet, so that [`Hub::report`] or [`Hub::set_cluster_workloads`] can register them.
    pub async fn allocate_shared<'a>(
        &self,
        workloads: impl IntoIterator<Item = &'a Workload>,
    ) -> Result<(), crate::etcd_store::StoreError> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        let (missing, mut taken) = {
            let state = self.lock();
            (
                state.registry.missing_identities(workloads),
                state.registry.taken(),
            )
        };
        if missing.is_empty() {
            return Ok(());
        }
        let numbers = store.allocate(&missing, &mut taken).await?;
        self.adopt_identities(numbers);
        Ok(())
    }

    /// Adopts numbers the shared store holds; one that contradicts what is known is logged and
    /// left out.
    pub fn adopt_identities(&self, numbers: BTreeMap<String, u32>) {
        let mut state = self.lock();
        let mut changed = false;
        for (key, number) in numbers {
            match state.registry.adopt_identity(&key, number) {
                Ok(new) => changed |= new,
                Err(reason) => {
                    tracing::error!(%reason, "identity in the shared store refused")
                }
            }
        }
        if changed {
            self.registry_changed_locked(state);
        }
    }

    /// Applies a node record another replica stored (`None`: deleted); returns the workloads
    /// left out.
    pub fn apply_node_record(
        &self,
        node: &str,
        record: Option<crate::etcd_store::NodeRecord>,
    ) -> Vec<Refusal> {
        let enforces = record.as_ref().map(|r| r.enforces);
        let moved = {
            let mut elsewhere = self
                .enforced_elsewhere
                .lock()
                .expect("enforced lock poisoned");
            match enforces {
                Some(enforces) => elsewhere.insert(node.to_owned(), enforces) != Some(enforces),
                None => elsewhere.remove(node).is_some(),
            }
        };
        if moved {
            Self::bump(&self.status_changed);
        }
        let mut state = self.lock();
        if state.follows_cluster {
            return Vec::new();
        }
        let (changed, refusals) = state.registry.set_node_record(node, record);
        if changed {
            self.registry_changed_locked(state);
        }
        refusals
    }

    /// What `node` reported, and the history version it enforces, as the shared store keeps
    /// them.
    pub fn node_record(&self, node: &str) -> crate::etcd_store::NodeRecord {
        let mut record = self.lock().registry.node_record(node);
        record.enforces = self.enforced_history_version(node).flatten();
        record
    }

    /// Whether `node` acknowledged a POLICY version whose history number is not known yet (the
    /// shared history appends it a moment later).
    pub fn enforces_unnumbered(&self, node: &str) -> bool {
        matches!(self.enforced_history_version(node), Some(None))
    }

    /// The history number of the POLICY version `node` acknowledged to this replica: `None`
    /// when it acknowledged none (or no history is kept), `Some(None)` while it is not numbered.
    fn enforced_history_version(&self, node: &str) -> Option<Option<u64>> {
        let policy = self
            .enforced
            .lock()
            .expect("enforced lock poisoned")
            .get(node)
            .cloned()
            .flatten()?;
        self.with_history(|w| w.version_of(&policy))
    }

    /// Whether the cluster, not the agents, says which workloads run where.
    pub fn follows_cluster(&self) -> bool {
        self.lock().follows_cluster
    }

    /// Records that `node`'s agent enforces POLICY `version` (`None`: nothing it said).
    pub fn note_enforced(&self, node: &str, version: Option<String>) {
        self.enforced
            .lock()
            .expect("enforced lock poisoned")
            .insert(node.to_owned(), version);
        Self::bump(&self.status_changed);
    }

    /// Wakes on a change of what nodes enforce, of their streams, or of what is served.
    pub fn subscribe_status(&self) -> (watch::Receiver<u64>, watch::Receiver<u64>) {
        (self.status_changed.subscribe(), self.changed.subscribe())
    }

    /// The POLICY version served, and for each node seen since the start: whether it has a
    /// stream and the POLICY version it enforces.
    pub fn node_status(&self) -> (Option<String>, Vec<Enforcing>) {
        let served = self.version(ResourceType::Policy).map(|v| v.to_string());
        let connected = self.connected_nodes();
        let mut nodes: BTreeMap<String, Enforcing> = self
            .enforced
            .lock()
            .expect("enforced lock poisoned")
            .iter()
            .map(|(node, version)| {
                let status = Enforcing {
                    node: node.clone(),
                    connected: connected.contains(node),
                    policy: version.clone(),
                    elsewhere: false,
                    history_version: None,
                };
                (node.clone(), status)
            })
            .collect();
        // A node whose stream another replica holds: what that replica stored.
        let elsewhere = self
            .enforced_elsewhere
            .lock()
            .expect("enforced lock poisoned")
            .clone();
        for (node, version) in elsewhere {
            if !connected.contains(&node) {
                let status = Enforcing {
                    node: node.clone(),
                    connected: false,
                    policy: None,
                    elsewhere: true,
                    history_version: version,
                };
                nodes.insert(node, status);
            }
        }
        (served, nodes.into_values().collect())
    }

    /// Records every policy set served from now on with `writer`.
    pub fn keep_history(&self, writer: crate::history::Writer) {
        *self.history.lock().expect("history lock poisoned") = Some(writer);
    }

    /// Runs `f` on the history writer, if a history is kept.
    pub fn with_history<R>(&self, f: impl FnOnce(&mut crate::history::Writer) -> R) -> Option<R> {
        self.history
            .lock()
            .expect("history lock poisoned")
            .as_mut()
            .map(f)
    }

    /// Ends every agent stream (now and any opened later) with `UNAVAILABLE`: the control plane
    /// is shutting down, and agents move on to reconnect.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Completes once [`Hub::close`] was called.
    /// Whether [`Hub::close`] was called (the process is shutting down).
    pub fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    pub async fn closed(&self) {
        let mut closing = self.closing.subscribe();
        // The sender lives as long as the hub, which outlives this borrow.
        let _ = closing.wait_for(|closing| *closing).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("hub lock poisoned")
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn subscribe_registry(&self) -> watch::Receiver<u64> {
        self.registry_changed.subscribe()
    }

    fn bump(sender: &watch::Sender<u64>) {
        sender.send_modify(|g| *g += 1);
    }

    /// Serves `policies` from now on (checked by the caller: see [`crate::policy_set`]). Returns
    /// the new version if it changed.
    pub fn set_policies(&self, policies: ReadSet) -> Option<Version> {
        let mut state = self.lock();
        state.policies = Arc::new(policies.set);
        if !state.sets.policy.replace_all(policies.resources) {
            return None;
        }
        let version = state.sets.policy.version();
        drop(state);
        Self::bump(&self.changed);
        version
    }

    /// Serves `services` (SERVICE resources by name, checked by the caller: see
    /// [`crate::service_resources`]) to every agent from now on. Returns the new version if it
    /// changed.
    pub fn set_services(&self, services: BTreeMap<String, Resource>) -> Option<Version> {
        let mut state = self.lock();
        if !state.sets.services.replace_all(services) {
            return None;
        }
        let version = state.sets.services.version();
        drop(state);
        Self::bump(&self.changed);
        version
    }

    /// The policy documents read from the cluster, which the next read of the policy set adds.
    pub fn cluster_documents(&self) -> Vec<ClusterDocument> {
        self.lock().cluster_documents.clone()
    }

    pub fn set_cluster_documents(&self, documents: Vec<ClusterDocument>) {
        self.lock().cluster_documents = documents;
    }

    /// Serves `revoked` (canonical serials) in the trust bundle from now on. Returns what changed,
    /// `None` if nothing did.
    pub fn set_revoked(&self, revoked: BTreeSet<String>) -> Option<RevocationChange> {
        let mut state = self.lock();
        if state.revoked == revoked {
            return None;
        }
        let added = revoked.difference(&state.revoked).count();
        let removed = state.revoked.difference(&revoked).count();
        let total = revoked.len();
        let bundle = trust_bundle(&self.trust_bundle_pem, &revoked);
        state.revoked = revoked;
        state.sets.trust_bundle.replace_all(bundle);
        let version = state.sets.trust_bundle.version();
        drop(state);
        Self::bump(&self.changed);
        Some(RevocationChange {
            added,
            removed,
            total,
            version,
        })
    }

    /// Revokes `nodes` from now on (and only them): their streams end, and their workloads leave
    /// the registry (unless the cluster says where workloads run). Returns the nodes newly revoked.
    pub fn set_revoked_nodes(&self, nodes: BTreeSet<String>) -> Vec<String> {
        let mut state = self.lock();
        if state.revoked_nodes == nodes {
            return Vec::new();
        }
        let added: Vec<String> = nodes.difference(&state.revoked_nodes).cloned().collect();
        state.revoked_nodes = nodes;
        let mut removed = false;
        if !state.follows_cluster {
            for node in &added {
                removed |= state.registry.remove_node(node);
            }
        }
        if removed {
            self.registry_changed_locked(state);
        } else {
            drop(state);
        }
        // Wakes every stream, so a revoked node's ends now.
        Self::bump(&self.changed);
        added
    }

    pub fn node_revoked(&self, node: &str) -> bool {
        self.lock().revoked_nodes.contains(node)
    }

    /// The serials the trust bundle lists as revoked.
    pub fn revoked(&self) -> BTreeSet<String> {
        self.lock().revoked.clone()
    }

    pub fn version(&self, kind: ResourceType) -> Option<Version> {
        self.lock().sets.get(kind).and_then(ResourceSet::version)
    }

    pub fn len(&self, kind: ResourceType) -> usize {
        self.lock().sets.get(kind).map_or(0, ResourceSet::len)
    }

    /// The policies served now, and every node's workloads as the policy compiler sees them.
    pub fn policies_and_workloads(
        &self,
    ) -> (
        Arc<ward_policy::PolicySet>,
        BTreeMap<String, Vec<ward_policy::WorkloadInfo>>,
    ) {
        let state = self.lock();
        (state.policies.clone(), state.registry.workload_infos())
    }

    /// Every node's workloads as the policy compiler sees them, and the registry's generation
    /// (see [`Hub::registry_generation`]).
    pub fn workload_infos(&self) -> (BTreeMap<String, Vec<ward_policy::WorkloadInfo>>, u64) {
        let state = self.lock();
        let generation = *self.registry_changed.borrow();
        (state.registry.workload_infos(), generation)
    }

    /// Wakes whoever follows registry changes (the check of the served policy set, the
    /// persister) as if the registry had changed.
    pub fn recheck_registry(&self) {
        Self::bump(&self.registry_changed);
    }

    /// Counts the registry's changes.
    pub fn registry_generation(&self) -> u64 {
        *self.registry_changed.borrow()
    }

    /// Registers what `node` reports; see [`Registry::report`]. A control plane that reads a
    /// cluster takes the workloads from there and registers no report.
    pub fn report(
        &self,
        node: &str,
        workloads: Vec<Workload>,
    ) -> Result<Vec<Refusal>, ReportError> {
        let mut state = self.lock();
        if state.follows_cluster {
            state.registry.touch(node, Instant::now());
            // Only the agent knows which pods it has opened tunnel listeners in.
            let ports: BTreeMap<String, u16> = workloads
                .iter()
                .filter_map(|w| Some((w.name.clone(), u16::try_from(w.tunnel_port).ok()?)))
                .filter(|(_, port)| *port != 0)
                .collect();
            if state.tunnel_ports.get(node) != Some(&ports) {
                let changed = state.registry.set_tunnel_ports(node, &ports);
                state.tunnel_ports.insert(node.into(), ports);
                if changed {
                    self.registry_changed_locked(state);
                }
            }
            return Ok(Vec::new());
        }
        let (changed, refusals) = state.registry.report(node, workloads)?;
        state.registry.touch(node, Instant::now());
        if changed {
            self.registry_changed_locked(state);
        }
        Ok(refusals)
    }

    /// From now on the cluster says which workloads run where: agents' reports are not
    /// registered and nodes do not expire (a node's pods leave when the cluster deletes them).
    /// Until the cluster is listed, the registry read at start is served.
    pub fn follow_cluster(&self) {
        self.lock().follows_cluster = true;
    }

    /// Makes `nodes` (node → its pods, as the cluster schedules them) every node's workloads,
    /// and each node's WORKLOAD set. Host-network pods are in the WORKLOAD sets only. Returns the
    /// workloads refused, by node.
    pub fn set_cluster_workloads(
        &self,
        nodes: BTreeMap<String, Vec<Workload>>,
    ) -> Result<Vec<(String, Refusal)>, ReportError> {
        let mut pods = BTreeMap::new();
        let mut host_pods: BTreeMap<String, BTreeMap<String, Resource>> = BTreeMap::new();
        for (node, workloads) in nodes {
            let (host, own): (Vec<Workload>, Vec<Workload>) =
                workloads.into_iter().partition(|w| w.host_network);
            for w in host {
                let resource = Resource {
                    name: w.pod_uid.clone(),
                    body: Some(Body::Workload(w)),
                };
                let of_node = host_pods.entry(node.clone()).or_default();
                of_node.insert(resource.name.clone(), resource);
            }
            pods.insert(node, own);
        }
        let mut state = self.lock();
        for (node, workloads) in &mut pods {
            let ports = state.tunnel_ports.get(node);
            for w in workloads {
                w.tunnel_port = ports
                    .and_then(|p| p.get(&w.name))
                    .map_or(0, |port| u32::from(*port));
            }
        }
        state.follows_cluster = true;
        let (mut changed, refusals) = state.registry.replace_nodes(pods)?;
        let epoch = state.epoch;
        state.host_pods = host_pods;
        let State {
            cluster,
            registry,
            host_pods,
            ..
        } = &mut *state;
        let sets = cluster.get_or_insert_with(BTreeMap::new);
        let known: BTreeSet<String> = registry
            .nodes()
            .map(|(n, _)| n.to_string())
            .chain(sets.keys().cloned())
            .chain(host_pods.keys().cloned())
            .collect();
        for node in known {
            let set = sets
                .entry(node.clone())
                .or_insert_with(|| ResourceSet::new(ResourceType::Workload, epoch));
            let mut resources = registry.workload_resources(&node);
            resources.extend(host_pods.get(&node).cloned().unwrap_or_default());
            changed |= set.replace_all(resources);
        }
        if changed {
            self.registry_changed_locked(state);
            Self::bump(&self.changed);
        }
        Ok(refusals)
    }

    /// Records the tunnel address `node` announced in its Hello (checked by the session); a
    /// change reaches every agent as an IPCACHE update of that node's addresses. Returns whether
    /// it changed.
    pub fn set_tunnel(&self, node: &str, tunnel: &str) -> bool {
        let mut state = self.lock();
        let changed = state.registry.set_tunnel(node, tunnel);
        if changed {
            self.registry_changed_locked(state);
        }
        changed
    }

    /// Derives IDENTITY and IPCACHE again after the registry changed, and wakes whoever watches.
    fn registry_changed_locked(&self, mut state: std::sync::MutexGuard<'_, State>) {
        let identities = state.registry.identity_resources();
        let ipcache = state.registry.ipcache_resources();
        let a = state.sets.identity.replace_all(identities);
        let b = state.sets.ipcache.replace_all(ipcache);
        drop(state);
        Self::bump(&self.registry_changed);
        if a || b {
            Self::bump(&self.changed);
        }
    }

    /// Removes the workloads of nodes without a stream for `lease` or longer; see
    /// [`Registry::expire`]. Returns the nodes removed.
    pub fn expire_nodes(&self, lease: Duration) -> Vec<String> {
        let connected = self.connected_nodes();
        let mut state = self.lock();
        // With a shared store, a node's record expires by its lease there (see
        // [`crate::replication`]): another replica may hold its stream.
        if state.follows_cluster || self.store.get().is_some() {
            return Vec::new();
        }
        let gone = state.registry.expire(Instant::now(), lease, &connected);
        if !gone.is_empty() {
            self.registry_changed_locked(state);
        }
        gone
    }

    /// Whether `node`'s last report holds a workload with `spiffe_id`.
    pub fn node_reported(&self, node: &str, spiffe_id: &str) -> bool {
        self.lock()
            .registry
            .nodes()
            .any(|(n, workloads)| n == node && workloads.iter().any(|w| w.spiffe_id == spiffe_id))
    }

    pub fn registry_json(&self) -> String {
        self.lock().registry.to_json()
    }

    /// For each type, what `node`'s agent, holding `held`, must receive.
    pub fn deltas(
        &self,
        node: &str,
        held: &BTreeMap<ResourceType, Option<String>>,
    ) -> Vec<(ResourceType, Delta)> {
        let mut state = self.lock();
        let epoch = state.epoch;
        if let Some(sets) = &mut state.cluster {
            // A node without pods yet holds an empty set, so its agent learns it has none.
            sets.entry(node.to_string()).or_insert_with(|| {
                let mut set = ResourceSet::new(ResourceType::Workload, epoch);
                set.replace_all(BTreeMap::new());
                set
            });
        }
        ResourceType::ALL
            .into_iter()
            .filter_map(|kind| {
                let set = match kind {
                    ResourceType::Workload => state.cluster.as_ref()?.get(node)?,
                    kind => state.sets.get(kind)?,
                };
                let delta = set.diff(held.get(&kind).and_then(|v| v.as_deref()))?;
                Some((kind, delta))
            })
            .collect()
    }

    /// Makes the calling stream the one that speaks for `node`, ending the previous one.
    pub fn register_session(&self, node: &str) -> SessionGuard<'_> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.lock().registry.touch(node, Instant::now());
        let (tx, rx) = watch::channel(false);
        let previous = self
            .sessions
            .lock()
            .expect("sessions lock poisoned")
            .insert(node.into(), (id, tx));
        if let Some((_, previous)) = previous {
            let _ = previous.send(true);
        }
        SessionGuard {
            hub: self,
            node: node.into(),
            id,
            replaced: rx,
        }
    }

    /// The nodes with a stream now.
    pub fn connected_nodes(&self) -> BTreeSet<String> {
        self.sessions
            .lock()
            .expect("sessions lock poisoned")
            .keys()
            .cloned()
            .collect()
    }

    pub fn sessions(&self) -> usize {
        self.sessions.lock().expect("sessions lock poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::new(Registry::new("example.org"), "PEM", 1)
    }

    #[test]
    fn a_new_agent_gets_everything_but_policy_until_policy_is_read() {
        let hub = hub();
        let kinds: Vec<ResourceType> = hub
            .deltas("a", &BTreeMap::new())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            kinds,
            [
                ResourceType::TrustBundle,
                ResourceType::Identity,
                ResourceType::Ipcache
            ]
        );
        hub.set_policies(ReadSet::default())
            .expect("first set is a change");
        assert_eq!(hub.deltas("a", &BTreeMap::new()).len(), 4);
    }

    #[test]
    fn reports_change_identities_and_ip_cache_and_wake_streams() {
        let hub = hub();
        let mut changes = hub.subscribe();
        let workload = Workload {
            name: "web".into(),
            spiffe_id: "spiffe://example.org/web".into(),
            addresses: vec!["10.0.0.1".into()],
            ..Workload::default()
        };
        hub.report("a", vec![workload.clone()]).expect("report");
        assert!(changes.has_changed().expect("hub alive"));
        changes.mark_unchanged();
        assert_eq!(hub.len(ResourceType::Ipcache), 1);
        hub.report("a", vec![workload]).expect("same report");
        assert!(
            !changes.has_changed().expect("hub alive"),
            "nothing changed"
        );
    }

    #[test]
    fn nodes_without_a_stream_expire_after_their_lease_and_wake_streams() {
        let hub = hub();
        let workload = |name: &str, address: &str| Workload {
            name: name.into(),
            spiffe_id: format!("spiffe://example.org/{name}"),
            addresses: vec![address.into()],
            ..Workload::default()
        };
        hub.report("a", vec![workload("web", "10.0.0.1")])
            .expect("report");
        hub.report("b", vec![workload("db", "10.0.0.2")])
            .expect("report");
        let session_a = hub.register_session("a");
        let mut changes = hub.subscribe();
        changes.mark_unchanged();
        assert!(hub.expire_nodes(Duration::from_secs(3600)).is_empty());
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(hub.expire_nodes(Duration::from_millis(10)), ["b"]);
        assert!(changes.has_changed().expect("hub alive"));
        assert_eq!(hub.len(ResourceType::Ipcache), 1, "a has a stream");
        drop(session_a);
        assert!(
            hub.expire_nodes(Duration::from_millis(10)).is_empty(),
            "the lease runs from the end of the stream"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(hub.expire_nodes(Duration::from_millis(10)), ["a"]);
        assert_eq!(hub.len(ResourceType::Ipcache), 0);
    }

    #[test]
    fn revocations_are_a_new_trust_bundle_version() {
        let hub = hub();
        let before = hub.version(ResourceType::TrustBundle).expect("ready");
        let mut changes = hub.subscribe();
        changes.mark_unchanged();
        let change = hub
            .set_revoked(BTreeSet::from(["4a:0b".to_string(), "cd".to_string()]))
            .expect("a change");
        assert_eq!((change.added, change.removed, change.total), (2, 0, 2));
        assert!(changes.has_changed().expect("hub alive"));
        let after = change.version.expect("ready");
        assert_ne!(after, before);
        let held = BTreeMap::from([(ResourceType::TrustBundle, Some(before.to_string()))]);
        let deltas = hub.deltas("a", &held);
        let (_, delta) = deltas
            .iter()
            .find(|(k, _)| *k == ResourceType::TrustBundle)
            .expect("the trust bundle changed");
        let Some(Body::TrustBundle(bundle)) = &delta.resources[0].body else {
            panic!("a trust bundle")
        };
        assert_eq!(bundle.pem, "PEM", "the CA is still there");
        assert_eq!(bundle.revoked_serials, ["4a:0b", "cd"]);
        assert_eq!(
            hub.set_revoked(BTreeSet::from(["4a:0b".to_string(), "cd".to_string()])),
            None
        );
        let change = hub
            .set_revoked(BTreeSet::from(["ef".to_string()]))
            .expect("a change");
        assert_eq!((change.added, change.removed, change.total), (1, 2, 1));
    }

    #[test]
    fn a_tunnel_address_change_updates_the_nodes_ip_cache_entries() {
        let hub = hub();
        let workload = Workload {
            name: "web".into(),
            spiffe_id: "spiffe://example.org/web".into(),
            addresses: vec!["10.0.0.1".into()],
            ..Workload::default()
        };
        hub.report("a", vec![workload]).expect("report");
        let before = hub.version(ResourceType::Ipcache).expect("ready");
        let mut registry = hub.subscribe_registry();
        registry.mark_unchanged();
        assert!(hub.set_tunnel("a", "10.0.0.10:4430"));
        assert!(registry.has_changed().expect("hub alive"), "persisted");
        assert!(!hub.set_tunnel("a", "10.0.0.10:4430"), "the same again");
        let held = BTreeMap::from([(ResourceType::Ipcache, Some(before.to_string()))]);
        let deltas = hub.deltas("a", &held);
        let (_, delta) = deltas
            .iter()
            .find(|(k, _)| *k == ResourceType::Ipcache)
            .expect("the IP cache changed");
        assert!(!delta.replace);
        let Some(Body::Ipcache(entry)) = &delta.resources[0].body else {
            panic!("an IP cache entry")
        };
        assert_eq!(
            (entry.node.as_str(), entry.tunnel.as_str()),
            ("a", "10.0.0.10:4430")
        );
        assert!(hub.registry_json().contains("10.0.0.10:4430"));
    }

    #[test]
    fn following_a_cluster_that_is_not_listed_yet_keeps_the_registry_as_read() {
        let hub = hub();
        let workload = Workload {
            name: "shop/web".into(),
            spiffe_id: "spiffe://example.org/ns/shop/sa/web".into(),
            addresses: vec!["10.0.0.1".into()],
            pod_uid: "u1".into(),
            ..Workload::default()
        };
        hub.report("a", vec![workload]).expect("as read at start");
        hub.follow_cluster();
        hub.report("a", Vec::new()).expect("report");
        assert_eq!(
            hub.len(ResourceType::Ipcache),
            1,
            "a report changes nothing"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(hub.expire_nodes(Duration::from_millis(1)).is_empty());
        assert!(
            !hub.deltas("a", &BTreeMap::new())
                .iter()
                .any(|(k, _)| *k == ResourceType::Workload),
            "no WORKLOAD set before the first listing: agents keep the pods they hold"
        );
    }

    #[test]
    fn a_cluster_gives_each_node_its_own_pods_and_takes_over_from_reports() {
        let hub = hub();
        let pod = |name: &str, uid: &str, address: &str| Workload {
            name: name.into(),
            spiffe_id: format!("spiffe://example.org/ns/shop/sa/{name}"),
            addresses: vec![address.into()],
            pod_uid: uid.into(),
            ..Workload::default()
        };
        assert!(
            !hub.deltas("a", &BTreeMap::new())
                .iter()
                .any(|(k, _)| *k == ResourceType::Workload),
            "no WORKLOAD type until the cluster is read"
        );
        let host = Workload {
            host_network: true,
            ..pod("proxy", "u3", "10.0.0.3")
        };
        hub.set_cluster_workloads(BTreeMap::from([
            ("a".to_string(), vec![pod("web", "u1", "10.0.0.1")]),
            ("b".to_string(), vec![pod("db", "u2", "10.0.0.2"), host]),
        ]))
        .expect("accepted");
        let workloads_of = |node: &str| -> Vec<String> {
            hub.deltas(node, &BTreeMap::new())
                .into_iter()
                .filter(|(k, _)| *k == ResourceType::Workload)
                .flat_map(|(_, d)| d.resources.into_iter().map(|r| r.name.clone()))
                .collect()
        };
        assert_eq!(workloads_of("a"), ["u1"]);
        assert_eq!(workloads_of("b"), ["u2", "u3"]);
        assert!(
            workloads_of("c").is_empty(),
            "a node without pods gets an empty set"
        );
        assert!(hub
            .deltas("c", &BTreeMap::new())
            .iter()
            .any(|(k, _)| *k == ResourceType::Workload));
        assert_eq!(
            hub.len(ResourceType::Ipcache),
            2,
            "every node's pods but the host-network one"
        );
        assert_eq!(hub.len(ResourceType::Identity), 2);
        // An agent's report changes nothing, and nodes without streams do not expire.
        hub.report("a", Vec::new()).expect("report");
        assert_eq!(hub.len(ResourceType::Ipcache), 2);
        std::thread::sleep(Duration::from_millis(5));
        assert!(hub.expire_nodes(Duration::from_millis(1)).is_empty());
        assert!(hub.node_reported("a", "spiffe://example.org/ns/shop/sa/web"));
    }

    fn service(name: &str, backend: &str) -> (String, Resource) {
        let key = format!("shop/{name}");
        let resource = Resource {
            name: key.clone(),
            body: Some(Body::Service(ward_proto::Service {
                namespace: "shop".into(),
                name: name.into(),
                cluster_ips: vec!["10.96.0.10".into()],
                ports: vec![ward_proto::ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: "TCP".into(),
                    backends: vec![ward_proto::ServiceBackend {
                        address: backend.into(),
                        port: 8080,
                        pod: String::new(),
                    }],
                }],
                client_ip_affinity: false,
            })),
        };
        (key, resource)
    }

    #[test]
    fn services_are_the_same_for_every_agent_and_only_changes_are_sent() {
        let hub = hub();
        let has_services = |node: &str| {
            hub.deltas(node, &BTreeMap::new())
                .iter()
                .any(|(k, _)| *k == ResourceType::Service)
        };
        assert!(
            !has_services("a"),
            "no SERVICE set until the Services are read"
        );
        let mut changes = hub.subscribe();
        changes.mark_unchanged();
        let first = hub
            .set_services(BTreeMap::from([
                service("web", "10.1.0.5"),
                service("db", "10.1.0.6"),
            ]))
            .expect("the first set is a change");
        assert!(changes.has_changed().expect("hub alive"));
        for node in ["a", "b"] {
            let deltas = hub.deltas(node, &BTreeMap::new());
            let (_, delta) = deltas
                .iter()
                .find(|(k, _)| *k == ResourceType::Service)
                .expect("every agent gets the Services");
            assert!(delta.replace);
            let names: Vec<&str> = delta.resources.iter().map(|r| r.name.as_str()).collect();
            assert_eq!(names, ["shop/db", "shop/web"]);
        }
        hub.set_services(BTreeMap::from([service("web", "10.1.0.7")]))
            .expect("a change");
        let held = BTreeMap::from([(ResourceType::Service, Some(first.to_string()))]);
        let deltas = hub.deltas("a", &held);
        let (_, delta) = deltas
            .iter()
            .find(|(k, _)| *k == ResourceType::Service)
            .expect("behind");
        assert!(!delta.replace);
        assert_eq!(delta.resources.len(), 1, "only web changed");
        assert_eq!(delta.removed, ["shop/db"]);
        assert_eq!(
            hub.set_services(BTreeMap::from([service("web", "10.1.0.7")])),
            None,
            "the same again"
        );
        assert_eq!(hub.len(ResourceType::Service), 1);
    }

    #[test]
    fn a_newer_stream_of_a_node_replaces_the_older() {
        let hub = hub();
        let first = hub.register_session("a");
        assert!(!*first.replaced.borrow());
        let second = hub.register_session("a");
        assert!(*first.replaced.borrow(), "the first stream is told to end");
        drop(first);
        assert_eq!(
            hub.sessions(),
            1,
            "dropping the replaced stream keeps the newer one"
        );
        drop(second);
        assert_eq!(hub.sessions(), 0);
    }
}
