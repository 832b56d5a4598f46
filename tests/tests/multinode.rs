//! Several nodes under one real `ward-control`: each node is a network namespace with its own
//! `ward` agent, cgroup subtree and pin directory (see `ward_tests::cluster`). Workloads on one
//! node connect to workloads on another over the test's own bridge; what the kernel of each node
//! allows follows the policy in the control plane's directory.

mod support;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use support::*;

use ward_tests::{peer, Cluster, Listener, Peer, Placement, Protocol, Workload};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Egress of `app: client` to `app: <to>`, on `port` if given (every port otherwise).
fn client_to(name: &str, to: &str, port: Option<u16>) -> String {
    let ports = port.map_or(String::new(), |p| {
        format!("      ports: [{{port: {p}, protocol: TCP}}]\n")
    });
    client_egress(
        name,
        &format!("    - name: to-{to}\n      to:\n        - labels: {{app: {to}}}\n{ports}"),
    )
}

fn db_on(address: IpAddr) -> Workload {
    Workload::new("db").address(&address.to_string())
}

/// A cluster of `nodes` nodes; node B runs `db` (on B's own address) with two listeners, the
/// other nodes a `client`. Every agent runs and knows every node's workloads.
struct Setup {
    cluster: Cluster,
    peer: Peer,
    /// On node B, in the db cgroup.
    first: Listener,
    second: Listener,
}

impl Setup {
    fn new(tag: &str, nodes: usize, plane_args: &[&str]) -> Self {
        let peer = peer!();
        let mut cluster = Cluster::new(tag, nodes, &[], plane_args);
        let db = cluster.node(B).workload("db");
        let first = peer.listen(Protocol::Tcp, "0.0.0.0:0", &db);
        let second = peer.listen(Protocol::Tcp, "0.0.0.0:0", &db);
        let db_address = cluster.node(B).address();
        for index in 0..nodes {
            let workloads = if index == B {
                vec![db_on(db_address)]
            } else {
                // The cgroup exists before ward starts, so it is mapped from the first packet on.
                cluster.node(index).workload("client");
                vec![Workload::new("client")]
            };
            cluster.node_mut(index).start(&workloads);
        }
        // client and db; db's one address.
        for node in cluster.nodes() {
            node.wait_known(0, 2, 1);
        }
        Setup {
            cluster,
            peer,
            first,
            second,
        }
    }

    fn db(&self, listener: &Listener) -> SocketAddr {
        SocketAddr::new(self.cluster.node(B).address(), listener.port())
    }

    fn client(&self, node: usize) -> Placement {
        self.cluster.node(node).workload("client")
    }

    fn assert_allowed(&self, from: usize, to: SocketAddr) {
        let node = self.cluster.node(from);
        assert_allowed(
            &self.peer,
            Protocol::Tcp,
            to,
            &self.client(from),
            node.ward(),
            &[],
        );
    }

    fn assert_refused(&self, from: usize, to: SocketAddr) {
        let node = self.cluster.node(from);
        assert_refused_at_once(
            &self.peer,
            Protocol::Tcp,
            to,
            &self.client(from),
            node.ward(),
            &[],
        );
    }

    /// From `from`: the first listener reachable and the second refused, or the reverse.
    fn assert_only(&self, from: usize, first_open: bool) {
        let (open, closed) = if first_open {
            (&self.first, &self.second)
        } else {
            (&self.second, &self.first)
        };
        self.assert_allowed(from, self.db(open));
        self.assert_refused(from, self.db(closed));
    }
}

#[test]
fn a_policy_change_in_the_control_plane_changes_every_nodes_kernel() {
    let setup = Setup::new("mn-change", 3, &[]);
    // Before any policy: nothing is isolated.
    setup.assert_allowed(A, setup.db(&setup.second));

    let first = Some(setup.first.port());
    setup
        .cluster
        .apply_policy("client.yaml", &client_to("client-egress", "db", first));
    for node in [A, C] {
        setup.assert_only(node, true);
    }

    let second = Some(setup.second.port());
    setup
        .cluster
        .apply_policy("client.yaml", &client_to("client-egress", "db", second));
    for node in [A, C] {
        setup.assert_only(node, false);
    }
}

