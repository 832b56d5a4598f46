//! The stream to the control plane: joining, connecting with the node certificate, applying
//! batches through the agent and answering them, reporting workloads, renewing the certificate,
//! and reconnecting with backoff.
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use ward_proto::{
    agent_message::Kind, control_client::ControlClient, Ack, AgentMessage, Hello, JoinRequest,
    Nack, RenewRequest, Report, ServerMessage, SignWorkloadRequest, TypeVersion, Update, Workload,
};

use super::{
    certs::{self, NodeCert},
    state::{self, Held, MergeError},
    ControlError, ControlPlaneConfig, RemoteUpdate, ReportedWorkload,
};

/// Reconnection backoff: from the first to the last delay, doubling, with jitter.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Largest message accepted from the control plane (it splits batches far below this).
const MAX_SERVER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Largest batch accepted, over all its messages, and most messages in one batch.
const MAX_BATCH_BYTES: usize = 1024 * 1024 * 1024;
const MAX_BATCH_MESSAGES: usize = 4096;
/// Longest error text sent back in a NACK.
const MAX_NACK_ERROR: usize = 4096;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Capped exponential backoff with jitter.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }
}

fn random_fraction() -> f64 {
    let mut bytes = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX)
}

impl Backoff {
    /// The delay before the next attempt: between half and all of the current step, so that
    /// agents cut off together do not come back together.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        step.mul_f64(0.5 + random_fraction() / 2.0)
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }
}

/// Connects to the first replica that answers, trying them in turn from the `first`-th;
/// returns the channel and the index of the replica it reached.
async fn connect(
    cfg: &ControlPlaneConfig,
    identity: Option<&NodeCert>,
    first: usize,
) -> Result<(Channel, usize), ControlError> {
    let addresses = cfg.addresses();
    let mut failed = None;
    for step in 0..addresses.len() {
        let index = (first + step) % addresses.len();
        match endpoint(cfg, addresses[index], identity)?.connect().await {
            Ok(channel) => return Ok((channel, index)),
            Err(e) => {
                if addresses.len() > 1 {
                    tracing::warn!(address = addresses[index], error = %e, "control plane replica unreachable; trying the next");
                }
                failed = Some(e);
            }
        }
    }
    Err(failed.map_or_else(
        || ControlError::Field {
            field: "address".into(),
            reason: "no address".into(),
        },
        ControlError::from,
    ))
}

