//! Services in the kernel: a connection or datagram to a cluster IP and port is translated at
//! `connect()`/`sendmsg()` to one of its backends, and policy judges that backend; replies and
//! `getpeername()` show the cluster IP again. The Services come from the agent's configuration
//! (`services:`), so these run on every kernel of the VM matrix; tests/tests/kubernetes_cluster.rs
//! has them from a cluster, for pods in network namespaces of their own.
//!
//! The client is a workload in a network namespace of its own, which has no route to the cluster
//! IPs: a connection the kernel did not translate fails there, and nothing leaves the test's
//! namespaces.
mod support;
use std::{net::SocketAddr, time::Duration};

use support::*;
use ward_tests::{
    peer, received_by, scaled, Listener, Outcome, Placement, Protocol, TestCgroups, TwoNodes, Ward,
    Workload,
};

fn service(
    name: &str,
    ips: &[&str],
    affinity: bool,
    ports: &[(&str, u16, &str, Vec<SocketAddr>)],
) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, proto, backends)| {
            let backends: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
            format!(
                "{{name: {n}, port: {p}, protocol: {proto}, backends: [{}]}}",
                backends.join(", ")
            )
        })
        .collect();
    let ips: Vec<String> = ips.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "  - name: {name}\n    namespace: shop\n    clusterIPs: [{}]\n    sessionAffinity: {}\n    ports: [{}]\n",
        ips.join(", "),
        if affinity { "ClientIP" } else { "None" },
        ports.join(", ")
    )
}

