//! TLS for the control channel: the serving certificate (re-issued at half its lifetime without a
//! restart), client certificates verified against the control plane's CA, and an accept loop
//! that logs every refused handshake and bounds how many are in progress.
use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, Semaphore},
};
use tokio_rustls::{
    rustls::{
        self,
        crypto::CryptoProvider,
        server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
        sign::CertifiedKey,
        RootCertStore, ServerConfig,
    },
    server::TlsStream,
    TlsAcceptor,
};

use crate::{ca::Ca, limits};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The serving certificate currently presented.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
    names: Vec<String>,
    lifetime: Duration,
}

impl ServingCert {
    pub fn issue(ca: &Ca, names: Vec<String>, lifetime: Duration) -> Result<Arc<Self>, TlsError> {
        let key = Self::certified(ca, &names, lifetime)?;
        Ok(Arc::new(ServingCert {
            current: RwLock::new(key),
            names,
            lifetime,
        }))
    }

    fn certified(
        ca: &Ca,
        names: &[String],
        lifetime: Duration,
    ) -> Result<Arc<CertifiedKey>, TlsError> {
        let (chain, key) = ca.issue_server_cert(names, lifetime)?;
        Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider())?))
    }

    /// Re-issues the serving certificate at half its lifetime, forever.
    pub async fn keep_fresh(self: Arc<Self>, ca: Arc<Ca>) {
        let mut wait = self.lifetime / 2;
        loop {
            tokio::time::sleep(wait).await;
            match Self::certified(&ca, &self.names, self.lifetime) {
                Ok(key) => {
                    *self.current.write().expect("serving cert lock poisoned") = key;
                    tracing::info!("serving certificate renewed");
                    wait = self.lifetime / 2;
                }
                Err(e) => {
                    tracing::error!(error = %e, "renewing the serving certificate failed; retrying in a minute");
                    wait = Duration::from_secs(60);
                }
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .expect("serving cert lock poisoned")
                .clone(),
        )
    }
}

/// TLS 1.3 only; a client certificate is optional at the TLS layer (only Join may go without
/// one) but, when presented, must chain to the CA and be valid now, or the handshake fails.
pub fn server_config(ca: &Ca, serving: Arc<ServingCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts connections and completes their handshakes, passing on the ones that succeed.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let acceptor = TlsAcceptor::from(config);
        let permits = Arc::new(Semaphore::new(limits::MAX_PENDING_HANDSHAKES));
        loop {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Running out of file descriptors must not end the server.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(limits::HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                {
                    Err(_) => log_refused(peer, "no TLS handshake within 10 s"),
                    Ok(Err(e)) => log_refused(peer, &e.to_string()),
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
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
