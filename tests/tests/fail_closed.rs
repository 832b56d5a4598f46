//! Fail closed: what the kernel programs cannot decide by a rule is refused for an isolated
//! workload, and nothing gets around the policy by looking unusual. IPv6 extension headers
//! before the transport header, raw sockets, UDP-Lite, raw IP protocols, ICMP, children of a
//! workload's cgroup the agent has not mapped yet, cgroups no workload maps, SCTP; and the other
//! side of it: UDP replies, neighbour discovery and path MTU discovery keep working.
//!
//! Hand-made packets and odd sockets come from `tests/scripts/ward_packets.py` (standard library
//! Python only). Every address used lives in the test's own namespaces or on loopback.

mod support;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::*;

use ward_tests::{
    parse_verdicts, peer, run, scaled, unique_name, Background, Finished, Listener, Netns, Outcome,
    Placement, Protocol, TestCgroups, TwoNodes, VerdictQuery, Ward, Workload,
};

const PYTHON: &str = "/usr/bin/python3";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/ward_packets.py")
}

fn script_args<'a>(script: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![script];
    all.extend_from_slice(args);
    all
}

/// Runs `ward_packets.py <args>` in `at` to completion; panics when the script itself fails.
fn packets(at: &Placement, args: &[&str]) -> Finished {
    let script = script();
    let script = script.to_str().expect("a UTF-8 path");
    let label = format!("ward_packets.py {}", args.join(" "));
    let finished = run(
        &label,
        at.command(PYTHON, &script_args(script, args)),
        scaled(Duration::from_secs(90)),
    );
    assert!(
        finished.status.success(),
        "{label} failed ({}): {}{}",
        finished.status,
        finished.stdout,
        finished.stderr
    );
    finished
}

/// The single outcome line (`ok`, `eperm`, ...) a one-shot mode of the script prints.
fn packets_outcome(at: &Placement, args: &[&str]) -> Outcome {
    let finished = packets(at, args);
    Outcome::parse(finished.stdout.trim())
}

/// A long-running mode of the script, once it printed a line starting with `ready`; the rest of
/// that line is returned (a bound port, as a rule).
fn packets_background(at: &Placement, args: &[&str], ready: &str) -> (Background, String) {
    let script = script();
    let script = script.to_str().expect("a UTF-8 path");
    let label = format!("ward_packets.py {}", args.join(" "));
    let process = Background::spawn(&label, at.command(PYTHON, &script_args(script, args)), true);
    let (_, line) = process.wait_for_line(0, scaled(Duration::from_secs(20)), ready, |l| {
        l.starts_with(ready)
    });
    let rest = line[ready.len()..].trim().to_owned();
    (process, rest)
}

/// The payloads a peer UDP listener has printed (`datagram <peer> <payload>`).
fn datagrams(listener: &Listener) -> Vec<String> {
    listener
        .process
        .lines()
        .snapshot()
        .iter()
        .filter_map(|line| line.strip_prefix("datagram "))
        .filter_map(|rest| rest.split_once(' ').map(|(_, payload)| payload.to_owned()))
        .collect()
}

fn lines_of(process: &Background) -> Vec<String> {
    process.lines().snapshot()
}

/// Time for a dropped packet to have arrived had it not been dropped.
fn settle() {
    std::thread::sleep(scaled(Duration::from_millis(700)));
}

fn ward_tail(ward: &Ward) -> String {
    ward.log().tail(60)
}

// ---------------------------------------------------------------------------------------------
// 1. IPv6 extension headers on ingress
// ---------------------------------------------------------------------------------------------

/// A workload `server` in the server node, ingress-isolated: one rule admits any peer to
/// `open_tcp` and `open_udp`; `closed_tcp` and `closed_udp` are listening but not admitted.
/// Senders run in the client node, outside every workload.
struct Ingress6 {
    ward: Ward,
    open_tcp: Listener,
    closed_tcp: Listener,
    open_udp: Listener,
    closed_udp: Listener,
    _cgroups: TestCgroups,
    nodes: TwoNodes,
}

impl Ingress6 {
    fn new(tag: &str) -> Self {
        let peer = peer!();
        let nodes = TwoNodes::new(tag);
        let cgroups = TestCgroups::new(tag);
        let server = Placement::cgroup(cgroups.create("server")).in_netns(nodes.server.name());
        let open_tcp = peer.listen(Protocol::Tcp, "[::]:0", &server);
        let closed_tcp = peer.listen(Protocol::Tcp, "[::]:0", &server);
        let open_udp = peer.listen(Protocol::Udp, "[::]:0", &server);
        let closed_udp = peer.listen(Protocol::Udp, "[::]:0", &server);
        let spec = format!(
            "  selector:\n    labels: {{app: server}}\n  ingress:\n    - name: open-ports\n      \
             ports: [{{port: {}, protocol: TCP}}, {{port: {}, protocol: UDP}}]\n",
            open_tcp.port(),
            open_udp.port()
        );
        let ward = Ward::start(
            &cgroups,
            &[Workload::new("server")],
            &policy("server-ingress", &spec),
        );
        Ingress6 {
            ward,
            open_tcp,
            closed_tcp,
            open_udp,
            closed_udp,
            _cgroups: cgroups,
            nodes,
        }
    }

    /// The sender: the client node, no workload.
    fn sender(&self) -> Placement {
        Placement::host().in_netns(self.nodes.client.name())
    }

    fn server_v6(&self) -> String {
        self.nodes.v6(1).to_string()
    }

    /// Waits for the verdict record of an ingress denial at `port`.
    fn wait_for_ingress_denial(&self, port: u16) {
        self.ward.wait_for_verdict(
            &VerdictQuery {
                verdict: Some("deny"),
                direction: Some("ingress"),
                dst_port: Some(port),
                ..Default::default()
            },
            event_timeout(),
        );
    }

    /// Sends every layout as a TCP SYN to both TCP ports and as a datagram to both UDP ports;
    /// returns, for each TCP port, the layouts whose SYN the listener answered.
    fn send_layouts(&self, layouts: &[&str]) -> Vec<(u16, String, String)> {
        let tcp_ports = format!("{},{}", self.open_tcp.port(), self.closed_tcp.port());
        let udp_ports = format!("{},{}", self.open_udp.port(), self.closed_udp.port());
        let wait = scaled(Duration::from_millis(1500))
            .as_secs_f64()
            .to_string();
        let finished = packets(
            &self.sender(),
            &[
                "ingress6",
                &self.nodes.v6(100).to_string(),
                &self.server_v6(),
                &wait,
                &tcp_ports,
                &udp_ports,
                &layouts.join(","),
            ],
        );
        settle();
        finished
            .stdout
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                match (words.next(), words.next(), words.next(), words.next()) {
                    (Some("tcp"), Some(port), Some(layout), Some(answer)) => Some((
                        port.parse().expect("a port"),
                        layout.to_owned(),
                        answer.to_owned(),
                    )),
                    _ => None,
                }
            })
            .collect()
    }
}

