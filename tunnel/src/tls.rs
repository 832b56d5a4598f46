//! rustls configurations of both ends: TLS 1.3 only, ring, the SPIFFE verifiers, HTTP/2 by
//! ALPN, session resumption by tickets.
use std::sync::Arc;

use tokio_rustls::rustls::{
    self,
    client::ResolvesClientCert,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    version::TLS13,
    ClientConfig, ServerConfig, SignatureScheme,
};

use crate::{
    identity::SpiffeId,
    inbound::Presenting,
    svid::{Svid, SvidStore},
    trust::{SpiffeClientVerifier, SpiffeServerVerifier, TrustStore},
};

/// Both ends speak HTTP/2 (CONNECT) inside TLS.
pub const ALPN: &[u8] = b"h2";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The inbound listener's configuration: presents the certificate `presenting` names (read
/// from `svids` at each handshake, so a rotation takes effect at once) and requires a client
/// certificate that `trust` accepts.
pub fn server_config(
    svids: Arc<SvidStore>,
    trust: Arc<TrustStore>,
    presenting: Presenting,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let resolver: Arc<dyn ResolvesServerCert> = match presenting {
        Presenting::ByServerName => svids,
        Presenting::Workload(id) => Arc::new(PresentWorkload { svids, id }),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(SpiffeClientVerifier::new(trust))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Stateless tickets: a repeat peer resumes without a full handshake and without this side
    // keeping per-session state. A resumed session's certificate is checked again (expiry,
    // revocation) before any stream is carried.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// The outbound side's configuration for sessions from `svid`'s workload to the workload
/// `destination`. One configuration per pool entry: its resumption cache then only ever holds
/// tickets of that source identity, so a resumed session can never speak for another workload.
pub fn client_config(
    svid: &Svid,
    trust: Arc<TrustStore>,
    destination: SpiffeId,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(trust, destination))
        .with_client_cert_resolver(Arc::new(PresentSvid(svid.certified_key())));
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct PresentSvid(Arc<CertifiedKey>);

impl ResolvesClientCert for PresentSvid {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A workload's own listener presents its certificate, whatever the client names.
#[derive(Debug)]
struct PresentWorkload {
    svids: Arc<SvidStore>,
    id: SpiffeId,
}

impl ResolvesServerCert for PresentWorkload {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.svids.get(&self.id).map(|svid| svid.certified_key())
    }
}
