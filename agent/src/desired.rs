//! The desired state: what one configuration and its policy files, or, in control-plane mode,
//! the configuration and the control plane's state, say the kernel should enforce. Building it
//! compiles the policy; nothing here touches the kernel.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use agent_common::IDENTITY_HOST;
use anyhow::Context as _;

use crate::{
    cgroups::CgroupTree,
    config::{Config, HostAddresses, RunFlags, WorkloadConfig},
    control::{RemoteState, ReportedWorkload},
    events::Names,
    identity,
    kernel::{self, services::ServiceTable},
    placement::Placement,
    policy::{self, Compiled, RuleIds, WorkloadInfo},
};

/// Reads the configuration file, with the command line's control-plane flags over the file's.
pub fn load_config(file: &Path, flags: &RunFlags) -> anyhow::Result<Config> {
    let mut config = Config::load(file)?;
    config.apply_run_flags(flags)?;
    Ok(config)
}

/// Everything derived from one configuration and its policy files, or, in control-plane mode,
/// from the configuration and the control plane's state.
pub struct Desired {
    pub config: Config,
    /// This node's workloads.
    pub workloads: Vec<WorkloadInfo>,
    /// Other nodes' workloads (control-plane mode): identities that rules may name as peers.
    pub peers: Vec<WorkloadInfo>,
    pub compiled: Arc<Compiled>,
    pub addresses: Arc<BTreeMap<[u8; 16], u32>>,
    /// The cluster's Services (control-plane mode with a control plane that reads a cluster).
    pub services: Arc<ServiceTable>,
    /// UIDs of this node's host-network pods (`workloads: fromControlPlane`) and of the agent's
    /// own pod: their cgroups are the host's.
    pub host_pods: Vec<String>,
}

impl Desired {
    /// `remote` is the control plane's state to enforce (in control-plane mode; `None` until
    /// the first update, which means no policy).
    pub fn build(
        config: Config,
        remote: Option<&RemoteState>,
        rule_ids: &mut RuleIds,
        documents: &mut policy::DocumentCache,
    ) -> anyhow::Result<Self> {
        let mut config = config;
        let mut host_pods = if config.workloads_from_control_plane {
            add_cluster_workloads(&mut config, remote)
        } else {
            Vec::new()
        };
        host_pods.extend(config.own_pod_uid.clone());
        let mut workloads = identity::workload_infos(&config);
        let mut peers = Vec::new();
        let set = match (&config.control_plane, remote) {
            (None, _) => policy::load(&config.policies)?,
            (Some(_), None) => policy::PolicySet::default(),
            (Some(_), Some(state)) => {
                peers = remote_identities(state, &mut workloads);
                policy::parse_documents_cached(
                    documents,
                    state
                        .policies
                        .iter()
                        .map(|(name, yaml)| (name.as_str(), yaml.as_str())),
                )?
            }
        };
        let compiled = policy::compile_with_peers(&set, &workloads, &peers, rule_ids)?;
        let mut addresses = address_identities(&config, &workloads)?;
        if let Some(state) = remote {
            for (address, identity) in &state.ipcache {
                // This host's own addresses and this node's workloads win.
                addresses
                    .entry(kernel::mapped(*address))
                    .or_insert(*identity);
            }
        }
        if config.tunnel.is_none() {
            if let Some(rule) = compiled.rules.values().find(|r| r.mtls) {
                tracing::warn!(policy = %rule.policy, rule = %rule.rule, "mtls: required, but this agent runs no tunnel (tunnel: in the configuration, with controlPlane:); connections that need it are refused");
            }
        }
        let services = match (&config.control_plane, remote) {
            (Some(_), Some(state)) => ServiceTable::new(&state.services),
            (Some(_), None) => ServiceTable::default(),
            (None, _) => ServiceTable::new(&config.services),
        };
        Ok(Desired {
            config,
            workloads,
            peers,
            compiled: Arc::new(compiled),
            addresses: Arc::new(addresses),
            services: Arc::new(services),
            host_pods,
        })
    }

