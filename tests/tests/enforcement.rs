//! ward against real processes: each test builds its own cgroups (and network namespaces), writes
//! a policy, starts the real `ward` binary and runs real clients under it.

mod support;
use std::time::{Duration, Instant};
use std::{net::SocketAddr, path::Path};
use support::*;

use ward_tests::{
    peer, run_with_config, spiffe_id, Listener, Outcome, Peer, Placement, Protocol, TestCgroups,
    TwoNodes, VerdictQuery, Ward, WardOptions, Workload,
};

/// Refusal by the kernel is immediate; a dropped SYN would take a retransmission timeout (1 s).
#[test]
fn allowed_tcp_egress_passes_and_denied_fails_at_once_with_eperm() {
    let peer = peer!();
    let cgroups = TestCgroups::new("tcp4");
    let client = Placement::cgroup(cgroups.create("client"));
    let open = peer.listen_http("127.0.0.1:0", &Placement::host());
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let rules = allow_tcp("allow-open", open.port());
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-egress", &rules),
    );

    assert_allowed(&peer, Protocol::Tcp, open.addr, &client, &ward, &[]);
    assert_refused_at_once(&peer, Protocol::Tcp, closed.addr, &client, &ward, &[]);

    // Real clients see the same.
    let open_port = open.port().to_string();
    let closed_port = closed.port().to_string();
    let nc_open = tool(
        &client,
        "nc",
        &["-v", "-z", "-w", "2", "127.0.0.1", &open_port],
    );
    assert!(
        nc_open.status.success(),
        "nc to the allowed port: {nc_open:?}"
    );
    let nc_closed = tool(
        &client,
        "nc",
        &["-v", "-z", "-w", "2", "127.0.0.1", &closed_port],
    );
    assert!(
        !nc_closed.status.success(),
        "nc reached the denied port: {nc_closed:?}"
    );
    assert!(
        nc_closed.stderr.contains("Operation not permitted"),
        "{nc_closed:?}"
    );
    assert!(
        nc_closed.elapsed < at_once(),
        "nc refusal took {:?}",
        nc_closed.elapsed
    );

    let url = format!("http://127.0.0.1:{open_port}/");
    let curl_open = tool(&client, "curl", &["-sS", "--max-time", "5", &url]);
    assert!(
        curl_open.status.success(),
        "curl to the allowed port: {curl_open:?}"
    );
    assert_eq!(curl_open.stdout, "hello\n");
    let url = format!("http://127.0.0.1:{closed_port}/");
    let curl_closed = tool(&client, "curl", &["-sS", "--max-time", "5", &url]);
    // curl exit 7: could not connect.
    assert_eq!(
        curl_closed.status.code(),
        Some(7),
        "curl to the denied port: {curl_closed:?}"
    );
    assert!(
        curl_closed.elapsed < at_once(),
        "curl refusal took {:?}",
        curl_closed.elapsed
    );
    assert_eq!(closed.received(), 0, "the denied listener saw a connection");
}

#[test]
fn a_rule_that_requires_mtls_is_refused_where_no_tunnel_runs() {
    // Local mode has no tunnel (its certificates come from a control plane): fail closed.
    let peer = peer!();
    let cgroups = TestCgroups::new("notunnel");
    let client = Placement::cgroup(cgroups.create("client"));
    let tls = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let rules = format!(
        "    - name: tls-only\n      ports: [{{port: {}, protocol: TCP}}]\n      mtls: required\n",
        tls.port()
    );
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-egress", &rules),
    );
    assert_refused_at_once(&peer, Protocol::Tcp, tls.addr, &client, &ward, &[]);
    assert_eq!(tls.received(), 0, "nothing left in plaintext");
    let refusal = ward.wait_for_verdict(
        &VerdictQuery {
            verdict: Some("deny"),
            direction: Some("egress"),
            rule: Some("tls-only"),
            dst_port: Some(tls.port()),
            ..Default::default()
        },
        event_timeout(),
    );
    assert!(
        refusal.line.contains("this node runs no tunnel"),
        "{}",
        refusal.line
    );
}

#[test]
fn ipv6_and_v4_mapped_tcp_egress_follow_the_policy() {
    let peer = peer!();
    let cgroups = TestCgroups::new("tcp6");
    let client = Placement::cgroup(cgroups.create("client"));
    let open6 = peer.listen(Protocol::Tcp, "[::1]:0", &Placement::host());
    let closed6 = peer.listen(Protocol::Tcp, "[::1]:0", &Placement::host());
    let open4 = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let closed4 = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let rules = allow_tcp("allow-open6", open6.port()) + &allow_tcp("allow-open4", open4.port());
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-egress", &rules),
    );

    assert_allowed(&peer, Protocol::Tcp, open6.addr, &client, &ward, &[]);
    assert_refused_at_once(&peer, Protocol::Tcp, closed6.addr, &client, &ward, &[]);
    // An IPv6 socket to a v4-mapped address goes through connect6 with a v4 destination.
    let mapped = |port| socket("[::ffff:127.0.0.1]", port);
    assert_allowed(
        &peer,
        Protocol::Tcp,
        mapped(open4.port()),
        &client,
        &ward,
        &[],
    );
    assert_refused_at_once(
        &peer,
        Protocol::Tcp,
        mapped(closed4.port()),
        &client,
        &ward,
        &[],
    );

    let nc = tool(
        &client,
        "nc",
        &[
            "-v",
            "-6",
            "-z",
            "-w",
            "2",
            "::1",
            &closed6.port().to_string(),
        ],
    );
    assert!(
        nc.stderr.contains("Operation not permitted"),
        "nc over IPv6: {nc:?}"
    );
    let nc = tool(
        &client,
        "nc",
        &[
            "-v",
            "-6",
            "-z",
            "-w",
            "2",
            "::1",
            &open6.port().to_string(),
        ],
    );
    assert!(
        nc.status.success(),
        "nc over IPv6 to the allowed port: {nc:?}"
    );
    assert_eq!(
        closed6.received() + closed4.received(),
        0,
        "a denied listener saw a connection"
    );
}

