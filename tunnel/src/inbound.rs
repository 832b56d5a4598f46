//! The inbound listener: TLS 1.3 with a client certificate verified against the trust bundle,
//! HTTP/2, one CONNECT stream per tunneled connection, authorized by the peer's verified SPIFFE
//! ID (never by its address), then spliced to the local workload.
use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Request, Response, StatusCode};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

/// HTTP/2 DATA frames up to this size, fewer frames per byte than the 16 KiB default.
const MAX_FRAME: u32 = 64 * 1024;

use crate::{
    identity::SpiffeId,
    protocol::{self, REASON_HEADER},
    splice::{splice, Copied},
    svid::SvidStore,
    tls,
    trust::{describe_tls_error, TrustStore},
};

/// A refusal by policy: the reason goes into the refusal response and the verdict event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Denied {
    pub reason: String,
}

/// What the agent decides for the inbound listener. Implemented by the agent over its policy
/// and its table of local workloads.
pub trait Authorizer: Send + Sync + 'static {
    /// The SPIFFE ID of the workload on this node listening at `destination`, or `None` when
    /// `destination` is not a local workload's address (the listener then refuses to connect).
    fn local_workload(&self, destination: SocketAddr) -> Option<SpiffeId>;

    /// Whether the peer workload `peer` (verified by its certificate) may reach `workload` at
    /// `destination`, by `workload`'s ingress policy. `claimed` is the numeric identity the
    /// source agent named ([`protocol::SOURCE_IDENTITY_HEADER`]), to be accepted only if it is
    /// one of `peer`'s. Returns the identity the peer is known by, for [`Authorizer::connect`].
    fn authorize(
        &self,
        peer: &SpiffeId,
        claimed: Option<u32>,
        workload: &SpiffeId,
        destination: SocketAddr,
    ) -> Result<u32, Denied>;

    /// Every verdict, for flow events and counters; every refusal is also logged.
    fn record(&self, _event: &InboundEvent) {}

    /// Opens the connection to `destination` for an authorized stream of the peer `authorize`
    /// named `peer_identity`. The agent overrides it to tell its kernel's ingress check which
    /// verified workload this connection carries, for this connection only.
    fn connect(&self, _peer_identity: u32, destination: SocketAddr) -> DeliveryFuture {
        Box::pin(TcpStream::connect(destination))
    }
}

/// The connection [`Authorizer::connect`] opens.
pub type DeliveryFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TcpStream>> + Send>>;

/// Why the inbound listener refused a session or a stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("TLS handshake failed: {reason}")]
    Handshake { reason: String },
    #[error("HTTP/2 handshake failed: {reason}")]
    Http2Handshake { reason: String },
    #[error("no TLS and HTTP/2 handshake within {timeout:?}")]
    HandshakeTimeout { timeout: Duration },
    #[error("too many handshakes in progress ({limit})")]
    TooManyHandshakes { limit: usize },
    #[error("peer certificate refused: {reason}")]
    PeerCertificate { reason: String },
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    #[error("{destination} is not a local workload")]
    NotLocal { destination: SocketAddr },
    #[error("{destination} is workload {workload}, but the session was opened for {session}")]
    WrongWorkload {
        destination: SocketAddr,
        workload: SpiffeId,
        session: SpiffeId,
    },
    #[error("denied by policy: {reason}")]
    Denied { reason: String },
    #[error("connecting to {destination} failed: {reason}")]
    ConnectFailed {
        destination: SocketAddr,
        reason: String,
    },
}

impl Refusal {
    /// The status of the refusal response on the CONNECT stream, as HBONE peers (Istio's
    /// ztunnel) answer: 400 for a request this listener does not serve, 401 when authorization
    /// fails, 503 when the destination cannot be reached.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest { .. }
            | Refusal::NotLocal { .. }
            | Refusal::WrongWorkload { .. } => StatusCode::BAD_REQUEST,
            Refusal::Denied { .. } | Refusal::PeerCertificate { .. } => StatusCode::UNAUTHORIZED,
            Refusal::ConnectFailed { .. }
            | Refusal::Handshake { .. }
            | Refusal::Http2Handshake { .. }
            | Refusal::HandshakeTimeout { .. }
            | Refusal::TooManyHandshakes { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Authorized and connected: the connection is being carried.
    Allowed,
    /// The connection was carried and is finished.
    Carried(Copied),
    /// Carried until the stream or the local connection failed.
    Broken {
        reason: String,
    },
    Refused(Refusal),
}

/// One verdict of the inbound listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundEvent {
    /// The address of the peer agent.
    pub peer_addr: SocketAddr,
    /// The peer workload, once its certificate is verified.
    pub peer: Option<SpiffeId>,
    /// The original destination, once a stream named it.
    pub destination: Option<SocketAddr>,
    pub verdict: Verdict,
}

