//! The Kubernetes NetworkPolicy conformance table (`policy/src/testdata/
//! networkpolicy-conformance.yaml`), which the unit tests check through `ward policy trace`,
//! checked through the kernel: every pod a cgroup with its address in a network namespace of its
//! own, the real `ward` enforcing each scenario's policies, and every pair tried with a real client.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Instant;

use ward_policy::testing::{conformance_table, ConformanceTable, ContainerPort, Scenario};
use ward_tests::{
    peer, Lan, Listener, Outcome, Peer, Placement, Protocol, TestCgroups, Ward, Workload,
};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
/// Long enough for an allowed connection across the bridge; a refused one either fails at once
/// (egress, EPERM) or waits this long (ingress, the SYN dropped).
const QUICK_TIMEOUT_MS: &str = "400";
/// Mismatches are tried again with this, so that a slow machine never turns allow into deny.
const PATIENT_TIMEOUT_MS: &str = "3000";

/// The protocol of a container port of the table.
fn protocol(port: &ContainerPort) -> Protocol {
    match port.protocol.as_deref() {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some(other) => panic!("container port {}: protocol {other:?}", port.name),
    }
}

/// The protocol and port a scenario tries.
fn scenario_port(scenario: &Scenario) -> (Protocol, u16) {
    let parsed = scenario.port.split_once('/').and_then(|(port, protocol)| {
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return None,
        };
        Some((protocol, port.parse().ok()?))
    });
    parsed.unwrap_or_else(|| {
        panic!(
            "scenario {:?}: port {:?} is not <port>/tcp or <port>/udp",
            scenario.name, scenario.port
        )
    })
}

/// `expected[source][destination]`: whether the connection goes through.
fn expected(scenario: &Scenario, pods: &[String]) -> Vec<Vec<bool>> {
    let rows: Vec<Vec<bool>> = scenario
        .reachability
        .lines()
        .zip(pods)
        .map(|(line, pod)| {
            let (label, cells) = line.split_once(':').unwrap_or_else(|| {
                panic!("scenario {:?}: row {line:?} has no label", scenario.name)
            });
            assert_eq!(
                label.trim(),
                pod,
                "scenario {:?}: rows are in pod order",
                scenario.name
            );
            cells
                .chars()
                .filter(|c| ".X".contains(*c))
                .map(|c| c == '.')
                .collect()
        })
        .collect();
    assert!(
        rows.len() == pods.len() && rows.iter().all(|r| r.len() == pods.len()),
        "scenario {:?}: the reachability matrix is not {n}x{n}",
        scenario.name,
        n = pods.len()
    );
    rows
}

fn connects(outcome: &Outcome) -> Option<bool> {
    match outcome {
        Outcome::Ok => Some(true),
        Outcome::Eperm | Outcome::Timeout => Some(false),
        Outcome::Refused | Outcome::Error(_) => None,
    }
}

/// The table's pods, each a cgroup under one ward's root with its address in a network namespace
/// of its own on one bridge, listening on every port the table tries.
struct Pods {
    names: Vec<String>,
    placements: Vec<Placement>,
    workloads: Vec<Workload>,
    /// (pod, protocol, port) → the listener's address.
    targets: BTreeMap<(usize, Protocol, u16), SocketAddr>,
    /// Kept running until the test ends.
    listeners: Vec<Listener>,
    // Dropped after the processes in them.
    _lan: Lan,
}

impl Pods {
    fn new(table: &ConformanceTable, cgroups: &TestCgroups) -> Self {
        let mut lan = Lan::new("conformance");
        let (mut names, mut placements, mut workloads) = (Vec::new(), Vec::new(), Vec::new());
        for (n, namespace) in NAMESPACES.iter().enumerate() {
            for (p, pod) in PODS.iter().enumerate() {
                // As the table's header describes them: x/a is 10.0.0.1, z/c is 10.0.2.3.
                let name = format!("{namespace}/{pod}");
                let address = format!("10.0.{n}.{}", p + 1);
                let netns = lan.add_host(
                    &format!("conf-{namespace}{pod}"),
                    &[&format!("{address}/16")],
                );
                placements.push(Placement::cgroup(cgroups.create(&name)).in_netns(&netns));
                let mut workload = Workload::new(&name)
                    .namespace(namespace)
                    .label("pod", pod)
                    .address(&address);
                for port in table.container_ports.get(*pod).into_iter().flatten() {
                    workload = workload.named_port(&port.name, protocol(port), port.port);
                }
                workloads.push(workload);
                names.push(name);
            }
        }
        Pods {
            names,
            placements,
            workloads,
            targets: BTreeMap::new(),
            listeners: Vec::new(),
            _lan: lan,
        }
    }

