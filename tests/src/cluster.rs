//! Several "nodes" under one real control plane: each node is a network namespace with its own
//! `ward` agent, cgroup subtree and pin directory; `ward-control` runs in a namespace of its own
//! (the hub) holding the bridge that joins them. Every address lives inside the test's
//! namespaces only; `<n>` is the cluster's number.
//!
//! - Every address has an IPv6 twin ([`v6`]): `10.232.<n>.<h>` is also `fd00:232:<n>::<h>`
//!   (the bridge is a /64), a pod's `10.233.<n>.<p>` also `fd00:233:<n>::<p>`, routed alike; a
//!   pod's IPv6 default route is the link-local `fe80::1` on the node's side of its veth.
//! - Nodes: `10.232.<n>.0/24` on the bridge. The bridge is `.1` (where the control plane
//!   listens), node `i` (from 0) is host `10 * (i + 1)` and its extra addresses
//!   ([`Node::add_address`], for workloads sharing the node's namespace) follow it.
//! - Pods with a network namespace of their own ([`Cluster::pod_network`]), as on a real
//!   cluster: node `i`'s pods take the addresses of `10.233.<n>.<16 * (i + 1)>/28` after its
//!   network address, in order (node A's first pod is `10.233.<n>.17`, node B's
//!   `10.233.<n>.33`; at most 14 a node). Joined as Calico joins them: each pod has its address
//!   as a /32 on its `eth0` and a default route via the link-local gateway `169.254.1.1`, which
//!   the node's side of the veth answers ARP for by proxy; the node routes the /32 to that
//!   veth and forwards (and, from its first pod on, has a default route to the hub, which proxy
//!   ARP needs to answer for the gateway). The hub and the other nodes route the node's /28 via
//!   the node's address, so pods on different nodes reach each other across the bridge.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use ward_control::test_helpers::{ControlPlane, ControlPlaneOptions};

use crate::{Netns, Placement, TestCgroups, Ward, WardOptions, Workload};

/// The port ward-control listens on, in its own namespace.
pub const CONTROL_PORT: u16 = 7443;
/// The port of every node's tunnel listener in these tests.
pub const TUNNEL_PORT: u16 = 15008;
/// The log line ward writes once a control-plane state is in the kernel.
pub const APPLIED: &str = "control plane state applied";
const NODE_NAMES: [&str; 4] = ["node-a", "node-b", "node-c", "node-d"];

/// The IPv6 twin of a test cluster's IPv4 address: `10.232.<n>.<h>` → `fd00:232:<n>::<h>`,
/// `10.233.<n>.<p>` → `fd00:233:<n>:<p / 16>::<p>` (a /64 per node's pods), each number
/// written as the same digits in hex.
pub fn v6(address: IpAddr) -> Ipv6Addr {
    let IpAddr::V4(a) = address else {
        panic!("{address} is no IPv4 address of a test cluster")
    };
    let [_, range, subnet, host] = a.octets();
    let hex = |n: u8| u16::from_str_radix(&n.to_string(), 16).expect("decimal digits");
    let pods = if range == 233 {
        u16::from(host / 16)
    } else {
        0
    };
    Ipv6Addr::new(0xfd00, hex(range), hex(subnet), pods, 0, 0, 0, hex(host))
}

/// One node: its agent (while running), cgroups, pods' namespaces and namespace, dropped in that
/// order.
pub struct Node {
    ward: Option<Ward>,
    pub cgroups: TestCgroups,
    /// The network namespaces of its pods ([`Cluster::pod_network`]), the `n`th joined by
    /// veth `pod<n>`.
    pods: Vec<Netns>,
    pub netns: Netns,
    pub name: String,
    subnet: u8,
    host: u8,
    extra_addresses: u8,
    token_file: PathBuf,
    state_dir: PathBuf,
    config_extra: String,
}

impl Node {
    /// The node's own address (on its veth).
    pub fn address(&self) -> IpAddr {
        IpAddr::from([10, 232, self.subnet, self.host])
    }

    /// The node's pod range, `10.233.<n>.<16 * (i + 1)>/28`.
    fn pod_range(&self) -> String {
        format!("10.233.{}.{}/28", self.subnet, self.pod_base())
    }