    /// What the kernel's generation maps are to hold.
    pub fn target(&self) -> kernel::Target<'_> {
        kernel::Target {
            compiled: &self.compiled,
            addresses: &self.addresses,
            services: &self.services,
        }
    }

    /// Names for verdict lines: this node's workloads, other nodes' by SPIFFE ID.
    pub fn names(&self) -> Names {
        let all: Vec<WorkloadInfo> = self.peers.iter().chain(&self.workloads).cloned().collect();
        Names::new(&self.compiled, &all, &self.services.names)
    }

    /// Each local workload with the cgroup directories of `tree` (below `root`) it runs in.
    pub fn placements(&self, tree: &CgroupTree, root: &Path) -> Vec<Placement> {
        let mut cgroups: BTreeMap<usize, Vec<PathBuf>> = BTreeMap::new();
        for path in tree.values() {
            if let Some(i) = identity::workload_of_cgroup(&self.config, path) {
                cgroups.entry(i).or_default().push(root.join(path));
            }
        }
        cgroups
            .into_iter()
            .filter_map(|(i, cgroups)| {
                let w = &self.workloads[i];
                Some(Placement {
                    workload: w.name.clone(),
                    spiffe_id: ward_tunnel::SpiffeId::parse(&w.spiffe_id).ok()?,
                    addresses: w.addresses.clone(),
                    cgroups,
                })
            })
            .collect()
    }

    /// cgroup id → identity for the cgroups of this node's workloads, and the host's identity
    /// for those of its host-network pods.
    pub fn cgroup_identities(&self, tree: &CgroupTree) -> BTreeMap<u64, u32> {
        tree.iter()
            .filter_map(
                |(id, path)| match identity::workload_of_cgroup(&self.config, path) {
                    Some(i) => Some((*id, self.workloads[i].identity)),
                    None => identity::in_pod_cgroup(&self.host_pods, path)
                        .then_some((*id, IDENTITY_HOST)),
                },
            )
            .collect()
    }
}

/// Gives this node's workloads the control plane's numbers for their identities (the same as
/// the local ones unless two keys collided) and returns every other identity as a peer, with the
/// addresses the IP cache gives it.
fn remote_identities(state: &RemoteState, workloads: &mut [WorkloadInfo]) -> Vec<WorkloadInfo> {
    let mut local: std::collections::HashMap<String, Vec<usize>> = Default::default();
    for (i, w) in workloads.iter().enumerate() {
        local.entry(w.key()).or_default().push(i);
    }
    let mut addresses: std::collections::HashMap<u32, Vec<IpAddr>> = Default::default();
    for (address, identity) in &state.ipcache {
        addresses.entry(*identity).or_default().push(*address);
    }
    let mut peers = Vec::new();
    for remote in &state.identities {
        if let Some(indices) = local.get(&remote.key()) {
            for &i in indices {
                workloads[i].identity = remote.identity;
            }
            continue;
        }
        peers.push(WorkloadInfo {
            identity: remote.identity,
            name: remote.spiffe_id.clone(),
            spiffe_id: remote.spiffe_id.clone(),
            namespace: remote.namespace.clone(),
            labels: remote.labels.clone(),
            namespace_labels: remote.namespace_labels.clone(),
            // Named ports resolve on the node of the workload that names them.
            ports: Vec::new(),
            addresses: addresses.remove(&remote.identity).unwrap_or_default(),
        });
    }
    peers
}

/// Adds this node's pods, as the control plane read them from the cluster, to the configured
/// workloads (matched to kubelet's pod cgroups by UID), and their namespaces' labels. Returns
/// the UIDs of the host-network pods, which are no workloads.
fn add_cluster_workloads(config: &mut Config, remote: Option<&RemoteState>) -> Vec<String> {
    // The configuration may be a previous build's, with the pods of then: a configuration with
    // `workloads: fromControlPlane` lists none of its own.
    config.workloads.clear();
    let Some(state) = remote else {
        return Vec::new();
    };
    let mut host_pods = Vec::new();
    for w in &state.workloads {
        if w.host_network {
            host_pods.push(w.pod_uid.clone());
            continue;
        }
        if let Some(namespace) = &w.namespace {
            config
                .namespaces
                .insert(namespace.clone(), w.namespace_labels.clone());
        }
        config.workloads.push(WorkloadConfig {
            name: w.name.clone(),
            spiffe_id: w.spiffe_id.clone(),
            namespace: w.namespace.clone(),
            labels: w.labels.clone(),
            cgroups: Vec::new(),
            systemd_units: Vec::new(),
            pod_uids: vec![w.pod_uid.clone()],
            addresses: w.addresses.clone(),
            ports: w.ports.clone(),
        });
    }
    host_pods
}