#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// TLS and HTTP/2 handshakes together: a slow (slowloris) peer is dropped after this.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further connections are refused at once.
    pub max_pending_handshakes: usize,
    pub connect_timeout: Duration,
    /// Concurrent tunneled connections per TLS session.
    pub max_streams_per_session: u32,
    /// A session without streams for this long is closed (GOAWAY); the peer resumes it when it
    /// needs it again.
    pub idle_timeout: Duration,
    /// HTTP/2 flow-control windows: how much one stream, and one session, may have in flight
    /// unacknowledged. They bound the memory a slow destination can make this side hold.
    pub stream_window: u32,
    pub session_window: u32,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 1024,
            connect_timeout: Duration::from_secs(5),
            max_streams_per_session: 4096,
            idle_timeout: Duration::from_secs(300),
            stream_window: 1024 * 1024,
            session_window: 16 * 1024 * 1024,
        }
    }
}

/// The inbound side of the tunnel.
pub struct Inbound {
    acceptor: TlsAcceptor,
    trust: Arc<TrustStore>,
    svids: Arc<SvidStore>,
    authorizer: Arc<dyn Authorizer>,
    config: InboundConfig,
    pending_handshakes: Arc<Semaphore>,
    presenting: Presenting,
}

/// A verified session: who the peer is, and which local workload's certificate it asked for.
struct Session {
    peer_addr: SocketAddr,
    peer: SpiffeId,
    local: SpiffeId,
    peer_chain: Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    /// Streams being carried, and when the last one ended: an idle session is closed.
    open_streams: std::sync::atomic::AtomicUsize,
    idle_since: std::sync::Mutex<tokio::time::Instant>,
}

/// Counts a stream as open while it lives.
struct OpenStream(Arc<Session>);

impl OpenStream {
    fn new(session: Arc<Session>) -> OpenStream {
        session.open_streams.fetch_add(1, Ordering::AcqRel);
        OpenStream(session)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if self.0.open_streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("idle lock poisoned") = tokio::time::Instant::now();
        }
    }
}

impl Session {
    fn idle_for(&self) -> Option<Duration> {
        (self.open_streams.load(Ordering::Acquire) == 0).then(|| {
            self.idle_since
                .lock()
                .expect("idle lock poisoned")
                .elapsed()
        })
    }
}

/// Whose certificate an inbound listener presents, and so which local workload its sessions
/// are for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presenting {
    /// The node's shared listener: the workload the client names by SNI
    /// ([`crate::server_name_for`]). Workloads in the node's network namespace share its
    /// address, so only the name tells them apart.
    ByServerName,
    /// A listener in one workload's own network namespace, at its address (standard HBONE):
    /// that workload's certificate, whatever server name the client sends, if any.
    Workload(SpiffeId),
}

impl Inbound {
    /// The node's shared listener ([`Presenting::ByServerName`]).
    pub fn new(
        svids: Arc<SvidStore>,
        trust: Arc<TrustStore>,
        authorizer: Arc<dyn Authorizer>,
        config: InboundConfig,
    ) -> Result<Arc<Inbound>, tokio_rustls::rustls::Error> {
        Inbound::presenting(svids, trust, authorizer, config, Presenting::ByServerName)
    }

    pub fn presenting(
        svids: Arc<SvidStore>,
        trust: Arc<TrustStore>,
        authorizer: Arc<dyn Authorizer>,
        config: InboundConfig,
        presenting: Presenting,
    ) -> Result<Arc<Inbound>, tokio_rustls::rustls::Error> {
        let server_config = tls::server_config(svids.clone(), trust.clone(), presenting.clone())?;
        Ok(Arc::new(Inbound {
            acceptor: TlsAcceptor::from(server_config),
            trust,
            svids,
            authorizer,
            pending_handshakes: Arc::new(Semaphore::new(config.max_pending_handshakes)),
            config,
            presenting,
        }))
    }

