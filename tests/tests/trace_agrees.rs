//! `ward policy trace` and the kernel must never disagree: generated policy sets, every
//! (source, destination, port, protocol) tried for real and traced without a kernel. A UDP case
//! counts as allowed only when the destination's answer gets back: replies pass the
//! destination's egress and the source's ingress, as trace says.
use std::net::SocketAddr;
use std::time::Duration;

use ward_tests::{peer, run, ward_bin, Outcome, Placement, Protocol, TestCgroups, Ward, Workload};

mod support;
use support::*;

const NAMES: [&str; 3] = ["a", "b", "c"];

/// A small deterministic generator, so a failing case can be replayed from its seed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next(100) < percent
    }
}

/// One policy per workload and direction, at random: rules naming random peers and ports, now
/// and then a deny rule or audit mode.
fn generate(seed: u64, ports: &[u16]) -> String {
    let mut rng = Lcg(seed);
    let mut docs = Vec::new();
    for name in NAMES {
        for (direction, peer_key) in [("ingress", "from"), ("egress", "to")] {
            if !rng.chance(60) {
                continue;
            }
            let mode = if rng.chance(20) { "audit" } else { "enforce" };
            let mut rules = String::new();
            for i in 0..1 + rng.next(3) {
                let action = if rng.chance(25) { "deny" } else { "allow" };
                let peers = if rng.chance(20) {
                    String::new()
                } else {
                    format!(
                        "      {peer_key}: [{{labels: {{app: {}}}}}]\n",
                        NAMES[rng.next(3) as usize]
                    )
                };
                let port_list = if rng.chance(25) {
                    String::new()
                } else {
                    let protocol = if rng.chance(50) { "TCP" } else { "UDP" };
                    format!(
                        "      ports: [{{port: {}, protocol: {protocol}}}]\n",
                        ports[rng.next(ports.len() as u64) as usize]
                    )
                };
                rules.push_str(&format!(
                    "    - name: r{i}\n      action: {action}\n{peers}{port_list}"
                ));
            }
            docs.push(policy(
                &format!("{name}-{direction}"),
                &format!("  mode: {mode}\n  selector:\n    labels: {{app: {name}}}\n  {direction}:\n{rules}"),
            ));
        }
    }
    if docs.is_empty() {
        docs.push(policy(
            "nothing",
            "  selector:\n    labels: {app: none}\n  egress: []\n",
        ));
    }
    docs.join("---\n")
}

fn traced(ward: &Ward, from: &str, to: &str, port: u16, protocol: &str) -> String {
    let mut c = std::process::Command::new(ward_bin());
    c.args(["policy", "trace", "--config"])
        .arg(ward.config_file())
        .args([
            "--from",
            from,
            "--to",
            to,
            "--port",
            &format!("{port}/{protocol}"),
        ]);
    let done = run(
        "ward policy trace",
        c,
        ward_tests::scaled(Duration::from_secs(10)),
    );
    assert!(done.status.success(), "trace failed: {}", done.stderr);
    let first = done.stdout.lines().next().unwrap_or_default().to_string();
    first
        .rsplit(": ")
        .next()
        .unwrap_or_default()
        .trim()
        .to_lowercase()
}

#[test]
fn trace_and_the_kernel_agree_on_generated_policies() {
    let peer = peer!();
    let cgroups = TestCgroups::new("trace-agrees");
    let placements: Vec<Placement> = NAMES
        .iter()
        .map(|n| Placement::cgroup(cgroups.create(n)))
        .collect();
    // Two ports per destination; every generated rule picks among all of them. The probes stay
    // bound until every port is chosen: a port a dropped probe gave back may be handed out again.
    let probes: Vec<std::net::TcpListener> = (0..2 * (NAMES.len() - 1))
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    let ports: Vec<(usize, u16)> = probes
        .iter()
        .enumerate()
        .map(|(i, probe)| (1 + i / 2, probe.local_addr().expect("bound").port()))
        .collect();
    drop(probes);
    let all_ports: Vec<u16> = ports.iter().map(|(_, p)| *p).collect();
    let workloads: Vec<Workload> = NAMES
        .iter()
        .map(|n| Workload::new(n).label("app", n))
        .collect();
    let mut ward = Ward::start(&cgroups, &workloads, &generate(1, &all_ports));
    // Listeners open after ward attached, so the kernel names each by its workload.
    let listeners: Vec<_> = ports
        .iter()
        .flat_map(|(d, p)| {
            [Protocol::Tcp, Protocol::Udp].map(|protocol| {
                let listener = peer.listen(protocol, &format!("127.0.0.1:{p}"), &placements[*d]);
                (listener, protocol, *d, *p)
            })
        })
        .collect();
    let mut verdicts = std::collections::BTreeMap::<String, usize>::new();
    for seed in 1..=6u64 {
        if seed > 1 {
            ward.reload_applied(&generate(seed, &all_ports));
        }
        for (src, from) in NAMES.iter().enumerate() {
            for (listener, protocol, dst, port) in &listeners {
                if src == *dst {
                    continue;
                }
                let name = match protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                };
                let expected = traced(&ward, from, NAMES[*dst], *port, name);
                let to: SocketAddr = listener.addr;
                let (outcome, _) = attempt(
                    &peer,
                    *protocol,
                    to,
                    &placements[src],
                    &["--timeout-ms", "400"],
                );
                let agrees = match expected.as_str() {
                    "allow" | "audit" => outcome == Outcome::Ok,
                    "deny" => outcome == Outcome::Eperm || outcome == Outcome::Timeout,
                    other => panic!("trace answered {other:?}"),
                };
                assert!(
                    agrees,
                    "seed {seed}: {from} -> {} port {port}/{name}: trace says {expected}, the kernel gave {outcome:?}\npolicy:\n{}",
                    NAMES[*dst],
                    generate(seed, &all_ports)
                );
                *verdicts.entry(format!("{name} {expected}")).or_default() += 1;
            }
        }
    }
    eprintln!("trace and kernel agreed on every generated case: {verdicts:?}");
    for case in ["tcp allow", "tcp deny", "udp allow", "udp deny"] {
        assert!(
            verdicts.contains_key(case),
            "the generated cases do not cover `{case}`: {verdicts:?}"
        );
    }
}