/// What this node reports to the control plane; `in_pod` names the workloads with tunnel
/// listeners of their own, and their port.
pub fn reported(
    workloads: &[WorkloadInfo],
    in_pod: &BTreeMap<String, u16>,
) -> Vec<ReportedWorkload> {
    workloads
        .iter()
        .map(|w| ReportedWorkload {
            name: w.name.clone(),
            spiffe_id: w.spiffe_id.clone(),
            namespace: w.namespace.clone(),
            labels: w.labels.clone(),
            addresses: w.addresses.clone(),
            tunnel_port: in_pod.get(&w.name).copied().unwrap_or(0),
        })
        .collect()
}

/// The IP cache: workload addresses name their workload; this host's own addresses name the host,
/// behind which the kernel tells workloads apart by their listening sockets.
fn address_identities(
    config: &Config,
    workloads: &[WorkloadInfo],
) -> anyhow::Result<BTreeMap<[u8; 16], u32>> {
    let host: Vec<IpAddr> = match &config.host_addresses {
        HostAddresses::List(list) => list.clone(),
        HostAddresses::Auto => nix::ifaddrs::getifaddrs()
            .context("listing this host's addresses")?
            .filter_map(|ifa| {
                let a = ifa.address?;
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect(),
    };
    let mut out: BTreeMap<[u8; 16], u32> = host
        .into_iter()
        .map(|a| (kernel::mapped(a), IDENTITY_HOST))
        .collect();
    for w in workloads {
        for a in &w.addresses {
            if out.get(&kernel::mapped(*a)) == Some(&IDENTITY_HOST) {
                tracing::warn!(workload = %w.name, address = %a, "address belongs to this host; the workload is told apart by its listening sockets instead");
                continue;
            }
            out.insert(kernel::mapped(*a), w.identity);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use agent_common::{DIRECTION_EGRESS, PROTO_TCP, VERDICT_ALLOW, VERDICT_DENY};

    use super::*;
    use crate::control::RemoteState;

    const CONFIG: &str = "trustDomain: x.test\nhostAddresses: [10.0.0.254]\ncontrolPlane: {address: '10.0.0.10:7443', nodeName: node-a, caFile: ca.pem, stateDir: /s}\nworkloads:\n  - {name: client, labels: {app: client}, addresses: [10.0.0.1]}\n";
    const EGRESS: &str = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: client-egress\nspec:\n  selector:\n    labels: {app: client}\n  egress:\n    - to: [{labels: {app: db}}]\n      ports: [{port: 5432}]\n";

    fn config() -> Config {
        Config::parse(Path::new("/etc/ward/ward.yaml"), CONFIG).expect("valid configuration")
    }

    fn identity(spiffe_id: &str, identity: u32, app: &str) -> crate::control::RemoteIdentity {
        crate::control::RemoteIdentity {
            spiffe_id: spiffe_id.into(),
            identity,
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            namespace: None,
            namespace_labels: BTreeMap::new(),
        }
    }

    fn state(policy: &str) -> RemoteState {
        let ip = |a: &str| a.parse::<IpAddr>().expect("address");
        RemoteState {
            policies: vec![("client-egress".into(), policy.into())],
            identities: vec![
                identity("spiffe://x.test/workload/client", 4242, "client"),
                identity("spiffe://x.test/workload/db", 777, "db"),
            ],
            ipcache: vec![
                (ip("10.0.0.1"), 4242),
                (ip("10.0.0.2"), 777),
                (ip("10.0.0.254"), 777),
            ],
            ..RemoteState::default()
        }
    }

    #[test]
    fn a_remote_state_gives_identities_peers_and_the_ip_cache() {
        let desired = Desired::build(
            config(),
            Some(&state(EGRESS)),
            &mut RuleIds::new(),
            &mut Default::default(),
        )
        .expect("compiles");
        assert_eq!(
            desired.workloads[0].identity, 4242,
            "the control plane's number"
        );
        assert_eq!(desired.peers.len(), 1);
        assert!(
            desired.peers[0]
                .addresses
                .contains(&"10.0.0.2".parse::<IpAddr>().expect("ip")),
            "a peer has its addresses from the IP cache, for CIDR rules"
        );
        let decide = |remote| {
            desired
                .compiled
                .decide(4242, remote, DIRECTION_EGRESS, PROTO_TCP, 5432)
                .verdict
        };
        assert_eq!(decide(777), VERDICT_ALLOW, "db on another node is a peer");
        assert_eq!(decide(778), VERDICT_DENY);
        let at = |a: &str| {
            desired
                .addresses
                .get(&kernel::mapped(a.parse().expect("ip")))
                .copied()
        };
        assert_eq!(at("10.0.0.2"), Some(777));
        assert_eq!(at("10.0.0.1"), Some(4242));
        assert_eq!(
            at("10.0.0.254"),
            Some(IDENTITY_HOST),
            "this host's address stays the host"
        );
    }

    #[test]
    fn a_remote_policy_that_does_not_compile_is_an_error_naming_it() {
        let bad = EGRESS.replace("ports:", "bogus: 1\n      ports:");
        let e = Desired::build(
            config(),
            Some(&state(&bad)),
            &mut RuleIds::new(),
            &mut Default::default(),
        )
        .err()
        .expect("refused");
        let text = format!("{e:#}");
        assert!(
            text.contains("client-egress") && text.contains("bogus"),
            "{text}"
        );
    }

    #[test]
    fn the_control_planes_pods_are_this_nodes_workloads_found_by_uid() {
        let text = CONFIG.replace(
            "workloads:\n  - {name: client, labels: {app: client}, addresses: [10.0.0.1]}\n",
            "workloads: fromControlPlane\n",
        );
        let config = Config::parse(Path::new("/etc/ward/ward.yaml"), &text).expect("valid");
        let mut state = state(EGRESS);
        state.workloads = vec![crate::control::RemoteWorkload {
            name: "shop/client".into(),
            pod_uid: "3f1c2a4e-aaaa-bbbb-cccc-0123456789ab".into(),
            spiffe_id: "spiffe://x.test/workload/client".into(),
            namespace: Some("shop".into()),
            namespace_labels: BTreeMap::from([("team".to_string(), "a".to_string())]),
            labels: BTreeMap::from([("app".to_string(), "client".to_string())]),
            addresses: vec!["10.0.0.1".parse().expect("ip")],
            ports: Vec::new(),
            host_network: false,
        }];
        state.workloads.push(crate::control::RemoteWorkload {
            name: "kube-system/proxy".into(),
            pod_uid: "00000000-1111-2222-3333-444444444444".into(),
            host_network: true,
            ..Default::default()
        });
        let desired = Desired::build(
            config,
            Some(&state),
            &mut RuleIds::new(),
            &mut Default::default(),
        )
        .expect("compiles");
        // The next update relabels the pod (and so names its identity with the new labels); it
        // is built from this build's configuration.
        state.workloads[0]
            .labels
            .insert("app".into(), "client-v2".into());
        state.identities[0].namespace = Some("shop".into());
        state.identities[0]
            .labels
            .insert("app".into(), "client-v2".into());
        let desired = Desired::build(
            desired.config.clone(),
            Some(&state),
            &mut RuleIds::new(),
            &mut Default::default(),
        )
        .expect("the pod is there once, with its new labels");
        assert_eq!(desired.workloads[0].labels["app"], "client-v2");
        assert_eq!(desired.workloads.len(), 1);
        assert_eq!(
            desired.workloads[0].identity, 4242,
            "the control plane's number"
        );
        assert_eq!(desired.workloads[0].namespace_labels["team"], "a");
        let tree = crate::cgroups::CgroupTree::from([
            (7, "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f1c2a4e_aaaa_bbbb_cccc_0123456789ab.slice/cri-containerd-1.scope".into()),
            (8, "kubepods/besteffort/pod00000000-aaaa-bbbb-cccc-0123456789ab/c".into()),
            (9, "kubepods/besteffort/pod00000000-1111-2222-3333-444444444444/c".into()),
        ]);
        assert_eq!(
            desired.cgroup_identities(&tree),
            BTreeMap::from([(7, 4242), (9, IDENTITY_HOST)]),
            "the pod's container, under the systemd driver; the host-network pod is the \
             host's; not another pod"
        );
    }

    #[test]
    fn control_plane_mode_without_a_state_has_no_policy() {
        let desired = Desired::build(config(), None, &mut RuleIds::new(), &mut Default::default())
            .expect("builds");
        assert!(desired.compiled.entries.is_empty());
        assert!(desired.peers.is_empty());
    }
}