/// The layouts of `results` for `port` whose SYN was answered with a SYN-ACK.
fn answered(results: &[(u16, String, String)], port: u16) -> Vec<String> {
    results
        .iter()
        .filter(|(p, _, answer)| *p == port && answer == "synack")
        .map(|(_, layout, _)| layout.clone())
        .collect()
}

/// The layouts whose datagram reached `listener` (payload `<layout>@<port>`).
fn delivered(listener: &Listener) -> Vec<String> {
    datagrams(listener)
        .iter()
        .filter_map(|payload| payload.split_once('@').map(|(layout, _)| layout.to_owned()))
        .collect()
}

/// An ordinary client socket with a sticky IPv6 option header (the kernel adds it to every
/// packet) must meet the same ingress policy as one without.
fn option_header_socket_is_decided_by_policy(tag: &str, option: &str) {
    let setup = Ingress6::new(tag);
    let sender = setup.sender();
    let server = setup.server_v6();
    let timeout = scaled(Duration::from_millis(2000))
        .as_secs_f64()
        .to_string();
    let attempt = |protocol: &str, port: u16| {
        packets_outcome(
            &sender,
            &[
                "sockopt",
                protocol,
                &server,
                &port.to_string(),
                option,
                &timeout,
            ],
        )
    };

    // The admitted ports, with the option header: the walk must not refuse what is legitimate.
    assert_eq!(
        attempt("tcp", setup.open_tcp.port()),
        Outcome::Ok,
        "TCP with {option} to the admitted port must connect; ward log:\n{}",
        ward_tail(&setup.ward)
    );
    assert_eq!(
        attempt("udp", setup.open_udp.port()),
        Outcome::Ok,
        "UDP with {option} to the admitted port must get the listener's reply; ward log:\n{}",
        ward_tail(&setup.ward)
    );

    // The ports no rule admits: the option header in front of the TCP or UDP header must not
    // make the packet look like something the ingress check lets through undecided.
    let tcp = attempt("tcp", setup.closed_tcp.port());
    assert_eq!(
        tcp,
        Outcome::Timeout,
        "a TCP SYN carrying {option} to a port no rule admits must be dropped (the client times \
         out), got {tcp:?}; listener: {:?}; ward log:\n{}",
        lines_of(&setup.closed_tcp.process),
        ward_tail(&setup.ward)
    );
    let udp = attempt("udp", setup.closed_udp.port());
    settle();
    assert_eq!(
        udp,
        Outcome::Timeout,
        "a datagram carrying {option} to a port no rule admits must be dropped, got {udp:?}"
    );
    assert_eq!(
        setup.closed_tcp.received() + setup.closed_udp.received(),
        0,
        "the listener on a port no rule admits received traffic carrying {option}: tcp {:?} udp \
         {:?}",
        lines_of(&setup.closed_tcp.process),
        lines_of(&setup.closed_udp.process)
    );
    setup.wait_for_ingress_denial(setup.closed_tcp.port());
}

/// Two nodes and a cgroup root named `tag`, and the `client` workload's place on the client node.
fn client_on_two_nodes(tag: &str) -> (TwoNodes, TestCgroups, Placement) {
    let nodes = TwoNodes::new(tag);
    let cgroups = TestCgroups::new(tag);
    let client = Placement::cgroup(cgroups.create("client")).in_netns(nodes.client.name());
    (nodes, cgroups, client)
}

#[test]
fn ipv6_destination_options_do_not_skip_the_ingress_check() {
    option_header_socket_is_decided_by_policy("dstopts", "dstopts");
}

#[test]
fn ipv6_hop_by_hop_options_do_not_skip_the_ingress_check() {
    option_header_socket_is_decided_by_policy("hopopts", "hopopts");
}

/// Layouts the receiving kernel accepts and delivers (checked against a plain kernel: each one
/// reaches a listener that no program guards): decided by policy like a plain packet.
const LEGITIMATE_LAYOUTS: &[&str] = &[
    "plain",
    "hbh",
    "dst",
    "rt0",
    "frag",
    "hbh+dst",
    "hbh+rt0+frag",
    "dst+rt0+dst",
    "frag+dst",
    "hbh+dst+rt0+frag+dst",
    // Exactly the bound the kernel walks.
    "dstx8",
];

#[test]
fn hand_made_ipv6_extension_header_layouts_are_decided_by_policy() {
    let setup = Ingress6::new("ext6");
    // AH: no security association exists, so the receiving kernel drops it whatever ward does;
    // it is sent all the same, and must not reach a port no rule admits.
    let mut layouts = LEGITIMATE_LAYOUTS.to_vec();
    layouts.extend(["ah", "ah+dst", "hbh+ah"]);
    let results = setup.send_layouts(&layouts);

    let expected: Vec<String> = LEGITIMATE_LAYOUTS.iter().map(|s| s.to_string()).collect();
    let open_tcp = answered(&results, setup.open_tcp.port());
    let open_udp = delivered(&setup.open_udp);
    let closed_tcp = answered(&results, setup.closed_tcp.port());
    let closed_udp = delivered(&setup.closed_udp);
    assert!(
        closed_tcp.is_empty() && closed_udp.is_empty(),
        "hand-made packets reached listeners on ports no rule admits: TCP SYNs answered for \
         layouts {closed_tcp:?}, datagrams delivered for layouts {closed_udp:?}; ward log:\n{}",
        ward_tail(&setup.ward)
    );
    let missing_tcp: Vec<&String> = expected.iter().filter(|l| !open_tcp.contains(l)).collect();
    let missing_udp: Vec<&String> = expected.iter().filter(|l| !open_udp.contains(l)).collect();
    assert!(
        missing_tcp.is_empty() && missing_udp.is_empty(),
        "legitimate layouts to the admitted ports were refused: TCP {missing_tcp:?}, UDP \
         {missing_udp:?} (answers: {results:?}); ward log:\n{}",
        ward_tail(&setup.ward)
    );
    setup.wait_for_ingress_denial(setup.closed_udp.port());
}