#[test]
fn udp_egress_is_decided_for_unconnected_and_connected_sockets() {
    let peer = peer!();
    let cgroups = TestCgroups::new("udp");
    let client = Placement::cgroup(cgroups.create("client"));
    let open4 = peer.listen(Protocol::Udp, "127.0.0.1:0", &Placement::host());
    let closed4 = peer.listen(Protocol::Udp, "127.0.0.1:0", &Placement::host());
    let open6 = peer.listen(Protocol::Udp, "[::1]:0", &Placement::host());
    let closed6 = peer.listen(Protocol::Udp, "[::1]:0", &Placement::host());
    let rules = format!(
        "    - name: allow-udp\n      ports: [{{port: {}, protocol: UDP}}, {{port: {}, protocol: UDP}}]\n",
        open4.port(),
        open6.port()
    );
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-udp", &rules),
    );

    for connected in [&[][..], &["--connected"][..]] {
        assert_allowed(&peer, Protocol::Udp, open4.addr, &client, &ward, connected);
        assert_refused_at_once(
            &peer,
            Protocol::Udp,
            closed4.addr,
            &client,
            &ward,
            connected,
        );
        assert_allowed(&peer, Protocol::Udp, open6.addr, &client, &ward, connected);
        assert_refused_at_once(
            &peer,
            Protocol::Udp,
            closed6.addr,
            &client,
            &ward,
            connected,
        );
    }
    // sendto a v4-mapped address from an IPv6 socket goes through sendmsg4, connect() through
    // connect6: both must decide on the v4 address.
    let mapped = |port| socket("[::ffff:127.0.0.1]", port);
    for connected in [&[][..], &["--connected"][..]] {
        assert_allowed(
            &peer,
            Protocol::Udp,
            mapped(open4.port()),
            &client,
            &ward,
            connected,
        );
        assert_refused_at_once(
            &peer,
            Protocol::Udp,
            mapped(closed4.port()),
            &client,
            &ward,
            connected,
        );
    }
    let script = format!("echo hi | nc -v -u -w 1 127.0.0.1 {}", closed4.port());
    let nc = tool(&client, "sh", &["-c", &script]);
    assert!(
        nc.stderr.contains("Operation not permitted"),
        "nc -u to the denied port: {nc:?}"
    );
    assert_eq!(
        closed4.received() + closed6.received(),
        0,
        "a denied listener got a datagram"
    );
}

/// Workloads `server`, `friend`, `intruder`; the server admits only `friend` on its port.
fn ingress_setup(tag: &str, protocol: Protocol) -> (TestCgroups, Listener, Ward, Peer) {
    let peer = peer!();
    let cgroups = TestCgroups::new(tag);
    let server = Placement::cgroup(cgroups.create("server"));
    cgroups.create("friend");
    cgroups.create("intruder");
    let listener = peer.listen(protocol, "127.0.0.1:0", &server);
    let proto = if protocol == Protocol::Tcp {
        "TCP"
    } else {
        "UDP"
    };
    let spec = format!(
        "  selector:\n    labels: {{app: server}}\n  ingress:\n    - name: from-friend\n      \
         from: [{{labels: {{app: friend}}}}]\n      ports: [{{port: {}, protocol: {proto}}}]\n",
        listener.port()
    );
    let workloads = [
        Workload::new("server"),
        Workload::new("friend"),
        Workload::new("intruder"),
    ];
    let ward = Ward::start(&cgroups, &workloads, &policy("server-ingress", &spec));
    (cgroups, listener, ward, peer)
}

#[test]
fn denied_tcp_ingress_never_reaches_the_listener() {
    let (cgroups, listener, ward, peer) = ingress_setup("ingress-tcp", Protocol::Tcp);
    let friend = Placement::cgroup(cgroups.path("friend"));
    let intruder = Placement::cgroup(cgroups.path("intruder"));
    assert_allowed(&peer, Protocol::Tcp, listener.addr, &friend, &ward, &[]);
    listener.wait_received(1, ward_tests::scaled(Duration::from_secs(5)));

    let (outcome, _) = attempt(
        &peer,
        Protocol::Tcp,
        listener.addr,
        &intruder,
        &["--timeout-ms", "2500"],
    );
    assert_eq!(
        outcome,
        Outcome::Timeout,
        "the intruder's SYN must be dropped, not answered"
    );
    let nc = tool(
        &intruder,
        "nc",
        &[
            "-v",
            "-z",
            "-w",
            "2",
            "127.0.0.1",
            &listener.port().to_string(),
        ],
    );
    assert!(
        !nc.status.success(),
        "nc from the intruder connected: {nc:?}"
    );
    // Give a late SYN retransmission its chance to show up before counting.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        listener.received(),
        1,
        "the listener accepted the intruder: {:?}",
        listener.process.lines().snapshot()
    );
    ward.wait_for_verdict(
        &VerdictQuery {
            verdict: Some("deny"),
            direction: Some("ingress"),
            policy: Some("server-ingress"),
            src: Some("intruder"),
            dst_port: Some(listener.port()),
            ..Default::default()
        },
        event_timeout(),
    );
}

#[test]
fn denied_udp_ingress_never_reaches_the_listener() {
    let (cgroups, listener, ward, peer) = ingress_setup("ingress-udp", Protocol::Udp);
    let friend = Placement::cgroup(cgroups.path("friend"));
    let intruder = Placement::cgroup(cgroups.path("intruder"));
    assert_allowed(&peer, Protocol::Udp, listener.addr, &friend, &ward, &[]);
    listener.wait_received(1, ward_tests::scaled(Duration::from_secs(5)));
    let (outcome, _) = attempt(
        &peer,
        Protocol::Udp,
        listener.addr,
        &intruder,
        &["--timeout-ms", "1000", "--send", "intruder"],
    );
    assert_eq!(
        outcome,
        Outcome::Timeout,
        "the intruder's datagram must be dropped"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        listener.received(),
        1,
        "the listener got the intruder's datagram: {:?}",
        listener.process.lines().snapshot()
    );
}

