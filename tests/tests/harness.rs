//! The harness's own pieces, checked without the agent: the peer binary, cgroup placement and
//! cleanup, network namespaces, and the real clients (nc, curl) the enforcement tests use.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use ward_tests::{
    peer, require_root, run, Netns, Outcome, Placement, Protocol, TestCgroups, TwoNodes,
};

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a literal socket address")
}

#[test]
fn peer_speaks_tcp_and_udp_over_loopback() {
    require_root();
    let peer = peer!();
    let tcp = peer.listen(Protocol::Tcp, "127.0.0.1:0", &Placement::host());
    let attempts = peer.connect(
        Protocol::Tcp,
        tcp.addr,
        &Placement::host(),
        &["--count", "3"],
    );
    assert_eq!(attempts.outcomes, vec![Outcome::Ok; 3], "{attempts:?}");
    tcp.wait_received(3, ward_tests::scaled(Duration::from_secs(5)));

    let udp = peer.listen(Protocol::Udp, "[::1]:0", &Placement::host());
    let unconnected = peer.connect(
        Protocol::Udp,
        udp.addr,
        &Placement::host(),
        &["--send", "x"],
    );
    assert_eq!(unconnected.only(), &Outcome::Ok, "{unconnected:?}");
    let connected = peer.connect(
        Protocol::Udp,
        udp.addr,
        &Placement::host(),
        &["--connected"],
    );
    assert_eq!(connected.only(), &Outcome::Ok, "{connected:?}");
    udp.wait_received(2, ward_tests::scaled(Duration::from_secs(5)));

    // A closed TCP port refuses; a closed UDP port stays silent to an unconnected socket and
    // refuses a connected one (ICMP port unreachable).
    let closed = addr(&format!("127.0.0.1:{}", free_port()));
    let refused = peer.connect(Protocol::Tcp, closed, &Placement::host(), &[]);
    assert_eq!(refused.only(), &Outcome::Refused);
    let silent = peer.connect(
        Protocol::Udp,
        closed,
        &Placement::host(),
        &["--timeout-ms", "300"],
    );
    assert_eq!(silent.only(), &Outcome::Timeout);
    let udp_refused = peer.connect(Protocol::Udp, closed, &Placement::host(), &["--connected"]);
    assert_eq!(udp_refused.only(), &Outcome::Refused);
}

fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    socket.local_addr().expect("bound address").port()
}

#[test]
fn placed_processes_run_in_their_cgroup_and_cleanup_removes_it() {
    require_root();
    let cgroups = TestCgroups::new("harness-cgroup");
    let root = cgroups.root().to_path_buf();
    let workload = cgroups.create("workload/nested");
    let placement = Placement::cgroup(&workload);
    let finished = run(
        "cat /proc/self/cgroup",
        placement.command("cat", &["/proc/self/cgroup"]),
        ward_tests::scaled(Duration::from_secs(10)),
    );
    let relative = workload
        .strip_prefix(ward_tests::cgroup2_mount())
        .expect("below the mount");
    assert!(
        finished
            .stdout
            .contains(&format!("0::/{}", relative.display())),
        "the process ran in {}: {}",
        workload.display(),
        finished.stdout
    );
    // A process still running at drop time is killed and the subtree removed.
    let sleeper =
        ward_tests::Background::spawn("sleep", placement.command("sleep", &["600"]), true);
    drop(cgroups);
    drop(sleeper);
    assert!(!root.exists(), "{} left behind", root.display());
}

#[test]
fn two_nodes_reach_each_other_over_ipv4_and_ipv6_only_inside_their_namespaces() {
    require_root();
    let peer = peer!();
    let nodes = TwoNodes::new("harness-net");
    nodes.add_server_host(2);
    let server = Placement::host().in_netns(nodes.server.name());
    let client = Placement::host().in_netns(nodes.client.name());
    let listener = peer.listen(Protocol::Tcp, "[::]:0", &server);
    for target in [nodes.v4(1), nodes.v4(2), nodes.v6(1), nodes.v6(2)] {
        let to = SocketAddr::new(target, listener.port());
        let attempts = peer.connect(Protocol::Tcp, to, &client, &[]);
        assert_eq!(
            attempts.only(),
            &Outcome::Ok,
            "connect to {to}: {attempts:?}"
        );
    }
    // The host itself has no route into the test subnet.
    let from_host = peer.connect(
        Protocol::Tcp,
        SocketAddr::new(nodes.v4(1), listener.port()),
        &Placement::host(),
        &["--timeout-ms", "300"],
    );
    assert_ne!(from_host.only(), &Outcome::Ok, "{from_host:?}");
    let name = nodes.client.name().to_owned();
    drop(listener);
    drop(nodes);
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(&name),
        "netns {name} left behind"
    );
    let netns = Netns::new("harness-single");
    assert!(std::path::Path::new("/run/netns")
        .join(netns.name())
        .exists());
}

#[test]
fn nc_and_curl_reach_the_peer_listeners() {
    require_root();
    let peer = peer!();
    let http = peer.listen_http("127.0.0.1:0", &Placement::host());
    let port = http.port().to_string();
    let url = format!("http://127.0.0.1:{port}/");
    let curl = run(
        "curl",
        Placement::host().command("curl", &["-sS", "--max-time", "5", &url]),
        ward_tests::scaled(Duration::from_secs(10)),
    );
    assert!(curl.status.success(), "curl: {curl:?}");
    assert_eq!(curl.stdout, "hello\n");
    let nc = run(
        "nc -z",
        Placement::host().command("nc", &["-z", "-w", "2", "127.0.0.1", &port]),
        ward_tests::scaled(Duration::from_secs(10)),
    );
    assert!(nc.status.success(), "nc: {nc:?}");

    let udp = peer.listen(Protocol::Udp, "127.0.0.1:0", &Placement::host());
    let udp_port = udp.port().to_string();
    let script = format!("echo hi | nc -u -w 1 127.0.0.1 {udp_port}");
    let nc_udp = run(
        "nc -u",
        Placement::host().command("sh", &["-c", &script]),
        ward_tests::scaled(Duration::from_secs(10)),
    );
    assert!(nc_udp.status.success(), "nc -u: {nc_udp:?}");
    udp.process.wait_for_line(
        0,
        ward_tests::scaled(Duration::from_secs(5)),
        "with the datagram",
        |line| line.starts_with("datagram ") && line.ends_with(" hi"),
    );
}