    /// The IPv6 twin of the pod range ([`v6`]): a /64.
    fn pod_range6(&self) -> String {
        let base = v6(IpAddr::from([10, 233, self.subnet, self.pod_base()]));
        format!(
            "{}/64",
            Ipv6Addr::from(u128::from(base) & !u128::from(u64::MAX))
        )
    }

    /// The range's first address (its network address, no pod's).
    fn pod_base(&self) -> u8 {
        16 * (self.host / 10)
    }

    /// Adds another address to the node's veth (for a workload of its own) and returns it.
    pub fn add_address(&mut self) -> IpAddr {
        self.extra_addresses += 1;
        assert!(
            self.extra_addresses < 10,
            "at most 9 extra addresses a node"
        );
        let address = IpAddr::from([10, 232, self.subnet, self.host + self.extra_addresses]);
        self.netns
            .ip(&["addr", "add", &format!("{address}/24"), "dev", "veth0"]);
        address
    }

    /// Where this node's tunnel listens (once [`Node::enable_tunnel`]).
    pub fn tunnel_address(&self) -> SocketAddr {
        SocketAddr::new(self.address(), TUNNEL_PORT)
    }

    /// Makes the agent, when started, run the mTLS tunnel on its own address.
    pub fn enable_tunnel(&mut self) {
        self.config_extra += &format!("tunnel:\n  listen: \"{}\"\n", self.tunnel_address());
    }

    /// A process placement in workload cgroup `cgroup` (created) of this node, in its namespace.
    pub fn workload(&self, cgroup: &str) -> Placement {
        Placement::cgroup(self.cgroups.create(cgroup)).in_netns(self.netns.name())
    }

    /// A placement in the node's namespace outside every workload (no policy applies).
    pub fn host(&self) -> Placement {
        Placement::host().in_netns(self.netns.name())
    }

    /// The node's agent; panics if it is not running.
    pub fn ward(&self) -> &Ward {
        self.ward
            .as_ref()
            .unwrap_or_else(|| panic!("{}: ward is not running", self.name))
    }

    pub fn ward_mut(&mut self) -> &mut Ward {
        let name = self.name.clone();
        self.ward
            .as_mut()
            .unwrap_or_else(|| panic!("{name}: ward is not running"))
    }

    pub fn is_running(&self) -> bool {
        self.ward.is_some()
    }

    /// Starts the node's agent in control-plane mode with `workloads` and waits for `ready`.
    pub fn start(&mut self, workloads: &[Workload]) {
        self.start_with(Some(workloads), &[]);
    }

    /// `None`: the workloads come from the control plane (`config_extra` says so).
    fn start_with(&mut self, workloads: Option<&[Workload]>, args: &[&str]) {
        assert!(self.ward.is_none(), "{}: ward already runs", self.name);
        self.ward = Some(Ward::launch_with(
            &self.cgroups,
            workloads,
            WardOptions {
                policy: None,
                args,
                config_extra: self.config_extra.clone(),
                netns: Some(self.netns.name().to_owned()),
            },
        ));
    }

    /// Stops the agent for good (SIGTERM: programs detached, pins removed, as at a
    /// decommission); its control-plane state directory stays.
    pub fn stop(&mut self) {
        self.ward = None;
    }

    /// The agent's control-plane state directory (node certificate, last applied state).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// Waits for an [`APPLIED`] line from log line `from` on with at least `identities`
    /// identities and `addresses` IP cache entries (every node's workloads known) and returns it.
    pub fn wait_known(&self, from: usize, identities: u64, addresses: u64) -> String {
        let what = format!("`{APPLIED}` with {identities} identities and {addresses} addresses");
        let count = |line: &str, key: &str| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v[key].as_u64())
        };
        self.ward().wait_for_log(
            from,
            crate::scaled(Duration::from_secs(20)),
            &what,
            |line| {
                line.contains(APPLIED)
                    && count(line, "identities") == Some(identities)
                    && count(line, "addresses") == Some(addresses)
            },
        )
    }

    /// Waits for a [`APPLIED`] line from log line `from` on that contains `needle`; returns it.
    pub fn wait_applied(&self, from: usize, needle: &str, timeout: Duration) -> String {
        let what = format!("`{APPLIED}` with {needle}");
        self.ward().wait_for_log(from, timeout, &what, |line| {
            line.contains(APPLIED) && line.contains(needle)
        })
    }
}