#[test]
fn an_overlong_or_truncated_ipv6_header_chain_is_refused_for_an_isolated_workload() {
    let setup = Ingress6::new("chain6");
    let from = setup.ward.log_len();
    // Nine and more headers: past the bound of eight. `badlen`: a destination options header
    // whose length points far past the end of the packet.
    let results = setup.send_layouts(&["dstx9", "hbh+dstx9", "dstx30", "badlen", "dst+badlen"]);
    let reached_tcp: Vec<(u16, String)> = results
        .iter()
        .filter(|(_, _, answer)| answer == "synack")
        .map(|(port, layout, _)| (*port, layout.clone()))
        .collect();
    let reached_udp = [delivered(&setup.open_udp), delivered(&setup.closed_udp)].concat();
    assert!(
        reached_tcp.is_empty() && reached_udp.is_empty(),
        "a chain the kernel cannot walk to its end must be refused for an isolated workload, \
         even on a port a rule admits: TCP SYNs answered {reached_tcp:?}, datagrams delivered \
         {reached_udp:?}; ward log:\n{}",
        ward_tail(&setup.ward)
    );
    let refusal = setup.ward.wait_for_log(
        from,
        event_timeout(),
        "with an ingress deny verdict that gives a reason",
        |line| {
            ward_tests::find_verdict(
                &[line],
                &VerdictQuery {
                    verdict: Some("deny"),
                    direction: Some("ingress"),
                    ..Default::default()
                },
            )
            .is_some()
                && has_reason(line)
        },
    );
    eprintln!("refusal logged: {refusal}");
}

/// Whether a verdict line gives a non-empty `reason` (every verdict line has the field).
fn has_reason(line: &str) -> bool {
    let Some(start) = line.find('{') else {
        return false;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&line[start..]) else {
        return false;
    };
    let reason = value
        .get("reason")
        .or_else(|| value.get("fields").and_then(|f| f.get("reason")));
    reason
        .and_then(serde_json::Value::as_str)
        .is_some_and(|r| !r.is_empty())
}

// ---------------------------------------------------------------------------------------------
// 2. The egress backstop: raw sockets, UDP-Lite, raw IP protocols
// ---------------------------------------------------------------------------------------------

/// Marks the watcher has printed (`seen <family> <protocol> <mark>`).
fn seen_marks(watcher: &Background) -> Vec<String> {
    lines_of(watcher)
        .iter()
        .filter_map(|line| line.strip_prefix("seen "))
        .map(str::to_owned)
        .collect()
}

