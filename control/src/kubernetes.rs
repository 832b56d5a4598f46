//! Reads a Kubernetes cluster (`ward-control --kubernetes`): one watch each for Namespaces, Pods,
//! `networking.k8s.io/v1` NetworkPolicies, ward's own Policies ([`crate::crd`]), Services and
//! `discovery.k8s.io/v1` EndpointSlices for the whole cluster, with kube-rs's watcher (which
//! resumes from the last resourceVersion and lists again after `410 Gone`).
//!
//! What the cluster says becomes the hub's state: every scheduled pod with addresses is a
//! workload of its node (SPIFFE ID `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`
//! and its labels, which together are its identity; its namespace's labels, its container
//! ports), served to that node's agent as WORKLOAD resources and to all as identities and the IP
//! cache; every NetworkPolicy and Policy is a POLICY resource next to the policy directory's. A
//! cluster without ward's CRD has no Policies, which is no failure. Every Service with a cluster IP
//! is a SERVICE resource served to all, its backends from its EndpointSlices
//! ([`crate::service_resources`]).
//!
//! Workloads and policies are not published before Namespaces, Pods, NetworkPolicies and Policies
//! are listed once, nor Services before Services and EndpointSlices are (a control plane whose
//! role may not read Services still serves workloads and policies). A watch that fails keeps what
//! it had: an API server that answers errors or drops watches never empties what agents enforce.
//! A relist replaces a kind's objects at once when it completes.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures_util::{stream::BoxStream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, ObjectReference, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    core::{ApiResource, DynamicObject},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        watcher, WatchStreamExt as _,
    },
    Api, Client, Resource, ResourceExt as _,
};
use ward_proto::{NamedPort, Workload};

use crate::{
    crd,
    hub::Hub,
    policy_set::ClusterDocument,
    service_resources::{self, Problem},
};

/// The source prefix of NetworkPolicy documents (`networkpolicies/<namespace>/<name>`).
const NETWORK_POLICIES: &str = "networkpolicies";

/// Quiet time after a change before the state is published, so a burst (a Deployment's pods, a
/// relist) is one update.
const SETTLE: Duration = Duration::from_millis(20);