#[test]
fn audit_mode_lets_traffic_pass_and_logs_the_verdict() {
    let peer = peer!();
    let cgroups = TestCgroups::new("audit");
    let client = Placement::cgroup(cgroups.create("client"));
    let blocked = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let unlisted = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let spec = format!(
        "  mode: audit\n  selector:\n    labels: {{app: client}}\n  egress:\n{}",
        deny_tcp("audit-block", blocked.port())
    );
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &policy("client-audit", &spec),
    );

    assert_allowed(&peer, Protocol::Tcp, blocked.addr, &client, &ward, &[]);
    assert_allowed(&peer, Protocol::Tcp, unlisted.addr, &client, &ward, &[]);
    blocked.wait_received(1, ward_tests::scaled(Duration::from_secs(5)));
    // The explicit deny rule, reported, not enforced.
    ward.wait_for_verdict(
        &VerdictQuery {
            verdict: Some("audit"),
            direction: Some("egress"),
            policy: Some("client-audit"),
            rule: Some("audit-block"),
            dst_port: Some(blocked.port()),
            ..Default::default()
        },
        event_timeout(),
    );
    // The policy's default deny, reported likewise.
    ward.wait_for_verdict(
        &VerdictQuery {
            verdict: Some("audit"),
            policy: Some("client-audit"),
            dst_port: Some(unlisted.port()),
            ..Default::default()
        },
        event_timeout(),
    );
}

#[test]
fn a_connected_udp_sender_on_a_host_address_is_named_in_another_namespace() {
    // A workload on the host's network (its address names *host*) sends over a connected UDP
    // socket to a workload in a network namespace of its own. No socket lookup in the
    // receiver's namespace finds the sender: the record its `connect()` wrote names it there.
    // (The client node's addresses stand in for the host's: `hostAddresses` declares them.)
    let peer = peer!();
    let nodes = TwoNodes::new("hostudp");
    let cgroups = TestCgroups::new("hostudp");
    let client = Placement::cgroup(cgroups.create("client")).in_netns(nodes.client.name());
    let other = Placement::cgroup(cgroups.create("other")).in_netns(nodes.client.name());
    let db_at = Placement::cgroup(cgroups.create("db")).in_netns(nodes.server.name());
    let listeners: Vec<Listener> = [nodes.v4(1), nodes.v6(1)]
        .iter()
        .map(|ip| peer.listen(Protocol::Udp, &SocketAddr::new(*ip, 0).to_string(), &db_at))
        .collect();
    let mut db = Workload::new("db");
    db.addresses = vec![nodes.v4(1).to_string(), nodes.v6(1).to_string()];
    let ward = Ward::start_with_options(
        &cgroups,
        &[Workload::new("client"), Workload::new("other"), db],
        &policy(
            "db-ingress",
            "  selector:\n    labels: {app: db}\n  ingress:\n    - name: clients\n      \
             from: [{labels: {app: client}}]\n",
        ),
        &[],
        &format!(
            "hostAddresses: [\"{}\", \"{}\"]\n",
            nodes.v4(100),
            nodes.v6(100)
        ),
    );
    let options = ["--connected", "--timeout-ms", "3000"];
    for listener in &listeners {
        assert_allowed(
            &peer,
            Protocol::Udp,
            listener.addr,
            &client,
            &ward,
            &options,
        );
        listener.wait_received(1, ward_tests::scaled(Duration::from_secs(5)));
        let (outcome, _) = attempt(&peer, Protocol::Udp, listener.addr, &other, &options);
        assert_eq!(outcome, Outcome::Timeout, "other reached {}", listener.addr);
        assert_eq!(
            listener.received(),
            1,
            "{} received other's datagram",
            listener.addr
        );
    }
}

#[test]
fn cidr_peers_with_except_between_network_namespaces() {
    let peer = peer!();
    let nodes = TwoNodes::new("cidr");
    nodes.add_server_host(2);
    let cgroups = TestCgroups::new("cidr");
    let client = Placement::cgroup(cgroups.create("client")).in_netns(nodes.client.name());
    let server = Placement::host().in_netns(nodes.server.name());
    let listener = peer.listen(Protocol::Tcp, "[::]:0", &server);
    let port = listener.port();
    let rules = format!(
        "    - name: subnet-but-two\n      to:\n        - cidr: {}\n          except: [{}/32]\n        \
         - cidr: \"{}\"\n          except: [\"{}/128\"]\n      ports: [{{port: {port}}}]\n",
        nodes.v4_subnet(),
        nodes.v4(2),
        nodes.v6_subnet(),
        nodes.v6(2),
    );
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-cidr", &rules),
    );

    assert_allowed(
        &peer,
        Protocol::Tcp,
        SocketAddr::new(nodes.v4(1), port),
        &client,
        &ward,
        &[],
    );
    assert_refused_at_once(
        &peer,
        Protocol::Tcp,
        SocketAddr::new(nodes.v4(2), port),
        &client,
        &ward,
        &[],
    );
    assert_allowed(
        &peer,
        Protocol::Tcp,
        SocketAddr::new(nodes.v6(1), port),
        &client,
        &ward,
        &[],
    );
    assert_refused_at_once(
        &peer,
        Protocol::Tcp,
        SocketAddr::new(nodes.v6(2), port),
        &client,
        &ward,
        &[],
    );

    let port_text = port.to_string();
    let nc_in = tool(
        &client,
        "nc",
        &["-v", "-z", "-w", "2", &nodes.v4(1).to_string(), &port_text],
    );
    assert!(nc_in.status.success(), "nc inside the CIDR: {nc_in:?}");
    let nc_out = tool(
        &client,
        "nc",
        &["-v", "-z", "-w", "2", &nodes.v4(2).to_string(), &port_text],
    );
    assert!(
        nc_out.stderr.contains("Operation not permitted"),
        "nc to the exception: {nc_out:?}"
    );
    let url = format!("http://[{}]:{port_text}/", nodes.v6(2));
    let curl = tool(&client, "curl", &["-sS", "--max-time", "5", &url]);
    assert_eq!(
        curl.status.code(),
        Some(7),
        "curl to the IPv6 exception: {curl:?}"
    );
    ward.wait_for_verdict(
        &VerdictQuery {
            verdict: Some("deny"),
            direction: Some("egress"),
            policy: Some("client-cidr"),
            dst_port: Some(port),
            ..Default::default()
        },
        event_timeout(),
    );
}