/// A peer on this host is named by its connecting socket, which the ingress check finds by the
/// SYN's 4-tuple. A SYN made by hand from the port a workload listens on must not borrow that
/// workload: the lookup then finds the listener, which is not a SYN's sender. The friend's own
/// connections pass; the forged SYNs (IPv4 and IPv6, from a process of no workload) are the
/// host's, and denied.
#[test]
fn a_hand_made_syn_from_a_workloads_listening_port_does_not_borrow_its_workload() {
    let peer = peer!();
    let cgroups = TestCgroups::new("synfrom");
    let server = Placement::cgroup(cgroups.create("server"));
    let friend = Placement::cgroup(cgroups.create("friend"));
    let listener = peer.listen(Protocol::Tcp, "[::]:0", &server);
    let friends_listener = peer.listen(Protocol::Tcp, "[::]:0", &friend);
    let spec = format!(
        "  selector:\n    labels: {{app: server}}\n  ingress:\n    - name: from-friend\n      \
         from: [{{labels: {{app: friend}}}}]\n      ports: [{{port: {}, protocol: TCP}}]\n",
        listener.port()
    );
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("server"), Workload::new("friend")],
        &policy("server-ingress", &spec),
    );
    for address in ["127.0.0.1", "::1"] {
        let to = SocketAddr::new(address.parse().expect("an address"), listener.port());
        assert_allowed(&peer, Protocol::Tcp, to, &friend, &ward, &[]);
    }
    let (port, friends_port) = (
        listener.port().to_string(),
        friends_listener.port().to_string(),
    );
    for (address, family) in [("127.0.0.1", "v4"), ("::1", "v6")] {
        let mark = format!("ward-mark-forged-{family}");
        let sent = packets_outcome(
            &Placement::host(),
            &[
                "raw-send",
                address,
                address,
                "tcp-syn",
                &port,
                &mark,
                &friends_port,
            ],
        );
        assert_eq!(sent, Outcome::Ok, "the forged {family} SYN was sent");
    }
    // Each forged SYN is denied as the host's (its own record: the addresses differ).
    let query = VerdictQuery {
        verdict: Some("deny"),
        direction: Some("ingress"),
        src: Some("host"),
        dst_port: Some(listener.port()),
        ..Default::default()
    };
    let deadline = Instant::now() + event_timeout();
    loop {
        let denied: Vec<String> = parse_verdicts(&ward.lines())
            .into_iter()
            .filter(|v| query.matches(v))
            .filter_map(|v| v.dst_addr)
            .collect();
        if denied.iter().any(|a| a.contains("127.0.0.1")) && denied.iter().any(|a| a == "::1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both forged SYNs denied as the host's; denied at {denied:?}; log:\n{}",
            ward_tail(&ward)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn raw_sockets_of_an_egress_isolated_workload_cannot_send_around_the_policy() {
    let (nodes, cgroups, client) = client_on_two_nodes("rawegr");
    let outsider = Placement::host().in_netns(nodes.client.name());
    let (watcher, _) = packets_background(
        &Placement::host().in_netns(nodes.server.name()),
        &["watch"],
        "watching",
    );
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-egress", &allow_tcp("web-only", 8080)),
    );
    let denied_port = "5555";
    let sends = |at: &Placement, who: &str| -> Vec<(String, Outcome)> {
        let mut outcomes = Vec::new();
        for (src, dst, family) in [
            (nodes.v4(100), nodes.v4(1), "v4"),
            (nodes.v6(100), nodes.v6(1), "v6"),
        ] {
            for kind in ["tcp-syn", "udp", "proto253"] {
                let mark = format!("ward-mark-{who}-{kind}-{family}");
                let outcome = packets_outcome(
                    at,
                    &[
                        "raw-send",
                        &src.to_string(),
                        &dst.to_string(),
                        kind,
                        denied_port,
                        &mark,
                    ],
                );
                outcomes.push((mark, outcome));
            }
        }
        outcomes
    };

    // Outside every workload the same packets arrive: the watcher sees what it should.
    let control = sends(&outsider, "outsider");
    for (mark, outcome) in &control {
        assert_eq!(outcome, &Outcome::Ok, "{mark}: the outsider's raw send");
        let deadline = Instant::now() + scaled(Duration::from_secs(5));
        while !seen_marks(&watcher)
            .iter()
            .any(|s| s.ends_with(mark.as_str()))
        {
            assert!(
                Instant::now() < deadline,
                "the watcher never saw {mark} from outside every workload: {:?}",
                lines_of(&watcher)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let workload = sends(&client, "workload");
    settle();
    let leaked: Vec<String> = seen_marks(&watcher)
        .into_iter()
        .filter(|s| s.contains("ward-mark-workload-"))
        .collect();
    let unexpected: Vec<&(String, Outcome)> = workload
        .iter()
        .filter(|(_, outcome)| !matches!(outcome, Outcome::Eperm | Outcome::Ok))
        .collect();
    assert!(
        leaked.is_empty() && unexpected.is_empty(),
        "hand-made packets from a raw socket of an egress-isolated workload to a port its policy \
         does not allow must be refused (EPERM) or dropped; sendto said {workload:?}; the peer \
         received {leaked:?}; ward log:\n{}",
        ward_tail(&ward)
    );
}

#[test]
fn udp_lite_is_refused_for_isolated_workloads_in_both_directions() {
    let (nodes, cgroups, client) = client_on_two_nodes("udplite");
    let server = Placement::cgroup(cgroups.create("server")).in_netns(nodes.server.name());
    let outsider = Placement::host().in_netns(nodes.client.name());
    let (outside_lite, outside_port) = packets_background(
        &Placement::host().in_netns(nodes.server.name()),
        &["udplite-listen", "::", "0"],
        "listening",
    );
    let (server_lite, server_port) =
        packets_background(&server, &["udplite-listen", "::", "0"], "listening");
    // The policies admit UDP on those very ports: UDP-Lite is not UDP, and no rule can name it.
    let client_policy = client_egress(
        "client-egress",
        &format!("    - name: udp-port\n      ports: [{{port: {outside_port}, protocol: UDP}}]\n"),
    );
    let server_policy = policy(
        "server-ingress",
        &format!(
            "  selector:\n    labels: {{app: server}}\n  ingress:\n    - name: udp-port\n      \
             ports: [{{port: {server_port}, protocol: UDP}}]\n"
        ),
    );
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client"), Workload::new("server")],
        &format!("{client_policy}---\n{server_policy}"),
    );
    let marks = |listener: &Background| -> Vec<String> {
        lines_of(listener)
            .iter()
            .filter_map(|l| l.strip_prefix("datagram "))
            .map(str::to_owned)
            .collect()
    };

    // Harness check: UDP-Lite from outside every workload to an unguarded listener arrives.
    let v4 = nodes.v4(1).to_string();
    let v6 = nodes.v6(1).to_string();
    assert_eq!(
        packets_outcome(
            &outsider,
            &[
                "udplite-send",
                &v4,
                &outside_port,
                "ward-mark-control",
                "unconnected"
            ]
        ),
        Outcome::Ok
    );
    outside_lite.wait_for_line(
        0,
        scaled(Duration::from_secs(5)),
        "with the control datagram",
        |l| l.contains("ward-mark-control"),
    );

    // Egress: refused at once, connected or not, IPv4 and IPv6.
    let mut egress = Vec::new();
    for dst in [&v4, &v6] {
        for how in ["connected", "unconnected"] {
            let mark = format!("ward-mark-egress-{how}-{dst}");
            let outcome =
                packets_outcome(&client, &["udplite-send", dst, &outside_port, &mark, how]);
            egress.push((mark, outcome));
        }
    }
    // Ingress: a sender outside every workload to the ingress-isolated UDP-Lite listener.
    for dst in [&v4, &v6] {
        let mark = format!("ward-mark-ingress-{dst}");
        assert_eq!(
            packets_outcome(
                &outsider,
                &["udplite-send", dst, &server_port, &mark, "unconnected"]
            ),
            Outcome::Ok,
            "the outsider's UDP-Lite send to the server"
        );
    }
    settle();
    let not_refused: Vec<&(String, Outcome)> = egress
        .iter()
        .filter(|(_, outcome)| *outcome != Outcome::Eperm)
        .collect();
    assert!(
        not_refused.is_empty(),
        "UDP-Lite from an egress-isolated workload must fail with EPERM: {egress:?}; received \
         outside: {:?}; ward log:\n{}",
        marks(&outside_lite),
        ward_tail(&ward)
    );
    let leaked: Vec<String> = marks(&outside_lite)
        .into_iter()
        .filter(|m| m.contains("egress"))
        .collect();
    assert!(leaked.is_empty(), "UDP-Lite left the workload: {leaked:?}");
    assert!(
        marks(&server_lite).is_empty(),
        "UDP-Lite reached an ingress-isolated listener: {:?}; ward log:\n{}",
        marks(&server_lite),
        ward_tail(&ward)
    );
}

// ---------------------------------------------------------------------------------------------
// 3. ICMP, neighbour discovery, path MTU discovery
// ---------------------------------------------------------------------------------------------

/// `ping` with its source address given: without `-I`, iputils ping first connects a UDP socket
/// (to port 1025) to learn its source address, which an egress-isolated workload's policy refuses
/// like any other UDP flow, whatever it says about ICMP.
fn ping(at: &Placement, from: IpAddr, to: IpAddr) -> Finished {
    let (from, to) = (from.to_string(), to.to_string());
    let mut args = vec!["-n", "-c", "1", "-W", "2", "-I", &from];
    if to.contains(':') {
        args.push("-6");
    }
    args.push(&to);
    tool(at, "ping", &args)
}

#[test]
fn ping_from_an_egress_isolated_workload_without_an_icmp_rule_fails() {
    let (nodes, cgroups, client) = client_on_two_nodes("noicmp");
    let outsider = Placement::host().in_netns(nodes.client.name());
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-egress", &allow_tcp("web-only", 8080)),
    );
    for (from, to) in [(nodes.v4(100), nodes.v4(1)), (nodes.v6(100), nodes.v6(1))] {
        let control = ping(&outsider, from, to);
        assert!(
            control.status.success(),
            "ping {to} from outside every workload (harness check): {control:?}"
        );
        let refused = ping(&client, from, to);
        assert!(
            !refused.status.success(),
            "ping {to} from an egress-isolated workload with no ICMP rule must fail; it got: \
             {refused:?}; ward log:\n{}",
            ward_tail(&ward)
        );
    }
}

#[test]
fn ping_passes_with_an_echo_request_rule_even_under_ingress_isolation() {
    let (nodes, cgroups, client) = client_on_two_nodes("icmpok");
    let spec = "  selector:\n    labels: {app: client}\n  ingress: []\n  egress:\n    \
                - name: echo\n      ports: [{protocol: ICMP, icmpType: 8}, \
                {protocol: ICMPv6, icmpType: 128}]\n";
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &policy("client-echo", spec),
    );
    for (from, to) in [(nodes.v4(100), nodes.v4(1)), (nodes.v6(100), nodes.v6(1))] {
        let pinged = ping(&client, from, to);
        assert!(
            pinged.status.success(),
            "ping {to} with a rule allowing echo requests must get its reply (a reply, though the \
             workload is ingress-isolated): {pinged:?}; ward log:\n{}",
            ward_tail(&ward)
        );
    }
}

/// A network namespace created by a process in `cgroup`: its kernel sockets (neighbour
/// discovery, ICMP errors, resets) belong to that cgroup, as when a workload's own runtime made
/// its namespace, so the programs see them as the workload's.
struct OwnNetns {
    name: String,
}

impl OwnNetns {
    fn new(tag: &str, cgroup: &Placement) -> Self {
        let name = unique_name(tag);
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        let made = tool(cgroup, "ip", &["netns", "add", &name]);
        assert!(made.status.success(), "ip netns add {name}: {made:?}");
        let netns = OwnNetns { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    fn ip(&self, args: &[&str]) -> String {
        ip_in(&self.name, args)
    }
}

impl Drop for OwnNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn ip_in(netns: &str, args: &[&str]) -> String {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    let output = std::process::Command::new("ip")
        .args(&full)
        .output()
        .unwrap_or_else(|e| panic!("run ip {full:?}: {e}"));
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        full.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn under_default_deny_ping_is_refused_but_neighbour_and_path_mtu_discovery_work() {
    // client ── router ── server; the router's link to the server has MTU 1280, the ends 1500:
    // the client's full-sized segments meet "packet too big" / "fragmentation needed".
    let cgroups = TestCgroups::new("pmtu");
    let workload = Placement::cgroup(cgroups.create("client"));
    let client = OwnNetns::new("pmtu-c", &workload);
    let router = Netns::new("pmtu-r");
    let server = Netns::new("pmtu-s");
    router.veth("r0", "c0", &client.name);
    router.ip(&[
        "link",
        "add",
        "r1",
        "mtu",
        "1280",
        "type",
        "veth",
        "peer",
        "name",
        "s0",
        "netns",
        server.name(),
    ]);
    client.ip(&["addr", "add", "10.232.1.2/24", "dev", "c0"]);
    client.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:232:1::2/64",
        "dev",
        "c0",
        "nodad",
    ]);
    router.ip(&["addr", "add", "10.232.1.1/24", "dev", "r0"]);
    router.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:232:1::1/64",
        "dev",
        "r0",
        "nodad",
    ]);
    router.ip(&["addr", "add", "10.232.2.1/24", "dev", "r1"]);
    router.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:232:2::1/64",
        "dev",
        "r1",
        "nodad",
    ]);
    server.ip(&["addr", "add", "10.232.2.2/24", "dev", "s0"]);
    server.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:232:2::2/64",
        "dev",
        "s0",
        "nodad",
    ]);
    client.ip(&["link", "set", "c0", "up"]);
    router.ip(&["link", "set", "r0", "up"]);
    router.ip(&["link", "set", "r1", "up"]);
    server.ip(&["link", "set", "s0", "up"]);
    client.ip(&["route", "add", "default", "via", "10.232.1.1"]);
    client.ip(&["-6", "route", "add", "default", "via", "fd00:232:1::1"]);
    server.ip(&["route", "add", "default", "via", "10.232.2.1"]);
    server.ip(&["-6", "route", "add", "default", "via", "fd00:232:2::1"]);
    let forwarding = tool(
        &Placement::host().in_netns(router.name()),
        "sh",
        &[
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward && \
             echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
        ],
    );
    assert!(
        forwarding.status.success(),
        "router forwarding: {forwarding:?}"
    );

    let (_sink, sink_port) = packets_background(
        &Placement::host().in_netns(server.name()),
        &["sink", "::", "0"],
        "listening",
    );
    let spec = format!(
        "  selector:\n    labels: {{app: client}}\n  ingress: []\n  egress:\n{}",
        allow_tcp("sink-only", sink_port.parse().expect("a port"))
    );
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &policy("client-default-deny", &spec),
    );
    let in_client = Placement::cgroup(cgroups.path("client")).in_netns(&client.name);
    let bytes = "2000000";
    let timeout = scaled(Duration::from_secs(20)).as_secs_f64().to_string();
    for (server_addr, v6) in [("fd00:232:2::2", true), ("10.232.2.2", false)] {
        // A fresh neighbour: the router's entry is gone, so the first packet waits for
        // neighbour discovery (or ARP) to resolve it.
        client.ip(&["neigh", "flush", "all"]);
        client.ip(&["-6", "neigh", "flush", "all"]);
        let sent = packets(
            &in_client,
            &["bulk", server_addr, &sink_port, bytes, &timeout],
        );
        assert_eq!(
            sent.stdout.trim(),
            format!("ok {bytes}"),
            "a large transfer to {server_addr} on the one allowed port, across a smaller MTU, \
             must complete (neighbour discovery and packet-too-big must pass); ward log:\n{}",
            ward_tail(&ward)
        );
        let family = if v6 { "-6" } else { "-4" };
        let route = client.ip(&[family, "route", "get", server_addr]);
        assert!(
            route.contains("mtu 1280"),
            "the client must have learnt the path MTU to {server_addr} from the router's ICMP \
             error, so the transfer did cross the smaller MTU: {route}"
        );
    }
    for (from, to) in [
        ("10.232.1.2", "10.232.2.2"),
        ("fd00:232:1::2", "fd00:232:2::2"),
    ] {
        let (from, to) = (
            from.parse().expect("an address"),
            to.parse().expect("an address"),
        );
        let refused = ping(&in_client, from, to);
        assert!(
            !refused.status.success(),
            "ping {to} from a workload isolated both ways with only a TCP rule must fail: \
             {refused:?}; ward log:\n{}",
            ward_tail(&ward)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. UDP replies
// ---------------------------------------------------------------------------------------------

#[test]
fn an_egress_isolated_workload_answers_a_datagram_its_ingress_admitted() {
    let peer = peer!();
    let cgroups = TestCgroups::new("udpanswer");
    // `quiet`: isolated for egress only. `guarded`: isolated both ways, a rule admits its ports.
    // `client`: a workload no policy selects, which asks over a connected socket.
    let quiet = Placement::cgroup(cgroups.create("quiet"));
    let guarded = Placement::cgroup(cgroups.create("guarded"));
    let client = Placement::cgroup(cgroups.create("client"));
    let quiet4 = peer.listen(Protocol::Udp, "127.0.0.1:0", &quiet);
    let quiet6 = peer.listen(Protocol::Udp, "[::1]:0", &quiet);
    let guarded4 = peer.listen(Protocol::Udp, "127.0.0.1:0", &guarded);
    let guarded6 = peer.listen(Protocol::Udp, "[::1]:0", &guarded);
    let elsewhere = peer.listen(Protocol::Udp, "127.0.0.1:0", &Placement::host());
    let quiet_policy = policy(
        "quiet-egress",
        "  selector:\n    labels: {app: quiet}\n  egress: []\n",
    );
    let guarded_policy = policy(
        "guarded",
        &format!(
            "  selector:\n    labels: {{app: guarded}}\n  ingress:\n    - name: admit\n      \
             ports: [{{port: {}, protocol: UDP}}, {{port: {}, protocol: UDP}}]\n  egress: []\n",
            guarded4.port(),
            guarded6.port()
        ),
    );
    let ward = Ward::start(
        &cgroups,
        &[
            Workload::new("quiet"),
            Workload::new("guarded"),
            Workload::new("client"),
        ],
        &format!("{quiet_policy}---\n{guarded_policy}"),
    );

    // A host process on an unconnected socket (named by its record), then a workload on a
    // connected one (named by its socket: its admission is written for the answer alone).
    let host = Placement::host();
    let unconnected = ["--timeout-ms", "1500", "--send", "question"];
    let connected = ["--timeout-ms", "1500", "--send", "question", "--connected"];
    for (sender, options, received) in [(&host, &unconnected[..], 1), (&client, &connected[..], 2)]
    {
        for listener in [&quiet4, &quiet6, &guarded4, &guarded6] {
            let (outcome, _) = attempt(&peer, Protocol::Udp, listener.addr, sender, options);
            assert_eq!(
                listener.received(),
                received,
                "the datagram to {} must be admitted (harness check): {:?}",
                listener.addr,
                lines_of(&listener.process)
            );
            assert_eq!(
                outcome,
                Outcome::Ok,
                "the egress-isolated workload behind {} must be able to answer the datagram its \
                 ingress admitted (sendto back to the sender, {options:?}); ward log:\n{}",
                listener.addr,
                ward_tail(&ward)
            );
        }
    }
    // Egress isolation is still in force for anything it starts itself.
    let (own, _) = attempt(
        &peer,
        Protocol::Udp,
        elsewhere.addr,
        &quiet,
        &["--timeout-ms", "500"],
    );
    assert_eq!(
        own,
        Outcome::Eperm,
        "a datagram the egress-isolated workload starts itself must be refused"
    );
}

#[test]
fn a_connected_udp_socket_of_an_ingress_isolated_workload_gets_its_reply() {
    let peer = peer!();
    let cgroups = TestCgroups::new("udpconn");
    let client = Placement::cgroup(cgroups.create("client"));
    let server4 = peer.listen(Protocol::Udp, "127.0.0.1:0", &Placement::host());
    let server6 = peer.listen(Protocol::Udp, "[::1]:0", &Placement::host());
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &policy(
            "client-ingress",
            "  selector:\n    labels: {app: client}\n  ingress: []\n",
        ),
    );
    let timeout = scaled(Duration::from_millis(1500))
        .as_secs_f64()
        .to_string();
    for server in [&server4, &server6] {
        let outcome = packets_outcome(
            &client,
            &[
                "udp-connected",
                &server.addr.ip().to_string(),
                &server.port().to_string(),
                &timeout,
            ],
        );
        assert_eq!(
            server.received(),
            1,
            "the query to {} must leave (harness check)",
            server.addr
        );
        assert_eq!(
            outcome,
            Outcome::Ok,
            "socket(); connect(); send() without bind() from an ingress-isolated workload must \
             get the reply of {}; ward log:\n{}",
            server.addr,
            ward_tail(&ward)
        );
    }
}

/// Three workloads on this host's addresses, for the tests of UDP senders on a shared address:
/// `client`, `other`, and `resolver`, whose ingress admits only `client`.
struct ResolverOnLoopback {
    cgroups: TestCgroups,
    client: Placement,
    other: Placement,
    resolver: Placement,
}

impl ResolverOnLoopback {
    fn new(name: &str) -> Self {
        let cgroups = TestCgroups::new(name);
        let client = Placement::cgroup(cgroups.create("client"));
        let other = Placement::cgroup(cgroups.create("other"));
        let resolver = Placement::cgroup(cgroups.create("resolver"));
        Self {
            cgroups,
            client,
            other,
            resolver,
        }
    }

    /// ward with the resolver's policy in force.
    fn start(&self) -> Ward {
        Ward::start(
            &self.cgroups,
            &[
                Workload::new("client"),
                Workload::new("other"),
                Workload::new("resolver"),
            ],
            &policy(
                "resolver-ingress",
                "  selector:\n    labels: {app: resolver}\n  ingress:\n    - name: clients\n      \
                 from: [{labels: {app: client}}]\n",
            ),
        )
    }
}

#[test]
fn an_unbound_connected_udp_sender_is_named_by_its_workload_on_loopback() {
    // glibc's resolver: socket(); connect(); send() with no bind(). The socket gets its port after
    // the connect hook, so no record of the flow can name it: the receiver's ingress finds the
    // connected socket itself. Before, such a sender was *host* to a receiver on loopback.
    let peer = peer!();
    let workloads = ResolverOnLoopback::new("udpname");
    let (client, other, resolver) = (&workloads.client, &workloads.other, &workloads.resolver);
    let server4 = peer.listen(Protocol::Udp, "127.0.0.1:0", resolver);
    let server6 = peer.listen(Protocol::Udp, "[::1]:0", resolver);
    let ward = workloads.start();
    let timeout = scaled(Duration::from_millis(1500))
        .as_secs_f64()
        .to_string();
    for server in [&server4, &server6] {
        let (addr, port) = (server.addr.ip().to_string(), server.port().to_string());
        let ask =
            |from: &Placement| packets_outcome(from, &["udp-connected", &addr, &port, &timeout]);
        assert_eq!(
            ask(client),
            Outcome::Ok,
            "client, which the rule names, must get the answer of {}; ward log:\n{}",
            server.addr,
            ward_tail(&ward)
        );
        server.wait_received(1, scaled(Duration::from_secs(5)));
        assert_eq!(
            ask(other),
            Outcome::Timeout,
            "other, which no rule names, must not reach {}",
            server.addr
        );
        assert_eq!(
            server.received(),
            1,
            "{} received other's datagram",
            server.addr
        );
    }
}

#[test]
fn an_admitted_datagram_flow_on_a_shared_address_is_not_passed_to_another_workload() {
    // An isolated receiver's ingress admits a flow from `client` on loopback, an address every
    // workload here shares. `client` closes its socket, and `other`, which no rule names, binds
    // the same port and sends to the same receiver: same 4-tuple, so the same flow by its
    // addresses. The admission was `client`'s: `other`'s datagram must not reach the listener.
    // Both ways a sender names itself: a connected socket (found by lookup) and an unconnected
    // one (named by its `sendto()`'s record).
    let peer = peer!();
    let workloads = ResolverOnLoopback::new("udpreuse");
    let (client, other, resolver) = (&workloads.client, &workloads.other, &workloads.resolver);
    let server4 = peer.listen(Protocol::Udp, "127.0.0.1:0", resolver);
    let server6 = peer.listen(Protocol::Udp, "[::1]:0", resolver);
    let ward = workloads.start();
    let timeout = scaled(Duration::from_millis(1500))
        .as_secs_f64()
        .to_string();
    // Each listener's count of datagrams once client's has arrived: one per way so far.
    for (server, how, received) in [
        (&server4, "udp-connected", 1),
        (&server6, "udp-connected", 1),
        (&server4, "udp-sendto", 2),
        (&server6, "udp-sendto", 2),
    ] {
        let (addr, port) = (server.addr.ip().to_string(), server.port().to_string());
        // A port free now, for both senders in turn.
        let any = if server.addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let sport = std::net::UdpSocket::bind(any)
            .and_then(|s| s.local_addr())
            .expect("a free UDP port")
            .port()
            .to_string();
        let ask = |from: &Placement| packets_outcome(from, &[how, &addr, &port, &timeout, &sport]);
        assert_eq!(
            ask(client),
            Outcome::Ok,
            "{how}: client, which the rule names, must get the answer of {} from port {sport}; \
             ward log:\n{}",
            server.addr,
            ward_tail(&ward)
        );
        server.wait_received(received, scaled(Duration::from_secs(5)));
        assert_eq!(
            ask(other),
            Outcome::Timeout,
            "{how}: other, which no rule names, must not reach {} from the port client was \
             admitted from ({sport})",
            server.addr
        );
        assert_eq!(
            server.received(),
            received,
            "{how}: {} received other's datagram from client's admitted port {sport}",
            server.addr
        );
    }
}

#[test]
fn a_datagram_to_loopback_from_another_source_than_a_decoy_connection_names_its_sender() {
    // A datagram to a UDP socket on loopback that is connected to the sender's port writes no
    // record of its flow: its receiver takes it as its peer's. The sender's hook finds that
    // socket by lookup, taking 127.0.0.1 as the source. Here a decoy socket on 127.0.0.1 is
    // connected to the sender's port, but the sender's socket is bound to 127.0.0.2: its datagram
    // goes to the isolated receiver on the wildcard address instead, which names the sender by
    // that record only. Had the hook skipped it, the sender would be *host* there, and refused.
    // (IPv6 has one loopback address, so this is IPv4 only.)
    let workloads = ResolverOnLoopback::new("udpdecoy");
    let (client, other, resolver) = (&workloads.client, &workloads.other, &workloads.resolver);
    let _ward = workloads.start();
    let (receiver, port) =
        packets_background(resolver, &["udp-listen", "0.0.0.0", "0"], "listening");
    let sport = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
        .to_string();
    let (_decoy, _) = packets_background(
        other,
        &["udp-decoy", "127.0.0.1", &port, "127.0.0.1", &sport],
        "connected",
    );
    let timeout = scaled(Duration::from_millis(300)).as_secs_f64().to_string();
    // No answer comes (the listener only prints what it receives).
    packets_outcome(
        client,
        &[
            "udp-sendto",
            "127.0.0.1",
            &port,
            &timeout,
            &sport,
            "127.0.0.2",
        ],
    );
    let deadline = Instant::now() + scaled(Duration::from_secs(5));
    let arrived = |l: &String| l == "datagram unconnected, bound";
    while !lines_of(&receiver).iter().any(arrived) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        lines_of(&receiver).iter().any(arrived),
        "client's datagram from 127.0.0.2:{sport} did not reach the receiver that admits \
         client; it printed {:?}",
        lines_of(&receiver)
    );
}

