//! What both control-plane test files need to speak to the real binary as a bare client.
#![allow(dead_code, reason = "each test file uses what it needs")]
use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use ward_agent::control::{ControlPlaneConfig, RemoteState, RemoteUpdate, ReportedWorkload};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use ward_control::test_helpers::{ControlPlane, ControlPlaneOptions};
use ward_proto::{control_client::ControlClient, JoinRequest};

pub const WEB: &str = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: web\nspec:\n  selector: {labels: {app: web}}\n  ingress: []\n";
pub const WAIT: Duration = Duration::from_secs(10);

/// The real `ward-control` in `tmp`, serving policy `web`, with `configure`'s options.
pub fn start_plane(tmp: &Path, configure: impl FnOnce(&mut ControlPlaneOptions)) -> ControlPlane {
    let mut opts = ControlPlaneOptions::new(env!("CARGO_BIN_EXE_ward-control"), tmp);
    configure(&mut opts);
    std::fs::create_dir_all(tmp.join("policy")).expect("policy dir");
    std::fs::write(tmp.join("policy/web.yaml"), WEB).expect("initial policy");
    ControlPlane::start(opts)
}

pub fn tls(plane: &ControlPlane, identity: Option<(&str, &str)>, ca_pem: Option<&str>) -> Endpoint {
    let ca = std::fs::read_to_string(plane.ca_file()).expect("CA file");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem.map_or(ca, str::to_owned)))
        .domain_name("ward-control");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{}", plane.address))
        .expect("uri")
        .tls_config(tls)
        .expect("tls config")
        .connect_timeout(Duration::from_secs(5))
}

pub async fn channel(plane: &ControlPlane, identity: Option<(&str, &str)>) -> Channel {
    tls(plane, identity, None)
        .connect()
        .await
        .expect("TLS connection")
}

pub fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    (key.serialize_pem(), csr)
}

pub async fn join(
    plane: &ControlPlane,
    node: &str,
    token: &str,
) -> Result<(String, String), tonic::Status> {
    join_with(plane, node, token, csr()).await
}

/// [`join`] with the key and CSR `request`.
pub async fn join_with(
    plane: &ControlPlane,
    node: &str,
    token: &str,
    (key, csr_pem): (String, String),
) -> Result<(String, String), tonic::Status> {
    let response = ControlClient::new(channel(plane, None).await)
        .join(JoinRequest {
            token: token.into(),
            node: node.into(),
            csr_pem,
        })
        .await?
        .into_inner();
    Ok((response.cert_pem, key))
}

pub async fn joined(plane: &ControlPlane, node: &str) -> (String, String) {
    join(plane, node, &plane.new_token(None))
        .await
        .expect("join")
}

pub fn agent_config(plane: &ControlPlane, dir: &Path, node: &str) -> ControlPlaneConfig {
    let token_file = dir.join(format!("{node}.token"));
    std::fs::write(&token_file, plane.new_token(Some(node))).expect("token file");
    ControlPlaneConfig {
        address: plane.address.to_string(),
        node_name: node.into(),
        join_token_file: Some(token_file),
        ca_file: plane.ca_file(),
        state_dir: dir.join(format!("{node}-state")),
        server_name: ward_agent::control::DEFAULT_SERVER_NAME.into(),
    }
}

pub fn workload(name: &str, app: &str, address: &str) -> ReportedWorkload {
    ReportedWorkload {
        name: name.into(),
        spiffe_id: format!("spiffe://example.org/ns/demo/sa/{app}"),
        namespace: Some("demo".into()),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        addresses: vec![address.parse().expect("address")],
        tunnel_port: 0,
    }
}

/// The agent's control-plane client running as the agent runs it.
pub struct Agent {
    pub updates: mpsc::Receiver<RemoteUpdate>,
    pub reports: watch::Sender<Vec<ReportedWorkload>>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    pub fn start(cfg: ControlPlaneConfig, workloads: Vec<ReportedWorkload>) -> Agent {
        let (reports, reports_rx) = watch::channel(workloads);
        let (tx, updates) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            ward_agent::control::run(cfg, None, reports_rx, tx)
                .await
                .expect("valid configuration");
        });
        Agent {
            updates,
            reports,
            task,
        }
    }

    pub async fn next(&mut self, within: Duration) -> RemoteUpdate {
        tokio::time::timeout(within, self.updates.recv())
            .await
            .unwrap_or_else(|_| panic!("no update within {within:?}"))
            .expect("client running")
    }

    /// Applies (ACKs) updates until one satisfies `done`; returns that state.
    pub async fn until(&mut self, what: &str, done: impl Fn(&RemoteState) -> bool) -> RemoteState {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let update = tokio::time::timeout(left, self.updates.recv())
                .await
                .unwrap_or_else(|_| panic!("never reached: {what}"))
                .expect("client running");
            let state = update.state.clone();
            update
                .ack
                .send(Ok(()))
                .expect("client waits for the answer");
            if done(&state) {
                return state;
            }
        }
    }

    /// From now on applies (ACKs) every update in the background, as an agent the test does
    /// not watch would.
    pub fn ack_everything(&mut self) {
        let (_, idle) = mpsc::channel(1);
        let mut updates = std::mem::replace(&mut self.updates, idle);
        tokio::spawn(async move {
            while let Some(update) = updates.recv().await {
                let _ = update.ack.send(Ok(()));
            }
        });
    }

    pub async fn quiet(&mut self, for_: Duration) {
        if let Ok(Some(update)) = tokio::time::timeout(for_, self.updates.recv()).await {
            panic!(
                "expected no update, got versions {:?}",
                update.state.versions
            );
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}