#[test]
fn an_explicit_deny_wins_over_every_allow() {
    let peer = peer!();
    let cgroups = TestCgroups::new("deny-wins");
    let client = Placement::cgroup(cgroups.create("client"));
    let target = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let other = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let port = target.port();
    let first = client_egress(
        "client-mixed",
        &(allow_tcp("allow-target", port)
            + &deny_tcp("deny-target", port)
            + &allow_tcp("allow-other", other.port())),
    );
    let second = client_egress("client-also-allows", &allow_tcp("allow-target-too", port));
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &format!("{first}---\n{second}"),
    );

    assert_refused_at_once(&peer, Protocol::Tcp, target.addr, &client, &ward, &[]);
    assert_allowed(&peer, Protocol::Tcp, other.addr, &client, &ward, &[]);
    let verdict = ward.wait_for_verdict(
        &VerdictQuery {
            verdict: Some("deny"),
            dst_port: Some(port),
            ..Default::default()
        },
        event_timeout(),
    );
    assert_eq!(
        verdict.policy.as_deref(),
        Some("client-mixed"),
        "{}",
        verdict.line
    );
    assert!(
        VerdictQuery {
            rule: Some("deny-target"),
            ..Default::default()
        }
        .matches(&verdict),
        "the verdict must name the deny rule: {}",
        verdict.line
    );
}

/// Runs one attempt in `at` every 100 ms until `want` comes, for at most `within`.
fn poll_until(
    peer: &Peer,
    to: SocketAddr,
    at: &Placement,
    want: &Outcome,
    within: Duration,
) -> Vec<Outcome> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let (outcome, _) = attempt(peer, Protocol::Tcp, to, at, &["--timeout-ms", "1000"]);
        let done = &outcome == want;
        seen.push(outcome);
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    seen
}

#[test]
fn a_workload_started_after_ward_is_enforced() {
    let peer = peer!();
    let cgroups = TestCgroups::new("late");
    let open = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let workload = Workload::new("client");
    let ward = Ward::start(
        &cgroups,
        &[workload],
        &client_egress("client-egress", &allow_tcp("allow-open", open.port())),
    );

    // Created only now; a nested cgroup belongs to the workload of its ancestor.
    for relative in ["client", "client/inner"] {
        let late = Placement::cgroup(cgroups.create(relative));
        let seen = poll_until(
            &peer,
            closed.addr,
            &late,
            &Outcome::Eperm,
            ward_tests::scaled(Duration::from_secs(5)),
        );
        assert_eq!(
            seen.last(),
            Some(&Outcome::Eperm),
            "cgroup {relative} created after ward was never enforced (outcomes {seen:?}); log:\n{}",
            ward.log().tail(100)
        );
        assert_allowed(&peer, Protocol::Tcp, open.addr, &late, &ward, &[]);
    }
}

#[test]
fn reloads_under_a_thousand_concurrent_connections_never_give_a_wrong_verdict() {
    let peer = peer!();
    let cgroups = TestCgroups::new("reload-load");
    let client = Placement::cgroup(cgroups.create("client"));
    let open = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let (o, c) = (open.port(), closed.port());
    // Equivalent policies, each written differently: same verdicts for both ports.
    let variants = [
        client_egress("client-egress", &allow_tcp("allow-open", o)),
        client_egress(
            "client-egress",
            &(allow_tcp("unrelated", 1) + &allow_tcp("allow-open", o)),
        ),
        client_egress(
            "client-egress",
            &(allow_tcp("allow-open-renamed", o) + &deny_tcp("never-open", c)),
        ),
        format!(
            "{}---\n{}",
            client_egress("client-egress", &allow_tcp("allow-open", o)),
            client_egress("client-extra", &allow_tcp("unrelated-udp-free", 2))
        ),
    ];
    let mut ward = Ward::start(&cgroups, &[Workload::new("client")], &variants[0]);
    let stop = StopFile::new("reload-load");
    let mut allowed = start_load(&peer, open.addr, &client, 4, &stop.0);
    let mut denied = start_load(&peer, closed.addr, &client, 4, &stop.0);
    wait_started(&allowed);
    wait_started(&denied);
    for round in 0..8 {
        ward.reload_applied(&variants[(round + 1) % variants.len()]);
    }
    stop.stop();
    let allowed = finish_load(&mut allowed);
    let denied = finish_load(&mut denied);
    assert!(
        allowed.len() + denied.len() >= 1000,
        "only {} attempts ran across the reloads",
        allowed.len() + denied.len()
    );
    eprintln!(
        "reload under load: allowed port {}, denied port {}",
        tally(&allowed),
        tally(&denied)
    );
    assert_load_verdicts("during reloads", &allowed, &denied, &closed, &ward);
}

