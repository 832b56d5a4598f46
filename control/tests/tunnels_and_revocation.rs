//! The real `ward-control` binary on loopback, spoken to by a bare protocol client: tunnel
//! addresses in the IP cache, revocations reaching connected streams, the workload certificate
//! lifetime and the signing rate limit.

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

mod common;
use common::{channel, csr, WAIT};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use ward_control::test_helpers::ControlPlane;
use ward_proto::{
    agent_message::Kind, control_client::ControlClient, resource::Body, Ack, AgentMessage, Hello,
    JoinRequest, RenewRequest, Report, ResourceType, ServerMessage, SignWorkloadRequest,
    TypeVersion, Update, Workload,
};

const BINARY: &str = env!("CARGO_BIN_EXE_ward-control");

fn start_plane(tmp: &Path, extra_args: &[&str]) -> ControlPlane {
    common::start_plane(tmp, |opts| {
        opts.extra_args = extra_args.iter().map(|a| (*a).to_string()).collect();
    })
}

/// A node certificate and its key.
#[derive(Clone)]
struct Node {
    name: String,
    cert: String,
    key: String,
}

impl Node {
    async fn join(plane: &ControlPlane, name: &str) -> Node {
        let (key, csr_pem) = csr();
        let response = ControlClient::new(channel(plane, None).await)
            .join(JoinRequest {
                token: plane.new_token(None),
                node: name.into(),
                csr_pem,
            })
            .await
            .expect("join")
            .into_inner();
        Node {
            name: name.into(),
            cert: response.cert_pem,
            key,
        }
    }

    async fn channel(&self, plane: &ControlPlane) -> Channel {
        channel(plane, Some((&self.cert, &self.key))).await
    }

    async fn stream(&self, plane: &ControlPlane, tunnel: &str) -> Result<RawStream, tonic::Status> {
        RawStream::open(self.channel(plane).await, &self.name, tunnel).await
    }
}

struct RawStream {
    tx: mpsc::Sender<AgentMessage>,
    rx: tonic::Streaming<ServerMessage>,
    versions: BTreeMap<i32, String>,
}