/// Labels that controllers put on pods and that differ between the pods of one workload (one per
/// ReplicaSet, revision or index): left out of the identity so that the pods of one Deployment,
/// StatefulSet or Job share one (an identity is a SPIFFE ID with its namespace and labels: with
/// these, each rollout or each pod would be an identity of its own, and every agent's policy
/// would change with it). Policies cannot select by them.
pub const VOLATILE_LABELS: [&str; 7] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
];

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("reading the kubeconfig {file}: {source}")]
    Kubeconfig {
        file: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("finding the cluster (in-cluster service account or KUBECONFIG): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for the cluster in `kubeconfig`, or the one kube-rs infers (the pod's service
/// account in a cluster, else `KUBECONFIG` or `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubernetesError> {
    let config = match kubeconfig {
        Some(file) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(file).map_err(|source| {
                KubernetesError::Kubeconfig {
                    file: file.to_owned(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| KubernetesError::Kubeconfig {
                    file: file.to_owned(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// One kind's objects by `namespace/name`, and the relist in progress.
struct Objects<K> {
    live: BTreeMap<String, K>,
    relisting: Option<BTreeMap<String, K>>,
    listed: bool,
    /// The last watch error, logged once until the watch works again.
    failing: Option<String>,
}

impl<K: Resource> Objects<K> {
    fn new() -> Self {
        Objects {
            live: BTreeMap::new(),
            relisting: None,
            listed: false,
            failing: None,
        }
    }

    fn key(object: &K) -> String {
        match object.meta().namespace.as_deref() {
            Some(namespace) => format!(
                "{namespace}/{}",
                object.meta().name.as_deref().unwrap_or("")
            ),
            None => object.meta().name.clone().unwrap_or_default(),
        }
    }

    /// The resource does not exist in the cluster (a CRD not installed, or deleted): no
    /// objects, which is a complete listing. Logged once. Returns whether the objects changed.
    fn absent(&mut self, what: &str) -> bool {
        const ABSENT: &str = "absent";
        if self.failing.as_deref() != Some(ABSENT) {
            tracing::info!(
                kind = what,
                "the cluster does not serve this resource (its CRD is not installed): none"
            );
            self.failing = Some(ABSENT.into());
        }
        self.listed = true;
        self.relisting = None;
        let changed = !self.live.is_empty();
        self.live.clear();
        changed
    }

    /// Applies one watch event; returns whether the objects in force changed.
    fn apply(&mut self, what: &str, event: Result<watcher::Event<K>, watcher::Error>) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                // The watch's resourceVersion is older than the API server keeps: the watcher
                // lists again, and the objects in force stay until that list is complete.
                tracing::info!(
                    kind = what,
                    "Kubernetes watch expired (410 Gone); listing again"
                );
                return false;
            }
            Err(e) => {
                let text = e.to_string();
                if self.failing.as_ref() != Some(&text) {
                    tracing::warn!(kind = what, error = %text, "Kubernetes watch failed; retrying, and agents keep what they have");
                    self.failing = Some(text);
                }
                return false;
            }
        };
        if self.failing.take().is_some() {
            tracing::info!(kind = what, "Kubernetes watch works again");
        }
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                if let Some(relisting) = &mut self.relisting {
                    relisting.insert(Self::key(&object), object);
                }
                false
            }
            watcher::Event::InitDone => {
                if let Some(relisting) = self.relisting.take() {
                    self.live = relisting;
                }
                self.listed = true;
                true
            }
            watcher::Event::Apply(object) => {
                self.live.insert(Self::key(&object), object);
                true
            }
            watcher::Event::Delete(object) => self.live.remove(&Self::key(&object)).is_some(),
        }
    }
}

type WatchEvent<K> = Box<Result<watcher::Event<K>, watcher::Error>>;

enum Change {
    Namespace(WatchEvent<Namespace>),
    Pod(WatchEvent<Pod>),
    NetworkPolicy(WatchEvent<NetworkPolicy>),
    Policy(WatchEvent<DynamicObject>),
    Service(WatchEvent<DynamicObject>),
    EndpointSlice(WatchEvent<DynamicObject>),
}

fn watch<K>(client: &Client, wrap: fn(WatchEvent<K>) -> Change) -> BoxStream<'static, Change>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(move |event| wrap(Box::new(event)))
        .boxed()
}

/// A watch of objects kept untyped: ward's Policies (a custom resource), and kinds read one
/// object at a time so that one object kube cannot read fails alone
/// ([`service_resources::typed`]).
fn watch_untyped(
    client: &Client,
    resource: &ApiResource,
    wrap: fn(WatchEvent<DynamicObject>) -> Change,
) -> BoxStream<'static, Change> {
    let api = Api::<DynamicObject>::all_with(client.clone(), resource);
    watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |event| wrap(Box::new(event)))
        .boxed()
}

/// What the cluster holds, as the watches last reported it.
struct Cluster {
    namespaces: Objects<Namespace>,
    pods: Objects<Pod>,
    network_policies: Objects<NetworkPolicy>,
    policies: Objects<DynamicObject>,
    services: Objects<DynamicObject>,
    endpoint_slices: Objects<DynamicObject>,
    /// `services` and `endpoint_slices` read as their types.
    typed_services: Typed<Service>,
    typed_slices: Typed<EndpointSlice>,
}

impl Cluster {
    fn new() -> Self {
        Cluster {
            namespaces: Objects::new(),
            pods: Objects::new(),
            network_policies: Objects::new(),
            policies: Objects::new(),
            services: Objects::new(),
            endpoint_slices: Objects::new(),
            typed_services: Typed::default(),
            typed_slices: Typed::default(),
        }
    }

    fn services_listed(&self) -> bool {
        self.services.listed && self.endpoint_slices.listed
    }

    /// Every Service with a cluster IP as a SERVICE resource, and what was left out.
    fn services(&mut self) -> service_resources::Built {
        self.typed_services.refresh("Service", &self.services.live);
        self.typed_slices
            .refresh("EndpointSlice", &self.endpoint_slices.live);
        let mut built =
            service_resources::build(self.typed_services.read(), self.typed_slices.read());
        built.problems.extend(self.typed_services.unreadable());
        built.problems.extend(self.typed_slices.unreadable());
        built
    }

    fn listed(&self) -> bool {
        self.namespaces.listed
            && self.pods.listed
            && self.network_policies.listed
            && self.policies.listed
    }

    /// Each node's pods as workloads.
    fn workloads(&self, trust_domain: &str) -> BTreeMap<String, Vec<Workload>> {
        let mut nodes: BTreeMap<String, Vec<Workload>> = BTreeMap::new();
        for pod in self.pods.live.values() {
            let Some((node, workload)) = pod_workload(pod, trust_domain, |namespace| {
                self.namespaces
                    .live
                    .get(namespace)
                    .map(|n| n.labels().clone())
                    .unwrap_or_default()
            }) else {
                continue;
            };
            nodes.entry(node).or_default().push(workload);
        }
        nodes
    }

    /// Every NetworkPolicy and Policy as a policy document.
    fn documents(&self) -> Vec<ClusterDocument> {
        let network_policies =
            self.network_policies
                .live
                .iter()
                .map(|(key, policy)| ClusterDocument {
                    source: format!("{NETWORK_POLICIES}/{key}"),
                    yaml: network_policy_document(policy),
                    writer: last_writer(policy),
                });
        let policies = self
            .policies
            .live
            .iter()
            .map(|(key, policy)| ClusterDocument {
                source: format!("{}/{key}", crd::PLURAL),
                yaml: crd::document(policy),
                writer: last_writer(policy),
            });
        network_policies.chain(policies).collect()
    }

    /// The object a document's source names, as an Event's `regarding`.
    fn reference(&self, source: &str) -> Option<ObjectReference> {
        let (plural, key) = source.split_once('/')?;
        match plural {
            NETWORK_POLICIES => Some(self.network_policies.live.get(key)?.object_ref(&())),
            crd::PLURAL => Some(
                self.policies
                    .live
                    .get(key)?
                    .object_ref(&crd::api_resource()),
            ),
            _ => None,
        }
    }
}

/// Untyped objects read as `K` ([`service_resources::typed`]), each once per resourceVersion:
/// a publication reads again only the objects that changed, not the whole cluster.
struct Typed<K> {
    /// By key: the resourceVersion read, and what it read as.
    by_key: BTreeMap<String, (Option<String>, Result<K, Problem>)>,
}

impl<K> Default for Typed<K> {
    fn default() -> Self {
        Typed {
            by_key: BTreeMap::new(),
        }
    }
}

impl<K: serde::de::DeserializeOwned> Typed<K> {
    /// Follows `live`: reads what is new or changed, forgets what is gone.
    fn refresh(&mut self, kind: &'static str, live: &BTreeMap<String, DynamicObject>) {
        self.by_key.retain(|key, _| live.contains_key(key));
        for (key, object) in live {
            let version = &object.metadata.resource_version;
            let current = self
                .by_key
                .get(key)
                .is_some_and(|(read, _)| read.is_some() && read == version);
            if !current {
                let typed = service_resources::typed(kind, key, object);
                self.by_key.insert(key.clone(), (version.clone(), typed));
            }
        }
    }

    fn read(&self) -> impl Iterator<Item = &K> {
        self.by_key
            .values()
            .filter_map(|(_, typed)| typed.as_ref().ok())
    }

    /// A problem for each object that cannot be read as `K`.
    fn unreadable(&self) -> impl Iterator<Item = Problem> + '_ {
        self.by_key
            .values()
            .filter_map(|(_, typed)| typed.as_ref().err().cloned())
    }
}

