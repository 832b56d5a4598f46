//! Two real `ward-control` replicas sharing a real etcd (Debian's etcd-server, started by the
//! test on loopback ports), spoken to by the agent's own control-plane client.

mod common;
use common::{agent_config, join, workload, Agent};

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    process::Command,
    time::Duration,
};

use ward_agent::control::{RemoteState, ReportedWorkload};
use ward_control::test_helpers::{ControlPlane, Etcd, Partition};

/// Two replicas on `etcd`, each with its own directories and the same CA files (as a mounted
/// secret gives them), created once with `ward-control init-ca`.
fn replicas(tmp: &Path, etcd: &Etcd, lease: &str) -> (ControlPlane, ControlPlane) {
    replicas_on(tmp, &etcd.endpoint, &etcd.endpoint, lease)
}

/// Two replicas, `a` reaching etcd at `a_etcd` and `b` at `b_etcd`.
fn replicas_on(
    tmp: &Path,
    a_etcd: &str,
    b_etcd: &str,
    lease: &str,
) -> (ControlPlane, ControlPlane) {
    replicas_with(tmp, a_etcd, b_etcd, lease, |_| {})
}

/// [`replicas_on`], with `more` adding to both replicas' arguments.
fn replicas_with(
    tmp: &Path,
    a_etcd: &str,
    b_etcd: &str,
    lease: &str,
    more: impl Fn(&mut Vec<String>),
) -> (ControlPlane, ControlPlane) {
    let ca = tmp.join("ca");
    let made = Command::new(env!("CARGO_BIN_EXE_ward-control"))
        .args(["init-ca", "--trust-domain", "example.org", "--state-dir"])
        .arg(&ca)
        .output()
        .expect("running ward-control init-ca");
    assert!(made.status.success(), "init-ca: {made:?}");
    // Both ways of sharing the CA: replica a reads it where it was made (as from a mounted
    // Secret, `--ca-dir`), b has copies in its state directory.
    let start = |name: &str, etcd: &str| {
        let root = tmp.join(name);
        std::fs::create_dir_all(root.join("state")).expect("state dir");
        let mut ca_args = Vec::new();
        if name == "a" {
            ca_args = vec!["--ca-dir".into(), ca.display().to_string()];
        } else {
            for file in ["ca.pem", "ca-key.pem", "trust-domain"] {
                std::fs::copy(ca.join(file), root.join("state").join(file))
                    .expect("copying the CA");
            }
        }
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        common::start_plane(&root, |opts| {
            opts.extra_args = vec![
                "--etcd-endpoints".into(),
                etcd.to_owned(),
                "--node-lease".into(),
                lease.into(),
                "--metrics-listen".into(),
                metrics.to_string(),
            ];
            opts.extra_args.extend(ca_args);
            more(&mut opts.extra_args);
        })
    };
    (start("a", a_etcd), start("b", b_etcd))
}

fn identities(state: &RemoteState) -> BTreeMap<String, u32> {
    state
        .identities
        .iter()
        .map(|i| (i.spiffe_id.clone(), i.identity))
        .collect()
}

fn has(state: &RemoteState, address: &str) -> bool {
    let address: IpAddr = address.parse().expect("address");
    state.ipcache.iter().any(|(a, _)| *a == address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_identities_nodes_and_join_tokens() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(tmp.path());
    let (a, b) = replicas(tmp.path(), &etcd, "1h");
    let mut on_a = Agent::start(
        agent_config(&a, tmp.path(), "node-a"),
        vec![workload("web", "web", "10.0.0.1")],
    );
    let mut on_b = Agent::start(
        agent_config(&b, tmp.path(), "node-b"),
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

    // A join token is spent for every replica at once.
    let token = a.new_token(None);
    std::fs::write(b.token_file(), format!("{token}\n")).expect("token file of b");
    join(&a, "node-x", &token).await.expect("first use");
    let refused = join(&b, "node-y", &token)
        .await
        .expect_err("a token spent on replica a");
    assert!(refused.message().contains("already used"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_allocating_1000_identities_at_once_give_each_one_number() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(tmp.path());
    let (a, b) = replicas(tmp.path(), &etcd, "1h");
    // The same 1,000 identities reported at once through both replicas, from other addresses.
    let workloads = |net: u8| -> Vec<ReportedWorkload> {
        (0..1000u32)
            .map(|i| {
                workload(
                    &format!("w{i}"),
                    &format!("app-{i}"),
                    &format!("10.{net}.{}.{}", i / 250, i % 250 + 1),
                )
            })
            .collect()
    };
    let mut on_a = Agent::start(agent_config(&a, tmp.path(), "node-a"), workloads(1));
    let mut on_b = Agent::start(agent_config(&b, tmp.path(), "node-b"), workloads(2));
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
async fn an_agent_resumes_on_another_replica_unchanged_and_a_silent_node_is_evicted() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(tmp.path());
    let (mut a, b) = replicas(tmp.path(), &etcd, "3s");
    let mut cfg = agent_config(&a, tmp.path(), "node-a");
    cfg.address = format!("{},{}", a.address, b.address);
    let mut on_a = Agent::start(cfg, vec![workload("web", "web", "10.0.0.1")]);
    let on_b = Agent::start(
        agent_config(&b, tmp.path(), "node-b"),
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
    let mut etcd = Etcd::cluster(tmp.path(), 3);
    // Replica a reaches member 0 through a relay the test cuts, as a network partition between
    // it and etcd would (the members and both replicas are real; only the cut is the test's).
    let relay = Partition::relay(
        etcd.member(0)
            .trim_start_matches("http://")
            .parse()
            .expect("member address"),
    );
    let (a, b) = replicas_on(
        tmp.path(),
        &format!("http://{}", relay.address),
        &etcd.endpoint,
        "1h",
    );
    let mut cfg = agent_config(&a, tmp.path(), "node-a");
    cfg.address = format!("{},{}", a.address, b.address);
    let mut on_a = Agent::start(cfg, vec![workload("web", "web", "10.0.0.1")]);
    let mut on_b = Agent::start(
        agent_config(&b, tmp.path(), "node-b"),
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
    relay.cut();
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

    relay.heal();
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
    let etcd = Etcd::start(tmp.path());
    let (a, b) = replicas(tmp.path(), &etcd, "1h");
    let mut on_a = Agent::start(
        agent_config(&a, tmp.path(), "node-a"),
        vec![workload("web", "web", "10.0.0.1")],
    );
    let _on_b = Agent::start(
        agent_config(&b, tmp.path(), "node-b"),
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
    let etcd = Etcd::start_tls(tmp.path());
    let tls = etcd.tls().expect("TLS files");
    let (a, _b) = replicas_with(tmp.path(), &etcd.endpoint, &etcd.endpoint, "1h", |args| {
        for (flag, file) in [
            ("--etcd-ca", &tls.ca),
            ("--etcd-cert", &tls.client_cert),
            ("--etcd-key", &tls.client_key),
        ] {
            args.push(flag.into());
            args.push(file.display().to_string());
        }
    });
    let mut on_a = Agent::start(
        agent_config(&a, tmp.path(), "node-a"),
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