fn endpoint(
    cfg: &ControlPlaneConfig,
    address: &str,
    identity: Option<&NodeCert>,
) -> Result<Endpoint, ControlError> {
    let ca = std::fs::read_to_string(&cfg.ca_file).map_err(|source| ControlError::Read {
        file: cfg.ca_file.clone(),
        source,
    })?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(cfg.server_name.clone());
    if let Some(cert) = identity {
        tls = tls.identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem));
    }
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("https://{address}")
    };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| ControlError::Field {
            field: "address".into(),
            reason: e.to_string(),
        })?
        .tls_config(tls)
        .map_err(|e| ControlError::Field {
            field: "caFile".into(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

fn client(channel: Channel) -> ControlClient<Channel> {
    ControlClient::new(channel).max_decoding_message_size(MAX_SERVER_MESSAGE_BYTES)
}

/// Trades the join token for a node certificate.
async fn join(cfg: &ControlPlaneConfig) -> Result<NodeCert, ControlError> {
    let token_file = cfg.join_token_file.as_ref().ok_or(ControlError::NoToken)?;
    let token = std::fs::read_to_string(token_file)
        .map_err(|source| ControlError::Read {
            file: token_file.clone(),
            source,
        })?
        .trim()
        .to_owned();
    let (key_pem, csr_pem) = certs::join_request(&cfg.state_dir)?;
    let (channel, _) = connect(cfg, None, 0).await?;
    let mut request = tonic::Request::new(JoinRequest {
        token,
        node: cfg.node_name.clone(),
        csr_pem,
    });
    request.set_timeout(CALL_TIMEOUT);
    let response = client(channel)
        .join(request)
        .await
        .map_err(|status| match status.code() {
            tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                ControlError::Join(status.message().to_owned())
            }
            _ => ControlError::Status(status),
        })?
        .into_inner();
    let cert = NodeCert::new(response.cert_pem, key_pem)?;
    cert.save(&cfg.state_dir)?;
    certs::finish_join(&cfg.state_dir);
    tracing::info!(node = cfg.node_name, not_after = ?cert.not_after, "joined the control plane");
    Ok(cert)
}

/// A fresh certificate over the current one's channel.
async fn renew(cfg: &ControlPlaneConfig, channel: Channel) -> Result<NodeCert, ControlError> {
    let (key_pem, csr_pem) = certs::new_request()?;
    let mut request = tonic::Request::new(RenewRequest { csr_pem });
    request.set_timeout(CALL_TIMEOUT);
    let response = client(channel).renew(request).await?.into_inner();
    let cert = NodeCert::new(response.cert_pem, key_pem)?;
    cert.save(&cfg.state_dir)?;
    Ok(cert)
}

/// Signs this node's workload certificates through the control plane's `SignWorkload`, over a
/// channel authenticated by the node certificate the stream keeps fresh.
/// How long a workload certificate's signing waits for the node to join, and how often it
/// looks.
const JOIN_WAIT: Duration = Duration::from_secs(30);
const JOIN_POLL: Duration = Duration::from_millis(20);

pub struct WorkloadSigner {
    cfg: ControlPlaneConfig,
}

impl WorkloadSigner {
    pub fn new(cfg: ControlPlaneConfig) -> Self {
        WorkloadSigner { cfg }
    }

    async fn sign_pem(&self, spiffe_id: String, csr_pem: String) -> Result<String, ControlError> {
        // Right after the agent starts the node may not have joined yet: wait for it rather than
        // fail and retry a second later, so the first certificate comes as soon as it can.
        let deadline = tokio::time::Instant::now() + JOIN_WAIT;
        let cert = loop {
            match NodeCert::load(&self.cfg.state_dir).filter(|c| !c.is_expired()) {
                Some(cert) => break cert,
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(JOIN_POLL).await;
                }
                None => {
                    return Err(ControlError::Protocol(format!(
                        "the node has not joined within {JOIN_WAIT:?}"
                    )))
                }
            }
        };
        let (channel, _) = connect(&self.cfg, Some(&cert), 0).await?;
        let mut request = tonic::Request::new(SignWorkloadRequest { spiffe_id, csr_pem });
        request.set_timeout(CALL_TIMEOUT);
        let response = client(channel).sign_workload(request).await?.into_inner();
        Ok(response.cert_chain_pem)
    }
}

impl ward_tunnel::renewal::SvidSigner for WorkloadSigner {
    async fn sign(
        &self,
        spiffe_id: &ward_tunnel::SpiffeId,
        csr_pem: String,
    ) -> Result<String, String> {
        self.sign_pem(spiffe_id.to_string(), csr_pem)
            .await
            .map_err(|e| e.to_string())
    }
}

fn to_proto(node: &str, workloads: &[ReportedWorkload]) -> AgentMessage {
    AgentMessage {
        kind: Some(Kind::Report(Report {
            node: node.into(),
            workloads: workloads
                .iter()
                .map(|w| Workload {
                    name: w.name.clone(),
                    spiffe_id: w.spiffe_id.clone(),
                    namespace: w.namespace.clone(),
                    labels: w.labels.clone().into_iter().collect(),
                    addresses: w.addresses.iter().map(ToString::to_string).collect(),
                    tunnel_port: w.tunnel_port.into(),
                    ..Workload::default()
                })
                .collect(),
        })),
    }
}

/// How a stream ended, when not by an error.
enum End {
    /// A new certificate is in place; connect again at once.
    Renewed,
    /// The agent is shutting down.
    AgentGone,
}

/// The agent-side loop: holds state across streams.
pub struct Client {
    cfg: ControlPlaneConfig,
    /// Announced in the Hello: where peers reach this node's tunnel.
    tunnel_address: Option<std::net::SocketAddr>,
    held: Held,
    cert: Option<NodeCert>,
    reports: watch::Receiver<Vec<ReportedWorkload>>,
    updates: mpsc::Sender<RemoteUpdate>,
    renew_backoff: Backoff,
    /// The replica (index in [`ControlPlaneConfig::addresses`]) tried first.
    replica: usize,
    /// When the current stream was established, if it was.
    connected_at: Option<tokio::time::Instant>,
    /// Moves to another replica left before backing off: a stream that ends is retried at once
    /// on the next replica, once per other replica, until a stream lasts.
    moves_left: usize,
}

/// A stream that lasted this long was healthy: its end resets the backoff.
const STABLE: Duration = Duration::from_secs(5);
/// The pause before trying the next replica after a stream ended.
const MOVE_DELAY: Duration = Duration::from_millis(50);

impl Client {
    pub fn new(
        cfg: ControlPlaneConfig,
        tunnel_address: Option<std::net::SocketAddr>,
        reports: watch::Receiver<Vec<ReportedWorkload>>,
        updates: mpsc::Sender<RemoteUpdate>,
    ) -> Client {
        let held = state::load(&cfg.state_dir)
            .map(|s| Held::from_state(&s))
            .unwrap_or_default();
        let cert = NodeCert::load(&cfg.state_dir);
        let moves_left = cfg.addresses().len().saturating_sub(1);
        Client {
            cfg,
            tunnel_address,
            held,
            cert,
            reports,
            updates,
            renew_backoff: Backoff::default(),
            replica: 0,
            connected_at: None,
            moves_left,
        }
    }

    /// Streams until the agent drops its end of `updates`.
    pub async fn run(mut self) {
        let mut backoff = Backoff::default();
        loop {
            let outcome = self.connect_and_stream().await;
            match outcome {
                Ok(End::AgentGone) => return,
                Ok(End::Renewed) => {
                    self.connected_at = None;
                    backoff.reset();
                    continue;
                }
                Err(e) => {
                    // A stream that stayed up a while earns a fresh backoff, so one that fails at
                    // once after connecting (a refused certificate, a NACK loop) still backs off.
                    let replicas = self.cfg.addresses().len();
                    let lasted = self.connected_at.take().map(|t| t.elapsed());
                    if lasted.is_some_and(|d| d >= STABLE) {
                        backoff.reset();
                        self.moves_left = replicas.saturating_sub(1);
                    }
                    let delay = if lasted.is_some() && self.moves_left > 0 {
                        self.moves_left -= 1;
                        MOVE_DELAY
                    } else {
                        backoff.next_delay()
                    };
                    let failed = self
                        .cfg
                        .addresses()
                        .get(self.replica)
                        .map(|a| a.to_string());
                    // The next attempt starts at the next replica: this one may be gone.
                    self.replica = (self.replica + 1) % self.cfg.addresses().len().max(1);
                    tracing::warn!(
                        address = failed.unwrap_or_default(),
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "control plane stream failed; enforcing the last applied policy meanwhile"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.updates.closed() => return,
                    }
                }
            }
        }
    }

    async fn connect_and_stream(&mut self) -> Result<End, ControlError> {
        let cert = match self.cert.clone().filter(|c| !c.is_expired()) {
            Some(cert) => cert,
            None => {
                if self.cert.is_some() {
                    tracing::warn!(
                        node = self.cfg.node_name,
                        "the node certificate expired; joining again with the join token"
                    );
                }
                let cert = join(&self.cfg).await?;
                self.cert = Some(cert.clone());
                cert
            }
        };
        let (channel, replica) = connect(&self.cfg, Some(&cert), self.replica).await?;
        self.replica = replica;
        let (tx, rx) = mpsc::channel::<AgentMessage>(16);
        let hello = AgentMessage {
            kind: Some(Kind::Hello(Hello {
                node: self.cfg.node_name.clone(),
                versions: self
                    .held
                    .versions()
                    .iter()
                    .map(|(k, v)| TypeVersion {
                        r#type: *k as i32,
                        version: v.clone(),
                    })
                    .collect(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                tunnel_address: self
                    .tunnel_address
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            })),
        };
        tx.send(hello).await.map_err(|_| ControlError::Closed)?;
        let report = to_proto(&self.cfg.node_name, &self.reports.borrow_and_update());
        tx.send(report).await.map_err(|_| ControlError::Closed)?;
        let mut inbound = client(channel.clone())
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        tracing::info!(
            address = self.cfg.addresses()[replica],
            node = self.cfg.node_name,
            "connected to the control plane"
        );
        let mut pending: Vec<ServerMessage> = Vec::new();
        let mut pending_bytes = 0usize;
        // How long the stream lasts decides, when it ends, between a fresh backoff and more.
        self.connected_at = Some(tokio::time::Instant::now());
        loop {
            let renew_in = self
                .cert
                .as_ref()
                .map(|c| {
                    c.renew_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                })
                .unwrap_or(Duration::MAX);
            tokio::select! {
                message = inbound.message() => {
                    let Some(message) = message? else {
                        return Err(ControlError::Closed);
                    };
                    let more = message.more;
                    pending_bytes += prost::Message::encoded_len(&message);
                    pending.push(message);
                    if pending.len() > MAX_BATCH_MESSAGES || pending_bytes > MAX_BATCH_BYTES {
                        return Err(ControlError::Protocol(format!(
                            "a batch of more than {MAX_BATCH_MESSAGES} messages or {MAX_BATCH_BYTES} bytes"
                        )));
                    }
                    if !more {
                        let batch: Vec<Update> = std::mem::take(&mut pending)
                            .into_iter()
                            .flat_map(|m| m.updates)
                            .collect();
                        pending_bytes = 0;
                        if !self.apply(batch, &tx).await? {
                            return Ok(End::AgentGone);
                        }
                    }
                }
                changed = self.reports.changed() => {
                    if changed.is_err() {
                        return Ok(End::AgentGone);
                    }
                    let report = to_proto(&self.cfg.node_name, &self.reports.borrow_and_update());
                    tx.send(report).await.map_err(|_| ControlError::Closed)?;
                }
                () = tokio::time::sleep(renew_in) => {
                    match renew(&self.cfg, channel.clone()).await {
                        Ok(cert) => {
                            tracing::info!(node = self.cfg.node_name, not_after = ?cert.not_after, "node certificate renewed");
                            self.cert = Some(cert);
                            self.renew_backoff.reset();
                            return Ok(End::Renewed);
                        }
                        Err(e) => {
                            let delay = self.renew_backoff.next_delay();
                            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "renewing the node certificate failed; the current one stays in use");
                            if let Some(cert) = self.cert.as_mut() {
                                cert.renew_at = SystemTime::now() + delay;
                            }
                        }
                    }
                }
                () = self.updates.closed() => return Ok(End::AgentGone),
            }
        }
    }

    /// Merges a batch, has the agent apply it, and answers. Returns false when the agent is gone.
    async fn apply(
        &mut self,
        batch: Vec<Update>,
        tx: &mpsc::Sender<AgentMessage>,
    ) -> Result<bool, ControlError> {
        let answer_all = |ok: Result<(), String>, held: &Held| -> Vec<AgentMessage> {
            let mut seen = std::collections::BTreeSet::new();
            batch
                .iter()
                .filter(|u| seen.insert(u.r#type))
                .map(|u| {
                    let kind = match &ok {
                        Ok(()) => Kind::Ack(Ack {
                            r#type: u.r#type,
                            version: u.version.clone(),
                            nonce: u.nonce.clone(),
                        }),
                        Err(error) => Kind::Nack(Nack {
                            r#type: u.r#type,
                            version: ward_proto::ResourceType::try_from(u.r#type)
                                .ok()
                                .and_then(|k| held.version(k))
                                .unwrap_or_default()
                                .into(),
                            nonce: u.nonce.clone(),
                            error: truncate(error, MAX_NACK_ERROR),
                        }),
                    };
                    AgentMessage { kind: Some(kind) }
                })
                .collect()
        };
        let next = match self.held.merged(&batch) {
            Ok(next) => next,
            Err(e @ MergeError::BaseMismatch { .. }) => {
                return Err(ControlError::Protocol(e.to_string()));
            }
            Err(MergeError::Invalid(reason)) => {
                tracing::warn!(
                    reason,
                    "refusing a malformed update from the control plane (NACK)"
                );
                for answer in answer_all(Err(format!("malformed update: {reason}")), &self.held) {
                    tx.send(answer).await.map_err(|_| ControlError::Closed)?;
                }
                return Ok(true);
            }
        };
        let result = if next.same_content(&self.held) {
            // Only the versions moved (the control plane restarted with the same content).
            Ok(())
        } else {
            let (ack, answer) = oneshot::channel();
            let update = RemoteUpdate {
                state: next.to_state(),
                ack,
            };
            if self.updates.send(update).await.is_err() {
                return Ok(false);
            }
            match answer.await {
                Ok(result) => result,
                Err(_) => return Ok(false),
            }
        };
        match &result {
            Ok(()) => {
                self.held = next;
                let (dir, snapshot) = (self.cfg.state_dir.clone(), self.held.to_state());
                let saved = tokio::task::spawn_blocking(move || state::save(&dir, &snapshot)).await;
                if let Ok(Err(e)) | Err(e) = saved.map_err(std::io::Error::other) {
                    tracing::warn!(error = %e, dir = %self.cfg.state_dir.display(), "saving the applied state failed; a restart without the control plane would enforce an older one");
                }
                tracing::info!(versions = ?self.held.to_state().versions, "control plane update applied");
            }
            Err(e) => tracing::warn!(
                error = e,
                "control plane update refused; keeping the previous state (NACK)"
            ),
        }
        for answer in answer_all(result, &self.held) {
            tx.send(answer).await.map_err(|_| ControlError::Closed)?;
        }
        Ok(true)
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(
            first >= BACKOFF_FIRST / 2 && first <= BACKOFF_FIRST,
            "{first:?}"
        );
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(
            *delays.last().expect("delays") >= BACKOFF_MAX / 2,
            "reaches the cap"
        );
        b.reset();
        assert!(b.next_delay() <= BACKOFF_FIRST);
    }

    #[test]
    fn nack_errors_are_truncated_on_a_character_boundary() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("ééé", 3), "é…");
    }
}