#[test]
fn a_policy_change_revokes_an_admitted_datagram_flow_the_workload_answered() {
    // The listener's ingress admits a datagram and it answers; after a policy change that admits
    // nothing, the next datagram of the same flow (same socket, same ports) is refused: its
    // answer did not turn the flow into one the workload started itself.
    let peer = peer!();
    let cgroups = TestCgroups::new("udprevoke");
    let guarded = Placement::cgroup(cgroups.create("guarded"));
    let listener4 = peer.listen(Protocol::Udp, "127.0.0.1:0", &guarded);
    let listener6 = peer.listen(Protocol::Udp, "[::1]:0", &guarded);
    let admitting = policy(
        "guarded",
        &format!(
            "  selector:\n    labels: {{app: guarded}}\n  ingress:\n    - name: admit\n      \
             ports: [{{port: {}, protocol: UDP}}, {{port: {}, protocol: UDP}}]\n",
            listener4.port(),
            listener6.port()
        ),
    );
    let mut ward = Ward::start(&cgroups, &[Workload::new("guarded")], &admitting);

    // This test's own sockets: a host process, which no policy limits.
    let exchange = |listener: &Listener| {
        let bind = if listener.addr.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        let socket = std::net::UdpSocket::bind(bind).expect("bind a UDP socket");
        socket
            .set_read_timeout(Some(scaled(Duration::from_millis(1500))))
            .expect("set a read timeout");
        socket.send_to(b"first", listener.addr).expect("send");
        let mut answer = [0u8; 256];
        let got = socket.recv_from(&mut answer);
        assert!(
            got.is_ok(),
            "the admitted datagram to {} must be answered (harness check): {got:?}; ward log:\n{}",
            listener.addr,
            ward_tail(&ward)
        );
        listener.wait_received(1, scaled(Duration::from_secs(2)));
        socket
    };
    let sockets = [exchange(&listener4), exchange(&listener6)];

    ward.reload_applied(&policy(
        "guarded",
        "  selector:\n    labels: {app: guarded}\n  ingress: []\n",
    ));
    for (socket, listener) in sockets.iter().zip([&listener4, &listener6]) {
        socket.send_to(b"second", listener.addr).expect("send");
    }
    std::thread::sleep(scaled(Duration::from_millis(700)));
    for listener in [&listener4, &listener6] {
        assert_eq!(
            listener.received(),
            1,
            "after the policy stopped admitting it, the flow {} answered must be refused; \
             listener output: {:?}; ward log:\n{}",
            listener.addr,
            lines_of(&listener.process),
            ward_tail(&ward)
        );
    }
}