/// The control plane and the nodes, torn down agents first.
pub struct Cluster {
    nodes: Vec<Node>,
    pub plane: ControlPlane,
    /// Holds the bridge and the control plane.
    pub hub: Netns,
    dir: PathBuf,
    subnet: u8,
}

impl Cluster {
    /// `nodes` nodes (agents not started) and a control plane serving `policies` (file name,
    /// YAML), started with extra `ward-control` arguments `plane_args`.
    pub fn new(tag: &str, nodes: usize, policies: &[(&str, &str)], plane_args: &[&str]) -> Self {
        let args: Vec<String> = plane_args.iter().map(|a| (*a).to_owned()).collect();
        Self::build(tag, nodes, policies, |_, _| args)
    }

    /// `nodes` nodes (agents not started) and a control plane that reads a cluster from
    /// `api`, a stand-in for the Kubernetes API server started in the control plane's namespace
    /// (none can run on these machines: see [`crate::kube_api`]).
    pub fn kubernetes(tag: &str, nodes: usize) -> (Self, crate::kube_api::KubeApi) {
        let mut api = None;
        let cluster = Self::build(tag, nodes, &[], |hub, dir| {
            let started = hub.run_inside(crate::kube_api::KubeApi::start);
            let kubeconfig = dir.join("kubeconfig");
            started.write_kubeconfig(&kubeconfig);
            api = Some(started);
            vec![
                "--kubernetes".into(),
                "--kubeconfig".into(),
                kubeconfig.to_string_lossy().into_owned(),
            ]
        });
        (cluster, api.expect("started"))
    }

    /// Starts the agent of node `index` with `workloads: fromControlPlane` (its workloads are
    /// the pods the control plane reads from the cluster), `config` added to its configuration
    /// and `args` to `ward run`.
    pub fn start_from_cluster(&mut self, index: usize, config: &str, args: &[&str]) {
        let node = &mut self.nodes[index];
        node.config_extra += "workloads: fromControlPlane\n";
        node.config_extra += config;
        node.start_with(None, args);
    }