/// The pod as a workload of its node; `None` for a pod that is not scheduled yet or has finished
/// (its addresses may already be another pod's). A pod that uses the node's network is marked
/// so, without addresses: its node's agent maps its cgroup to the host.
fn pod_workload(
    pod: &Pod,
    trust_domain: &str,
    namespace_labels: impl Fn(&str) -> BTreeMap<String, String>,
) -> Option<(String, Workload)> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let host_network = spec.host_network == Some(true);
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let namespace = pod.namespace().unwrap_or_else(|| "default".into());
    let service_account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut addresses: Vec<String> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.clone()).collect())
        .unwrap_or_default();
    if addresses.is_empty() {
        addresses.extend(status.and_then(|s| s.pod_ip.clone()));
    }
    if host_network {
        // The node's own addresses.
        addresses.clear();
    }
    let ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone()?,
                port: u32::try_from(p.container_port).ok()?,
                protocol: p.protocol.clone().unwrap_or_default(),
            })
        })
        .collect();
    let workload = Workload {
        name: format!("{namespace}/{}", pod.name_any()),
        spiffe_id: format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"),
        labels: pod
            .labels()
            .iter()
            .filter(|(k, _)| !VOLATILE_LABELS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        namespace_labels: namespace_labels(&namespace).into_iter().collect(),
        namespace: Some(namespace),
        addresses,
        pod_uid: pod.uid().unwrap_or_default(),
        ports,
        host_network,
        // The pod's agent reports it (in its own report), not the API.
        tunnel_port: 0,
    };
    Some((node, workload))
}

