//! The outbound side: carries a workload's connection, accepted by the agent's local outbound
//! listener, to the destination node's agent as an HTTP/2 CONNECT stream. Sessions are pooled per
//! (source workload, destination workload, peer agent): one TLS session presents one source
//! certificate, and carries every connection between that pair of workloads.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    rustls::{pki_types::ServerName, ClientConfig, HandshakeKind},
    TlsConnector,
};

/// HTTP/2 DATA frames up to this size, fewer frames per byte than the 16 KiB default.
const MAX_FRAME: u32 = 64 * 1024;

use crate::{
    identity::{cert_info, Serial, SpiffeId},
    protocol::{self, REASON_HEADER},
    splice::{splice, Copied, SpliceError},
    svid::{server_name_for, SvidStore},
    tls,
    trust::TrustStore,
};

/// One connection to carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundRequest {
    /// The workload that connected (from its socket's cgroup).
    pub source: SpiffeId,
    /// Its numeric identity, which the destination agent checks against `source`'s certificate.
    pub source_identity: u32,
    /// Where the workload connected to, before the connect hook redirected it.
    pub destination: SocketAddr,
    /// The destination workload's identity (from the IP cache); its certificate is expected.
    pub destination_id: SpiffeId,
    /// The destination node's agent's inbound listener.
    pub peer_agent: SocketAddr,
    /// The policy rule that sent the connection through the tunnel (the agent's rule id, 0 for
    /// none), so that a refusal's verdict names it.
    pub rule: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no certificate for source workload {source_id}")]
    NoCertificate { source_id: SpiffeId },
    #[error("TLS configuration for {source_id}: {reason}")]
    Config { source_id: SpiffeId, reason: String },
    #[error("connecting to peer agent {peer_agent} failed: {reason}")]
    Connect {
        peer_agent: SocketAddr,
        reason: String,
    },
    #[error("TLS handshake with peer agent {peer_agent} failed: {reason}")]
    Handshake {
        peer_agent: SocketAddr,
        reason: String,
    },
    #[error("HTTP/2 session with peer agent {peer_agent} failed: {reason}")]
    Session {
        peer_agent: SocketAddr,
        reason: String,
    },
    #[error("peer agent refused the connection to {destination} ({status}): {reason}")]
    Refused {
        destination: SocketAddr,
        status: u16,
        reason: String,
    },
    #[error("tunnel broke: {0}")]
    Broken(#[from] SpliceError),
}

#[derive(Clone, Debug)]
pub struct OutboundConfig {
    pub connect_timeout: Duration,
    /// TLS and HTTP/2 handshakes together.
    pub handshake_timeout: Duration,
    pub stream_window: u32,
    pub session_window: u32,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            stream_window: 1024 * 1024,
            session_window: 16 * 1024 * 1024,
        }
    }
}

/// Counters of the session pool.
#[derive(Debug, Default)]
pub struct OutboundStats {
    pub full_handshakes: AtomicU64,
    pub resumed_handshakes: AtomicU64,
    pub streams: AtomicU64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    destination: SpiffeId,
    peer_agent: SocketAddr,
}

/// One pool entry: the TLS configuration (and so the resumption tickets) of one source
/// certificate, and the session currently open, if any.
struct PoolSlot {
    serial: Serial,
    tls: Arc<ClientConfig>,
    session: tokio::sync::Mutex<Option<Session>>,
}

#[derive(Clone)]
struct Session {
    send_request: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// The peer's certificate is not used past its end.
    peer_not_after: SystemTime,
}

impl Session {
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && SystemTime::now() < self.peer_not_after
    }
}

pub struct Outbound {
    svids: Arc<SvidStore>,
    trust: Arc<TrustStore>,
    config: OutboundConfig,
    pool: Mutex<HashMap<PoolKey, Arc<PoolSlot>>>,
    stats: OutboundStats,
}

/// What the agent provides to [`Outbound::serve`]: the original destination of each accepted
/// connection (from the connect hook's map), and where verdicts go.
pub trait OriginalDestinations: Send + Sync + 'static {
    /// The request for a connection accepted from `local_peer` (the workload's own address and
    /// port). An error resets the connection; it names why.
    fn lookup(&self, local: &TcpStream, local_peer: SocketAddr) -> Result<OutboundRequest, String>;

    /// Every carried or refused connection, once it is over.
    fn finished(&self, _request: &OutboundRequest, _result: &Result<Copied, TunnelError>) {}
}

impl Outbound {
    pub fn new(
        svids: Arc<SvidStore>,
        trust: Arc<TrustStore>,
        config: OutboundConfig,
    ) -> Arc<Outbound> {
        Arc::new(Outbound {
            svids,
            trust,
            config,
            pool: Mutex::default(),
            stats: OutboundStats::default(),
        })
    }

