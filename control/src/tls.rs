//! TLS for the control channel: the serving certificate (re-issued at half its lifetime without a
//! restart) and client certificates verified against the control plane's CA. Which connections
//! get to a handshake is the listener's ([`crate::listener`]).
use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio_rustls::rustls::{
    self,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    RootCertStore, ServerConfig,
};

use crate::ca::Ca;

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