/// The NetworkPolicy as ward's loader reads one: its spec with only the name and namespace of its
/// metadata (the rest, managedFields above all, is the API server's bookkeeping).
fn network_policy_document(policy: &NetworkPolicy) -> String {
    let document = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": policy.name_any(),
            "namespace": policy.namespace().unwrap_or_else(|| "default".into()),
        },
        "spec": policy.spec,
    });
    serde_json::to_string_pretty(&document).expect("a NetworkPolicy serializes")
}

/// Follows the cluster until the watches end (never, short of a shutdown): publishes its
/// workloads to the hub and its NetworkPolicies to `publish_policies` after each settled burst
/// of changes, once every kind has been listed.
pub async fn follow(
    client: Client,
    hub: Arc<Hub>,
    trust_domain: String,
    publish_policies: impl Fn(Vec<ClusterDocument>) + Send + Sync + 'static,
) {
    let mut changes = futures_util::stream::select_all([
        watch::<Namespace>(&client, Change::Namespace),
        watch::<Pod>(&client, Change::Pod),
        watch::<NetworkPolicy>(&client, Change::NetworkPolicy),
        watch_untyped(&client, &crd::api_resource(), Change::Policy),
        watch_untyped(
            &client,
            &ApiResource::erase::<Service>(&()),
            Change::Service,
        ),
        watch_untyped(
            &client,
            &ApiResource::erase::<EndpointSlice>(&()),
            Change::EndpointSlice,
        ),
    ]);
    let mut cluster = Cluster::new();
    let publish_policies = Arc::new(publish_policies);
    let (mut workloads_dirty, mut policies_dirty) = (false, false);
    let (mut services_dirty, mut services_published) = (false, false);
    let mut service_problems = BTreeSet::new();
    let mut published_documents: Option<Vec<ClusterDocument>> = None;
    let mut checked = Checked::default();
    let mut refused_pods = BTreeSet::new();
    let recorder = Recorder::new(client.clone(), reporter());
    loop {
        let change = if workloads_dirty || policies_dirty || services_dirty {
            match tokio::time::timeout(SETTLE, changes.next()).await {
                Ok(change) => change,
                Err(_) => {
                    if services_dirty && cluster.services_listed() {
                        publish_services(&hub, cluster.services(), &mut service_problems);
                        (services_dirty, services_published) = (false, true);
                    }
                    if (workloads_dirty || policies_dirty) && cluster.listed() {
                        if workloads_dirty {
                            let nodes = cluster.workloads(&trust_domain);
                            publish_workloads(&hub, nodes, &mut refused_pods).await;
                        }
                        let (documents, refused) = checked.accepted(cluster.documents());
                        for refusal in refused {
                            report_refusal(&recorder, &cluster, refusal).await;
                        }
                        if policies_dirty && published_documents.as_ref() != Some(&documents) {
                            published_documents = Some(documents.clone());
                            let publish = publish_policies.clone();
                            let _ = tokio::task::spawn_blocking(move || publish(documents)).await;
                        }
                        (workloads_dirty, policies_dirty) = (false, false);
                    }
                    continue;
                }
            }
        } else {
            changes.next().await
        };
        let Some(change) = change else { return };
        match change {
            // Namespace labels are part of each pod's workload.
            Change::Namespace(e) => workloads_dirty |= cluster.namespaces.apply("Namespace", *e),
            Change::Pod(e) => workloads_dirty |= cluster.pods.apply("Pod", *e),
            Change::NetworkPolicy(e) => {
                policies_dirty |= cluster.network_policies.apply("NetworkPolicy", *e)
            }
            Change::Policy(e) => {
                policies_dirty |= match *e {
                    Err(e) if crd::not_installed(&e) => cluster.policies.absent("Policy"),
                    e => cluster.policies.apply("Policy", e),
                }
            }
            Change::Service(e) => services_dirty |= cluster.services.apply("Service", *e),
            Change::EndpointSlice(e) => {
                services_dirty |= cluster.endpoint_slices.apply("EndpointSlice", *e)
            }
        }
        if cluster.services_listed() && !services_published {
            // The first complete listing publishes, even no Services.
            services_dirty = true;
        }
        if cluster.listed() && published_documents.is_none() {
            // The first complete listing publishes both, even an empty cluster.
            (workloads_dirty, policies_dirty) = (true, true);
        }
    }
}

