//! The trust bundle (the CA certificates a peer's chain must lead to), the revoked serial numbers
//! and the trust domain, with the rustls verifiers that apply all three. The bundle and the
//! revocations are replaced at runtime; every handshake and every new tunneled stream reads the
//! current ones.
use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
    time::SystemTime,
};

use tokio_rustls::rustls::{
    self,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    client::verify_server_cert_signed_by_trust_anchor,
    crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate, WebPkiClientVerifier,
    },
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::{
    identity::{cert_info, IdentityError, Serial, SpiffeId},
    tls::provider,
};

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("trust bundle refused: {reason}")]
    Bundle { reason: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("certificate {serial} ({spiffe_id}) is revoked")]
    Revoked { serial: Serial, spiffe_id: String },
    #[error("certificate {serial} ({spiffe_id}) expired")]
    Expired { serial: Serial, spiffe_id: String },
    #[error("peer presented {found}, expected {expected}")]
    UnexpectedPeer { found: SpiffeId, expected: SpiffeId },
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("certificate chain refused: {reason}")]
    Chain { reason: String },
}

struct Bundle {
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

/// The trust domain, the current trust bundle and the revoked serials.
pub struct TrustStore {
    trust_domain: String,
    bundle: RwLock<Arc<Bundle>>,
    revoked: RwLock<HashSet<Serial>>,
    algorithms: WebPkiSupportedAlgorithms,
    /// Counts bundle replacements, so that sessions verified under an older bundle can end.
    bundle_generation: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustStore")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn bundle(roots: &[CertificateDer<'static>]) -> Result<Bundle, TrustError> {
    let refuse = |reason: String| TrustError::Bundle { reason };
    if roots.is_empty() {
        return Err(refuse("no CA certificate".into()));
    }
    let mut store = RootCertStore::empty();
    for (i, root) in roots.iter().enumerate() {
        store
            .add(root.clone())
            .map_err(|e| refuse(format!("certificate {i}: {e}")))?;
    }
    let roots = Arc::new(store);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| refuse(e.to_string()))?;
    Ok(Bundle {
        roots,
        client_verifier,
    })
}

/// Carried whole (see [`describe_tls_error`]) so that the log names the serial or the identity.
fn rustls_error(error: TrustError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// A handshake failure as the log and the verdict event name it.
pub fn describe_tls_error(error: &std::io::Error) -> String {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(tls) => describe_rustls_error(tls),
        None => error.to_string(),
    }
}

fn describe_rustls_error(tls: &rustls::Error) -> String {
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.to_string()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!("{tls}: the certificate is not signed by a CA of the trust bundle"),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("{tls}: the certificate has expired"),
        rustls::Error::PeerIncompatible(_) => format!("{tls}: the peer does not speak TLS 1.3"),
        rustls::Error::InvalidMessage(_) => format!("{tls}: not TLS (plaintext?)"),
        rustls::Error::NoCertificatesPresented => {
            format!("{tls}: a workload certificate is required")
        }
        other => other.to_string(),
    }
}