    pub fn stats(&self) -> &OutboundStats {
        &self.stats
    }

    /// Forgets every pooled session (their streams go on until they end). For a changed trust
    /// bundle or revocation list: new connections then handshake again, resuming where they can
    /// (the resumption tickets stay), and the peer's certificate is verified anew either way.
    pub fn drop_sessions(&self) {
        for slot in self.pool.lock().expect("pool lock poisoned").values() {
            // A slot whose lock is held is opening a session right now, under the new trust.
            if let Ok(mut session) = slot.session.try_lock() {
                *session = None;
            }
        }
    }

    /// Forgets every pool entry of workload `source` (which left the node).
    pub fn forget_source(&self, source: &SpiffeId) {
        self.pool
            .lock()
            .expect("pool lock poisoned")
            .retain(|key, _| &key.source != source);
    }

    /// Accepts connections redirected to the local outbound listener and carries each.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        destinations: Arc<dyn OriginalDestinations>,
    ) {
        loop {
            let (tcp, local_peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "outbound tunnel: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (this, destinations) = (self.clone(), destinations.clone());
            tokio::spawn(async move {
                match destinations.lookup(&tcp, local_peer) {
                    Ok(request) => {
                        let result = this.carry(tcp, &request).await;
                        destinations.finished(&request, &result);
                    }
                    Err(reason) => {
                        tracing::warn!(%local_peer, reason, "outbound tunnel: no original destination; connection reset");
                        let _ = tcp.set_zero_linger();
                    }
                }
            });
        }
    }

    /// Carries `local` (the workload's accepted connection) to `request.destination` through the
    /// peer agent, until both sides are done. Whatever the workload sent before the tunnel was
    /// open is carried too: its connect() succeeded at once. If the tunnel cannot be opened or is
    /// refused, `local` is reset and the error names why.
    pub async fn carry(
        &self,
        mut local: TcpStream,
        request: &OutboundRequest,
    ) -> Result<Copied, TunnelError> {
        let _ = local.set_nodelay(true);
        let result = self.carry_inner(&mut local, request).await;
        match &result {
            Ok(copied) => {
                tracing::debug!(source = %request.source, destination = %request.destination, ?copied, "outbound tunnel stream done")
            }
            Err(e) => {
                let _ = local.set_zero_linger();
                tracing::warn!(source = %request.source, destination = %request.destination, peer_agent = %request.peer_agent, reason = %e, "outbound tunnel failed; connection reset");
            }
        }
        result
    }

    async fn carry_inner(
        &self,
        local: &mut TcpStream,
        request: &OutboundRequest,
    ) -> Result<Copied, TunnelError> {
        let mut retried = false;
        let (response, send) = loop {
            let (mut send_request, closed) = self.ready_session(request).await?;
            match send_request.send_request(
                protocol::connect_request(request.destination, request.source_identity),
                false,
            ) {
                Ok(opened) => break opened,
                // The peer closed the session (GOAWAY) since it was found ready; nothing of the
                // workload's was sent yet, so a new session can take the connection.
                Err(_) if !retried => {
                    closed.store(true, Ordering::Release);
                    retried = true;
                }
                Err(e) => {
                    return Err(TunnelError::Session {
                        peer_agent: request.peer_agent,
                        reason: e.to_string(),
                    })
                }
            }
        };
        self.stats.streams.fetch_add(1, Ordering::Relaxed);
        let destination = request.destination;
        let refused = Arc::new(Mutex::new(None));
        let opened = {
            let refused = refused.clone();
            let peer_agent = request.peer_agent;
            async move {
                let response = match response.await {
                    Ok(response) => response,
                    Err(e) => {
                        // Before any answer: the session failed (a refused certificate shows
                        // here in TLS 1.3, where the client finishes its handshake first).
                        *refused.lock().expect("lock poisoned") = Some(TunnelError::Session {
                            peer_agent,
                            reason: e.to_string(),
                        });
                        return Err(SpliceError::StreamClosed);
                    }
                };
                if response.status() != protocol::OK {
                    let reason = response
                        .headers()
                        .get(REASON_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("no reason given")
                        .to_string();
                    *refused.lock().expect("lock poisoned") = Some(TunnelError::Refused {
                        destination,
                        status: response.status().as_u16(),
                        reason,
                    });
                    return Err(SpliceError::StreamClosed);
                }
                Ok(response.into_body())
            }
        };
        let result = splice(local, send, opened).await;
        if let Some(refusal) = refused.lock().expect("lock poisoned").take() {
            return Err(refusal);
        }
        Ok(result?)
    }

    /// A session to the peer agent ready for one more stream: the pooled one, or a new one.
    async fn ready_session(
        &self,
        request: &OutboundRequest,
    ) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), TunnelError> {
        let slot = self.slot(request)?;
        // Two tries: a pooled session may turn out closed only when asked for a stream.
        for _ in 0..2 {
            let session = {
                let mut current = slot.session.lock().await;
                match current.as_ref().filter(|s| s.usable()) {
                    Some(session) => session.clone(),
                    None => {
                        let session = self.open_session(&slot, request).await?;
                        *current = Some(session.clone());
                        session
                    }
                }
            };
            match session.send_request.ready().await {
                Ok(ready) => return Ok((ready, session.closed)),
                Err(e) => {
                    session.closed.store(true, Ordering::Release);
                    tracing::debug!(peer_agent = %request.peer_agent, error = %e, "pooled tunnel session closed; opening another");
                }
            }
        }
        Err(TunnelError::Session {
            peer_agent: request.peer_agent,
            reason: "a new session closed at once".into(),
        })
    }

    /// The pool entry for `request`, replaced when the source's certificate was rotated (so that
    /// new sessions present the new one, while streams on the old session run to their end).
    fn slot(&self, request: &OutboundRequest) -> Result<Arc<PoolSlot>, TunnelError> {
        let svid = self
            .svids
            .get(&request.source)
            .ok_or_else(|| TunnelError::NoCertificate {
                source_id: request.source.clone(),
            })?;
        let key = PoolKey {
            source: request.source.clone(),
            destination: request.destination_id.clone(),
            peer_agent: request.peer_agent,
        };
        let mut pool = self.pool.lock().expect("pool lock poisoned");
        if let Some(slot) = pool.get(&key) {
            if &slot.serial == svid.serial() {
                return Ok(slot.clone());
            }
        }
        let tls = tls::client_config(&svid, self.trust.clone(), request.destination_id.clone())
            .map_err(|e| TunnelError::Config {
                source_id: request.source.clone(),
                reason: e.to_string(),
            })?;
        let slot = Arc::new(PoolSlot {
            serial: svid.serial().clone(),
            tls,
            session: tokio::sync::Mutex::new(None),
        });
        pool.insert(key, slot.clone());
        Ok(slot)
    }

    async fn open_session(
        &self,
        slot: &PoolSlot,
        request: &OutboundRequest,
    ) -> Result<Session, TunnelError> {
        let peer_agent = request.peer_agent;
        let tcp = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(peer_agent))
            .await
            .map_err(|_| TunnelError::Connect {
                peer_agent,
                reason: format!("no answer within {:?}", self.config.connect_timeout),
            })?
            .map_err(|e| TunnelError::Connect {
                peer_agent,
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        // The name tells a node's shared listener which workload's certificate to present; a
        // workload's own listener (standard HBONE) presents its own and ignores the name.
        let server_name = ServerName::try_from(server_name_for(&request.destination_id))
            .expect("a hex label under .svid.ward is a DNS name");
        let handshake = async {
            let tls = TlsConnector::from(slot.tls.clone())
                .connect(server_name, tcp)
                .await
                .map_err(|e| TunnelError::Handshake {
                    peer_agent,
                    reason: e.to_string(),
                })?;
            let (_, conn) = tls.get_ref();
            let counter = match conn.handshake_kind() {
                Some(HandshakeKind::Resumed) => &self.stats.resumed_handshakes,
                _ => &self.stats.full_handshakes,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let peer_not_after = conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| cert_info(leaf).ok())
                .map(|info| info.not_after)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let (send_request, connection) = h2::client::Builder::new()
                .initial_window_size(self.config.stream_window)
                .initial_connection_window_size(self.config.session_window)
                .max_frame_size(MAX_FRAME)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| TunnelError::Session {
                    peer_agent,
                    reason: e.to_string(),
                })?;
            Ok::<_, TunnelError>((send_request, connection, peer_not_after))
        };
        let (send_request, connection, peer_not_after) =
            tokio::time::timeout(self.config.handshake_timeout, handshake)
                .await
                .map_err(|_| TunnelError::Handshake {
                    peer_agent,
                    reason: format!("no handshake within {:?}", self.config.handshake_timeout),
                })??;
        let closed = Arc::new(AtomicBool::new(false));
        let driver_closed = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer_agent, error = %e, "outbound tunnel session ended");
            }
            driver_closed.store(true, Ordering::Release);
        });
        Ok(Session {
            send_request,
            closed,
            peer_not_after,
        })
    }
}