/// Who ward-control's Events say reported them: the pod's name when the Deployment gives it.
fn reporter() -> Reporter {
    Reporter {
        controller: "ward-control".into(),
        instance: std::env::var("POD_NAME").ok(),
    }
}

/// An object refused, and why (the check's diagnostics).
struct Refusal {
    source: String,
    note: String,
}

/// Tells the object's owners why it was refused: a Warning Event on the object, which
/// `kubectl describe` shows. A failure to post it is logged, nothing more.
async fn report_refusal(recorder: &Recorder, cluster: &Cluster, refusal: Refusal) {
    let Some(reference) = cluster.reference(&refusal.source) else {
        return;
    };
    // An Event's note holds at most 1 kB.
    let note: String = refusal.note.chars().take(1000).collect();
    let event = Event {
        type_: EventType::Warning,
        reason: "PolicyRefused".into(),
        note: Some(note),
        action: "Enforce".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        tracing::warn!(object = refusal.source, error = %e, "posting the refusal as an Event failed");
    }
}

/// The cluster's policy documents that passed the check on their own, so that an object that does
/// not compile changes nothing: a new one is left out, a changed one keeps its previous version.
#[derive(Default)]
struct Checked {
    /// By source: the last version that passed, with its writer.
    accepted: BTreeMap<String, ClusterDocument>,
    /// By source: the version refused, logged once.
    refused: BTreeMap<String, String>,
}