#[test]
fn a_cluster_ip_is_translated_to_a_backend_and_policy_judges_the_backend() {
    let peer = peer!();
    let nodes = TwoNodes::new("svc");
    for host in [2, 3] {
        nodes.add_server_host(host);
    }
    let cgroups = TestCgroups::new("svc");
    let client = Placement::cgroup(cgroups.create("client")).in_netns(nodes.client.name());
    let db_at = Placement::cgroup(cgroups.create("db")).in_netns(nodes.server.name());
    let web_at = Placement::cgroup(cgroups.create("web")).in_netns(nodes.server.name());
    // db's two backends (server hosts 1 and 2, HTTP on both families, UDP echo on host 1) and
    // web (host 3), each address a workload's own.
    let web_listener = peer.listen_http(&format!("{}:0", nodes.v4(3)), &web_at);
    let mut db_http: Vec<Listener> = Vec::new();
    for host in [1, 2] {
        for ip in &[nodes.v4(host), nodes.v6(host)] {
            db_http.push(peer.listen_http(&SocketAddr::new(*ip, 8080).to_string(), &db_at));
        }
    }
    let db_udp: Vec<Listener> = [nodes.v4(1), nodes.v6(1)]
        .iter()
        .map(|ip| {
            peer.listen(
                Protocol::Udp,
                &SocketAddr::new(*ip, 5353).to_string(),
                &db_at,
            )
        })
        .collect();
    let at = |host: u8, port: u16| SocketAddr::new(nodes.v4(host), port);
    let at6 = |host: u8, port: u16| SocketAddr::new(nodes.v6(host), port);
    let services = [
        service(
            "db",
            &["10.96.0.20", "fd00:96::20"],
            false,
            &[
                (
                    "http",
                    80,
                    "TCP",
                    vec![at(1, 8080), at(2, 8080), at6(1, 8080), at6(2, 8080)],
                ),
                ("echo", 7, "UDP", vec![at(1, 5353), at6(1, 5353)]),
            ],
        ),
        service(
            "sticky",
            &["10.96.0.21"],
            true,
            &[("http", 80, "TCP", vec![at(1, 8080), at(2, 8080)])],
        ),
        service(
            "web",
            &["10.96.0.30"],
            false,
            &[("http", 80, "TCP", vec![at(3, web_listener.port())])],
        ),
        service(
            "empty",
            &["10.96.0.40", "fd00:96::40"],
            false,
            &[("http", 80, "TCP", vec![])],
        ),
    ];
    let mut db = Workload::new("db");
    db.addresses = [1, 2]
        .iter()
        .flat_map(|h| [nodes.v4(*h).to_string(), nodes.v6(*h).to_string()])
        .collect();
    let mut web = Workload::new("web");
    web.addresses = vec![nodes.v4(3).to_string(), nodes.v6(3).to_string()];
    // The client may reach db only, on any port; nothing may reach the client.
    let policy = policy(
        "client",
        "  selector:\n    labels: {app: client}\n  egress:\n    - name: db\n      to:\n        - labels: {app: db}\n  ingress: []\n",
    );
    let ward = Ward::start_with_options(
        &cgroups,
        &[Workload::new("client"), db, web],
        &policy,
        &[],
        &format!("services:\n{}", services.concat()),
    );

    // TCP through both cluster IPs: the socket's peer is the cluster IP.
    assert_eq!(
        curl_peer(&client, "http://10.96.0.20/").unwrap(),
        "10.96.0.20"
    );
    assert_eq!(
        curl_peer(&client, "http://[fd00:96::20]/").unwrap(),
        "fd00:96::20"
    );
    // Every connection reaches a backend of its family, and both backends get some.
    for (target, first) in [("10.96.0.20:80", 0), ("[fd00:96::20]:80", 1)] {
        let backends = [&db_http[first], &db_http[first + 2]];
        let before: usize = backends.iter().map(|b| b.received()).sum();
        let many = peer.connect(
            Protocol::Tcp,
            target.parse().unwrap(),
            &client,
            &["--count", "40"],
        );
        assert_eq!(many.count(&Outcome::Ok), 40, "{target}: {many:?}");
        let served = received_by(&backends, before + 40, scaled(Duration::from_secs(10)));
        assert!(
            served.iter().all(|n| *n > 0),
            "{target}: both backends served: {served:?}"
        );
    }
    // UDP, connected and unconnected: the reply comes from the cluster IP (the peer reports
    // `wrong-source` otherwise).
    for target in ["10.96.0.20:7", "[fd00:96::20]:7"] {
        for connected in [&["--connected"][..], &[]] {
            let mut options = vec!["--timeout-ms", "3000"];
            options.extend_from_slice(connected);
            assert_allowed(
                &peer,
                Protocol::Udp,
                target.parse().unwrap(),
                &client,
                &ward,
                &options,
            );
        }
    }
    assert!(db_udp.iter().all(|l| l.received() > 0));

    // Session affinity: every socket of the client reaches one backend.
    let backends = [&db_http[0], &db_http[2]];
    let before: Vec<usize> = backends.iter().map(|b| b.received()).collect();
    let sticky = peer.connect(
        Protocol::Tcp,
        "10.96.0.21:80".parse().unwrap(),
        &client,
        &["--count", "20"],
    );
    assert_eq!(sticky.count(&Outcome::Ok), 20, "{sticky:?}");
    let served = received_by(
        &backends,
        before.iter().sum::<usize>() + 20,
        scaled(Duration::from_secs(10)),
    );
    let gained: Vec<usize> = served.iter().zip(&before).map(|(s, b)| s - b).collect();
    assert!(
        gained.contains(&0) && gained.contains(&20),
        "one backend took all: {gained:?}"
    );

    // A Service whose backend the client may not reach: refused at once; the verdict names the
    // Service and the backend.
    let mark = ward.lines().len();
    assert_refused_at_once(
        &peer,
        Protocol::Tcp,
        "10.96.0.30:80".parse().unwrap(),
        &client,
        &ward,
        &[],
    );
    let web_ip = nodes.v4(3);
    let named = ward.log().wait_for(mark, event_timeout(), |l| {
        l.contains("\"verdict\":\"deny\"")
            && l.contains("\"service\":\"shop/web\"")
            && l.contains(&format!("\"dst_addr\":\"{web_ip}\""))
    });
    assert!(
        named.is_some(),
        "the deny names the Service and the backend:\n{}",
        ward.log().tail(20)
    );
    assert_eq!(web_listener.received(), 0, "nothing reached web");

    // No backend: ECONNREFUSED at once, for TCP and for a datagram, IPv4 and IPv6.
    for target in ["10.96.0.40:80", "[fd00:96::40]:80"] {
        let (outcome, elapsed) =
            attempt(&peer, Protocol::Tcp, target.parse().unwrap(), &client, &[]);
        assert_eq!(outcome, Outcome::Refused, "{target}");
        assert!(
            elapsed < at_once(),
            "{target}: refused at once, not after {elapsed:?}"
        );
    }

    // A process of no workload (below the cgroup root ward attaches to) is translated too, and no
    // policy applies to it.
    let host = Placement::cgroup(cgroups.create("unmapped")).in_netns(nodes.client.name());
    assert_eq!(
        curl_peer(&host, "http://10.96.0.30/").unwrap(),
        "10.96.0.30"
    );
}
