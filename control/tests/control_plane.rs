//! The real `ward-control` binary on loopback, spoken to over real mTLS by the agent's own
//! control-plane client (`ward_agent::control`) and by a bare protocol client for what the
//! agent's client would never do.

mod common;
use common::{agent_config, channel, csr, join, joined, tls, workload, Agent, WAIT, WEB};

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tonic::transport::Channel;
use ward_agent::control::RemoteState;
use ward_control::test_helpers::{ControlPlane, ControlPlaneOptions};
use ward_proto::{
    agent_message::Kind, control_client::ControlClient, resource::Body, Ack, AgentMessage, Hello,
    Report, ResourceType, ServerMessage, SignWorkloadRequest, TypeVersion, Update, Workload,
};

const DB: &str = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: db\nspec:\n  selector: {labels: {app: db}}\n  ingress: []\n";

fn start_plane(tmp: &Path, lifetime: &str) -> ControlPlane {
    common::start_plane(tmp, |opts| opts.node_cert_lifetime = lifetime.into())
}

fn policy_names(state: &RemoteState) -> Vec<&str> {
    state.policies.iter().map(|(n, _)| n.as_str()).collect()
}

// ---- a bare protocol client -------------------------------------------------------------

struct RawStream {
    tx: mpsc::Sender<AgentMessage>,
    rx: tonic::Streaming<ServerMessage>,
}

impl RawStream {
    async fn open(
        channel: Channel,
        node: &str,
        versions: &BTreeMap<i32, String>,
    ) -> Result<RawStream, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(AgentMessage {
            kind: Some(Kind::Hello(Hello {
                node: node.into(),
                versions: versions
                    .iter()
                    .map(|(t, v)| TypeVersion {
                        r#type: *t,
                        version: v.clone(),
                    })
                    .collect(),
                agent_version: "test".into(),
                tunnel_address: String::new(),
            })),
        })
        .await
        .expect("queue hello");
        let rx = ControlClient::new(channel)
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(RawStream { tx, rx })
    }

    async fn batch(&mut self) -> Result<Vec<Update>, tonic::Status> {
        let mut updates = Vec::new();
        loop {
            let message = tokio::time::timeout(WAIT, self.rx.message())
                .await
                .expect("a message within the wait")?
                .ok_or_else(|| tonic::Status::cancelled("stream closed"))?;
            updates.extend(message.updates);
            if !message.more {
                return Ok(updates);
            }
        }
    }

    async fn ack_all(&self, updates: &[Update], versions: &mut BTreeMap<i32, String>) {
        self.try_ack_all(updates, versions)
            .await
            .expect("stream open");
    }

    /// [`RawStream::ack_all`]; `Err` when the stream has ended.
    async fn try_ack_all(
        &self,
        updates: &[Update],
        versions: &mut BTreeMap<i32, String>,
    ) -> Result<(), mpsc::error::SendError<AgentMessage>> {
        for u in updates {
            versions.insert(u.r#type, u.version.clone());
            self.tx
                .send(AgentMessage {
                    kind: Some(Kind::Ack(Ack {
                        r#type: u.r#type,
                        version: u.version.clone(),
                        nonce: u.nonce.clone(),
                    })),
                })
                .await?;
        }
        Ok(())
    }

    /// The status the server ended the stream with.
    async fn ended(&mut self) -> tonic::Status {
        loop {
            match tokio::time::timeout(WAIT, self.rx.message())
                .await
                .expect("stream ends")
            {
                Err(status) => return status,
                Ok(None) => return tonic::Status::ok("closed"),
                Ok(Some(_)) => continue,
            }
        }
    }

    async fn report(&self, node: &str, workloads: Vec<Workload>) {
        self.tx
            .send(AgentMessage {
                kind: Some(Kind::Report(Report {
                    node: node.into(),
                    workloads,
                })),
            })
            .await
            .expect("stream open");
    }
}

fn raw_workload(name: &str, address: &str) -> Workload {
    Workload {
        name: name.into(),
        spiffe_id: format!("spiffe://example.org/ns/demo/sa/{name}"),
        addresses: vec![address.into()],
        ..Workload::default()
    }
}