#[test]
fn a_broken_policy_reloaded_under_traffic_is_refused_and_the_previous_one_stays() {
    let peer = peer!();
    let cgroups = TestCgroups::new("reload-broken");
    let client = Placement::cgroup(cgroups.create("client"));
    let open = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let good = client_egress("client-egress", &allow_tcp("allow-open", open.port()));
    let mut ward = Ward::start(&cgroups, &[Workload::new("client")], &good);
    let stop = StopFile::new("reload-broken");
    let mut allowed = start_load(&peer, open.addr, &client, 2, &stop.0);
    let mut denied = start_load(&peer, closed.addr, &client, 2, &stop.0);
    wait_started(&allowed);
    wait_started(&denied);

    // Would open the closed port, if ward half-applied it; `portz` is not a field.
    let broken = client_egress(
        "client-egress",
        &format!(
            "    - name: allow-everything\n      portz: [{{port: {}}}]\n",
            closed.port()
        ),
    );
    let from = ward.log_len();
    let reload = ward.reload(&broken);
    assert!(
        !reload.applied,
        "ward applied a broken policy: {:?}",
        reload.outcome_lines
    );
    assert!(
        log_has(&ward, from, "portz") && log_has(&ward, from, "policy.yaml"),
        "the rejection must name the file and the field; log:\n{}",
        ward.log().tail(50)
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.stop();
    let allowed = finish_load(&mut allowed);
    let denied = finish_load(&mut denied);
    assert_load_verdicts(
        "after a refused reload (the previous policy must stay enforced)",
        &allowed,
        &denied,
        &closed,
        &ward,
    );

    // Reloading still works after a refusal.
    let wider = client_egress(
        "client-egress",
        &(allow_tcp("allow-open", open.port()) + &allow_tcp("allow-closed", closed.port())),
    );
    ward.reload_applied(&wider);
    assert_allowed(&peer, Protocol::Tcp, closed.addr, &client, &ward, &[]);
}

/// 3,000 entries beside the rules under test: a change must not rewrite them.
fn filler_ports() -> String {
    "    - name: filler\n      ports: [{port: 20000, endPort: 22999, protocol: TCP}]\n".into()
}

/// The fields of a `policy applied` line.
fn applied_fields(line: &str) -> serde_json::Value {
    let start = line
        .find('{')
        .unwrap_or_else(|| panic!("not a JSON log line: {line}"));
    serde_json::from_str(&line[start..])
        .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
}

/// Replaces the policy file with `policy` (one reload, from the file watch); panics unless the
/// apply wrote and removed at least one and at most `most` entries in all. Returns its fields.
fn apply_by_difference(ward: &mut Ward, policy: &str, most: u64) -> serde_json::Value {
    let line = ward.replace_policy(policy);
    let fields = applied_fields(&line);
    let count = |key: &str| {
        fields[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no `{key}` count in {line}"))
    };
    let changed = count("written") + count("removed");
    assert!(changed > 0, "a changed policy must change entries: {line}");
    assert!(
        changed <= most,
        "a one-rule change must write only that rule, not the policy's thousands of entries: {line}"
    );
    eprintln!("applied by difference: {line}");
    fields
}

#[test]
fn one_rule_changes_to_a_large_policy_are_applied_by_difference_under_traffic() {
    let peer = peer!();
    let cgroups = TestCgroups::new("diff-apply");
    let client = Placement::cgroup(cgroups.create("client"));
    let steady = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let toggled = [
        peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host()),
        peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host()),
    ];
    let rules = allow_tcp("steady", steady.port()) + &filler_ports();
    let policy_allowing = |which: &[usize]| {
        let mut allowed = rules.clone();
        for &i in which {
            allowed += &allow_tcp(&format!("toggled-{i}"), toggled[i].port());
        }
        client_egress("client-egress", &allowed)
    };
    let mut ward = Ward::start(&cgroups, &[Workload::new("client")], &policy_allowing(&[]));

    let stop = StopFile::new("diff-apply");
    let mut allowed = start_load(&peer, steady.addr, &client, 2, &stop.0);
    let mut denied = start_load(&peer, closed.addr, &client, 2, &stop.0);
    wait_started(&allowed);
    wait_started(&denied);
    // One rule added or removed per step. Each apply writes the other generation bit, so a bit
    // gets the changes of two steps at a time: the one before (its catch-up after the settle)
    // and its own.
    // A bit left behind by a step would lose a rule added there.
    let steps: [&[usize]; 6] = [&[0], &[0, 1], &[1], &[], &[0], &[0, 1]];
    let mut generations = Vec::new();
    for allowing in steps {
        let applied = apply_by_difference(&mut ward, &policy_allowing(allowing), 4);
        assert!(
            applied["entries"].as_u64().is_some_and(|n| n > 3000),
            "the policy under test has the filler's 3,000 entries: {applied}"
        );
        generations.push(applied["generation"].as_u64().expect("a generation"));
        for (i, listener) in toggled.iter().enumerate() {
            if allowing.contains(&i) {
                assert_allowed(&peer, Protocol::Tcp, listener.addr, &client, &ward, &[]);
            } else {
                assert_refused_at_once(&peer, Protocol::Tcp, listener.addr, &client, &ward, &[]);
            }
        }
    }
    // The same rules spelled differently (a comment added): read and compiled again, equal to
    // what is in force, so nothing is written and the generation stays.
    let line = ward.replace_policy(&(policy_allowing(&[0, 1]) + "\n# the same rules\n"));
    let same = applied_fields(&line);
    assert_eq!(
        (
            same["switched"].as_bool(),
            same["written"].as_u64(),
            same["removed"].as_u64(),
            same["generation"].as_u64(),
        ),
        (Some(false), Some(0), Some(0), generations.last().copied()),
        "an unchanged policy must neither write nor switch: {line}"
    );
    for listener in &toggled {
        assert_allowed(&peer, Protocol::Tcp, listener.addr, &client, &ward, &[]);
    }
    stop.stop();
    let allowed = finish_load(&mut allowed);
    let denied = finish_load(&mut denied);
    assert!(
        generations.windows(2).all(|w| w[1] == w[0] + 1),
        "each change is the next generation, so the bits take turns: {generations:?}"
    );
    eprintln!(
        "changes by difference under load: steady port {}, closed port {}",
        tally(&allowed),
        tally(&denied)
    );
    assert_load_verdicts(
        "during changes by difference",
        &allowed,
        &denied,
        &closed,
        &ward,
    );
}

