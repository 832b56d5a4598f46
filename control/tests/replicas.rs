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
use ward_control::test_helpers::{ControlPlane, Etcd};

/// Two replicas on `etcd`, each with its own directories and the same CA files (as a mounted
/// secret gives them), created once with `ward-control init-ca`.
fn replicas(tmp: &Path, etcd: &Etcd, lease: &str) -> (ControlPlane, ControlPlane) {
    let ca = tmp.join("ca");
    let made = Command::new(env!("CARGO_BIN_EXE_ward-control"))
        .args(["init-ca", "--trust-domain", "example.org", "--state-dir"])
        .arg(&ca)
        .output()
        .expect("running ward-control init-ca");
    assert!(made.status.success(), "init-ca: {made:?}");
    let start = |name: &str| {
        let root = tmp.join(name);
        std::fs::create_dir_all(root.join("state")).expect("state dir");
        for file in ["ca.pem", "ca-key.pem", "trust-domain"] {
            std::fs::copy(ca.join(file), root.join("state").join(file)).expect("copying the CA");
        }
        common::start_plane(&root, |opts| {
            opts.extra_args = vec![
                "--etcd-endpoints".into(),
                etcd.endpoint.clone(),
                "--node-lease".into(),
                lease.into(),
            ]
        })
    };
    (start("a"), start("b"))
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