impl Checked {
    /// The documents to serve, and those newly refused (each version once).
    fn accepted(
        &mut self,
        documents: Vec<ClusterDocument>,
    ) -> (Vec<ClusterDocument>, Vec<Refusal>) {
        let mut refused = Vec::new();
        let current: BTreeMap<String, ClusterDocument> = documents
            .into_iter()
            .map(|d| (d.source.clone(), d))
            .collect();
        self.accepted
            .retain(|source, _| current.contains_key(source));
        self.refused
            .retain(|source, _| current.contains_key(source));
        for (source, document) in current {
            // Only the text decides: an object applied again unchanged keeps its version.
            if self.accepted.get(&source).map(|d| &d.yaml) == Some(&document.yaml) {
                continue;
            }
            match crate::policy_set::check_document(&document) {
                Ok(()) => {
                    self.refused.remove(&source);
                    self.accepted.insert(source, document);
                }
                Err(errors) => {
                    if self.refused.get(&document.source) != Some(&document.yaml) {
                        for error in &errors {
                            tracing::error!(object = document.source, %error, "NetworkPolicy refused");
                        }
                        let kept = if self.accepted.contains_key(&document.source) {
                            "its previous version stays in force"
                        } else {
                            "it is not enforced"
                        };
                        tracing::error!(
                            object = document.source,
                            errors = errors.len(),
                            "NetworkPolicy refused: {kept}"
                        );
                        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                        refused.push(Refusal {
                            source: document.source.clone(),
                            note: format!(
                                "ward refused this NetworkPolicy, {kept}: {}",
                                errors.join("; ")
                            ),
                        });
                        self.refused.insert(document.source, document.yaml);
                    }
                }
            }
        }
        (self.accepted.values().cloned().collect(), refused)
    }
}

/// An object's last writer: the manager of its most recent managed-fields entry.
fn last_writer(object: &impl kube::ResourceExt) -> Option<String> {
    object
        .managed_fields()
        .iter()
        .max_by(|a, b| a.time.cmp(&b.time))
        .and_then(|entry| entry.manager.clone())
}

/// Publishes the cluster's Services; what was left out is logged when first seen, not at every
/// publication. `logged` holds what was logged.
fn publish_services(hub: &Hub, built: service_resources::Built, logged: &mut BTreeSet<Problem>) {
    for problem in built.problems.difference(logged) {
        tracing::warn!(
            kind = problem.kind,
            object = problem.object,
            "SERVICE resources: {}",
            problem.what
        );
    }
    *logged = built.problems;
    let services = built.resources.len();
    if let Some(version) = hub.set_services(built.resources) {
        tracing::info!(services, %version, left_out = logged.len(), "cluster services updated");
    }
}

