//! The Kubernetes NetworkPolicy conformance table (`agent/src/policy/testdata/
//! networkpolicy-conformance.yaml`), which the unit tests check through `ward policy trace`,
//! checked through the kernel: every pod a cgroup with its address in a network namespace of its
//! own, the real `ward` enforcing each scenario's policies, and every pair tried with a real client.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use serde::Deserialize;
use ward_tests::{peer, Lan, Listener, Outcome, Placement, Protocol, TestCgroups, Ward, Workload};

const TABLE: &str = "../agent/src/policy/testdata/networkpolicy-conformance.yaml";
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
/// Long enough for an allowed connection across the bridge; a refused one either fails at once
/// (egress, EPERM) or waits this long (ingress, the SYN dropped).
const QUICK_TIMEOUT_MS: &str = "400";
/// Mismatches are tried again with this, so that a slow machine never turns allow into deny.
const PATIENT_TIMEOUT_MS: &str = "3000";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Table {
    /// By pod name, the same in every namespace.
    container_ports: BTreeMap<String, Vec<ContainerPort>>,
    /// By namespace; ward's configuration gives them as `namespaces.<name>.labels`.
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    scenarios: Vec<Scenario>,
}

#[derive(Deserialize)]
struct ContainerPort {
    name: String,
    port: u16,
    protocol: Option<String>,
}

impl ContainerPort {
    fn protocol(&self) -> Protocol {
        match self.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some(other) => panic!("container port {}: protocol {other:?}", self.name),
        }
    }
}

#[derive(Deserialize)]
struct Scenario {
    name: String,
    port: String,
    policies: String,
    reachability: String,
}

impl Scenario {
    fn port(&self) -> (Protocol, u16) {
        let parsed = self.port.split_once('/').and_then(|(port, protocol)| {
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
                self.name, self.port
            )
        })
    }

    /// `expected[source][destination]`: whether the connection goes through.
    fn expected(&self, pods: &[String]) -> Vec<Vec<bool>> {
        let rows: Vec<Vec<bool>> = self
            .reachability
            .lines()
            .zip(pods)
            .map(|(line, pod)| {
                let (label, cells) = line.split_once(':').unwrap_or_else(|| {
                    panic!("scenario {:?}: row {line:?} has no label", self.name)
                });
                assert_eq!(
                    label.trim(),
                    pod,
                    "scenario {:?}: rows are in pod order",
                    self.name
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
            self.name,
            n = pods.len()
        );
        rows
    }
}

fn table() -> Table {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(TABLE);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read the conformance table {}: {e}", path.display()));
    serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("the conformance table {}: {e}", path.display()))
}

fn connects(outcome: &Outcome) -> Option<bool> {
    match outcome {
        Outcome::Ok => Some(true),
        Outcome::Eperm | Outcome::Timeout => Some(false),
        Outcome::Refused | Outcome::Error(_) => None,
    }
}

#[test]
fn the_kernel_follows_the_networkpolicy_conformance_table() {
    let started = Instant::now();
    let table = table();
    let peer = peer!();
    let cgroups = TestCgroups::new("conformance");
    let mut lan = Lan::new("conformance");
    let mut pods = Vec::new();
    let mut workloads = Vec::new();
    let mut placements = Vec::new();
    let mut addresses = Vec::new();
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
                workload = workload.named_port(&port.name, port.protocol(), port.port);
            }
            workloads.push(workload);
            addresses.push(address);
            pods.push(name);
        }
    }
    // Every pod listens on every port of the table, once, for all scenarios.
    let ports: BTreeSet<(Protocol, u16)> = table.scenarios.iter().map(Scenario::port).collect();
    let namespaces: BTreeMap<&str, BTreeMap<&str, &BTreeMap<String, String>>> = table
        .namespace_labels
        .iter()
        .map(|(namespace, labels)| (namespace.as_str(), BTreeMap::from([("labels", labels)])))
        .collect();
    let namespaces = serde_yaml::to_string(&BTreeMap::from([("namespaces", namespaces)]))
        .expect("namespaces serialise");
    let mut ward = Ward::start_with_options(
        &cgroups,
        &workloads,
        &table.scenarios[0].policies,
        &[],
        &namespaces,
    );
    // Listeners open after ward is attached, so their sockets belong to their pods from the start.
    let listeners: Vec<Vec<((Protocol, u16), Listener)>> = placements
        .iter()
        .zip(&addresses)
        .map(|(placement, address)| {
            let listen = |&(protocol, port): &(Protocol, u16)| {
                let at = format!("{address}:{port}");
                ((protocol, port), peer.listen(protocol, &at, placement))
            };
            ports.iter().map(listen).collect()
        })
        .collect();
    let target = |destination: usize, wanted: (Protocol, u16)| -> SocketAddr {
        let found = listeners[destination]
            .iter()
            .find(|(key, _)| *key == wanted);
        found.expect("a listener per pod and port").1.addr
    };

    let mut mismatches = Vec::new();
    for (index, scenario) in table.scenarios.iter().enumerate() {
        if index > 0 {
            ward.replace_policy(&scenario.policies);
        }
        let (protocol, port) = scenario.port();
        let expected = scenario.expected(&pods);
        let destinations = |source: usize| (0..pods.len()).filter(move |d| *d != source);
        let try_all = |timeout_ms: &str, pairs: &[(usize, usize)]| -> Vec<Outcome> {
            let options = ["--timeout-ms", timeout_ms];
            let outcomes = std::thread::scope(|scope| {
                let runs: Vec<_> = (0..pods.len())
                    .map(|source| {
                        let targets: Vec<SocketAddr> = pairs
                            .iter()
                            .filter(|(s, _)| *s == source)
                            .map(|&(_, d)| target(d, (protocol, port)))
                            .collect();
                        let (peer, placement) = (&peer, &placements[source]);
                        scope.spawn(move || {
                            if targets.is_empty() {
                                Vec::new()
                            } else {
                                peer.probe(protocol, &targets, placement, &options)
                            }
                        })
                    })
                    .collect();
                let joined = runs.into_iter().map(|r| r.join().expect("a probe thread"));
                joined.collect::<Vec<_>>()
            });
            // Back in the order of `pairs`, which lists each source's destinations together.
            outcomes.into_iter().flatten().collect()
        };
        let all: Vec<(usize, usize)> = (0..pods.len())
            .flat_map(|s| destinations(s).map(move |d| (s, d)))
            .collect();
        let wrong = |pairs: &[(usize, usize)], outcomes: &[Outcome]| -> Vec<(usize, usize)> {
            pairs
                .iter()
                .zip(outcomes)
                .filter(|(&(s, d), outcome)| connects(outcome) != Some(expected[s][d]))
                .map(|(pair, _)| *pair)
                .collect()
        };
        let first = wrong(&all, &try_all(QUICK_TIMEOUT_MS, &all));
        if first.is_empty() {
            continue;
        }
        let outcomes = try_all(PATIENT_TIMEOUT_MS, &first);
        for ((s, d), outcome) in first.iter().zip(&outcomes) {
            if connects(outcome) == Some(expected[*s][*d]) {
                continue;
            }
            let want = if expected[*s][*d] {
                "connect"
            } else {
                "be refused"
            };
            mismatches.push(format!(
                "scenario {:?}, {} -> {} on {}: should {want}, the kernel gave {outcome:?}",
                scenario.name, pods[*s], pods[*d], scenario.port
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
        pods.len(),
        started.elapsed()
    );
}