#[test]
fn a_workload_started_on_another_node_is_reachable_only_as_policy_says() {
    let mut setup = Setup::new("mn-new-workload", 2, &[]);
    setup
        .cluster
        .apply_policy("client.yaml", &client_to("client-egress", "cache", None));
    let cache_address = setup.cluster.node_mut(B).add_address();
    let other_address = setup.cluster.node_mut(B).add_address();
    let node_b = setup.cluster.node(B);
    let cache = setup.peer.listen(
        Protocol::Tcp,
        &format!("{cache_address}:0"),
        &node_b.workload("cache"),
    );
    let other = setup.peer.listen(
        Protocol::Tcp,
        &format!("{other_address}:0"),
        &node_b.workload("other"),
    );
    // Not a workload yet: the address is the world, which the client may not reach.
    setup.assert_refused(A, cache.addr);

    let mark = setup.cluster.node(A).ward().log_len();
    let db = db_on(setup.cluster.node(B).address());
    let reload = setup.cluster.node_mut(B).ward_mut().set_workloads(&[
        db,
        Workload::new("cache").address(&cache_address.to_string()),
        Workload::new("other").address(&other_address.to_string()),
    ]);
    assert!(reload.applied, "{:?}", reload.outcome_lines);
    // client, db, cache, other; three addresses.
    setup.cluster.node(A).wait_known(mark, 4, 3);
    setup.assert_allowed(A, cache.addr);
    setup.assert_refused(A, other.addr);
    assert_eq!(other.received(), 0, "the refused listener saw a connection");
}

#[test]
fn enforcement_holds_while_the_control_plane_is_down_and_resyncs_after() {
    let mut setup = Setup::new("mn-plane-down", 2, &[]);
    setup.cluster.apply_policy(
        "client.yaml",
        &client_to("client-egress", "db", Some(setup.first.port())),
    );
    setup.assert_only(A, true);

    let mark = setup.cluster.node(A).ward().log_len();
    setup.cluster.plane.kill();
    setup.cluster.node(A).ward().wait_for_log(
        mark,
        ward_tests::scaled(Duration::from_secs(20)),
        "noticing the control plane is gone",
        |line| line.contains("control plane stream failed"),
    );
    setup.assert_only(A, true);
    // Through a few reconnection attempts.
    std::thread::sleep(Duration::from_secs(2));
    setup.assert_only(A, true);

    let mark = setup.cluster.node(A).ward().log_len();
    setup.cluster.plane.restart();
    setup.cluster.node(A).ward().wait_for_log(
        mark,
        ward_tests::scaled(Duration::from_secs(30)),
        "reconnecting to the restarted control plane",
        |line| line.contains("connected to the control plane"),
    );
    setup.assert_only(A, true);
    setup.cluster.apply_policy(
        "client.yaml",
        &client_to("client-egress", "db", Some(setup.second.port())),
    );
    setup.assert_only(A, false);
}

#[test]
fn an_agent_restarted_while_the_control_plane_is_down_enforces_its_last_applied_state() {
    let mut setup = Setup::new("mn-agent-restart", 2, &[]);
    setup.cluster.apply_policy(
        "client.yaml",
        &client_to("client-egress", "db", Some(setup.first.port())),
    );
    setup.assert_only(A, true);

    setup.cluster.plane.kill();
    let ward = setup.cluster.node_mut(A).ward_mut();
    // SIGTERM: programs detached and pins removed, so nothing of the old run keeps enforcing.
    assert!(ward.stop().success(), "ward stopped cleanly");
    let ready = ward.respawn(&ward_tests::ward_bin(), &[]);
    assert!(
        log_has(ward, 0, "enforcing the last applied control-plane state"),
        "{ready}\n{}",
        ward.log().tail(50)
    );
    setup.assert_only(A, true);

    let mark = setup.cluster.node(A).ward().log_len();
    setup.cluster.plane.restart();
    setup.cluster.node(A).ward().wait_for_log(
        mark,
        ward_tests::scaled(Duration::from_secs(30)),
        "reconnecting to the restarted control plane",
        |line| line.contains("connected to the control plane"),
    );
    setup.cluster.apply_policy(
        "client.yaml",
        &client_to("client-egress", "db", Some(setup.second.port())),
    );
    setup.assert_only(A, false);
}