/// A file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn getent_in_an_ingress_isolated_workload_resolves_through_a_real_dns_server() {
    let (nodes, cgroups, client) = client_on_two_nodes("dns");
    let dns_addr = nodes.v4(1).to_string();
    let pid_file = TempFile(std::env::temp_dir().join(format!("{}.pid", unique_name("dnsmasq"))));
    let resolv = TempFile(std::env::temp_dir().join(format!("{}.conf", unique_name("resolv"))));
    std::fs::write(
        &resolv.0,
        format!("nameserver {dns_addr}\noptions timeout:1 attempts:2\n"),
    )
    .expect("write the resolver configuration");
    let dnsmasq = Background::spawn(
        "dnsmasq",
        Placement::host().in_netns(nodes.server.name()).command(
            "dnsmasq",
            &[
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--bind-interfaces",
                &format!("--listen-address={dns_addr}"),
                "--except-interface=lo",
                "--address=/ward.test/10.1.2.3",
                // Answered here, never forwarded: AAAA queries get NODATA, not REFUSED.
                "--local=/ward.test/",
                "--log-facility=-",
                "--log-queries",
                "--user=root",
                &format!("--pid-file={}", pid_file.0.display()),
            ],
        ),
        true,
    );
    // Ready once the server answers a query from outside every workload.
    let outsider = Placement::host().in_netns(nodes.client.name());
    let lookup = |at: &Placement| {
        let script = format!(
            "mount --bind {} /etc/resolv.conf && exec getent hosts db.ward.test",
            resolv.0.display()
        );
        tool(at, "unshare", &["-m", "sh", "-c", &script])
    };
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    loop {
        let control = lookup(&outsider);
        if control.stdout.contains("10.1.2.3") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "getent from outside every workload never resolved (harness check): {control:?}; \
             dnsmasq: {}",
            dnsmasq.lines().tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &policy(
            "client-ingress",
            "  selector:\n    labels: {app: client}\n  ingress: []\n",
        ),
    );
    let resolved = lookup(&client);
    assert!(
        resolved.status.success() && resolved.stdout.contains("10.1.2.3"),
        "getent hosts in an ingress-isolated workload must get the DNS server's answer: \
         {resolved:?}; dnsmasq: {}; ward log:\n{}",
        dnsmasq.lines().tail(20),
        ward_tail(&ward)
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Cgroups the agent has not mapped
// ---------------------------------------------------------------------------------------------

/// Stops a process with SIGSTOP until dropped.
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Self {
        // SAFETY: a signal to a process this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[test]
fn a_child_cgroup_of_a_workload_is_enforced_before_the_agent_maps_it() {
    let peer = peer!();
    let cgroups = TestCgroups::new("child");
    cgroups.create("client");
    let open = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-egress", &allow_tcp("allow-open", open.port())),
    );
    // The agent is stopped: whatever it would do about a new cgroup, it does not do it now.
    let (denied, allowed) = {
        let _stopped = Stopped::new(ward.pid());
        let child = Placement::cgroup(cgroups.create("client/container-1"));
        let denied = attempt(&peer, Protocol::Tcp, closed.addr, &child, &[]).0;
        let allowed = attempt(&peer, Protocol::Tcp, open.addr, &child, &[]).0;
        (denied, allowed)
    };
    assert_eq!(
        denied,
        Outcome::Eperm,
        "a process in a new child cgroup of a workload must be held to the workload's policy at \
         once: its connect to a port the policy does not allow must fail with EPERM; ward log:\n{}",
        ward_tail(&ward)
    );
    assert_eq!(
        allowed,
        Outcome::Ok,
        "the child cgroup gets the workload's allow rules too"
    );
    assert_eq!(closed.received(), 0, "the denied listener saw a connection");
}

#[test]
fn unmapped_cgroups_deny_refuses_a_cgroup_no_workload_maps() {
    let peer = peer!();
    let target = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let workloads = [Workload::new("client")];
    let rules = client_egress("client-egress", &allow_tcp("allow-target", target.port()));

    // By default a cgroup no workload maps is not touched.
    {
        let cgroups = TestCgroups::new("unmapped-default");
        cgroups.create("client");
        let stray = Placement::cgroup(cgroups.create("stray"));
        let ward = Ward::start(&cgroups, &workloads, &rules);
        let (outcome, _) = attempt(&peer, Protocol::Tcp, target.addr, &stray, &[]);
        assert_eq!(
            outcome,
            Outcome::Ok,
            "with the default, an unmapped cgroup is untouched; ward log:\n{}",
            ward_tail(&ward)
        );
    }

    let cgroups = TestCgroups::new("unmapped-deny");
    cgroups.create("client");
    let stray = Placement::cgroup(cgroups.create("stray"));
    let ward =
        Ward::start_with_options(&cgroups, &workloads, &rules, &[], "unmappedCgroups: deny\n");
    let (outcome, _) = attempt(&peer, Protocol::Tcp, target.addr, &stray, &[]);
    assert_eq!(
        outcome,
        Outcome::Eperm,
        "with `unmappedCgroups: deny`, a cgroup below the root that no workload maps must be \
         refused; ward log:\n{}",
        ward_tail(&ward)
    );
    // The workload itself keeps its rules.
    let client = Placement::cgroup(cgroups.path("client"));
    let (outcome, _) = attempt(&peer, Protocol::Tcp, target.addr, &client, &[]);
    assert_eq!(
        outcome,
        Outcome::Ok,
        "the mapped workload's allowed connect"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. SCTP
// ---------------------------------------------------------------------------------------------

#[test]
fn sctp_is_decided_like_tcp_where_the_kernel_has_sctp() {
    let support = packets(&Placement::host(), &["sctp-support"]);
    let support = support.stdout.trim();
    if let Some(rest) = support.strip_prefix("unsupported ") {
        // Not a skip: the test proves the kernel has no SCTP at all, so nothing can get around
        // the policy through it here; the kernel matrix runs the rest.
        let errno: i32 = rest
            .split_whitespace()
            .next()
            .and_then(|e| e.parse().ok())
            .unwrap_or_else(|| panic!("sctp-support said {support:?}"));
        assert!(
            errno == libc::EPROTONOSUPPORT || errno == libc::ESOCKTNOSUPPORT,
            "an SCTP socket failed with errno {errno} ({rest}), not for want of SCTP"
        );
        eprintln!("SCTP: this kernel has no SCTP (socket: {rest}); tested in the kernel matrix");
        println!("SCTP: this kernel has no SCTP; tested in the kernel matrix");
        return;
    }
    assert_eq!(support, "supported", "sctp-support said {support:?}");

    let cgroups = TestCgroups::new("sctp");
    let client = Placement::cgroup(cgroups.create("client"));
    let (open, open_port) = packets_background(
        &Placement::host(),
        &["sctp-listen", "127.0.0.1", "0"],
        "listening",
    );
    let (closed, closed_port) = packets_background(
        &Placement::host(),
        &["sctp-listen", "127.0.0.1", "0"],
        "listening",
    );
    let rules =
        format!("    - name: sctp-open\n      ports: [{{port: {open_port}, protocol: SCTP}}]\n");
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-egress", &rules),
    );
    let timeout = scaled(Duration::from_secs(3)).as_secs_f64().to_string();
    let denied = packets_outcome(
        &client,
        &["sctp-connect", "127.0.0.1", &closed_port, &timeout],
    );
    // EPERM from the connect hook, or an INIT the egress program drops (the connect times out).
    assert!(
        matches!(denied, Outcome::Eperm | Outcome::Timeout),
        "SCTP to a port the policy does not allow must not connect (EPERM, or its INIT \
         dropped), got {denied:?}; ward log:\n{}",
        ward_tail(&ward)
    );
    let allowed = packets_outcome(
        &client,
        &["sctp-connect", "127.0.0.1", &open_port, &timeout],
    );
    assert_eq!(
        allowed,
        Outcome::Ok,
        "SCTP to the allowed port must connect; ward log:\n{}",
        ward_tail(&ward)
    );
    settle();
    assert!(
        !lines_of(&closed).iter().any(|l| l.starts_with("accepted")),
        "the denied SCTP listener accepted an association: {:?}",
        lines_of(&closed)
    );
    assert!(
        lines_of(&open).iter().any(|l| l.starts_with("accepted")),
        "the allowed SCTP listener saw no association: {:?}",
        lines_of(&open)
    );
}