/// The maps a stopped agent leaves hold its policy in both generation bits; the next agent knows
/// neither, so it rewrites both in full before it changes anything by difference.
#[test]
fn a_restart_with_a_changed_policy_enforces_the_new_one_and_then_applies_by_difference() {
    let peer = peer!();
    let cgroups = TestCgroups::new("diff-restart");
    let client = Placement::cgroup(cgroups.create("client"));
    let steady = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let first = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let second = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let rules = allow_tcp("steady", steady.port()) + &filler_ports();
    let policy_allowing = |ports: &[&Listener]| {
        let mut allowed = rules.clone();
        for (i, listener) in ports.iter().enumerate() {
            allowed += &allow_tcp(&format!("allow-{i}"), listener.port());
        }
        client_egress("client-egress", &allowed)
    };
    let workloads = [Workload::new("client")];
    let keep = ["--keep-enforcing"];
    let mut ward = Ward::start_with_args(&cgroups, &workloads, &policy_allowing(&[&first]), &keep);
    assert_allowed(&peer, Protocol::Tcp, first.addr, &client, &ward, &[]);
    assert_refused_at_once(&peer, Protocol::Tcp, second.addr, &client, &ward, &[]);

    let stop = StopFile::new("diff-restart");
    let mut allowed = start_load(&peer, steady.addr, &client, 2, &stop.0);
    let mut denied = start_load(&peer, closed.addr, &client, 2, &stop.0);
    wait_started(&allowed);
    wait_started(&denied);
    let status = ward.stop();
    assert!(
        status.success(),
        "ward --keep-enforcing exited with {status}"
    );
    std::fs::write(ward.policy_file(), policy_allowing(&[&second]))
        .unwrap_or_else(|e| panic!("write {}: {e}", ward.policy_file().display()));
    ward.respawn(&ward_tests::ward_bin(), &keep);
    assert_allowed(&peer, Protocol::Tcp, second.addr, &client, &ward, &[]);
    assert_refused_at_once(&peer, Protocol::Tcp, first.addr, &client, &ward, &[]);

    // Both bits now hold the new policy: one-rule changes into each are a few writes.
    apply_by_difference(&mut ward, &policy_allowing(&[&second, &first]), 4);
    assert_allowed(&peer, Protocol::Tcp, first.addr, &client, &ward, &[]);
    apply_by_difference(&mut ward, &policy_allowing(&[&first]), 4);
    assert_refused_at_once(&peer, Protocol::Tcp, second.addr, &client, &ward, &[]);
    assert_allowed(&peer, Protocol::Tcp, first.addr, &client, &ward, &[]);
    stop.stop();
    let allowed = finish_load(&mut allowed);
    let denied = finish_load(&mut denied);
    assert_load_verdicts("across the restart", &allowed, &denied, &closed, &ward);
}

/// A policy file changed while the agent starts (after it read the policy, before it watches the
/// files) is read again before it says `ready`: the change is not lost.
#[test]
fn a_policy_changed_while_the_agent_starts_is_enforced_once_it_is_ready() {
    let peer = peer!();
    let cgroups = TestCgroups::new("startchange");
    let client = Placement::cgroup(cgroups.create("client"));
    let open = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let deny_all = policy(
        "client-egress",
        "  selector:\n    labels: {app: client}\n  egress: []\n",
    );
    let mut ward = Ward::start(&cgroups, &[Workload::new("client")], &deny_all);
    assert_refused_at_once(&peer, Protocol::Tcp, open.addr, &client, &ward, &[]);
    ward.kill();
    ward.respawn_changing_policy(&client_egress(
        "client-egress",
        &allow_tcp("allow-open", open.port()),
    ));
    assert_allowed(&peer, Protocol::Tcp, open.addr, &client, &ward, &[]);
}

/// An allowed connection does not wake the agent: the kernel counts allowed flows, keyed without
/// the client's ephemeral port, and the agent reports each flow once per reading (every second)
/// with its count. An event per connection would give twenty lines (or the eight of a flow's event
/// budget), each standing for one.
#[test]
fn allowed_connections_are_counted_in_the_kernel_and_reported_once_per_reading() {
    let peer = peer!();
    let cgroups = TestCgroups::new("counted");
    let client = Placement::cgroup(cgroups.create("client"));
    let open = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-egress", &allow_tcp("allow-open", open.port())),
    );
    let from = ward.log_len();
    let attempts = peer.connect(Protocol::Tcp, open.addr, &client, &["--count", "20"]);
    assert_eq!(attempts.count(&Outcome::Ok), 20, "{attempts:?}");
    // Two readings after the last connection, every count has been read.
    std::thread::sleep(Duration::from_millis(2500));
    let query = VerdictQuery {
        verdict: Some("allow"),
        dst_port: Some(open.port()),
        ..Default::default()
    };
    let lines = ward.lines();
    let allowed: Vec<_> = ward_tests::parse_verdicts(&lines[from..])
        .into_iter()
        .filter(|v| query.matches(v))
        .collect();
    let counted: u64 = allowed.iter().map(|v| v.count).sum();
    assert_eq!(
        counted,
        20,
        "the allow lines must stand for every connection; log:\n{}",
        ward.log().tail(40)
    );
    assert!(
        allowed.len() <= 3,
        "{} allow lines for 20 connections of one flow: one per reading expected; log:\n{}",
        allowed.len(),
        ward.log().tail(40)
    );
}

/// A workload's listener names its port to peers on this host. Once it is gone and a process of
/// no workload listens on that port, that process is the host, not the workload: a client allowed
/// to the workload (and not to the host) is refused. The process runs in a cgroup below the root
/// that no workload maps, as a node's own services do when the root is the whole hierarchy
/// (the bind hook sees only sockets below the root).
#[test]
fn a_port_a_workload_listened_on_is_not_its_name_once_a_host_process_listens_there() {
    let peer = peer!();
    let cgroups = TestCgroups::new("relisten");
    let client = Placement::cgroup(cgroups.create("client"));
    let web = Placement::cgroup(cgroups.create("web"));
    let unmapped = Placement::cgroup(cgroups.create("node-service"));
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("bound").port()
    };
    let spec = format!(
        "  selector:\n    labels: {{app: client}}\n  egress:\n    - name: to-web\n      \
         to: [{{labels: {{app: web}}}}]\n      ports: [{{port: {port}}}]\n"
    );
    let ward = Ward::start(
        &cgroups,
        &[
            Workload::new("client").label("app", "client"),
            Workload::new("web").label("app", "web"),
        ],
        &policy("client-egress", &spec),
    );
    let addr = format!("127.0.0.1:{port}");
    let workload_listener = peer.listen(Protocol::Tcp, &addr, &web);
    assert_allowed(
        &peer,
        Protocol::Tcp,
        workload_listener.addr,
        &client,
        &ward,
        &[],
    );
    drop(workload_listener);
    let host_listener = peer.listen(Protocol::Tcp, &addr, &unmapped);
    assert_refused_at_once(
        &peer,
        Protocol::Tcp,
        host_listener.addr,
        &client,
        &ward,
        &[],
    );
    assert_eq!(
        host_listener.received(),
        0,
        "the host's listener saw the client"
    );
}