#[test]
fn a_policy_the_check_refuses_never_reaches_the_agents_and_the_kernel_keeps_the_old_one() {
    let setup = Setup::new("mn-refuse", 2, &[]);
    setup.cluster.apply_policy(
        "client.yaml",
        &client_to("client-egress", "db", Some(setup.first.port())),
    );
    setup.assert_only(A, true);

    // Valid YAML of a valid kind and name, refused by the policy library: the control plane
    // refuses it itself, with the check's diagnostic, and serves nothing new.
    let marks = setup.cluster.log_marks();
    let from = setup.cluster.plane.logs().len();
    let broken = client_to("client-egress", "db", Some(setup.second.port()))
        .replace("      to:", "      bogus: 1\n      to:");
    setup.cluster.plane.write_policy("client.yaml", &broken);
    assert!(
        setup.cluster.plane.wait_for_log(
            "policy directory refused whole",
            ward_tests::scaled(Duration::from_secs(10))
        ),
        "{}",
        setup.cluster.plane.logs()
    );
    let log = setup
        .cluster
        .plane
        .logs()
        .get(from..)
        .unwrap_or_default()
        .to_owned();
    assert!(
        log.contains("client.yaml:") && log.contains("unknown field `bogus`"),
        "{log}"
    );
    assert!(!log.contains("policy set updated"), "{log}");
    std::thread::sleep(ward_tests::scaled(Duration::from_millis(500)));
    setup.assert_only(A, true);
    for (node, mark) in setup.cluster.nodes().iter().zip(&marks) {
        assert!(
            !log_has(node.ward(), *mark, "policy rejected")
                && !log_has(node.ward(), *mark, ward_tests::cluster::APPLIED),
            "{} received something after the refusal:\n{}",
            node.name,
            node.ward().log().tail(50)
        );
    }

    // The next good change still arrives.
    setup.cluster.apply_policy(
        "client.yaml",
        &client_to("client-egress", "db", Some(setup.second.port())),
    );
    setup.assert_only(A, false);
}

#[test]
fn a_node_gone_for_longer_than_its_lease_leaves_the_other_nodes_ip_cache() {
    let setup = Setup::new("mn-lease", 2, &["--node-lease", "3s"]);
    let mut cluster = setup.cluster;
    cluster.apply_policy("client.yaml", &client_to("client-egress", "db", None));
    let db = SocketAddr::new(cluster.node(B).address(), setup.first.port());
    let client = cluster.node(A).workload("client");
    let attempt_db = || support::attempt(&setup.peer, Protocol::Tcp, db, &client, &[]).0;
    assert_eq!(attempt_db(), ward_tests::Outcome::Ok);

    // Node B is decommissioned: its agent stops for good (its listener stays, without ward).
    let mark = cluster.node(A).ward().log_len();
    cluster.node_mut(B).stop();
    // Only client is left, without addresses.
    cluster.node(A).wait_known(mark, 1, 0);
    assert!(
        cluster.plane.logs().contains("node removed"),
        "{}",
        cluster.plane.logs()
    );
    assert_eq!(
        attempt_db(),
        ward_tests::Outcome::Eperm,
        "B's address is the world now; log:\n{}",
        cluster.node(A).ward().log().tail(50)
    );
}

#[test]
fn a_reused_join_token_is_refused_and_the_other_nodes_carry_on() {
    let mut setup = Setup::new("mn-token", 3, &[]);
    setup.cluster.apply_policy(
        "client.yaml",
        &client_to("client-egress", "db", Some(setup.first.port())),
    );

    // Node C loses its certificate (a reinstalled host) and joins again with its used token.
    let node_c = setup.cluster.node_mut(C);
    node_c.stop();
    std::fs::remove_dir_all(node_c.state_dir()).expect("removing node C's state");
    node_c.start(&[Workload::new("client")]);
    node_c.ward().wait_for_log(
        0,
        ward_tests::scaled(Duration::from_secs(20)),
        "saying its join was refused",
        |line| line.contains("join refused by the control plane") && line.contains("already used"),
    );
    assert!(
        setup
            .cluster
            .plane
            .wait_for_log("join refused", ward_tests::scaled(Duration::from_secs(10))),
        "{}",
        setup.cluster.plane.logs()
    );

    // Nodes A and B still follow the control plane.
    let marks = setup.cluster.log_marks();
    let version = setup.cluster.write_policy(
        "client.yaml",
        &client_to("client-egress", "db", Some(setup.second.port())),
    );
    for node in [A, B] {
        setup.cluster.node(node).wait_applied(
            marks[node],
            &version,
            ward_tests::scaled(Duration::from_secs(20)),
        );
    }
    setup.assert_only(A, false);
    // Node C never joined: it enforces no policy, and says why.
    setup.assert_allowed(C, setup.db(&setup.first));
}
