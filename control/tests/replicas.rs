//! Two real `ward-control` replicas sharing a real etcd (Debian's etcd-server, started by the
//! test on loopback ports), spoken to by the agent's own control-plane client.

mod common;
use common::{agent_config, join, join_with, workload, Agent};

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use ward_agent::control::{RemoteState, ReportedWorkload};
use ward_control::test_helpers::{ControlPlane, Etcd, Network};

/// etcd members and two replicas, each on a host of its own (a network namespace) on one
/// bridge: members on hosts `0..members`, replica a on the next host and b on the one after.
/// The test's agents reach the replicas across the bridge.
struct Setup {
    etcd: Etcd,
    a: ControlPlane,
    b: ControlPlane,
    /// Dropped last: the processes in its namespaces go first.
    network: Network,
}

impl Setup {
    /// Replica a's host.
    fn a_host(&self) -> usize {
        self.etcd.member_count()
    }
}

/// [`Setup`] with `members` etcd members (speaking TLS with client certificates when `tls`)
/// and node leases of `lease`. The replicas have their own directories and the same CA files,
/// created once with `ward-control init-ca`.
fn setup(tmp: &Path, members: usize, tls: bool, lease: &str) -> Setup {
    let network = Network::new(members + 2);
    let hosts: Vec<usize> = (0..members).collect();
    let etcd = Etcd::on(tmp, &network, &hosts, tls);
    let ca = tmp.join("ca");
    let made = Command::new(env!("CARGO_BIN_EXE_ward-control"))
        .args(["init-ca", "--trust-domain", "example.org", "--state-dir"])
        .arg(&ca)
        .output()
        .expect("running ward-control init-ca");
    assert!(made.status.success(), "init-ca: {made:?}");
    // Both ways of sharing the CA: replica a reads it where it was made (as from a mounted
    // Secret, `--ca-dir`), b has copies in its state directory.
    let start = |name: &str, host: usize| {
        let root = tmp.join(name);
        std::fs::create_dir_all(root.join("state")).expect("state dir");
        let address = network.address(host);
        let mut args: Vec<String> = vec![
            "--etcd-endpoints".into(),
            etcd.endpoint.clone(),
            "--node-lease".into(),
            lease.into(),
            "--metrics-listen".into(),
            format!("{address}:9965"),
        ];
        if name == "a" {
            args.extend(["--ca-dir".into(), ca.display().to_string()]);
        } else {
            for file in ["ca.pem", "ca-key.pem", "trust-domain"] {
                std::fs::copy(ca.join(file), root.join("state").join(file))
                    .expect("copying the CA");
            }
        }
        if let Some(tls) = etcd.tls() {
            for (flag, file) in [
                ("--etcd-ca", &tls.ca),
                ("--etcd-cert", &tls.client_cert),
                ("--etcd-key", &tls.client_key),
            ] {
                args.extend([flag.into(), file.display().to_string()]);
            }
        }
        common::start_plane(&root, |opts| {
            opts.listen = std::net::SocketAddr::new(address, 7443);
            opts.netns = Some(network.host(host).to_owned());
            opts.extra_args = args;
        })
    };
    let (a, b) = (start("a", members), start("b", members + 1));
    Setup {
        etcd,
        a,
        b,
        network,
    }
}

fn identities(state: &RemoteState) -> BTreeMap<String, u32> {
    state
        .identities
        .iter()
        .map(|i| (i.spiffe_id.clone(), i.identity))
        .collect()
}

/// `count` workloads of `count` identities (`app-<i>`), at addresses in `10.<net>.0.0/16`.
fn workloads(count: u32, net: u8) -> Vec<ReportedWorkload> {
    (0..count)
        .map(|i| {
            workload(
                &format!("w{i}"),
                &format!("app-{i}"),
                &format!("10.{net}.{}.{}", i / 250, i % 250 + 1),
            )
        })
        .collect()
}