/// Two workloads on the same port at two loopback addresses: each is named by its own socket,
/// the one the kernel delivers to, not by the port. A client allowed to the one that bound last
/// (`cache`, on 127.0.0.2) is still refused by the other (`web`, on 127.0.0.1), over TCP and
/// UDP. (A record by port, the last one made, named both `cache`: the client reached `web`.)
#[test]
fn a_workload_on_the_same_port_at_another_address_does_not_lend_its_name() {
    let peer = peer!();
    let cgroups = TestCgroups::new("sameport");
    let client = Placement::cgroup(cgroups.create("client"));
    let web = Placement::cgroup(cgroups.create("web"));
    let cache = Placement::cgroup(cgroups.create("cache"));
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("bound").port()
        };
        let proto = match protocol {
            Protocol::Tcp => "TCP",
            _ => "UDP",
        };
        let spec = format!(
            "  selector:\n    labels: {{app: client}}\n  egress:\n    - name: to-cache\n      \
             to: [{{labels: {{app: cache}}}}]\n      ports: [{{port: {port}, protocol: {proto}}}]\n"
        );
        let ward = Ward::start(
            &cgroups,
            &[
                Workload::new("client").label("app", "client"),
                Workload::new("web").label("app", "web"),
                Workload::new("cache").label("app", "cache"),
            ],
            &policy("client-egress", &spec),
        );
        let web_listener = peer.listen(protocol, &format!("127.0.0.1:{port}"), &web);
        let cache_listener = peer.listen(protocol, &format!("127.0.0.2:{port}"), &cache);
        assert_allowed(&peer, protocol, cache_listener.addr, &client, &ward, &[]);
        assert_refused_at_once(&peer, protocol, web_listener.addr, &client, &ward, &[]);
        assert_eq!(
            web_listener.received(),
            0,
            "{proto}: web, which no rule allows, was reached through cache's name"
        );
        drop(ward);
    }
}

#[test]
fn verdict_lines_name_the_policy_rule_and_flow() {
    let peer = peer!();
    let cgroups = TestCgroups::new("verdicts");
    let client = Placement::cgroup(cgroups.create("client"));
    let open = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let unlisted = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let blocked = peer.listen(Protocol::Udp, "127.0.0.1:0", &Placement::host());
    let rules = allow_tcp("allow-open", open.port())
        + &format!(
            "    - name: block-udp\n      action: deny\n      ports: [{{port: {}, protocol: UDP}}]\n",
            blocked.port()
        );
    let ward = Ward::start(
        &cgroups,
        &[Workload::new("client")],
        &client_egress("client-egress", &rules),
    );
    let client_id = spiffe_id("client");

    assert_allowed(&peer, Protocol::Tcp, open.addr, &client, &ward, &[]);
    assert_refused_at_once(&peer, Protocol::Tcp, unlisted.addr, &client, &ward, &[]);
    assert_refused_at_once(&peer, Protocol::Udp, blocked.addr, &client, &ward, &[]);

    let allow = ward.wait_for_verdict(
        &VerdictQuery {
            verdict: Some("allow"),
            direction: Some("egress"),
            policy: Some("client-egress"),
            rule: Some("allow-open"),
            src: Some(&client_id),
            dst_port: Some(open.port()),
            protocol: Some("tcp"),
            ..Default::default()
        },
        event_timeout(),
    );
    assert_eq!(
        allow.dst_addr.as_deref(),
        Some("127.0.0.1"),
        "{}",
        allow.line
    );
    let default_deny = ward.wait_for_verdict(
        &VerdictQuery {
            verdict: Some("deny"),
            direction: Some("egress"),
            policy: Some("client-egress"),
            src: Some(&client_id),
            dst_port: Some(unlisted.port()),
            protocol: Some("tcp"),
            ..Default::default()
        },
        event_timeout(),
    );
    let rule = default_deny.rule.as_deref().unwrap_or_default();
    assert!(
        !rule.is_empty() && rule != "-",
        "the default deny must be named: {}",
        default_deny.line
    );
    ward.wait_for_verdict(
        &VerdictQuery {
            verdict: Some("deny"),
            direction: Some("egress"),
            policy: Some("client-egress"),
            rule: Some("block-udp"),
            src: Some(&client_id),
            dst_port: Some(blocked.port()),
            protocol: Some("udp"),
            ..Default::default()
        },
        event_timeout(),
    );
}

#[test]
fn a_bad_configuration_is_refused_with_a_message_naming_the_field() {
    let cgroups = TestCgroups::new("bad-config");
    let root = cgroups.root().to_string_lossy().into_owned();
    let cases = [
        (
            "cgroupRooot",
            format!("trustDomain: ward.test\ncgroupRooot: {root}\n"),
        ),
        (
            "labelz",
            format!("cgroupRoot: {root}\nworkloads:\n  - name: web\n    labelz: {{app: web}}\n"),
        ),
    ];
    for (field, config) in cases {
        let (file, finished) = run_with_config("bad-config", &config);
        let output = format!("{}{}", finished.stdout, finished.stderr);
        assert!(
            !finished.status.success(),
            "ward accepted an unknown field {field}: {output}"
        );
        assert!(
            output.contains(field),
            "the error must name {field}: {output}"
        );
        let file_name = file.file_name().expect("a file name").to_string_lossy();
        assert!(
            output.contains(&*file_name),
            "the error must name the file: {output}"
        );
        assert!(
            !output.contains("panicked") && !output.contains("stack backtrace"),
            "a configuration error is a message, not a crash: {output}"
        );
    }
    assert!(
        std::fs::read_dir(cgroups.root()).is_ok_and(|mut entries| entries
            .all(|e| { e.is_ok_and(|e| !e.file_type().is_ok_and(|t| t.is_dir())) })),
        "a refused configuration must change nothing"
    );
}