    /// Accepts connections forever; each is handled in its own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((tcp, peer_addr)) => {
                    tokio::spawn(self.clone().handle_connection(tcp, peer_addr));
                }
                Err(e) => {
                    // Running out of file descriptors must not end the listener.
                    tracing::warn!(error = %e, "inbound tunnel: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn refuse(
        &self,
        peer_addr: SocketAddr,
        peer: Option<&SpiffeId>,
        destination: Option<SocketAddr>,
        refusal: Refusal,
    ) {
        tracing::warn!(
            %peer_addr,
            peer = peer.map(|p| p.as_str()).unwrap_or("-"),
            destination = destination.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
            reason = %refusal,
            "inbound tunnel refused"
        );
        self.authorizer.record(&InboundEvent {
            peer_addr,
            peer: peer.cloned(),
            destination,
            verdict: Verdict::Refused(refusal),
        });
    }

    /// One TCP connection from a peer agent: handshake, then every CONNECT stream it opens.
    pub async fn handle_connection(self: Arc<Self>, tcp: TcpStream, peer_addr: SocketAddr) {
        let Ok(permit) = self.pending_handshakes.clone().try_acquire_owned() else {
            let limit = self.config.max_pending_handshakes;
            return self.refuse(peer_addr, None, None, Refusal::TooManyHandshakes { limit });
        };
        let _ = tcp.set_nodelay(true);
        let timeout = self.config.handshake_timeout;
        let handshake = tokio::time::timeout(timeout, self.handshake(tcp, peer_addr)).await;
        drop(permit);
        let (mut connection, session) = match handshake {
            Err(_) => {
                return self.refuse(peer_addr, None, None, Refusal::HandshakeTimeout { timeout })
            }
            Ok(Err((peer, refusal))) => {
                return self.refuse(peer_addr, peer.as_ref(), None, refusal)
            }
            Ok(Ok(ready)) => ready,
        };
        let session = Arc::new(session);
        tracing::debug!(%peer_addr, peer = %session.peer, local = %session.local, "inbound tunnel session open");
        let mut bundle_changes = self.trust.bundle_changes();
        bundle_changes.mark_unchanged();
        let idle_timeout = self.config.idle_timeout;
        let mut idle_check =
            tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(10)));
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing = false;
        loop {
            tokio::select! {
                stream = connection.accept() => match stream {
                    Some(Ok((request, respond))) => {
                        let open = OpenStream::new(session.clone());
                        tokio::spawn(
                            self.clone()
                                .handle_stream(open, request, respond),
                        );
                    }
                    Some(Err(e)) => {
                        tracing::debug!(%peer_addr, error = %e, "inbound tunnel session ended");
                        return;
                    }
                    None => break,
                },
                Ok(()) = bundle_changes.changed() => {
                    // Verified under the old bundle: no new streams (GOAWAY); the peer opens a
                    // new session, verified under the new one. Open streams run to their end.
                    tracing::info!(%peer_addr, peer = %session.peer, "trust bundle replaced; closing the session gracefully");
                    connection.graceful_shutdown();
                    closing = true;
                }
                _ = idle_check.tick(), if !closing => {
                    if session.idle_for().is_some_and(|idle| idle >= idle_timeout) {
                        tracing::debug!(%peer_addr, peer = %session.peer, "idle inbound tunnel session closed");
                        connection.graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
        // No new streams; the open ones still need the connection driven until they end.
        let _ = std::future::poll_fn(|cx| connection.poll_closed(cx)).await;
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        peer_addr: SocketAddr,
    ) -> Result<
        (h2::server::Connection<TlsStream<TcpStream>, Bytes>, Session),
        (Option<SpiffeId>, Refusal),
    > {
        let tls = self.acceptor.accept(tcp).await.map_err(|e| {
            (
                None,
                Refusal::Handshake {
                    reason: describe_tls_error(&e),
                },
            )
        })?;
        let (_, conn) = tls.get_ref();
        let peer_chain: Vec<_> = conn
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        // A resumed session skips the chain verification: the bundle may have changed since.
        if conn.handshake_kind() == Some(tokio_rustls::rustls::HandshakeKind::Resumed) {
            self.trust.verify_client_chain(&peer_chain).map_err(|e| {
                (
                    None,
                    Refusal::PeerCertificate {
                        reason: e.to_string(),
                    },
                )
            })?;
        }
        // Expiry and revocation, for a resumed session too.
        let peer = self.trust.check_peer(&peer_chain).map_err(|e| {
            (
                None,
                Refusal::PeerCertificate {
                    reason: e.to_string(),
                },
            )
        })?;
        let local = match &self.presenting {
            Presenting::Workload(id) => Some(id.clone()),
            Presenting::ByServerName => conn
                .server_name()
                .and_then(|name| self.svids.identity_for_server_name(name)),
        };
        let local = local.ok_or_else(|| {
            (
                Some(peer.clone()),
                Refusal::Handshake {
                    reason: "the session names no local workload (SNI)".into(),
                },
            )
        })?;
        let connection = h2::server::Builder::new()
            .max_concurrent_streams(self.config.max_streams_per_session)
            .initial_window_size(self.config.stream_window)
            .initial_connection_window_size(self.config.session_window)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(16 * 1024)
            .handshake(tls)
            .await
            .map_err(|e| {
                (
                    Some(peer.clone()),
                    Refusal::Http2Handshake {
                        reason: e.to_string(),
                    },
                )
            })?;
        Ok((
            connection,
            Session {
                peer_addr,
                peer,
                local,
                peer_chain,
                open_streams: 0.into(),
                idle_since: std::sync::Mutex::new(tokio::time::Instant::now()),
            },
        ))
    }

    async fn handle_stream(
        self: Arc<Self>,
        open: OpenStream,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let session = &open.0;
        let destination = protocol::destination_of(&request).ok();
        let refuse = |refusal: Refusal, respond: &mut SendResponse<Bytes>| {
            let response = Response::builder()
                .status(refusal.status())
                .header(REASON_HEADER, protocol::header_safe(&refusal.to_string()))
                .body(())
                .expect("a valid response");
            let _ = respond.send_response(response, true);
            self.refuse(session.peer_addr, Some(&session.peer), destination, refusal);
        };
        let (destination, workload, peer_identity) = match self.authorize(session, &request) {
            Ok(allowed) => allowed,
            Err(refusal) => return refuse(refusal, &mut respond),
        };
        let connect = tokio::time::timeout(
            self.config.connect_timeout,
            self.authorizer.connect(peer_identity, destination),
        )
        .await;
        let mut tcp = match connect {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                let reason = e.to_string();
                return refuse(
                    Refusal::ConnectFailed {
                        destination,
                        reason,
                    },
                    &mut respond,
                );
            }
            Err(_) => {
                let reason = format!("no answer within {:?}", self.config.connect_timeout);
                return refuse(
                    Refusal::ConnectFailed {
                        destination,
                        reason,
                    },
                    &mut respond,
                );
            }
        };
        let _ = tcp.set_nodelay(true);
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(e) => {
                tracing::debug!(error = %e, "inbound tunnel: the stream ended before it was opened");
                return;
            }
        };
        tracing::debug!(peer = %session.peer, %workload, %destination, "inbound tunnel stream open");
        self.authorizer.record(&InboundEvent {
            peer_addr: session.peer_addr,
            peer: Some(session.peer.clone()),
            destination: Some(destination),
            verdict: Verdict::Allowed,
        });
        let body = request.into_body();
        let verdict = match splice(&mut tcp, send, async { Ok(body) }).await {
            Ok(copied) => Verdict::Carried(copied),
            Err(e) => Verdict::Broken {
                reason: e.to_string(),
            },
        };
        self.authorizer.record(&InboundEvent {
            peer_addr: session.peer_addr,
            peer: Some(session.peer.clone()),
            destination: Some(destination),
            verdict,
        });
    }

    fn authorize(
        &self,
        session: &Session,
        request: &Request<RecvStream>,
    ) -> Result<(SocketAddr, SpiffeId, u32), Refusal> {
        let destination =
            protocol::destination_of(request).map_err(|reason| Refusal::BadRequest { reason })?;
        let claimed = protocol::source_identity_of(request)
            .map_err(|reason| Refusal::BadRequest { reason })?;
        // A certificate revoked or expired since the handshake ends what the session may open.
        self.trust
            .check_peer(&session.peer_chain)
            .map_err(|e| Refusal::PeerCertificate {
                reason: e.to_string(),
            })?;
        let workload = self
            .authorizer
            .local_workload(destination)
            .ok_or(Refusal::NotLocal { destination })?;
        if workload != session.local {
            return Err(Refusal::WrongWorkload {
                destination,
                workload,
                session: session.local.clone(),
            });
        }
        let peer_identity = self
            .authorizer
            .authorize(&session.peer, claimed, &workload, destination)
            .map_err(|denied| Refusal::Denied {
                reason: denied.reason,
            })?;
        Ok((destination, workload, peer_identity))
    }
}