    /// Starts a listener in every pod on every (protocol, port); call it once ward is attached,
    /// so that their sockets belong to their pods from the start.
    fn listen(&mut self, peer: &Peer, ports: &BTreeSet<(Protocol, u16)>) {
        for (pod, (workload, placement)) in self.workloads.iter().zip(&self.placements).enumerate()
        {
            for &(protocol, port) in ports {
                let at = format!("{}:{port}", workload.addresses[0]);
                let listener = peer.listen(protocol, &at, placement);
                self.targets.insert((pod, protocol, port), listener.addr);
                self.listeners.push(listener);
            }
        }
    }

    /// Every ordered pair of distinct pods.
    fn pairs(&self) -> Vec<(usize, usize)> {
        let count = self.names.len();
        (0..count)
            .flat_map(|s| (0..count).filter(move |d| *d != s).map(move |d| (s, d)))
            .collect()
    }

    /// One attempt per (source, destination) pair, every source's at once and all sources in
    /// parallel; the outcomes in the order of `pairs` (sorted by source).
    fn try_pairs(
        &self,
        peer: &Peer,
        (protocol, port): (Protocol, u16),
        timeout_ms: &str,
        pairs: &[(usize, usize)],
    ) -> Vec<Outcome> {
        let options = ["--timeout-ms", timeout_ms];
        std::thread::scope(|scope| {
            let runs: Vec<_> = (0..self.names.len())
                .map(|source| {
                    let targets: Vec<SocketAddr> = pairs
                        .iter()
                        .filter(|(s, _)| *s == source)
                        .map(|&(_, d)| self.targets[&(d, protocol, port)])
                        .collect();
                    let placement = &self.placements[source];
                    scope.spawn(move || match targets.is_empty() {
                        true => Vec::new(),
                        false => peer.probe(protocol, &targets, placement, &options),
                    })
                })
                .collect();
            let outcomes = runs.into_iter().map(|r| r.join().expect("a probe thread"));
            outcomes.flatten().collect()
        })
    }
}

/// Every namespace's labels as ward's configuration gives them (`namespaces:`).
fn namespaces_config(table: &ConformanceTable) -> String {
    let namespaces: BTreeMap<&str, BTreeMap<&str, &BTreeMap<String, String>>> = table
        .namespace_labels
        .iter()
        .map(|(namespace, labels)| (namespace.as_str(), BTreeMap::from([("labels", labels)])))
        .collect();
    // JSON is YAML: the section as one flow mapping.
    let namespaces = serde_json::to_string(&namespaces).expect("namespaces serialise");
    format!("namespaces: {namespaces}\n")
}

#[test]
fn the_kernel_follows_the_networkpolicy_conformance_table() {
    let started = Instant::now();
    let table = conformance_table();
    let peer = peer!();
    let cgroups = TestCgroups::new("conformance");
    let mut pods = Pods::new(&table, &cgroups);
    let mut ward = Ward::start_with_options(
        &cgroups,
        &pods.workloads,
        &table.scenarios[0].policies,
        &[],
        &namespaces_config(&table),
    );
    pods.listen(&peer, &table.scenarios.iter().map(scenario_port).collect());
    let all = pods.pairs();

    let mut mismatches = Vec::new();
    for (index, scenario) in table.scenarios.iter().enumerate() {
        if index > 0 {
            ward.replace_policy(&scenario.policies);
        }
        let expected = expected(scenario, &pods.names);
        let wrong = |pairs: &[(usize, usize)], outcomes: &[Outcome]| -> Vec<(usize, usize)> {
            let agrees =
                |&(s, d): &(usize, usize), outcome| connects(outcome) == Some(expected[s][d]);
            let pairs = pairs
                .iter()
                .zip(outcomes)
                .filter(|(pair, o)| !agrees(pair, o));
            pairs.map(|(pair, _)| *pair).collect()
        };
        let first = wrong(
            &all,
            &pods.try_pairs(&peer, scenario_port(scenario), QUICK_TIMEOUT_MS, &all),
        );
        if first.is_empty() {
            continue;
        }
        let outcomes = pods.try_pairs(&peer, scenario_port(scenario), PATIENT_TIMEOUT_MS, &first);
        for (&(s, d), outcome) in first.iter().zip(&outcomes) {
            if wrong(&[(s, d)], std::slice::from_ref(outcome)).is_empty() {
                continue;
            }
            let want = if expected[s][d] {
                "connect"
            } else {
                "be refused"
            };
            mismatches.push(format!(
                "scenario {:?}, {} -> {} on {}: should {want}, the kernel gave {outcome:?}",
                scenario.name, pods.names[s], pods.names[d], scenario.port
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "the kernel disagrees with the conformance table in {} case(s):\n{}\nward log:\n{}",
        mismatches.len(),
        mismatches.join("\n"),
        ward.log().tail(60)
    );
    eprintln!(
        "the kernel followed all {} scenarios of the conformance table ({} pods) in {:.1?}",
        table.scenarios.len(),
        pods.names.len(),
        started.elapsed()
    );
}