/// Publishes the cluster's workloads; a pod refused is logged when it is first refused (for that
/// reason), not at every publication. `refused` holds what was logged.
async fn publish_workloads(
    hub: &Hub,
    nodes: BTreeMap<String, Vec<Workload>>,
    refused: &mut BTreeSet<(String, String)>,
) {
    // With replicas, the numbers come from the store they share; a pod whose identity has none
    // (the store is unreachable) is refused below, and published with the next change.
    if let Err(e) = hub.allocate_shared(nodes.values().flatten()).await {
        tracing::error!(error = %e, "no identities from the shared store for the cluster's pods");
    }
    let pods: usize = nodes.values().map(Vec::len).sum();
    match hub.set_cluster_workloads(nodes) {
        Ok(refusals) => {
            let mut now = BTreeSet::new();
            for (node, refusal) in &refusals {
                let key = (refusal.workload.clone(), refusal.reason.clone());
                if !refused.contains(&key) {
                    tracing::warn!(
                        node,
                        pod = refusal.workload,
                        reason = refusal.reason,
                        "pod not enforced as a workload"
                    );
                }
                now.insert(key);
            }
            *refused = now;
            tracing::info!(pods, refused = refusals.len(), "cluster workloads updated");
        }
        Err(e) => tracing::error!(error = %e, "cluster workloads refused; the previous ones stay"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("a pod")
    }

    fn web() -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u1",
                         "labels": {"app": "web", "pod-template-hash": "abc"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080}, {"containerPort": 9090}]}]},
            "status": {"phase": "Running", "podIP": "10.1.0.5",
                       "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]},
        })
    }

    fn team(namespace: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("team".to_string(), format!("{namespace}-team"))])
    }

    #[test]
    fn a_pod_is_a_workload_of_its_node_with_its_service_accounts_identity() {
        let (node, w) = pod_workload(&pod(web()), "example.org", team).expect("a workload");
        assert_eq!(node, "node-a");
        assert_eq!(w.name, "shop/web-1");
        assert_eq!(w.spiffe_id, "spiffe://example.org/ns/shop/sa/default");
        assert_eq!(w.pod_uid, "u1");
        assert_eq!(w.addresses, ["10.1.0.5", "fd00::5"]);
        assert_eq!(
            w.labels.into_iter().collect::<Vec<_>>(),
            [("app".to_string(), "web".to_string())],
            "pod-template-hash is not part of the identity"
        );
        assert_eq!(w.namespace_labels["team"], "shop-team");
        assert_eq!(w.ports.len(), 1, "only named ports");
        assert_eq!((w.ports[0].name.as_str(), w.ports[0].port), ("http", 8080));
    }

    #[test]
    fn unscheduled_and_finished_pods_are_no_workloads_and_host_network_pods_the_nodes() {
        let mut unscheduled = web();
        unscheduled["spec"]["nodeName"] = serde_json::Value::Null;
        let mut finished = web();
        finished["status"]["phase"] = "Succeeded".into();
        for value in [unscheduled, finished] {
            assert!(pod_workload(&pod(value), "example.org", team).is_none());
        }
        let mut host = web();
        host["spec"]["hostNetwork"] = true.into();
        let (_, w) = pod_workload(&pod(host), "example.org", team).expect("the node's");
        assert!(
            w.host_network && w.addresses.is_empty(),
            "the node's addresses are not its own"
        );
        let mut no_ips = web();
        no_ips["status"] = serde_json::json!({"phase": "Pending"});
        let (_, w) = pod_workload(&pod(no_ips), "example.org", team).expect("scheduled");
        assert!(
            w.addresses.is_empty(),
            "a pod without IPs yet is still its node's workload"
        );
    }

    #[test]
    fn a_refused_object_keeps_its_previous_version_and_a_new_one_stays_out() {
        let good = ClusterDocument {
            source: "networkpolicies/shop/a".into(),
            yaml: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: shop}\nspec: {podSelector: {}}\n".into(),
            writer: Some("kubectl".into()),
        };
        let bad = |source: &str| {
            ClusterDocument {
            source: source.into(),
            yaml: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: shop}\nspec: {podSelector: {}, bogus: 1}\n".into(),
            writer: None,
        }
        };
        let mut checked = Checked::default();
        let (served, _) = checked.accepted(vec![good.clone()]);
        assert_eq!(served, std::slice::from_ref(&good));
        let both_bad = || vec![bad("networkpolicies/shop/a"), bad("networkpolicies/shop/b")];
        let (served, refused) = checked.accepted(both_bad());
        assert_eq!(
            served,
            [good],
            "the previous version stays; the new bad one stays out"
        );
        assert_eq!(refused.len(), 2);
        assert!(refused[0].note.contains("bogus"), "{}", refused[0].note);
        let (_, again) = checked.accepted(both_bad());
        assert!(again.is_empty(), "each refused version is reported once");
        let (served, _) = checked.accepted(Vec::new());
        assert!(served.is_empty(), "deleted objects go");
    }

    #[test]
    fn a_network_policy_document_keeps_only_its_name_and_namespace_of_the_metadata() {
        let policy: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop", "uid": "x", "resourceVersion": "5",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}},
        }))
        .expect("a NetworkPolicy");
        let text = network_policy_document(&policy);
        assert!(
            !text.contains("managedFields") && !text.contains("resourceVersion"),
            "{text}"
        );
        let document = ClusterDocument {
            source: "networkpolicies/shop/p".into(),
            yaml: text,
            writer: last_writer(&policy),
        };
        assert_eq!(document.writer.as_deref(), Some("kubectl"));
        crate::policy_set::check_document(&document).expect("ward reads it");
    }
}