fn has(state: &RemoteState, address: &str) -> bool {
    let address: IpAddr = address.parse().expect("address");
    state.ipcache.iter().any(|(a, _)| *a == address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_identities_nodes_and_join_tokens() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let Setup { etcd, a, b, .. } = &setup(tmp.path(), 1, false, "1h");
    let mut on_a = Agent::start(
        agent_config(a, tmp.path(), "node-a"),
        vec![workload("web", "web", "10.0.0.1")],
    );
    let mut on_b = Agent::start(
        agent_config(b, tmp.path(), "node-b"),
        vec![
            workload("db", "db", "10.0.0.2"),
            workload("web-2", "web", "10.0.0.3"),
        ],
    );
    let seen_a = on_a
        .until("node-b's workloads through replica b", |s| {
            has(s, "10.0.0.2") && has(s, "10.0.0.3") && has(s, "10.0.0.1")
        })
        .await;
    let seen_b = on_b
        .until("node-a's workload through replica a", |s| {
            has(s, "10.0.0.1")
        })
        .await;
    assert_eq!(
        identities(&seen_a),
        identities(&seen_b),
        "one number per identity on both replicas"
    );
    assert_eq!(identities(&seen_a).len(), 2);

    // One policy history for both replicas: the set both serve at start is one version, and a
    // change both read is the next one, recorded once.
    let db = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: db\nspec:\n  selector: {labels: {app: db}}\n  ingress: []\n";
    a.write_policy("db.yaml", db);
    b.write_policy("db.yaml", db);
    on_a.until("db policy", |s| s.policies.len() == 2).await;
    on_b.until("db policy", |s| s.policies.len() == 2).await;
    let history = Command::new(env!("CARGO_BIN_EXE_ward-control"))
        .args(["history", "--json", "--trust-domain", "example.org"])
        .args(["--etcd-endpoints", &etcd.endpoint])
        .output()
        .expect("running ward-control history");
    assert!(history.status.success(), "{history:?}");
    let records: Vec<serde_json::Value> =
        serde_json::from_slice(&history.stdout).expect("history JSON");
    let versions: Vec<u64> = records
        .iter()
        .map(|r| r["version"].as_u64().expect("version"))
        .collect();
    assert_eq!(versions, [1, 2], "{records:#?}");
    assert_eq!(records[1]["sources"][0]["source"], "db.yaml");

    // Each replica's status lists every node: its own, and the other replica's from the store,
    // with the version each enforces; neither lags.
    on_a.ack_everything();
    on_b.ack_everything();
    let deadline = Instant::now() + common::WAIT;
    let status = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_ward-control"))
            .args(["status", "--json", "--state-dir"])
            .arg(a.state_dir())
            .output()
            .expect("running ward-control status");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
        let settled = nodes.len() == 2
            && nodes
                .iter()
                .all(|n| n["enforces_history_version"] == 2 && n["lagging"] == false);
        if settled {
            break status;
        }
        assert!(Instant::now() < deadline, "status of replica a: {status:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let node_b = &status["nodes"][1];
    assert_eq!(node_b["node"], "node-b", "{status:#}");
    assert_eq!(node_b["elsewhere"], true, "{status:#}");
    assert_eq!(status["nodes"][0]["elsewhere"], false, "{status:#}");
    let metrics = a.get("/metrics").1;
    for line in ["ward_control_nodes 2", "ward_control_nodes_lagging 0"] {
        assert!(
            metrics.contains(line),
            "{line} not in a's metrics:\n{metrics}"
        );
    }
    // Each of the two versions counted once, by the replica that recorded it.
    let changes = |plane: &ControlPlane| -> u64 {
        let metrics = plane.get("/metrics").1;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("ward_control_policy_changes_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no policy changes counter:\n{metrics}"))
    };
    assert_eq!(changes(a) + changes(b), 2, "policy changes counted");

    // A join token is spent for every replica at once, for one node and one key: the same join
    // retried on the other replica (its answer lost with its replica) is answered again,
    // another key or node is refused.
    let token = a.new_token(None);
    std::fs::write(b.token_file(), format!("{token}\n")).expect("token file of b");
    let request = common::csr();
    join_with(a, "node-x", &token, request.clone())
        .await
        .expect("first use");
    join_with(b, "node-x", &token, request)
        .await
        .expect("the same join, retried on replica b");
    for (node, what) in [("node-x", "another key"), ("node-y", "another node")] {
        let refused = join(b, node, &token)
            .await
            .expect_err("a token spent on replica a");
        assert!(
            refused.message().contains("already used"),
            "{what}: {refused:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_allocating_1000_identities_at_once_give_each_one_number() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let Setup { a, b, .. } = &setup(tmp.path(), 1, false, "1h");
    // The same 1,000 identities reported at once through both replicas, from other addresses.
    let mut on_a = Agent::start(agent_config(a, tmp.path(), "node-a"), workloads(1000, 1));
    let mut on_b = Agent::start(agent_config(b, tmp.path(), "node-b"), workloads(1000, 2));
    let full = |s: &RemoteState| s.ipcache.len() == 2000 && s.identities.len() == 1000;
    let seen_a = on_a.until("2,000 addresses on replica a", full).await;
    let seen_b = on_b.until("2,000 addresses on replica b", full).await;
    let (ids_a, ids_b) = (identities(&seen_a), identities(&seen_b));
    assert_eq!(
        ids_a, ids_b,
        "both replicas give every identity the same number"
    );
    let numbers: BTreeSet<u32> = ids_a.values().copied().collect();
    assert_eq!(numbers.len(), 1000, "no number is given to two identities");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_nodes_report_through_it_loses_no_workload_and_renumbers_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let Setup { a, b, .. } = &mut setup(tmp.path(), 1, false, "1h");
    // Two nodes on replica a, each reporting 500 workloads of the same 500 identities.
    let both = format!("{},{}", a.address, b.address);
    let on_replica_a = |node: &str, net: u8| {
        let mut cfg = agent_config(a, tmp.path(), node);
        cfg.address = both.clone();
        Agent::start(cfg, workloads(500, net))
    };
    let (mut on_a, mut on_c) = (on_replica_a("node-a", 1), on_replica_a("node-c", 3));
    let mut on_b = Agent::start(agent_config(b, tmp.path(), "node-b"), workloads(500, 2));
    // A node not joined yet when replica a goes joins through b with the same token.
    let tokens_of_a = std::fs::read_to_string(a.token_file()).expect("a's tokens");
    let mut tokens_of_b = std::fs::read_to_string(b.token_file()).expect("b's tokens");
    tokens_of_b.push_str(&tokens_of_a);
    std::fs::write(b.token_file(), tokens_of_b).expect("b's tokens");
    // Killed (SIGKILL) as soon as it has answered its first node, with the other's report
    // still being numbered and stored.
    let first = on_a.until("a first update from replica a", |_| true).await;
    a.kill();
    // Every node applies its updates as they come (as agents do, each on its own).
    let full = |s: &RemoteState| s.ipcache.len() == 1500 && s.identities.len() == 500;
    let (seen_a, seen_b, seen_c) = tokio::join!(
        async {
            // Everything before the kill: replica b sends it no update (the same content
            // under new version numbers).
            match full(&first) {
                true => first.clone(),
                false => {
                    on_a.until("node-a: 1,500 addresses after the move", full)
                        .await
                }
            }
        },
        on_b.until("node-b: 1,500 addresses through replica b", full),
        on_c.until("node-c: 1,500 addresses after the move", full),
    );
    let expected = identities(&seen_b);
    assert_eq!(
        identities(&seen_a),
        expected,
        "node-a: one number per identity"
    );
    assert_eq!(
        identities(&seen_c),
        expected,
        "node-c: one number per identity"
    );
    let numbers: BTreeSet<u32> = expected.values().copied().collect();
    assert_eq!(numbers.len(), 500, "no number is given to two identities");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_resumes_on_another_replica_unchanged_and_a_silent_node_is_evicted() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let Setup { a, b, .. } = &mut setup(tmp.path(), 1, false, "3s");
    let mut cfg = agent_config(a, tmp.path(), "node-a");
    cfg.address = format!("{},{}", a.address, b.address);
    let mut on_a = Agent::start(cfg, vec![workload("web", "web", "10.0.0.1")]);
    let on_b = Agent::start(
        agent_config(b, tmp.path(), "node-b"),
        vec![workload("db", "db", "10.0.0.2")],
    );
    let before = on_a
        .until("both nodes through replica a", |s| {
            has(s, "10.0.0.1") && has(s, "10.0.0.2")
        })
        .await;

    a.kill();
    // Replica b holds the same identities and addresses: the agent resumes there with the
    // versions it holds, and nothing it enforces changes (its client applies no update).
    assert!(
        b.wait_for_log("ACK node=\"node-a\" kind=\"ipcache\"", common::WAIT),
        "node-a's agent never settled on replica b:\n{}",
        b.logs()
    );
    on_a.quiet(Duration::from_millis(500)).await;

    // node-b goes silent: once its lease (3 s) runs out, its workloads leave node-a's IP cache.
    drop(on_b);
    let evicted = on_a.until("node-b evicted", |s| !has(s, "10.0.0.2")).await;
    assert!(has(&evicted, "10.0.0.1"), "node-a stays");
    let web = |s: &RemoteState| identities(s)["spiffe://example.org/ns/demo/sa/web"];
    assert_eq!(web(&before), web(&evicted), "web keeps its number");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_lost_changes_nothing_and_a_replica_cut_off_from_etcd_stops_serving() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // Three members and two replicas, each in a network namespace of its own.
    let mut setup = setup(tmp.path(), 3, false, "1h");
    let a_host = setup.a_host();
    let Setup {
        etcd,
        a,
        b,
        network,
    } = &mut setup;
    let mut cfg = agent_config(a, tmp.path(), "node-a");
    cfg.address = format!("{},{}", a.address, b.address);
    let mut on_a = Agent::start(cfg, vec![workload("web", "web", "10.0.0.1")]);
    let mut on_b = Agent::start(
        agent_config(b, tmp.path(), "node-b"),
        vec![workload("db", "db", "10.0.0.2")],
    );
    on_b.ack_everything();
    on_a.until("node-b through replica a", |s| has(s, "10.0.0.2"))
        .await;

    // One member of three lost: a quorum remains, and a change still reaches node-a.
    etcd.kill(2);
    on_b.reports
        .send(vec![
            workload("db", "db", "10.0.0.2"),
            workload("cache", "cache", "10.0.0.3"),
        ])
        .expect("client running");
    let what = format!("node-b's new workload with a member down; b:\n{}", b.logs());
    on_a.until(&what, |s| has(s, "10.0.0.3")).await;

    // Replica a cut off from etcd: it ends node-a's stream rather than serve what it cannot
    // check, stops being ready (a Service stops sending agents to it), and node-a resumes on
    // replica b.
    assert_eq!(a.get("/readyz").0, 200, "replica a ready before the cut");
    // A partition: every packet between replica a and the members is dropped.
    network.cut(a_host, &[0, 1, 2]);
    assert!(
        a.wait_for_log("cut off from the shared store", Duration::from_secs(15)),
        "{}",
        a.logs()
    );
    assert_eq!(a.get("/readyz"), (503, "cut off from the store\n".into()));
    assert_eq!(a.get("/healthz").0, 200, "alive while cut off");
    assert!(a.get("/metrics").1.contains("ward_control_store_cut_off 1"));
    assert!(
        b.wait_for_log("agent connected node=\"node-a\"", common::WAIT),
        "node-a never moved to replica b:\n{}",
        b.logs()
    );
    on_b.reports
        .send(vec![workload("db", "db", "10.0.0.2")])
        .expect("client running");
    on_a.until("node-b's change through replica b", |s| {
        !has(s, "10.0.0.3") && has(s, "10.0.0.1")
    })
    .await;

    network.heal(a_host);
    assert!(
        a.wait_for_log("serving agents again", Duration::from_secs(20)),
        "{}",
        a.logs()
    );
    assert_eq!(a.get("/readyz").0, 200, "replica a ready again");
    let metrics = b.get("/metrics").1;
    for line in ["ward_control_nodes 2", "ward_control_store_cut_off 0"] {
        assert!(
            metrics.contains(line),
            "{line} not in b's metrics:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_in_etcd_reaches_every_replica_and_a_malformed_record_is_left_out() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let Setup { etcd, a, b, .. } = &setup(tmp.path(), 1, false, "1h");
    let mut on_a = Agent::start(
        agent_config(a, tmp.path(), "node-a"),
        vec![workload("web", "web", "10.0.0.1")],
    );
    let _on_b = Agent::start(
        agent_config(b, tmp.path(), "node-b"),
        vec![workload("db", "db", "10.0.0.2")],
    );
    on_a.until("node-b through replica a", |s| has(s, "10.0.0.2"))
        .await;

    // A record no replica would write: refused and logged by both, the rest still served.
    let mut client = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .expect("etcd client");
    client
        .put("/ward/example.org/nodes/node-z", "{not json", None)
        .await
        .expect("put");
    assert!(a.wait_for_log("malformed record in the shared store", common::WAIT));

    let revoked = Command::new(env!("CARGO_BIN_EXE_ward-control"))
        .args([
            "revoke",
            "--trust-domain",
            "example.org",
            "--node",
            "node-b",
        ])
        .args(["--etcd-endpoints", &etcd.endpoint])
        .output()
        .expect("running ward-control revoke");
    assert!(revoked.status.success(), "{revoked:?}");
    assert_eq!(
        String::from_utf8_lossy(&revoked.stdout).trim(),
        "revoked node node-b"
    );
    // Replica b ends node-b's stream; both replicas drop its workloads.
    assert!(b.wait_for_log("node revoked", common::WAIT), "{}", b.logs());
    assert!(a.wait_for_log("node revoked", common::WAIT), "{}", a.logs());
    let state = on_a
        .until("node-b's workloads gone", |s| !has(s, "10.0.0.2"))
        .await;
    assert!(has(&state, "10.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_reach_an_etcd_that_requires_client_certificates() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let Setup { etcd, a, .. } = &setup(tmp.path(), 1, true, "1h");
    let tls = etcd.tls().expect("TLS files");
    let mut on_a = Agent::start(
        agent_config(a, tmp.path(), "node-a"),
        vec![workload("web", "web", "10.0.0.1")],
    );
    on_a.until("web registered through etcd over TLS", |s| {
        has(s, "10.0.0.1")
    })
    .await;

    // Without a client certificate etcd refuses the replica, which does not start.
    let refused = Command::new(env!("CARGO_BIN_EXE_ward-control"))
        .args(["--policy-dir"])
        .arg(tmp.path().join("a/policy"))
        .args(["--state-dir"])
        .arg(tmp.path().join("a/state"))
        .args(["--listen", "127.0.0.1:0", "--trust-domain", "example.org"])
        .args(["--etcd-endpoints", &etcd.endpoint, "--etcd-ca"])
        .arg(&tls.ca)
        .output()
        .expect("running ward-control");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("etcd"), "{stderr}");
}