// ---- tests ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_joins_reports_and_receives_a_policy_change_at_once() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let cfg = agent_config(&plane, tmp.path(), "node-a");
    let mut agent = Agent::start(cfg, vec![workload("web", "web", "10.0.0.1")]);
    let state = agent
        .until("own workload in the IP cache", |s| !s.ipcache.is_empty())
        .await;
    assert_eq!(policy_names(&state), ["web"]);
    assert!(state.trust_bundle.contains("BEGIN CERTIFICATE"));
    let web = &state.identities[0];
    assert_eq!(web.spiffe_id, "spiffe://example.org/ns/demo/sa/web");
    assert_eq!(
        state.ipcache,
        [("10.0.0.1".parse::<IpAddr>().expect("ip"), web.identity)]
    );
    // Policy, identities, IP cache, trust bundle, and no Services: this control plane reads no
    // cluster (and no WORKLOAD set, for the same reason).
    assert_eq!(state.versions.len(), 5, "{:?}", state.versions);
    assert!(state.versions.contains_key("service") && state.services.is_empty());

    let written = Instant::now();
    plane.write_policy("db.yaml", DB);
    let update = agent.next(WAIT).await;
    let latency = written.elapsed();
    assert_eq!(policy_names(&update.state), ["db", "web"]);
    update.ack.send(Ok(())).expect("client waits");
    // A figure for the reader, not a threshold: timings belong to `cargo xtask bench`.
    eprintln!(
        "policy file change reached the agent in {:.1} ms",
        latency.as_secs_f64() * 1e3
    );

    plane.remove_policy("web.yaml");
    let state = agent
        .until("web removed", |s| policy_names(s) == ["db"])
        .await;
    assert_eq!(state.identities.len(), 1, "identities untouched");

    agent
        .reports
        .send(vec![
            workload("web", "web", "10.0.0.1"),
            workload("db", "db", "10.0.0.2"),
        ])
        .expect("client running");
    let state = agent
        .until("new workload reported", |s| s.ipcache.len() == 2)
        .await;
    assert_eq!(state.identities.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_signer_obtains_certificates_for_its_own_workloads_only() {
    use ward_tunnel::renewal::SvidSigner as _;
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let cfg = agent_config(&plane, tmp.path(), "node-a");
    let mut agent = Agent::start(cfg.clone(), vec![workload("web", "web", "10.0.0.1")]);
    agent
        .until("own workload known", |s| !s.ipcache.is_empty())
        .await;
    let signer = ward_agent::control::WorkloadSigner::new(cfg);
    let web = ward_tunnel::SpiffeId::parse("spiffe://example.org/ns/demo/sa/web").expect("id");
    let (key, csr) = ward_tunnel::renewal::new_request().expect("csr");
    let chain = signer.sign(&web, csr).await.expect("web is this node's");
    let svid = ward_tunnel::Svid::from_pem(&chain, &key.serialize_pem()).expect("a usable SVID");
    assert_eq!(svid.spiffe_id(), &web);
    let other = ward_tunnel::SpiffeId::parse("spiffe://example.org/ns/demo/sa/db").expect("id");
    let (_, csr) = ward_tunnel::renewal::new_request().expect("csr");
    let refused = signer
        .sign(&other, csr)
        .await
        .expect_err("db was never reported");
    assert!(
        refused.contains("PermissionDenied") || refused.contains("permission"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_versions_receives_only_the_difference() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    plane.write_policy("db.yaml", DB);
    assert!(plane.wait_for_log("policies=2", WAIT), "{}", plane.logs());
    let (cert, key) = joined(&plane, "node-a").await;
    let mut versions = BTreeMap::new();
    let mut first = RawStream::open(
        channel(&plane, Some((&cert, &key))).await,
        "node-a",
        &versions,
    )
    .await
    .expect("stream");
    let all = first.batch().await.expect("first batch");
    assert!(all.iter().all(|u| u.replace), "a new agent gets whole sets");
    assert_eq!(all.len(), 5, "four sets and an empty SERVICE set");
    first.ack_all(&all, &mut versions).await;
    drop(first);

    plane.write_policy("db.yaml", &DB.replace("app: db", "app: database"));
    assert!(
        plane.wait_for_log("reason=\"file change\"", WAIT),
        "{}",
        plane.logs()
    );
    let mut second = RawStream::open(
        channel(&plane, Some((&cert, &key))).await,
        "node-a",
        &versions,
    )
    .await
    .expect("stream");
    let diff = second.batch().await.expect("difference");
    assert_eq!(diff.len(), 1, "only policy changed: {diff:?}");
    let policy = &diff[0];
    assert_eq!(policy.r#type, ResourceType::Policy as i32);
    assert!(!policy.replace);
    assert_eq!(
        policy.base_version,
        versions[&(ResourceType::Policy as i32)]
    );
    let names: Vec<&str> = policy.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["db"], "web did not change");
    assert!(policy.removed.is_empty());
    second.ack_all(&diff, &mut versions).await;
    drop(second);

    let mut third = RawStream::open(
        channel(&plane, Some((&cert, &key))).await,
        "node-a",
        &versions,
    )
    .await
    .expect("stream");
    let nothing = tokio::time::timeout(Duration::from_millis(500), third.rx.message()).await;
    assert!(
        nothing.is_err(),
        "an agent that is up to date receives nothing: {nothing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_works_once() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let token = plane.new_token(None);
    join(&plane, "node-a", &token).await.expect("first join");
    let again = join(&plane, "node-b", &token)
        .await
        .expect_err("reused token");
    assert_eq!(again.code(), tonic::Code::PermissionDenied);
    assert!(again.message().contains("already used"), "{again:?}");
    let unknown = join(&plane, "node-c", "not-a-token-not-a-token")
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), tonic::Code::PermissionDenied);
    let bound = plane.new_token(Some("node-d"));
    let wrong = join(&plane, "node-e", &bound)
        .await
        .expect_err("bound to node-d");
    assert!(wrong.message().contains("node-d"), "{wrong:?}");
    assert!(plane.wait_for_log("join refused", WAIT), "{}", plane.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_certificate_are_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let cfg = agent_config(&plane, tmp.path(), "good");
    let mut agent = Agent::start(cfg, vec![]);
    agent.until("policy", |s| !s.policies.is_empty()).await;

    // No certificate: TLS lets it through for Join only.
    let anonymous = RawStream::open(channel(&plane, None).await, "node-a", &BTreeMap::new()).await;
    let status = anonymous.err().expect("refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // A certificate for the right SPIFFE ID from another CA.
    let foreign_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign_ca =
        rcgen::CertifiedIssuer::self_signed(ca_params, foreign_key).expect("foreign CA");
    let node_key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/node/evil".try_into().expect("uri"),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let forged = params
        .signed_by(&node_key, &foreign_ca)
        .expect("forged cert");
    let endpoint = tls(
        &plane,
        Some((&forged.pem(), &node_key.serialize_pem())),
        None,
    );
    let refused = match endpoint.connect().await {
        Err(e) => format!("{e:?}"),
        Ok(channel) => format!(
            "{:?}",
            RawStream::open(channel, "evil", &BTreeMap::new())
                .await
                .err()
                .expect("refused")
        ),
    };
    assert!(!refused.is_empty());
    assert!(
        plane.wait_for_log("not signed by this control plane's CA", WAIT),
        "{}",
        plane.logs()
    );

    // The agent that was connected all along is still served.
    plane.write_policy("db.yaml", DB);
    agent
        .until("db after the attempts", |s| {
            policy_names(s) == ["db", "web"]
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_ends_the_stream_and_cannot_reconnect() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "2s");
    let (cert, key) = joined(&plane, "node-a").await;
    let mut versions = BTreeMap::new();
    let mut stream = RawStream::open(
        channel(&plane, Some((&cert, &key))).await,
        "node-a",
        &versions,
    )
    .await
    .expect("valid for 2 s");
    // Under load the certificate can expire before the batch arrives or is acknowledged: the
    // stream must end the same way then.
    let status = match stream.batch().await {
        Ok(all) => {
            let _ = stream.try_ack_all(&all, &mut versions).await;
            stream.ended().await
        }
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("expired"), "{status:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = match tls(&plane, Some((&cert, &key)), None).connect().await {
        Err(_) => true,
        Ok(channel) => RawStream::open(channel, "node-a", &versions).await.is_err(),
    };
    assert!(again, "an expired certificate must not open a stream");
    assert!(plane.wait_for_log("has expired", WAIT), "{}", plane.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_certificate_before_it_expires() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "4s");
    let cfg = agent_config(&plane, tmp.path(), "node-a");
    let mut agent = Agent::start(cfg.clone(), vec![]);
    agent.until("policy", |s| !s.policies.is_empty()).await;
    assert!(
        plane.wait_for_log("node certificate renewed", WAIT),
        "{}",
        plane.logs()
    );
    // Well past the first certificate's lifetime the agent is still served on the same join.
    tokio::time::sleep(Duration::from_secs(5)).await;
    plane.write_policy("db.yaml", DB);
    agent
        .until("db with a renewed certificate", |s| {
            policy_names(s) == ["db", "web"]
        })
        .await;
    assert_eq!(
        plane.logs().matches("node joined").count(),
        1,
        "{}",
        plane.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_speak_for_another_node() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let (cert_a, key_a) = joined(&plane, "node-a").await;
    let (cert_b, key_b) = joined(&plane, "node-b").await;

    let hello_as_b = RawStream::open(
        channel(&plane, Some((&cert_a, &key_a))).await,
        "node-b",
        &BTreeMap::new(),
    )
    .await;
    let status = match hello_as_b {
        Err(status) => status,
        Ok(mut s) => s.ended().await,
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    let mut versions = BTreeMap::new();
    let mut a = RawStream::open(
        channel(&plane, Some((&cert_a, &key_a))).await,
        "node-a",
        &versions,
    )
    .await
    .expect("stream");
    let all = a.batch().await.expect("batch");
    a.ack_all(&all, &mut versions).await;
    a.report("node-a", vec![raw_workload("web", "10.0.0.1")])
        .await;
    let update = a.batch().await.expect("own workload");
    a.ack_all(&update, &mut versions).await;

    let mut b = RawStream::open(
        channel(&plane, Some((&cert_b, &key_b))).await,
        "node-b",
        &BTreeMap::new(),
    )
    .await
    .expect("stream");
    b.batch().await.expect("batch");
    b.report("node-a", vec![raw_workload("db", "10.0.0.2")])
        .await;
    let status = b.ended().await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // The stream's end can reach the agent before the control plane's log line is written.
    assert!(
        plane.wait_for_log("reported workloads of another node", WAIT),
        "{}",
        plane.logs()
    );

    // Node b claiming node a's address keeps its own workload but not the address.
    let mut b = RawStream::open(
        channel(&plane, Some((&cert_b, &key_b))).await,
        "node-b",
        &BTreeMap::new(),
    )
    .await
    .expect("stream");
    let mut b_versions = BTreeMap::new();
    let first = b.batch().await.expect("batch");
    b.ack_all(&first, &mut b_versions).await;
    b.report("node-b", vec![raw_workload("thief", "10.0.0.1")])
        .await;
    assert!(
        plane.wait_for_log("belongs to a workload of node", WAIT),
        "{}",
        plane.logs()
    );
    let update = a.batch().await.expect("node a sees the new identity");
    for u in update
        .iter()
        .filter(|u| u.r#type == ResourceType::Ipcache as i32)
    {
        for r in &u.resources {
            let Some(Body::Ipcache(entry)) = &r.body else {
                panic!("an IP cache entry")
            };
            assert_ne!(
                entry.address, "10.0.0.1",
                "the address must stay with node-a: {entry:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_ends_only_that_stream() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let cfg = agent_config(&plane, tmp.path(), "good");
    let mut agent = Agent::start(cfg, vec![]);
    agent.until("policy", |s| !s.policies.is_empty()).await;

    let (cert, key) = joined(&plane, "big").await;
    let mut big = RawStream::open(
        channel(&plane, Some((&cert, &key))).await,
        "big",
        &BTreeMap::new(),
    )
    .await
    .expect("stream");
    big.batch().await.expect("batch");
    let mut huge = raw_workload("huge", "10.9.9.9");
    huge.labels
        .insert("padding".into(), "x".repeat(5 * 1024 * 1024));
    big.report("big", vec![huge]).await;
    let status = big.ended().await;
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    assert!(plane.wait_for_log("stream ended", WAIT), "{}", plane.logs());

    plane.write_policy("db.yaml", DB);
    agent
        .until("db after the oversized message", |s| {
            policy_names(s) == ["db", "web"]
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_update_is_logged_and_the_next_change_still_arrives() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let cfg = agent_config(&plane, tmp.path(), "node-a");
    let mut agent = Agent::start(cfg.clone(), vec![]);
    let state = agent.until("policy", |s| !s.policies.is_empty()).await;

    // The control plane serves only sets that compile for the workloads it knows; an agent
    // may still be unable to apply one (its configuration names ports and namespace labels the
    // control plane does not know, its map is smaller), and refuses it.
    plane.write_policy("db.yaml", DB);
    let refused = agent.next(WAIT).await;
    assert!(policy_names(&refused.state).contains(&"db"));
    refused
        .ack
        .send(Err(
            "policy db: the policy map would need more than 65536 entries".into(),
        ))
        .expect("client waits");
    assert!(
        plane.wait_for_log("would need more than 65536 entries", WAIT),
        "{}",
        plane.logs()
    );
    agent.quiet(Duration::from_millis(400)).await;
    let kept = ward_agent::control::load_last_applied(&cfg).expect("saved state");
    assert_eq!(
        kept.policies, state.policies,
        "the NACKed state is not saved"
    );

    plane.write_policy("db.yaml", &DB.replace("ingress: []", "egress: []"));
    let fixed = agent
        .until("changed db", |s| policy_names(s) == ["db", "web"])
        .await;
    assert!(fixed
        .policies
        .iter()
        .any(|(_, yaml)| yaml.contains("egress")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_fails_the_check_is_refused_before_any_agent_sees_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let cfg = agent_config(&plane, tmp.path(), "node-a");
    let mut agent = Agent::start(cfg, vec![workload("web", "web", "10.0.0.1")]);
    let served = agent
        .until("web and its workload", |s| {
            policy_names(s) == ["web"] && !s.ipcache.is_empty()
        })
        .await;

    // Valid YAML of a valid kind, with an unknown field and a bad port: only the policy
    // library finds these.
    plane.write_policy(
        "db.yaml",
        &DB.replace(
            "ingress: []",
            "ingress:\n    - from: [{labels: {app: web}}]\n      bogus: 1\n      ports: [{port: 70000}]",
        ),
    );
    assert!(
        plane.wait_for_log("policy directory refused whole", WAIT),
        "{}",
        plane.logs()
    );
    let check = ward_policy::load::Report::load(&[plane.policy_dir()]);
    assert!(!check.errors.is_empty(), "the check refuses db.yaml too");
    for error in &check.errors {
        let diagnostic = error.to_string();
        assert!(diagnostic.contains("db.yaml:"), "{diagnostic}");
        assert!(
            plane.logs().contains(&diagnostic),
            "the log carries the check's diagnostic {diagnostic:?}:\n{}",
            plane.logs()
        );
    }
    agent.quiet(Duration::from_millis(400)).await;

    // The served version did not move: a new stream holding it receives no policy.
    let cfg = agent_config(&plane, tmp.path(), "node-b");
    let mut second = Agent::start(cfg, vec![]);
    let state = second.until("first state", |_| true).await;
    assert_eq!(
        state.versions.get("policy"),
        served.versions.get("policy"),
        "{:?} / {:?}",
        state.versions,
        served.versions
    );
    assert_eq!(policy_names(&state), ["web"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_are_served_as_the_check_reads_them() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let cfg = agent_config(&plane, tmp.path(), "node-a");
    let mut agent = Agent::start(cfg, vec![]);
    agent.until("policy", |s| policy_names(s) == ["web"]).await;

    // A document opened by its own `---` line and written as a flow mapping, then one whose
    // flow mapping starts on the `---` line itself.
    plane.write_policy(
        "flow.yaml",
        "# flow style\n---\n{apiVersion: ward.dev/v1, kind: Policy,\n metadata: {name: flow},\n spec: {selector: {labels: {app: web}}, ingress: []}}\n--- {apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: np, namespace: demo}, spec: {podSelector: {}}}\n",
    );
    let check = ward_policy::load::Report::load(&[plane.policy_dir()]);
    assert!(check.errors.is_empty(), "{:?}", check.errors);
    let mut checked: Vec<&str> = check.set.names().collect();
    checked.sort();
    assert_eq!(checked, ["demo/np", "flow", "web"]);
    let state = agent
        .until("every document the check keeps", |s| {
            policy_names(s) == checked
        })
        .await;
    // The agent reads the served texts with the library, one document each.
    let documents = state
        .policies
        .iter()
        .map(|(name, yaml)| (name.as_str(), yaml.as_str()));
    let parsed = ward_policy::parse_documents(documents).expect("served documents parse");
    let mut names: Vec<&str> = parsed.names().collect();
    names.sort();
    assert_eq!(names, checked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_restarts_of_agent_and_control_plane() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut plane = start_plane(tmp.path(), "1h");
    let cfg = agent_config(&plane, tmp.path(), "node-a");
    let mut agent = Agent::start(cfg.clone(), vec![workload("web", "web", "10.0.0.1")]);
    let applied = agent.until("own workload", |s| !s.ipcache.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(agent);

    plane.kill();
    let saved = ward_agent::control::load_last_applied(&cfg).expect("last applied state on disk");
    assert_eq!(saved.policies, applied.policies);
    assert_eq!(saved.ipcache, applied.ipcache);

    plane.restart();
    let mut agent = Agent::start(cfg.clone(), vec![workload("web", "web", "10.0.0.1")]);
    // Same content under a new server epoch: versions move, nothing is re-applied.
    agent.quiet(Duration::from_millis(800)).await;
    plane.write_policy("db.yaml", DB);
    let state = agent
        .until("db after restarts", |s| policy_names(s) == ["db", "web"])
        .await;
    assert_eq!(
        state.ipcache, applied.ipcache,
        "the registry survived the restart"
    );
    assert_eq!(
        plane.logs().matches("node joined").count(),
        1,
        "the certificate was reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_directory_the_server_cannot_parse_is_refused_whole() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let cfg = agent_config(&plane, tmp.path(), "node-a");
    let mut agent = Agent::start(cfg, vec![]);
    agent.until("policy", |s| policy_names(s) == ["web"]).await;

    plane.write_policy(
        "broken.yaml",
        "apiVersion: ward.dev/v1\nkind: Policy\nspec: [unclosed\n",
    );
    // Written after the broken file, so no settle window can see it alone.
    plane.write_policy("db.yaml", DB);
    assert!(
        plane.wait_for_log("policy directory refused whole", WAIT),
        "{}",
        plane.logs()
    );
    assert!(
        plane
            .logs()
            .contains("broken.yaml:3: document 1: unclosed bracket"),
        "{}",
        plane.logs()
    );
    agent.quiet(Duration::from_millis(400)).await;

    plane.remove_policy("broken.yaml");
    agent
        .until("db once the directory is valid", |s| {
            policy_names(s) == ["db", "web"]
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_certificates_are_signed_only_for_workloads_the_node_reported() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let (cert_a, key_a) = joined(&plane, "node-a").await;
    let (cert_b, key_b) = joined(&plane, "node-b").await;
    let web = "spiffe://example.org/ns/demo/sa/web";
    let sign = |cert: String, key: String, spiffe_id: &str| {
        let spiffe_id = spiffe_id.to_string();
        let plane = &plane;
        async move {
            let (workload_key, csr_pem) = csr();
            ControlClient::new(channel(plane, Some((&cert, &key))).await)
                .sign_workload(SignWorkloadRequest { spiffe_id, csr_pem })
                .await
                .map(|r| (r.into_inner(), workload_key))
        }
    };
    // Before its report, node a gets nothing.
    let status = sign(cert_a.clone(), key_a.clone(), web)
        .await
        .expect_err("not reported yet");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    let mut versions = BTreeMap::new();
    let mut a = RawStream::open(
        channel(&plane, Some((&cert_a, &key_a))).await,
        "node-a",
        &versions,
    )
    .await
    .expect("stream");
    let all = a.batch().await.expect("batch");
    a.ack_all(&all, &mut versions).await;
    a.report("node-a", vec![raw_workload("web", "10.0.0.1")])
        .await;
    let update = a.batch().await.expect("own workload registered");
    a.ack_all(&update, &mut versions).await;

    let (signed, workload_key) = sign(cert_a.clone(), key_a.clone(), web)
        .await
        .expect("a reported workload is signed");
    let svid = ward_tunnel::Svid::from_pem(&signed.cert_chain_pem, &workload_key)
        .expect("the tunnel takes the certificate");
    assert_eq!(svid.spiffe_id().as_str(), web);
    let roots = ward_tunnel::TrustStore::parse_pem_bundle(&signed.ca_pem).expect("bundle");
    let trust = ward_tunnel::TrustStore::new("example.org", &roots).expect("trust");
    let leaf = ward_tunnel::TrustStore::parse_pem_bundle(&signed.cert_chain_pem).expect("leaf");
    trust
        .check_peer(&leaf)
        .expect("the workload certificate is valid in the trust domain");
    let left = signed.not_after_unix
        - i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs(),
        )
        .expect("seconds");
    assert!((3500..=3600).contains(&left), "lifetime left: {left} s");
    assert!(plane.wait_for_log("workload certificate signed", WAIT));

    // Node b did not report web: refused, and logged.
    let status = sign(cert_b.clone(), key_b.clone(), web)
        .await
        .expect_err("another node's workload");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("node-b"), "{status:?}");
    assert!(
        plane.wait_for_log("not a workload this node reported", WAIT),
        "{}",
        plane.logs()
    );
    // A node's own ID is no workload's, even if reported as one.
    a.report(
        "node-a",
        vec![Workload {
            name: "sneaky".into(),
            spiffe_id: "spiffe://example.org/node/node-b".into(),
            addresses: vec!["10.0.0.9".into()],
            ..Workload::default()
        }],
    )
    .await;
    a.batch().await.expect("report registered");
    let status = sign(
        cert_a.clone(),
        key_a.clone(),
        "spiffe://example.org/node/node-b",
    )
    .await
    .expect_err("a node ID");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // No client certificate: no call.
    let (_, csr_pem) = csr();
    let status = ControlClient::new(channel(&plane, None).await)
        .sign_workload(SignWorkloadRequest {
            spiffe_id: web.into(),
            csr_pem,
        })
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gone_for_longer_than_its_lease_leaves_the_other_agents_ip_cache() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut opts = ControlPlaneOptions::new(env!("CARGO_BIN_EXE_ward-control"), tmp.path());
    opts.extra_args = vec!["--node-lease".into(), "2s".into()];
    std::fs::create_dir_all(tmp.path().join("policy")).expect("policy dir");
    std::fs::write(tmp.path().join("policy/web.yaml"), WEB).expect("initial policy");
    let plane = ControlPlane::start(opts);
    let web: IpAddr = "10.0.0.1".parse().expect("address");
    let db: IpAddr = "10.0.0.2".parse().expect("address");
    let has = |s: &RemoteState, a: IpAddr| s.ipcache.iter().any(|(x, _)| *x == a);

    let mut a = Agent::start(
        agent_config(&plane, tmp.path(), "node-a"),
        vec![workload("web", "web", "10.0.0.1")],
    );
    let mut b = Agent::start(
        agent_config(&plane, tmp.path(), "node-b"),
        vec![workload("db", "db", "10.0.0.2")],
    );
    a.until("both nodes' addresses", |s| has(s, web) && has(s, db))
        .await;
    b.until("both nodes' addresses", |s| has(s, web) && has(s, db))
        .await;
    // Connected for longer than the lease: still there.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(b);
    let started = Instant::now();
    let state = a.until("node-b's address gone", |s| !has(s, db)).await;
    assert!(has(&state, web), "node-a's own address stays");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "removed before its lease ran out: {:?}",
        started.elapsed()
    );
    assert!(plane.wait_for_log("node removed", WAIT), "{}", plane.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_control_plane_its_ca_file_does_not_name() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(&tmp.path().join("real"), "1h");
    let impostor = start_plane(&tmp.path().join("impostor"), "1h");
    let mut cfg = agent_config(&plane, tmp.path(), "node-a");
    cfg.address = impostor.address.to_string();
    let mut agent = Agent::start(cfg, vec![]);
    agent.quiet(Duration::from_secs(2)).await;
    assert!(
        !impostor.logs().contains("node joined"),
        "the agent joined a control plane its CA did not sign:\n{}",
        impostor.logs()
    );
}

// ---- the server tried from outside ------------------------------------------------------

/// A TCP connection to `plane` from `source` (a loopback address of the test's choosing, so a
/// flood can come from an address other than the agents').
async fn connect_from(plane: &ControlPlane, source: IpAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::new(source, 0))
        .expect("binding the source address");
    socket.connect(plane.address).await.expect("connect")
}

/// Whether the server closed `stream` within `within` (end of stream or reset on read).
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's descriptors")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_agents_streams_and_the_process_exits_within_the_grace() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut plane = start_plane(tmp.path(), "1h");
    let (cert, key) = joined(&plane, "node-a").await;
    let mut stream = RawStream::open(
        channel(&plane, Some((&cert, &key))).await,
        "node-a",
        &BTreeMap::new(),
    )
    .await
    .expect("stream");
    let updates = stream.batch().await.expect("first batch");
    let mut versions = BTreeMap::new();
    stream.ack_all(&updates, &mut versions).await;
    // An agent's client too, and a connection that never speaks.
    let mut agent = Agent::start(agent_config(&plane, tmp.path(), "node-b"), vec![]);
    agent
        .until("node-b's first state", |s| !s.policies.is_empty())
        .await;
    let _silent = connect_from(&plane, "127.0.0.1".parse().expect("address")).await;

    let started = Instant::now();
    let (status, plane) = tokio::task::spawn_blocking(move || {
        let status = plane.terminate(Duration::from_secs(20));
        (status, plane)
    })
    .await
    .expect("terminating");
    let took = started.elapsed();
    assert!(
        status.success(),
        "ward-control did not exit by itself within 20 s of SIGTERM ({status}):\n{}",
        plane.logs()
    );
    assert!(
        took < ward_control::SHUTDOWN_GRACE + Duration::from_secs(3),
        "ward-control took {took:?} to exit after SIGTERM:\n{}",
        plane.logs()
    );
    let ended = stream.ended().await;
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    eprintln!("ward-control exited {took:?} after SIGTERM with two agent streams open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_another_address_never_keep_an_agent_out() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let flooder: IpAddr = "127.0.0.2".parse().expect("address");
    let mut flood = Vec::new();
    for _ in 0..500 {
        flood.push(connect_from(&plane, flooder).await);
    }
    // The flood holds its connections open; an agent joins and streams at once.
    let started = Instant::now();
    let (cert, key) = join(&plane, "node-a", &plane.new_token(None))
        .await
        .expect("a join during the flood");
    let mut stream = RawStream::open(
        channel(&plane, Some((&cert, &key))).await,
        "node-a",
        &BTreeMap::new(),
    )
    .await
    .expect("a stream during the flood");
    stream.batch().await.expect("first batch during the flood");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "join and first batch took {took:?} under the flood"
    );
    // The flood's connections beyond the address's share are closed at once, the rest once their
    // handshake deadline passes.
    let mut closed_at_once = 0;
    for conn in &mut flood {
        if closed_by_server(conn, Duration::from_millis(10)).await {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once >= 500 - ward_control::listener::MAX_UNVERIFIED_PER_ADDRESS,
        "only {closed_at_once} of 500 idle connections were closed at once"
    );
    let deadline = ward_control::listener::HANDSHAKE_TIMEOUT + Duration::from_secs(3);
    for conn in &mut flood {
        assert!(
            closed_by_server(conn, deadline).await,
            "an idle connection outlived the handshake deadline"
        );
    }
    eprintln!("join and first batch under a 500-connection flood: {took:?}; {closed_at_once} closed at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_that_never_speak_http2_are_closed_and_the_file_limit_is_raised() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let pid = plane.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open file limit")
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3], open_files[4],
        "soft limit below the hard one: {limits}"
    );

    let ca = std::fs::read(plane.ca_file()).expect("CA file");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&ca).expect("CA PEM");
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(pem.contents.into()).expect("CA certificate");
    let config =
        tokio_rustls::rustls::ClientConfig::builder_with_provider(ward_control::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let before = open_descriptors(pid);
    // 200 TLS connections from 20 addresses, each a completed handshake and then silence.
    let mut silent = Vec::new();
    for i in 0..200u8 {
        let source: IpAddr = format!("127.0.1.{}", 1 + i / 10).parse().expect("address");
        let tcp = connect_from(&plane, source).await;
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("ward-control")
            .expect("server name");
        silent.push(connector.connect(name, tcp).await.expect("TLS handshake"));
    }
    let during = open_descriptors(pid);
    assert!(
        during >= before + 150,
        "the connections were not held: {before} then {during}"
    );
    let deadline = ward_control::listener::HANDSHAKE_TIMEOUT + Duration::from_secs(3);
    for conn in &mut silent {
        assert!(
            closed_by_server(conn, deadline).await,
            "a TLS connection without the HTTP/2 preface outlived the deadline"
        );
    }
    let after = open_descriptors(pid);
    assert!(
        after <= before + 2,
        "descriptors still held: {before} before, {during} during, {after} after"
    );
    // And the server still serves.
    joined(&plane, "node-a").await;
}

#[test]
fn two_control_planes_starting_at_once_on_an_empty_directory_share_one_ca() {
    for trial in 0..5 {
        let tmp = tempfile::tempdir().expect("temp dir");
        let state = tmp.path().join("shared-state");
        let planes: Vec<ControlPlane> = std::thread::scope(|scope| {
            let handles: Vec<_> = ["one", "two"]
                .map(|name| {
                    let (root, state) = (tmp.path().join(name), state.clone());
                    scope.spawn(move || {
                        common::start_plane(&root, |opts| opts.state_dir = Some(state))
                    })
                })
                .into_iter()
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a control plane starts"))
                .collect()
        });
        // Each serves with a certificate its CA key signed, verified against the one CA file.
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        for (i, plane) in planes.iter().enumerate() {
            runtime
                .block_on(join(plane, &format!("node-{i}"), &plane.new_token(None)))
                .unwrap_or_else(|e| panic!("trial {trial}: joining control plane {i}: {e}"));
        }
    }
}

#[test]
fn a_ca_key_that_does_not_match_its_certificate_is_refused_at_start() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut plane = start_plane(tmp.path(), "1h");
    plane.kill();
    let other = rcgen::KeyPair::generate().expect("key");
    std::fs::write(plane.state_dir().join("ca-key.pem"), other.serialize_pem()).expect("key");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ward-control"))
        .arg("--policy-dir")
        .arg(plane.policy_dir())
        .arg("--state-dir")
        .arg(plane.state_dir())
        .args(["--listen", "127.0.0.1:0", "--trust-domain", "example.org"])
        .output()
        .expect("running ward-control");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with a mismatched CA key: {stderr}"
    );
    assert!(
        stderr.contains("ca-key.pem") && stderr.contains("does not match the CA certificate"),
        "{stderr}"
    );
}

// ---- the policy history -----------------------------------------------------------------

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=ops", "-c", "user.email=ops@example.org"])
        .args(args)
        .output()
        .expect("running git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn control(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ward-control"))
        .args(args)
        .output()
        .expect("running ward-control");
    assert!(out.status.success(), "ward-control {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_change_becomes_a_version_with_its_sources_commit_and_access_diff() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // The policy directory is a git checkout, as DevOps teams keep it.
    std::fs::create_dir_all(tmp.path().join("policy")).expect("policy dir");
    std::fs::write(tmp.path().join("policy/web.yaml"), WEB).expect("policy");
    git(tmp.path(), &["init", "-q"]);
    git(tmp.path(), &["add", "policy"]);
    git(tmp.path(), &["commit", "-q", "-m", "web: no ingress"]);
    let mut plane = start_plane(tmp.path(), "1h");
    let state = plane.state_dir();
    let state_arg = state.to_str().expect("path");
    let mut agent = Agent::start(
        agent_config(&plane, tmp.path(), "node-a"),
        vec![
            workload("web", "web", "10.0.0.1"),
            workload("client", "client", "10.0.0.2"),
        ],
    );
    agent
        .until("both workloads", |s| s.ipcache.len() >= 2)
        .await;

    let allow = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: web\nspec:\n  selector: {labels: {app: web}}\n  ingress:\n    - from: [{labels: {app: client}}]\n      ports: [{port: 80}]\n";
    plane.write_policy("web.yaml", allow);
    git(
        tmp.path(),
        &["commit", "-q", "-am", "web: admit the client on 80"],
    );
    let commit = git(tmp.path(), &["rev-parse", "HEAD"]);
    assert!(
        plane.wait_for_log("history_version=2", WAIT),
        "{}",
        plane.logs()
    );
    let history = control(&["history", "--state-dir", state_arg]);
    assert_eq!(
        history.lines().count(),
        3,
        "a heading and two versions:\n{history}"
    );
    let shown = control(&["show", "--state-dir", state_arg, "2"]);
    assert!(
        shown.contains("+ client -> web tcp/80: deny -> allow"),
        "{shown}"
    );
    assert!(shown.contains(&format!("git commit {commit}")), "{shown}");
    let record: serde_json::Value =
        serde_json::from_str(&control(&["show", "--state-dir", state_arg, "--json", "2"]))
            .expect("JSON");
    assert_eq!(record["reason"], "file change");
    assert_eq!(record["diff"]["gained"], 1);
    assert_eq!(record["diff"]["lost"], 0);
    let digest = ward_control::sha256_hex(allow);
    assert!(
        record["sources"]
            .as_array()
            .expect("sources")
            .iter()
            .any(|s| s["sha256"] == digest.as_str()
                && s["source"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("web.yaml"))),
        "{record:#}"
    );
    let first = control(&["show", "--state-dir", state_arg, "1"]);
    assert!(
        first.contains("not known (the first set after a start)"),
        "{first}"
    );

    // A restart reading the same files adds no version.
    // (The start reads the policy directory before it listens.)
    plane.restart();
    let history = control(&["history", "--state-dir", state_arg]);
    assert_eq!(history.lines().count(), 3, "{history}");
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_ward-control"))
        .args(["show", "--state-dir", state_arg, "9"])
        .output()
        .expect("running ward-control");
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no version 9"),
        "{missing:?}"
    );
}

/// A webhook endpoint of the test's own: each request's body, as it arrives; with `answer` false
/// it reads requests and never answers (a hanging endpoint).
async fn webhook_endpoint(answer: bool) -> (String, mpsc::Receiver<String>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let url = format!("http://{}/hook", listener.local_addr().expect("address"));
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = conn.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    data.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&data).into_owned();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() < length {
                        continue;
                    }
                    let _ = tx.send(body[..length].to_owned()).await;
                    data.clear();
                    if answer {
                        let _ = conn
                            .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                            .await;
                    }
                }
            });
        }
    });
    (url, rx)
}

fn admit_client_on(port: u16) -> String {
    format!("apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: web\nspec:\n  selector: {{labels: {{app: web}}}}\n  ingress:\n    - from: [{{labels: {{app: client}}}}]\n      ports: [{{port: {port}}}]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_version_is_posted_to_the_webhook_and_a_hanging_one_never_holds_a_push() {
    for answer in [true, false] {
        let tmp = tempfile::tempdir().expect("temp dir");
        let (url, mut posted) = webhook_endpoint(answer).await;
        let plane = common::start_plane(tmp.path(), |opts| {
            opts.extra_args = vec!["--history-webhook".into(), url.clone()];
        });
        let mut agent = Agent::start(
            agent_config(&plane, tmp.path(), "node-a"),
            vec![
                workload("web", "web", "10.0.0.1"),
                workload("client", "client", "10.0.0.2"),
            ],
        );
        agent
            .until("both workloads", |s| s.ipcache.len() >= 2)
            .await;
        // The set read at start is the first version.
        let body = tokio::time::timeout(WAIT, posted.recv())
            .await
            .expect("the start's POST within the wait")
            .expect("endpoint alive");
        assert!(body.contains(r#""reason":"start""#), "{body}");
        for port in [80, 81] {
            let started = Instant::now();
            plane.write_policy("web.yaml", &admit_client_on(port));
            let needle = format!("port: {port}");
            agent
                .until("the new policy", |s| {
                    s.policies.iter().any(|(_, yaml)| yaml.contains(&needle))
                })
                .await;
            let pushed = started.elapsed();
            assert!(
                pushed < Duration::from_secs(2),
                "with a webhook that answers={answer}, the push took {pushed:?}"
            );
            if !answer {
                // The endpoint still holds the start's POST: this record waits in the queue.
                continue;
            }
            let body = tokio::time::timeout(WAIT, posted.recv())
                .await
                .expect("a POST within the wait")
                .expect("endpoint alive");
            let record: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
            assert_eq!(record["reason"], "file change", "{record:#}");
            assert!(
                record["diff"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains(&format!("tcp/{port}"))),
                "{record:#}"
            );
        }
        if !answer {
            assert!(
                plane.wait_for_log("history webhook: POST failed", Duration::from_secs(10)),
                "{}",
                plane.logs()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_the_version_each_node_enforces_and_the_nodes_that_lag() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), "1h");
    let state = plane.state_dir();
    let state_arg = state.to_str().expect("path").to_owned();
    let status = |state_arg: &str| -> serde_json::Value {
        serde_json::from_str(&control(&["status", "--state-dir", state_arg, "--json"]))
            .expect("status JSON")
    };
    let until = |what: &str, done: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = status(&state_arg);
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s:#}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let node = |s: &serde_json::Value, name: &str| {
        s["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["node"] == name).cloned())
            .unwrap_or_default()
    };
    let mut a = Agent::start(agent_config(&plane, tmp.path(), "node-a"), vec![]);
    let mut b = Agent::start(agent_config(&plane, tmp.path(), "node-b"), vec![]);
    a.until("node-a's policy", |s| !s.policies.is_empty()).await;
    b.until("node-b's policy", |s| !s.policies.is_empty()).await;
    let s = until("both nodes enforce version 1", &|s| {
        ["node-a", "node-b"]
            .iter()
            .all(|n| node(s, n)["enforces_history_version"] == 1 && node(s, n)["lagging"] == false)
    });
    assert_eq!(s["served_history_version"], 1, "{s:#}");

    // node-b goes away; the policy changes: node-a follows, node-b lags.
    drop(b);
    plane.write_policy("web.yaml", &admit_client_on(80));
    a.until("node-a's new policy", |s| {
        s.policies.iter().any(|(_, yaml)| yaml.contains("port: 80"))
    })
    .await;
    let s = until("node-b lags", &|s| {
        node(s, "node-a")["enforces_history_version"] == 2
            && node(s, "node-b")["lagging"] == true
            && node(s, "node-b")["connected"] == false
    });
    assert_eq!(s["served_history_version"], 2, "{s:#}");
    assert_eq!(node(&s, "node-b")["enforces_history_version"], 1, "{s:#}");
    let text = control(&["status", "--state-dir", &state_arg]);
    assert!(text.contains("lagging: node-b\n"), "{text}");
}