impl RawStream {
    async fn open(channel: Channel, node: &str, tunnel: &str) -> Result<RawStream, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(AgentMessage {
            kind: Some(Kind::Hello(Hello {
                node: node.into(),
                versions: Vec::<TypeVersion>::new(),
                agent_version: "test".into(),
                tunnel_address: tunnel.into(),
            })),
        })
        .await
        .expect("queue hello");
        let rx = ControlClient::new(channel)
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(RawStream {
            tx,
            rx,
            versions: BTreeMap::new(),
        })
    }

    /// The next batch, within `within`; `None` if none came.
    async fn batch_within(
        &mut self,
        within: Duration,
    ) -> Option<Result<Vec<Update>, tonic::Status>> {
        let mut updates = Vec::new();
        loop {
            let message = match tokio::time::timeout(within, self.rx.message()).await {
                Err(_) if updates.is_empty() => return None,
                Err(_) => panic!("a batch was cut short"),
                Ok(Err(status)) => return Some(Err(status)),
                Ok(Ok(None)) => return Some(Err(tonic::Status::cancelled("stream closed"))),
                Ok(Ok(Some(message))) => message,
            };
            updates.extend(message.updates);
            if !message.more {
                return Some(Ok(updates));
            }
        }
    }

    /// The next batch, ACKed.
    async fn batch(&mut self) -> Vec<Update> {
        let updates = self
            .batch_within(WAIT)
            .await
            .expect("a batch within the wait")
            .expect("stream open");
        for u in &updates {
            self.versions.insert(u.r#type, u.version.clone());
            self.tx
                .send(AgentMessage {
                    kind: Some(Kind::Ack(Ack {
                        r#type: u.r#type,
                        version: u.version.clone(),
                        nonce: u.nonce.clone(),
                    })),
                })
                .await
                .expect("stream open");
        }
        updates
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

    async fn report(&mut self, node: &str, workloads: Vec<Workload>) {
        self.tx
            .send(AgentMessage {
                kind: Some(Kind::Report(Report {
                    node: node.into(),
                    workloads,
                })),
            })
            .await
            .expect("stream open");
        // The report changes IDENTITY and IPCACHE: this stream receives them too.
        self.batch().await;
    }
}

fn workload(name: &str, address: &str) -> Workload {
    Workload {
        name: name.into(),
        spiffe_id: format!("spiffe://example.org/ns/demo/sa/{name}"),
        addresses: vec![address.into()],
        ..Workload::default()
    }
}

/// Every IP cache entry in `updates`: address → (node, tunnel); removed addresses map to `None`.
fn ipcache(updates: &[Update]) -> BTreeMap<String, Option<(String, String)>> {
    let mut out = BTreeMap::new();
    for u in updates
        .iter()
        .filter(|u| u.r#type == ResourceType::Ipcache as i32)
    {
        for r in &u.resources {
            let Some(Body::Ipcache(entry)) = &r.body else {
                panic!("an IP cache entry: {r:?}")
            };
            out.insert(
                entry.address.clone(),
                Some((entry.node.clone(), entry.tunnel.clone())),
            );
        }
        for name in &u.removed {
            out.insert(name.clone(), None);
        }
    }
    out
}

fn revoked_serials(updates: &[Update]) -> Option<Vec<String>> {
    updates
        .iter()
        .filter(|u| u.r#type == ResourceType::TrustBundle as i32)
        .flat_map(|u| &u.resources)
        .find_map(|r| match &r.body {
            Some(Body::TrustBundle(bundle)) => Some(bundle.revoked_serials.clone()),
            _ => None,
        })
}

fn revoke(state_dir: &Path, serials: &[&str]) -> std::process::Output {
    Command::new(BINARY)
        .arg("revoke")
        .arg("--state-dir")
        .arg(state_dir)
        .args(serials)
        .output()
        .expect("running ward-control revoke")
}

fn revoke_nodes(state_dir: &Path, nodes: &[&str]) -> std::process::Output {
    let mut command = Command::new(BINARY);
    command.arg("revoke").arg("--state-dir").arg(state_dir);
    for node in nodes {
        command.args(["--node", node]);
    }
    command.output().expect("running ward-control revoke")
}

// ---- tests ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_cache_entries_name_the_node_and_its_tunnel_address() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), &[]);
    let a = Node::join(&plane, "node-a").await;
    let b = Node::join(&plane, "node-b").await;
    let c = Node::join(&plane, "node-c").await;

    let mut watcher = c.stream(&plane, "").await.expect("stream");
    let mut seen = ipcache(&watcher.batch().await);

    let mut sa = a.stream(&plane, "127.0.0.1:4430").await.expect("stream");
    sa.batch().await;
    sa.report("node-a", vec![workload("web", "10.0.0.1")]).await;
    let mut sb = b.stream(&plane, "[::1]:4431").await.expect("stream");
    sb.batch().await;
    sb.report("node-b", vec![workload("db", "10.0.0.2")]).await;

    let expected = BTreeMap::from([
        (
            "10.0.0.1".to_string(),
            Some(("node-a".to_string(), "127.0.0.1:4430".to_string())),
        ),
        (
            "10.0.0.2".to_string(),
            Some(("node-b".to_string(), "[::1]:4431".to_string())),
        ),
    ]);
    let deadline = Instant::now() + WAIT;
    while seen != expected {
        assert!(Instant::now() < deadline, "never reached: {seen:?}");
        seen.extend(ipcache(&watcher.batch().await));
    }

    // Node a comes back with another tunnel address: the others receive the difference.
    drop(sa);
    let mut sa = a.stream(&plane, "127.0.0.2:4430").await.expect("stream");
    sa.batch().await;
    let update = watcher.batch().await;
    let ip = update
        .iter()
        .find(|u| u.r#type == ResourceType::Ipcache as i32)
        .expect("an IP cache update");
    assert!(!ip.replace, "a difference, not the whole set: {ip:?}");
    assert_eq!(
        ipcache(&update),
        BTreeMap::from([(
            "10.0.0.1".to_string(),
            Some(("node-a".to_string(), "127.0.0.2:4430".to_string()))
        )])
    );

    // A tunnel address that is no IP address and port is refused, naming it.
    let d = Node::join(&plane, "node-d").await;
    let status = match d.stream(&plane, "node-d.example:4430").await {
        Err(status) => status,
        Ok(mut s) => s.ended().await,
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("tunnel_address")
            && status.message().contains("node-d.example:4430"),
        "{status:?}"
    );
    assert!(
        watcher
            .batch_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing changed for the others"
    );
    drop(sa);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_a_connected_stream_in_the_trust_bundle() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), &[]);
    let a = Node::join(&plane, "node-a").await;
    let mut stream = a.stream(&plane, "").await.expect("stream");
    let first = stream.batch().await;
    assert_eq!(revoked_serials(&first), Some(vec![]), "nothing revoked yet");

    let started = Instant::now();
    let out = revoke(&plane.state_dir(), &["4A:0B:CD:01"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "revoked 4a:0b:cd:01\n"
    );
    let update = stream.batch().await;
    eprintln!(
        "a revocation reached the stream in {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(update.len(), 1, "only the trust bundle changed: {update:?}");
    let bundle = &update[0];
    assert_eq!(bundle.r#type, ResourceType::TrustBundle as i32);
    assert!(bundle.resources[0].name == "ca");
    let Some(Body::TrustBundle(tb)) = &bundle.resources[0].body else {
        panic!("a trust bundle")
    };
    assert!(tb.pem.contains("BEGIN CERTIFICATE"), "the CA stays");
    assert_eq!(tb.revoked_serials, ["4a:0b:cd:01"]);
    assert!(
        plane.wait_for_log("revocation list updated", WAIT),
        "{}",
        plane.logs()
    );

    // Again, with another form of the same serial and a new one: only the new one is added.
    let out = revoke(&plane.state_dir(), &["4a0bcd01", "ff"]);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("revoked ff\n"), "{printed}");
    assert!(printed.contains("already revoked 4a:0b:cd:01"), "{printed}");
    let update = stream.batch().await;
    assert_eq!(
        revoked_serials(&update),
        Some(vec!["4a:0b:cd:01".to_string(), "ff".to_string()])
    );

    // A malformed serial on the command line is refused and appends nothing.
    let out = revoke(&plane.state_dir(), &["01", "not-hex"]);
    assert!(!out.status.success(), "{out:?}");
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("not-hex") && error.contains("hexadecimal"),
        "{error}"
    );
    let file = plane.state_dir().join("revoked");
    assert_eq!(
        std::fs::read_to_string(&file).expect("revoked file"),
        "4a:0b:cd:01\nff\n"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&file).expect("stat").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A malformed line written by hand is logged with its number; the list in force stays.
    let mut text = std::fs::read_to_string(&file).expect("revoked file");
    text.push_str("garbage\n");
    std::fs::write(&file, text).expect("write");
    assert!(
        plane.wait_for_log("revocation file refused whole", WAIT),
        "{}",
        plane.logs()
    );
    assert!(plane.logs().contains("revoked:3:"), "{}", plane.logs());
    assert!(
        stream
            .batch_within(Duration::from_millis(500))
            .await
            .is_none(),
        "nothing is half applied"
    );
    std::fs::write(&file, "ff\n").expect("write");
    let update = stream.batch().await;
    assert_eq!(revoked_serials(&update), Some(vec!["ff".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_loses_its_stream_renewals_certificates_and_addresses_and_cannot_rejoin() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), &[]);
    let a = Node::join(&plane, "node-a").await;
    let b = Node::join(&plane, "node-b").await;
    let mut a_stream = a.stream(&plane, "").await.expect("stream");
    a_stream.batch().await;
    a_stream
        .report("node-a", vec![workload("web", "10.0.0.1")])
        .await;
    let mut b_stream = b.stream(&plane, "").await.expect("stream");
    let first = b_stream.batch().await;
    assert!(ipcache(&first).contains_key("10.0.0.1"), "{first:?}");

    let started = Instant::now();
    let out = revoke_nodes(&plane.state_dir(), &["node-a"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "revoked node node-a\n"
    );
    // Its stream ends; its workloads leave the other nodes' IP caches.
    let ended = a_stream.ended().await;
    assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{ended:?}");
    let update = b_stream.batch().await;
    assert_eq!(ipcache(&update).get("10.0.0.1"), Some(&None), "{update:?}");
    eprintln!("a node revocation took effect in {:?}", started.elapsed());

    // Its certificate opens no stream, renews nothing and gets no workload certificate.
    let refused = a.stream(&plane, "").await.err().expect("stream refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let (_, csr_pem) = csr();
    let renewed = ControlClient::new(a.channel(&plane).await)
        .renew(RenewRequest {
            csr_pem: csr_pem.clone(),
        })
        .await;
    assert_eq!(
        renewed.expect_err("renewal refused").code(),
        tonic::Code::PermissionDenied
    );
    let signed = ControlClient::new(a.channel(&plane).await)
        .sign_workload(SignWorkloadRequest {
            spiffe_id: "spiffe://example.org/ns/demo/sa/web".into(),
            csr_pem: csr_pem.clone(),
        })
        .await;
    assert_eq!(
        signed.expect_err("signing refused").code(),
        tonic::Code::PermissionDenied
    );
    // A fresh token does not bring it back while the revocation stands.
    let rejoin = |token: String| {
        let csr_pem = csr_pem.clone();
        let plane = &plane;
        async move {
            ControlClient::new(channel(plane, None).await)
                .join(JoinRequest {
                    token,
                    node: "node-a".into(),
                    csr_pem,
                })
                .await
        }
    };
    let refused = rejoin(plane.new_token(None))
        .await
        .expect_err("join refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // The other node is untouched.
    assert!(
        b_stream
            .batch_within(Duration::from_millis(300))
            .await
            .is_none_or(|b| b.is_ok()),
        "node-b's stream ended"
    );
    // Once the line is removed, a new token joins it again.
    std::fs::write(plane.state_dir().join("revoked"), "").expect("write");
    let deadline = Instant::now() + WAIT;
    loop {
        match rejoin(plane.new_token(None)).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("node-a cannot join again after its revocation was lifted: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_a_node_certificate_never_reaches_past_its_maximum_age() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), &["--node-cert-max-age", "20m"]);
    let validity = |pem: &str| {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
        let cert = pem.parse_x509().expect("certificate");
        (
            cert.validity().not_before.timestamp(),
            cert.validity().not_after.timestamp(),
        )
    };
    let a = Node::join(&plane, "node-a").await;
    let (joined, first_end) = validity(&a.cert);
    assert!(
        first_end - joined <= 20 * 60 + 300,
        "the first certificate is bounded by the maximum age (1 h lifetime): {joined}..{first_end}"
    );
    let (_, csr_pem) = csr();
    let renewed = ControlClient::new(a.channel(&plane).await)
        .renew(RenewRequest { csr_pem })
        .await
        .expect("renewed")
        .into_inner();
    let (start, end) = validity(&renewed.cert_pem);
    assert_eq!(start, joined, "the renewal keeps the join");
    assert!(
        end <= first_end + 1,
        "renewal extended the certificate: {first_end} then {end}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_certificates_follow_their_lifetime_flag_and_their_serial_is_logged() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), &["--workload-cert-lifetime", "10m"]);
    let a = Node::join(&plane, "node-a").await;
    let mut stream = a.stream(&plane, "").await.expect("stream");
    stream.batch().await;
    stream
        .report("node-a", vec![workload("web", "10.0.0.1")])
        .await;
    let (_, csr_pem) = csr();
    let signed = ControlClient::new(a.channel(&plane).await)
        .sign_workload(SignWorkloadRequest {
            spiffe_id: "spiffe://example.org/ns/demo/sa/web".into(),
            csr_pem,
        })
        .await
        .expect("signed")
        .into_inner();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let left = signed.not_after_unix - i64::try_from(now).expect("seconds");
    assert!((500..=600).contains(&left), "lifetime left: {left} s");
    let der = ward_tunnel::TrustStore::parse_pem_bundle(&signed.cert_chain_pem).expect("PEM");
    let info = ward_tunnel::identity::cert_info(der[0].as_ref()).expect("certificate");
    let cert_left = info
        .not_after
        .duration_since(std::time::SystemTime::now())
        .expect("valid");
    assert!(cert_left <= Duration::from_secs(600), "{cert_left:?}");
    assert!(
        plane.wait_for_log(&format!("serial=\"{}\"", info.serial), WAIT)
            || plane.logs().contains(&format!("serial={}", info.serial)),
        "the serial to revoke is logged: {}",
        plane.logs()
    );
    // The node certificate keeps its own lifetime.
    let node_cert = ward_tunnel::TrustStore::parse_pem_bundle(&a.cert).expect("PEM");
    let node_left = ward_tunnel::identity::cert_info(node_cert[0].as_ref())
        .expect("certificate")
        .not_after
        .duration_since(std::time::SystemTime::now())
        .expect("valid");
    assert!(node_left > Duration::from_secs(3000), "{node_left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_signing_is_rate_limited_per_node() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let plane = start_plane(tmp.path(), &[]);
    let a = Node::join(&plane, "node-a").await;
    let b = Node::join(&plane, "node-b").await;
    let mut stream = a.stream(&plane, "").await.expect("stream");
    stream.batch().await;
    stream
        .report("node-a", vec![workload("web", "10.0.0.1")])
        .await;
    let mut b_stream = b.stream(&plane, "").await.expect("stream");
    b_stream.batch().await;
    b_stream
        .report("node-b", vec![workload("db", "10.0.0.2")])
        .await;

    let (_, csr_pem) = csr();
    let sign = |client: &mut ControlClient<Channel>, id: &str| {
        let request = SignWorkloadRequest {
            spiffe_id: id.into(),
            csr_pem: csr_pem.clone(),
        };
        let mut client = client.clone();
        async move { client.sign_workload(request).await }
    };
    let mut client = ControlClient::new(a.channel(&plane).await);
    let mut signed = 0;
    let refused = loop {
        match sign(&mut client, "spiffe://example.org/ns/demo/sa/web").await {
            Ok(_) => signed += 1,
            Err(status) => break status,
        }
        assert!(signed < 1000, "never limited");
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("node-a"), "{refused:?}");
    assert!(signed >= 64, "the burst is allowed: {signed}");
    assert!(
        plane.wait_for_log("the node asks for more than", WAIT),
        "{}",
        plane.logs()
    );
    // Another node is not affected.
    let mut other = ControlClient::new(b.channel(&plane).await);
    sign(&mut other, "spiffe://example.org/ns/demo/sa/db")
        .await
        .expect("node-b has its own bucket");
}

#[test]
fn a_malformed_revocation_file_stops_the_start() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (policy, state) = (tmp.path().join("policy"), tmp.path().join("state"));
    std::fs::create_dir_all(&policy).expect("policy dir");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("revoked"), "4a:0b\nnope\n").expect("revoked file");
    let out = Command::new(BINARY)
        .arg("--policy-dir")
        .arg(&policy)
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("running ward-control");
    assert!(!out.status.success(), "{out:?}");
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("revoked:2:"), "{error}");
}