#[test]
fn sigterm_detaches_and_keep_enforcing_leaves_the_policy_in_force() {
    let peer = peer!();
    let cgroups = TestCgroups::new("shutdown");
    let client = Placement::cgroup(cgroups.create("client"));
    let closed = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let policy = client_egress("client-egress", &allow_tcp("allow-none", 1));
    let mut ward = Ward::start(&cgroups, &[Workload::new("client")], &policy);
    assert_refused_at_once(&peer, Protocol::Tcp, closed.addr, &client, &ward, &[]);
    let status = ward.stop();
    assert!(
        status.success(),
        "ward exited with {status} on SIGTERM; log:\n{}",
        ward.log().tail(50)
    );
    let leftovers: Vec<_> = std::fs::read_dir(ward.pin_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        !ward.admin_socket().exists(),
        "admin socket {} left after a clean stop",
        ward.admin_socket().display()
    );
    assert!(
        leftovers.is_empty(),
        "pins left after a clean stop: {leftovers:?}"
    );
    let (outcome, _) = attempt(&peer, Protocol::Tcp, closed.addr, &client, &[]);
    assert_eq!(
        outcome,
        Outcome::Ok,
        "programs still attached after a clean stop"
    );
    drop(ward);

    let mut ward = Ward::start_with_args(
        &cgroups,
        &[Workload::new("client")],
        &policy,
        &["--keep-enforcing"],
    );
    assert_refused_at_once(&peer, Protocol::Tcp, closed.addr, &client, &ward, &[]);
    let status = ward.stop();
    assert!(
        status.success(),
        "ward --keep-enforcing exited with {status}"
    );
    assert_refused_at_once(&peer, Protocol::Tcp, closed.addr, &client, &ward, &[]);
}

#[test]
fn sigterm_right_after_ready_still_detaches_cleanly() {
    let cgroups = TestCgroups::new("early-stop");
    cgroups.create("client");
    let policy = client_egress("client-egress", &allow_tcp("allow-none", 1));
    let mut ward = Ward::start(&cgroups, &[Workload::new("client")], &policy);
    // `ready` promises a working agent: a stop request from then on is handled, not fatal.
    let status = ward.stop();
    assert!(
        status.success(),
        "ward exited with {status} on a SIGTERM right after `ready`; log:\n{}",
        ward.log().tail(50)
    );
    let leftovers: Vec<_> = std::fs::read_dir(ward.pin_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "pins left: {leftovers:?}");
}

/// Lays out `dir` as a Kubernetes ConfigMap volume shows it: `policy.yaml -> ..data/policy.yaml`,
/// `..data -> ..<version>`; a new version is written beside the old and `..data` renamed over,
/// as the kubelet does.
fn configmap_update(dir: &Path, version: &str, policy: &str) {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data).expect("configmap version dir");
    std::fs::write(data.join("policy.yaml"), policy).expect("configmap policy");
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).expect("..data_tmp");
    std::fs::rename(&tmp, dir.join("..data")).expect("rename ..data");
    let link = dir.join("policy.yaml");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/policy.yaml", &link).expect("policy.yaml link");
    }
}

#[test]
fn a_configmap_update_and_a_policy_file_moved_away_are_seen_without_a_signal() {
    let peer = peer!();
    let cgroups = TestCgroups::new("configmap");
    let client = Placement::cgroup(cgroups.create("client"));
    let first = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let second = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let base = std::env::temp_dir().join("ward-test-configmap-volumes");
    let _ = std::fs::remove_dir_all(&base);
    let (volume, plain, away) = (base.join("volume"), base.join("plain"), base.join("away"));
    for dir in [&volume, &plain, &away] {
        std::fs::create_dir_all(dir).expect("policy dirs");
    }
    configmap_update(
        &volume,
        "2026_01_01_00_00_00.1",
        &client_egress("from-configmap", &allow_tcp("allow-first", first.port())),
    );
    std::fs::write(
        plain.join("second.yaml"),
        client_egress("from-plain-dir", &allow_tcp("allow-second", second.port())),
    )
    .expect("plain policy");
    let ward = Ward::launch(
        &cgroups,
        &[Workload::new("client")],
        WardOptions {
            policy: None,
            args: &[],
            config_extra: format!(
                "policies:\n  - {}\n  - {}\n",
                volume.display(),
                plain.display()
            ),
            netns: None,
        },
    );
    assert_allowed(&peer, Protocol::Tcp, first.addr, &client, &ward, &[]);
    assert_allowed(&peer, Protocol::Tcp, second.addr, &client, &ward, &[]);

    let applied = |from: usize, what: &str| {
        let line = ward.wait_for_log(
            from,
            ward_tests::scaled(Duration::from_secs(10)),
            what,
            |l| l.contains("policy applied") || l.contains("policy rejected"),
        );
        assert!(
            line.contains("policy applied") && line.contains("file change"),
            "{what}: {line}"
        );
    };
    // The kubelet's update: the configmap's policy now allows nothing.
    let from = ward.log_len();
    configmap_update(
        &volume,
        "2026_01_01_00_01_00.2",
        &client_egress("from-configmap", "    []\n"),
    );
    applied(from, "applying the configmap's new version");
    assert_refused_at_once(&peer, Protocol::Tcp, first.addr, &client, &ward, &[]);
    assert_allowed(&peer, Protocol::Tcp, second.addr, &client, &ward, &[]);

    // A policy file moved out of a watched directory is a policy removed.
    let from = ward.log_len();
    std::fs::rename(plain.join("second.yaml"), away.join("second.yaml")).expect("move away");
    applied(
        from,
        "applying the move of second.yaml out of the directory",
    );
    assert_refused_at_once(&peer, Protocol::Tcp, second.addr, &client, &ward, &[]);
    let _ = std::fs::remove_dir_all(&base);
}