    /// The common part: `plane_args` gets the control plane's namespace and directory, before
    /// the control plane starts.
    fn build(
        tag: &str,
        nodes: usize,
        policies: &[(&str, &str)],
        plane_args: impl FnOnce(&Netns, &Path) -> Vec<String>,
    ) -> Self {
        crate::require_privileges();
        assert!(
            nodes <= NODE_NAMES.len(),
            "at most {} nodes",
            NODE_NAMES.len()
        );
        static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);
        let subnet = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed).max(1);
        let dir = std::env::temp_dir().join(crate::unique_name(&format!("{tag}-cluster")));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("plane/policy"))
            .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        for (file, yaml) in policies {
            let path = dir.join("plane/policy").join(file);
            std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }

        let hub = Netns::new(&format!("{tag}-hub"));
        hub.ip(&["link", "add", "br0", "type", "bridge"]);
        hub.ip(&[
            "addr",
            "add",
            &format!("10.232.{subnet}.1/24"),
            "dev",
            "br0",
        ]);
        hub.ip(&[
            "addr",
            "add",
            &format!("{}/64", v6(IpAddr::from([10, 232, subnet, 1]))),
            "dev",
            "br0",
            "nodad",
        ]);
        hub.ip(&["link", "set", "br0", "up"]);

        let mut opts = ControlPlaneOptions::new(crate::control_bin(), dir.join("plane"));
        opts.listen = SocketAddr::from(([10, 232, subnet, 1], CONTROL_PORT));
        opts.trust_domain = crate::agent::TRUST_DOMAIN.into();
        opts.netns = Some(hub.name().to_owned());
        opts.extra_args = plane_args(&hub, &dir);
        let plane = ControlPlane::start(opts);

        let mut cluster = Cluster {
            nodes: Vec::new(),
            plane,
            hub,
            dir,
            subnet,
        };
        for index in 0..nodes {
            cluster.add_node(index);
        }
        cluster
    }

    fn add_node(&mut self, index: usize) {
        let name = NODE_NAMES[index];
        let netns = Netns::new(&format!("{name}-{}", self.subnet));
        let port = format!("p{index}");
        netns.veth("veth0", &port, self.hub.name());
        self.hub.ip(&["link", "set", &port, "master", "br0"]);
        self.hub.ip(&["link", "set", &port, "up"]);
        let host = 10 * (index as u8 + 1);
        let address = format!("10.232.{}.{host}/24", self.subnet);
        netns.ip(&["addr", "add", &address, "dev", "veth0"]);
        let address6 = v6(IpAddr::from([10, 232, self.subnet, host]));
        netns.ip(&[
            "addr",
            "add",
            &format!("{address6}/64"),
            "dev",
            "veth0",
            "nodad",
        ]);
        netns.ip(&["link", "set", "veth0", "up"]);

        let token_file = self.dir.join(format!("{name}.token"));
        std::fs::write(&token_file, self.plane.new_token(Some(name)))
            .unwrap_or_else(|e| panic!("write {}: {e}", token_file.display()));
        let state_dir = self.dir.join(format!("{name}-state"));
        let quote = |p: &Path| serde_json::to_string(&p.to_string_lossy()).expect("a string");
        let config_extra = format!(
            "controlPlane:\n  address: \"{}\"\n  nodeName: {name}\n  joinTokenFile: {}\n  caFile: {}\n  stateDir: {}\n",
            self.plane.address,
            quote(&token_file),
            quote(&self.plane.ca_file()),
            quote(&state_dir),
        );
        self.nodes.push(Node {
            ward: None,
            cgroups: TestCgroups::new(&format!("{name}-{}", self.subnet)),
            pods: Vec::new(),
            netns,
            name: name.to_owned(),
            subnet: self.subnet,
            host,
            extra_addresses: 0,
            token_file,
            state_dir,
            config_extra,
        });
    }

    /// A network namespace for a new pod on node `index`, joined to the node as Calico joins
    /// one: veth `eth0` in the pod holds the pod's address as a /32 and routes everything via
    /// the link-local gateway 169.254.1.1, which the node's side (`pod<n>`) answers ARP for by
    /// proxy; the node routes the address to that veth. The node's first pod makes it forward
    /// and gives the hub and the other nodes a route to its pod range. Returns the namespace's
    /// name (for [`Placement::in_netns`]: `node.workload(cgroup).in_netns(&name)` is a process
    /// of the pod) and the pod's address. The namespace is the node's: it goes with it.
    pub fn pod_network(&mut self, index: usize) -> (String, IpAddr) {
        let node = &self.nodes[index];
        if node.pods.is_empty() {
            node.netns.sysctl("net.ipv4.ip_forward", "1");
            // Proxy ARP answers only for an address routed through another interface: the
            // node's default route (to the hub, whose namespace leads nowhere else) is that
            // route for the gateway.
            let hub = format!("10.232.{}.1", self.subnet);
            node.netns
                .ip(&["route", "add", "default", "via", &hub, "dev", "veth0"]);
            node.netns.sysctl("net.ipv6.conf.all.forwarding", "1");
            let (range, via) = (node.pod_range(), node.address().to_string());
            let (range6, via6) = (node.pod_range6(), v6(node.address()).to_string());
            let others = self.nodes.iter().filter(|n| n.name != node.name);
            for netns in std::iter::once(&self.hub).chain(others.map(|n| &n.netns)) {
                netns.ip(&["route", "add", &range, "via", &via]);
                netns.ip(&["-6", "route", "add", &range6, "via", &via6]);
            }
        }

        let node = &mut self.nodes[index];
        let n = node.pods.len();
        assert!(n < 14, "at most 14 pods a node");
        let address = IpAddr::from([10, 233, self.subnet, node.pod_base() + 1 + n as u8]);
        let pod = Netns::new(&format!("{}-{}-pod{n}", node.name, self.subnet));
        let port = format!("pod{n}");
        pod.veth("eth0", &port, node.netns.name());
        pod.ip(&["addr", "add", &format!("{address}/32"), "dev", "eth0"]);
        let address6 = v6(address);
        pod.ip(&[
            "addr",
            "add",
            &format!("{address6}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ]);
        pod.ip(&[
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        pod.ip(&[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ]);
        node.netns
            .sysctl(&format!("net.ipv4.conf.{port}.proxy_arp"), "1");
        // Answer at once, not after up to 0.8 s.
        node.netns
            .sysctl(&format!("net.ipv4.neigh.{port}.proxy_delay"), "0");
        node.netns
            .ip(&["addr", "add", "fe80::1/64", "dev", &port, "nodad"]);
        node.netns.ip(&["link", "set", &port, "up"]);
        node.netns.ip(&[
            "route",
            "add",
            &format!("{address}/32"),
            "dev",
            &port,
            "scope",
            "link",
        ]);
        node.netns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{address6}/128"),
            "dev",
            &port,
        ]);
        let name = pod.name().to_owned();
        node.pods.push(pod);
        (name, address)
    }

    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    pub fn node_mut(&mut self, index: usize) -> &mut Node {
        &mut self.nodes[index]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The control plane's log from byte `from` on.
    fn plane_log_since(&self, from: usize) -> String {
        self.plane.logs().get(from..).unwrap_or_default().to_owned()
    }

    /// Writes a policy file in the control plane's directory and returns the policy version it
    /// served for it (from its `policy set updated` log line).
    pub fn write_policy(&self, file: &str, yaml: &str) -> String {
        let from = self.plane.logs().len();
        self.plane.write_policy(file, yaml);
        self.wait_policy_version(from)
    }

    /// Removes a policy file; returns the new policy version as [`Cluster::write_policy`].
    pub fn remove_policy(&self, file: &str) -> String {
        let from = self.plane.logs().len();
        self.plane.remove_policy(file);
        self.wait_policy_version(from)
    }

    fn wait_policy_version(&self, from: usize) -> String {
        let deadline = std::time::Instant::now() + crate::scaled(Duration::from_secs(10));
        loop {
            let log = self.plane_log_since(from);
            let served = log
                .lines()
                .filter(|l| l.contains("policy set updated"))
                .find_map(|l| field(l, "version"));
            if let Some(version) = served {
                return version;
            }
            if std::time::Instant::now() >= deadline {
                panic!(
                    "ward-control served no new policy version within 10 s; its log:\n{}",
                    self.plane.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until every running agent has applied policy `version`, each from its log line
    /// `from[i]` on (use [`Cluster::log_marks`] before the change).
    pub fn wait_everywhere(&self, from: &[usize], version: &str) {
        for (node, from) in self.nodes.iter().zip(from) {
            if node.is_running() {
                node.wait_applied(*from, version, crate::scaled(Duration::from_secs(20)));
            }
        }
    }

    /// Each node's current log length (0 for a node without a running agent).
    pub fn log_marks(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|n| n.ward.as_ref().map_or(0, Ward::log_len))
            .collect()
    }

    /// Writes a policy and waits until every running agent has it in the kernel.
    pub fn apply_policy(&self, file: &str, yaml: &str) -> String {
        let marks = self.log_marks();
        let version = self.write_policy(file, yaml);
        self.wait_everywhere(&marks, &version);
        version
    }
}

/// The value of `key=value` in a text log line (up to the next space, quotes removed).
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let value = line[start..].split(' ').next()?;
    Some(value.trim_matches('"').to_owned())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.ward = None;
        }
        self.plane.kill();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("ward-tests: remove {}: {e}", self.dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn fields_of_text_log_lines() {
        let line = "2026-01-01T00:00:00Z  INFO ward_control: policy set updated reason=\"file change\" policies=2 version=ab-3-cd read_ms=1.2";
        assert_eq!(field(line, "version").as_deref(), Some("ab-3-cd"));
        assert_eq!(field(line, "policies").as_deref(), Some("2"));
        assert_eq!(field(line, "nope"), None);
    }
}