impl TrustStore {
    pub fn new(
        trust_domain: &str,
        roots: &[CertificateDer<'static>],
    ) -> Result<Arc<TrustStore>, TrustError> {
        // The trust domain must be one a SPIFFE ID can name.
        SpiffeId::parse(&format!("spiffe://{trust_domain}"))?;
        Ok(Arc::new(TrustStore {
            trust_domain: trust_domain.into(),
            bundle: RwLock::new(Arc::new(bundle(roots)?)),
            revoked: RwLock::default(),
            algorithms: provider().signature_verification_algorithms,
            bundle_generation: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// PEM CA certificates, one or more.
    pub fn parse_pem_bundle(pem: &str) -> Result<Vec<CertificateDer<'static>>, TrustError> {
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TrustError::Bundle {
                reason: format!("not PEM certificates: {e}"),
            })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Replaces the trust bundle for handshakes from now on. A bundle that cannot be used is
    /// refused and the current one stays.
    pub fn replace_bundle(&self, roots: &[CertificateDer<'static>]) -> Result<(), TrustError> {
        let new = bundle(roots)?;
        *self.bundle.write().expect("trust bundle lock poisoned") = Arc::new(new);
        self.bundle_generation
            .send_modify(|generation| *generation += 1);
        tracing::info!(roots = roots.len(), "trust bundle replaced");
        Ok(())
    }

    /// Changes whenever the bundle is replaced.
    pub fn bundle_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.bundle_generation.subscribe()
    }

    /// Verifies a client chain against the current bundle, as the handshake does: for a resumed
    /// session, whose chain was verified under the bundle of its first handshake.
    pub fn verify_client_chain(&self, chain: &[CertificateDer<'_>]) -> Result<(), TrustError> {
        let (leaf, intermediates) = chain.split_first().ok_or(TrustError::NoCertificate)?;
        self.current()
            .client_verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| TrustError::Chain {
                reason: describe_rustls_error(&e),
            })?;
        Ok(())
    }

    pub fn revoke(&self, serial: Serial) {
        tracing::info!(%serial, "certificate revoked");
        self.revoked
            .write()
            .expect("revocation lock poisoned")
            .insert(serial);
    }

    /// Replaces the whole revocation set (as the control plane sends it).
    pub fn set_revoked(&self, serials: impl IntoIterator<Item = Serial>) {
        *self.revoked.write().expect("revocation lock poisoned") = serials.into_iter().collect();
    }

    pub fn is_revoked(&self, serial: &Serial) -> bool {
        self.revoked
            .read()
            .expect("revocation lock poisoned")
            .contains(serial)
    }

    fn current(&self) -> Arc<Bundle> {
        self.bundle
            .read()
            .expect("trust bundle lock poisoned")
            .clone()
    }

    /// What the chain verification by webpki does not check: the leaf's SPIFFE ID is in the
    /// trust domain, and no certificate of the chain is revoked or (for a resumed session, whose
    /// chain was verified earlier) expired. Returns the peer's SPIFFE ID.
    pub fn check_peer(&self, chain: &[CertificateDer<'_>]) -> Result<SpiffeId, TrustError> {
        let (leaf, rest) = chain.split_first().ok_or(TrustError::NoCertificate)?;
        let info = cert_info(leaf)?;
        let id = info
            .spiffe_id
            .clone()
            .ok_or_else(|| IdentityError::BadCertificate {
                reason: "no SPIFFE ID (URI SAN)".into(),
            })?;
        id.require_trust_domain(&self.trust_domain)?;
        let now = SystemTime::now();
        if now > info.not_after {
            return Err(TrustError::Expired {
                serial: info.serial,
                spiffe_id: id.to_string(),
            });
        }
        let revoked = self.revoked.read().expect("revocation lock poisoned");
        if revoked.contains(&info.serial) {
            return Err(TrustError::Revoked {
                serial: info.serial,
                spiffe_id: id.to_string(),
            });
        }
        for cert in rest {
            let ca = cert_info(cert)?;
            if revoked.contains(&ca.serial) {
                return Err(TrustError::Revoked {
                    serial: ca.serial,
                    spiffe_id: format!("intermediate CA of {id}"),
                });
            }
        }
        Ok(id)
    }
}

/// Verifies a client (the outbound agent, speaking for a source workload): chain to the current
/// bundle, client-auth usage, validity, then [`TrustStore::check_peer`].
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: Arc<TrustStore>,
}

impl SpiffeClientVerifier {
    pub fn new(trust: Arc<TrustStore>) -> Arc<Self> {
        Arc::new(SpiffeClientVerifier { trust })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Every workload has one certificate: nothing for the client to choose.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        self.trust.check_peer(&chain).map_err(rustls_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.trust.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.trust.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algorithms.supported_schemes()
    }
}

/// Verifies the server (the destination node's agent, presenting the destination workload's
/// certificate): chain to the current bundle, server-auth usage, validity,
/// [`TrustStore::check_peer`], and that the SPIFFE ID is the one expected. The DNS name is not
/// checked: SVIDs carry none, the SPIFFE ID is what names the peer.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: Arc<TrustStore>,
    expected: SpiffeId,
}

impl SpiffeServerVerifier {
    pub fn new(trust: Arc<TrustStore>, expected: SpiffeId) -> Arc<Self> {
        Arc::new(SpiffeServerVerifier { trust, expected })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.trust.current().roots,
            intermediates,
            now,
            self.trust.algorithms.all,
        )?;
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let found = self.trust.check_peer(&chain).map_err(rustls_error)?;
        if found != self.expected {
            return Err(rustls_error(TrustError::UnexpectedPeer {
                found,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.trust.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.trust.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::test_helpers::TestCa;

    fn der(pem: &str) -> Vec<CertificateDer<'static>> {
        TrustStore::parse_pem_bundle(pem).expect("PEM")
    }

    #[test]
    fn peers_are_checked_for_trust_domain_revocation_and_expiry() {
        let ca = TestCa::new("example.org");
        let trust = TrustStore::new("example.org", &[ca.cert_der()]).expect("trust");
        let good = ca.issue("spiffe://example.org/a", Duration::from_secs(3600));
        assert_eq!(
            trust
                .check_peer(&der(&good.chain_pem))
                .expect("good")
                .as_str(),
            "spiffe://example.org/a"
        );
        let foreign = ca.issue("spiffe://other.org/a", Duration::from_secs(3600));
        assert!(matches!(
            trust.check_peer(&der(&foreign.chain_pem)),
            Err(TrustError::Identity(IdentityError::WrongTrustDomain { .. }))
        ));
        let expired = ca.issue_expired("spiffe://example.org/a");
        assert!(matches!(
            trust.check_peer(&der(&expired.chain_pem)),
            Err(TrustError::Expired { .. })
        ));
        trust.revoke(good.serial.clone());
        let err = trust
            .check_peer(&der(&good.chain_pem))
            .expect_err("revoked");
        assert!(err.to_string().contains(&good.serial.to_string()), "{err}");
        trust.set_revoked([]);
        assert!(trust.check_peer(&der(&good.chain_pem)).is_ok());
        assert!(matches!(
            trust.check_peer(&[]),
            Err(TrustError::NoCertificate)
        ));
    }

    #[test]
    fn a_bundle_that_cannot_be_used_is_refused_and_the_current_one_stays() {
        let ca = TestCa::new("example.org");
        assert!(TrustStore::new("example.org", &[]).is_err());
        assert!(TrustStore::new("Bad Domain", &[ca.cert_der()]).is_err());
        let trust = TrustStore::new("example.org", &[ca.cert_der()]).expect("trust");
        let err = trust
            .replace_bundle(&[CertificateDer::from(vec![1u8, 2, 3])])
            .expect_err("garbage");
        assert!(err.to_string().contains("certificate 0"), "{err}");
        let good = ca.issue("spiffe://example.org/a", Duration::from_secs(3600));
        trust
            .verify_client_chain(&der(&good.chain_pem))
            .expect("the previous bundle still verifies");
        let other = TestCa::new("example.org");
        trust.replace_bundle(&[other.cert_der()]).expect("replace");
        let err = trust
            .verify_client_chain(&der(&good.chain_pem))
            .expect_err("the old CA is gone");
        assert!(err.to_string().contains("trust bundle"), "{err}");
        assert!(TrustStore::parse_pem_bundle("not pem").is_ok_and(|v| v.is_empty()));
    }
}
