//! The control plane's listener: which connections it takes, and how long each may take to become
//! an agent's HTTP/2 connection. Found by trying it from outside: idle TCP connections must not
//! fill the accept queue or the handshake slots, and a TLS connection that never speaks HTTP/2
//! must not hold a file descriptor for ever.
//!
//! - The listener accepts at once, always (a backlog of [`BACKLOG`]); a connection over a limit is
//!   closed right after `accept()` instead of waiting in the kernel's queue, where it would stand
//!   in front of every agent behind it.
//! - At most [`MAX_PENDING_HANDSHAKES`] connections are in their handshake at once, and at most
//!   [`MAX_UNVERIFIED_PER_ADDRESS`] from one address are in their handshake or without a client
//!   certificate: one address cannot take every slot.
//! - The TLS handshake *and* the HTTP/2 connection preface must arrive within
//!   [`HANDSHAKE_TIMEOUT`].
//! - A connection without a client certificate (it may only join) is closed after
//!   [`UNVERIFIED_LIFETIME`]; one with a certificate lives as long as HTTP/2 keepalive says its
//!   peer does.
use std::{
    collections::HashMap,
    future::Future as _,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, Semaphore},
    time::Sleep,
};
use tokio_rustls::{rustls::ServerConfig, server::TlsStream, TlsAcceptor};
use tonic::transport::server::Connected;

/// The listen backlog (the kernel caps it at `net.core.somaxconn`).
pub const BACKLOG: u32 = 4096;
/// Handshakes in progress at once; a connection beyond them is closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// Connections from one address in their handshake or without a client certificate.
pub const MAX_UNVERIFIED_PER_ADDRESS: usize = 16;
/// The TLS handshake and the HTTP/2 preface must both arrive this soon after `accept()`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection without a client certificate may stay open (a join takes milliseconds).
pub const UNVERIFIED_LIFETIME: Duration = Duration::from_secs(30);

/// What every HTTP/2 connection starts with (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Binds `addr` with [`BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// A connection that completed its TLS handshake and sent the HTTP/2 preface, handed to the
/// HTTP/2 server with the preface in front of the rest.
pub struct Admitted {
    inner: TlsStream<TcpStream>,
    preface_sent: usize,
    /// For a connection without a client certificate: its end, and its slot of its address.
    unverified: Option<(Pin<Box<Sleep>>, AddressSlot)>,
}

impl Connected for Admitted {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some((end, _)) = &mut this.unverified {
            if end.as_mut().poll(cx).is_ready() {
                // End of stream: the HTTP/2 server closes the connection.
                return Poll::Ready(Ok(()));
            }
        }
        if this.preface_sent < PREFACE.len() {
            let rest = &PREFACE[this.preface_sent..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.preface_sent += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Connections counted against their address; the count drops with the slot.
#[derive(Clone, Default)]
struct Addresses(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct AddressSlot {
    addresses: Addresses,
    address: IpAddr,
}

impl Addresses {
    fn take(&self, address: IpAddr) -> Option<AddressSlot> {
        let mut counts = self.0.lock().expect("address counts lock poisoned");
        let count = counts.entry(address).or_default();
        if *count >= MAX_UNVERIFIED_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            addresses: self.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self
            .addresses
            .0
            .lock()
            .expect("address counts lock poisoned");
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// Accepts connections and passes on those that complete the TLS handshake and the preface in
/// time, within the limits above.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<Result<Admitted, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let acceptor = TlsAcceptor::from(config);
        let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
        let addresses = Addresses::default();
        let mut shed = Shed::default();
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Running out of file descriptors must not end the server.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                shed.note(peer, "too many handshakes in progress");
                continue;
            };
            let Some(slot) = addresses.take(peer.ip()) else {
                shed.note(peer, "too many unverified connections from this address");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, admit(&acceptor, stream)).await {
                    Err(_) => log_refused(peer, "no TLS handshake and HTTP/2 preface within 5 s"),
                    Ok(Err(e)) => log_refused(peer, &e.to_string()),
                    Ok(Ok(tls)) => {
                        drop(permit);
                        let verified = tls.get_ref().1.peer_certificates().is_some();
                        let admitted = Admitted {
                            inner: tls,
                            preface_sent: 0,
                            unverified: (!verified)
                                .then(|| (Box::pin(tokio::time::sleep(UNVERIFIED_LIFETIME)), slot)),
                        };
                        let _ = tx.send(Ok(admitted)).await;
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The TLS handshake, then the preface.
async fn admit(acceptor: &TlsAcceptor, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
    let mut tls = acceptor.accept(stream).await?;
    let mut preface = [0u8; PREFACE.len()];
    tls.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an HTTP/2 connection (no preface)",
        ));
    }
    Ok(tls)
}

/// Connections closed at once for a limit: logged at most once a second, with the count.
#[derive(Default)]
struct Shed {
    last: Option<tokio::time::Instant>,
    since: u64,
}

impl Shed {
    fn note(&mut self, peer: SocketAddr, reason: &str) {
        self.since += 1;
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1))
        {
            tracing::warn!(%peer, closed = self.since, "connection closed at once: {reason}");
            self.last = Some(now);
            self.since = 0;
        }
    }
}

fn log_refused(peer: SocketAddr, error: &str) {
    let lower = error.to_lowercase();
    let hint = if lower.contains("unknownissuer") || lower.contains("badsignature") {
        "the client certificate is not signed by this control plane's CA"
    } else if lower.contains("expired") {
        "the client certificate has expired; the node must join again"
    } else if lower.contains("not valid yet") || lower.contains("notvalidyet") {
        "the client certificate is not valid yet (clock skew?)"
    } else {
        "TLS handshake failed"
    };
    tracing::warn!(%peer, error, "connection refused: {hint}");
}
