//! The control plane's certificate authority: created once in the state directory, it signs the
//! control plane's own serving certificate and the nodes' client certificates.
use std::{net::IpAddr, path::Path, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _,
    SanType, SerialNumber,
};
use time::OffsetDateTime;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::state_dir::{StateDir, StateDirError, CA_CERT_FILE, CA_KEY_FILE, TRUST_DOMAIN_FILE};

/// The DNS name every serving certificate carries, whatever address agents dial; agents verify
/// it (`serverName` in their configuration) so that only this CA's control plane is trusted.
pub const SERVER_NAME: &str = "ward-control";

const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past so that a node whose clock is slightly behind accepts
/// them at once.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    State(#[from] StateDirError),
    #[error("{file}: {reason}")]
    Load { file: String, reason: String },
    #[error("state directory belongs to trust domain {found:?}, not {wanted:?}; use another --state-dir or --trust-domain {found}")]
    TrustDomain { found: String, wanted: String },
    #[error("certificate signing request refused: {0}")]
    Csr(String),
    #[error("node {node:?} reached the maximum age of its certificates since its join (--node-cert-max-age, {max_age_s} s): it must join again")]
    NodeMaxAge { node: String, max_age_s: u64 },
    #[error("node name {name:?} refused: {reason}")]
    NodeName { name: String, reason: String },
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("client certificate refused: {0}")]
    PeerCert(String),
    #[error("workload SPIFFE ID {id:?} refused: {reason}")]
    WorkloadId { id: String, reason: String },
}

pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    node_cert_lifetime: Duration,
    /// How long after its join a node's certificates may reach, however often renewed.
    node_cert_max_age: Duration,
    workload_cert_lifetime: Duration,
}

/// A workload certificate [`Ca::sign_workload`] issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedWorkload {
    pub cert_pem: String,
    pub not_after: std::time::SystemTime,
    /// The serial number in the form `ward-control revoke` takes (lowercase hexadecimal bytes
    /// separated by ':').
    pub serial: String,
}

/// A node name: what the SPIFFE ID `spiffe://<trust domain>/node/<name>` and the logs carry.
pub fn check_node_name(name: &str) -> Result<(), CaError> {
    let refuse = |reason: &str| {
        Err(CaError::NodeName {
            name: name.chars().take(80).collect(),
            reason: reason.into(),
        })
    };
    if name.is_empty() || name.len() > 253 {
        return refuse("must have 1 to 253 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return refuse("only lowercase letters, digits, '-' and '.' are allowed");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return refuse("must start with a letter or digit");
    }
    Ok(())
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source works");
    // Positive, and never a leading zero byte that DER would strip.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Ca {
    /// Loads the CA from `state`, creating it on first start.
    pub fn load_or_create(
        state: &StateDir,
        trust_domain: &str,
        node_cert_lifetime: Duration,
    ) -> Result<Ca, CaError> {
        // Exclusive: two control planes starting at once on one empty directory would each
        // write a key and a certificate, and could leave one's key beside the other's certificate.
        let _lock = state.lock()?;
        match state.read(&state.trust_domain())? {
            Some(found) if found.trim() != trust_domain => {
                return Err(CaError::TrustDomain {
                    found: found.trim().into(),
                    wanted: trust_domain.into(),
                })
            }
            Some(_) => {}
            None => state.write_atomic(
                &state.trust_domain(),
                format!("{trust_domain}\n").as_bytes(),
                0o644,
            )?,
        }
        let load = |file: &std::path::Path, reason: String| CaError::Load {
            file: file.display().to_string(),
            reason,
        };
        let (cert_pem, key) = match (state.read(&state.ca_cert())?, state.read(&state.ca_key())?) {
            (Some(cert), Some(key_pem)) => {
                let key = KeyPair::from_pem(&key_pem)
                    .map_err(|e| load(&state.ca_key(), format!("not a private key: {e}")))?;
                (cert, key)
            }
            (None, None) => {
                let key = KeyPair::generate()?;
                let mut params = CertificateParams::default();
                let mut dn = DistinguishedName::new();
                dn.push(
                    DnType::CommonName,
                    format!("ward control plane CA ({trust_domain})"),
                );
                params.distinguished_name = dn;
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                params.subject_alt_names = vec![SanType::URI(
                    format!("spiffe://{trust_domain}").try_into().map_err(|_| {
                        CaError::TrustDomain {
                            found: trust_domain.into(),
                            wanted: "a trust domain usable in a URI".into(),
                        }
                    })?,
                )];
                params.not_before = now() - BACKDATE;
                params.not_after = now() + CA_LIFETIME;
                params.serial_number = Some(random_serial());
                let cert = params.self_signed(&key)?;
                // Key first: a CA certificate without its key would be useless after a crash.
                state.write_atomic(&state.ca_key(), key.serialize_pem().as_bytes(), 0o600)?;
                state.write_atomic(&state.ca_cert(), cert.pem().as_bytes(), 0o644)?;
                tracing::info!(file = %state.ca_cert().display(), trust_domain, "created the control plane's CA");
                (cert.pem(), key)
            }
            (Some(_), None) => {
                return Err(load(
                    &state.ca_key(),
                    "missing, but the CA certificate exists".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(load(
                    &state.ca_cert(),
                    "missing, but the CA key exists".into(),
                ))
            }
        };
        Ca::from_pem(
            trust_domain,
            cert_pem,
            key,
            (&state.ca_cert(), &state.ca_key()),
            node_cert_lifetime,
        )
    }

    /// Loads a CA made elsewhere (`ward-control init-ca`) from `dir`, such as a Secret every
    /// replica mounts: read only, never created or written there.
    pub fn load(
        dir: &Path,
        trust_domain: &str,
        node_cert_lifetime: Duration,
    ) -> Result<Ca, CaError> {
        let (cert_file, key_file) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        let read = |file: &Path| {
            std::fs::read_to_string(file).map_err(|e| CaError::Load {
                file: file.display().to_string(),
                reason: if e.kind() == std::io::ErrorKind::NotFound {
                    "missing: create the CA once with `ward-control init-ca` and give every replica its files".into()
                } else {
                    e.to_string()
                },
            })
        };
        match std::fs::read_to_string(dir.join(TRUST_DOMAIN_FILE)) {
            Ok(found) if found.trim() != trust_domain => {
                return Err(CaError::TrustDomain {
                    found: found.trim().into(),
                    wanted: trust_domain.into(),
                })
            }
            // Optional here: the CA certificate names its trust domain anyway.
            _ => {}
        }
        let cert_pem = read(&cert_file)?;
        let key = KeyPair::from_pem(&read(&key_file)?).map_err(|e| CaError::Load {
            file: key_file.display().to_string(),
            reason: format!("not a private key: {e}"),
        })?;
        Ca::from_pem(
            trust_domain,
            cert_pem,
            key,
            (&cert_file, &key_file),
            node_cert_lifetime,
        )
    }

    /// The CA of `cert_pem` and its `key` (read from `files`), refused unless they match.
    fn from_pem(
        trust_domain: &str,
        cert_pem: String,
        key: KeyPair,
        (cert_file, key_file): (&Path, &Path),
        node_cert_lifetime: Duration,
    ) -> Result<Ca, CaError> {
        let load = |file: &Path, reason: String| CaError::Load {
            file: file.display().to_string(),
            reason,
        };
        let cert_der =
            pem_to_der(&cert_pem).ok_or_else(|| load(cert_file, "not a PEM certificate".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| load(cert_file, format!("not an X.509 certificate: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(load(
                key_file,
                format!(
                    "does not match the CA certificate {} (its public key is another's); every certificate signed with it would fail verification. Restore the pair from one backup",
                    cert_file.display()
                ),
            ));
        }
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| load(cert_file, e.to_string()))?;
        Ok(Ca {
            trust_domain: trust_domain.into(),
            issuer,
            cert_pem,
            cert_der,
            node_cert_lifetime,
            node_cert_max_age: crate::DEFAULT_NODE_CERT_MAX_AGE,
            workload_cert_lifetime: crate::DEFAULT_WORKLOAD_CERT_LIFETIME,
        })
    }

    /// Sets how long after its join a node's certificate may be valid, renewals included.
    #[must_use]
    pub fn with_node_cert_max_age(mut self, max_age: Duration) -> Ca {
        self.node_cert_max_age = max_age;
        self
    }

    /// Sets the lifetime of the workload certificates [`Ca::sign_workload`] issues.
    #[must_use]
    pub fn with_workload_cert_lifetime(mut self, lifetime: Duration) -> Ca {
        self.workload_cert_lifetime = lifetime;
        self
    }

    pub fn workload_cert_lifetime(&self) -> Duration {
        self.workload_cert_lifetime
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn node_cert_lifetime(&self) -> Duration {
        self.node_cert_lifetime
    }

    pub fn node_spiffe_id(&self, node: &str) -> String {
        format!("spiffe://{}/node/{node}", self.trust_domain)
    }

    /// Signs a client certificate for `node`, joining now, with the public key of `csr_pem`.
    /// Everything but the key is the CA's decision: what the request asks for is ignored.
    pub fn sign_node(&self, node: &str, csr_pem: &str) -> Result<String, CaError> {
        let joined = now();
        self.node_cert(node, csr_pem, joined - BACKDATE, joined)
    }

    /// Renews `peer`'s certificate with the public key of `csr_pem`. The renewed certificate keeps
    /// the start of validity of the one it replaces (the node's join), and ends at most the
    /// maximum age after the join: renewal alone never keeps a node in past it.
    pub fn renew_node(&self, peer: &PeerNode, csr_pem: &str) -> Result<String, CaError> {
        let not_before = OffsetDateTime::from(peer.not_before);
        let joined = not_before + BACKDATE;
        if now() >= joined + self.node_cert_max_age {
            return Err(CaError::NodeMaxAge {
                node: peer.node.clone(),
                max_age_s: self.node_cert_max_age.as_secs(),
            });
        }
        self.node_cert(&peer.node, csr_pem, not_before, joined)
    }

    fn node_cert(
        &self,
        node: &str,
        csr_pem: &str,
        not_before: OffsetDateTime,
        joined: OffsetDateTime,
    ) -> Result<String, CaError> {
        check_node_name(node)?;
        let csr = parse_csr(csr_pem)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::URI(self.node_spiffe_id(node).try_into().map_err(
                |_| CaError::NodeName {
                    name: node.into(),
                    reason: "not usable in a URI".into(),
                },
            )?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = (now() + self.node_cert_lifetime).min(joined + self.node_cert_max_age);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }

    /// An X.509 SVID for the workload `spiffe_id` with the public key of `csr_pem` (ECDSA P-256
    /// only): the SPIFFE ID as the only URI SAN, client and server use, the workload certificate
    /// lifetime. Whether the caller may have it (its node reported the workload) is the
    /// service's check; this one refuses what no workload may be: an ID outside the trust
    /// domain, the trust domain itself, or a node's ID (which would speak for a node here).
    /// Returns the PEM certificate, its end of validity and its serial number.
    pub fn sign_workload(&self, spiffe_id: &str, csr_pem: &str) -> Result<SignedWorkload, CaError> {
        let refuse = |reason: String| CaError::WorkloadId {
            id: spiffe_id.chars().take(200).collect(),
            reason,
        };
        let id = ward_tunnel::SpiffeId::parse(spiffe_id).map_err(|e| refuse(e.to_string()))?;
        id.require_trust_domain(&self.trust_domain)
            .map_err(|e| refuse(e.to_string()))?;
        if id.path().is_empty() {
            return Err(refuse("names the trust domain, not a workload".into()));
        }
        if id.path().starts_with("/node/") {
            return Err(refuse("is a node's ID, not a workload's".into()));
        }
        let csr = parse_csr(csr_pem)?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::Csr("workload keys must be ECDSA P-256".into()));
        }
        let mut params = CertificateParams::default();
        // The SPIFFE ID is the URI SAN and the only name: no DNS name a client could match
        // instead. The subject names the trust domain (rcgen's default would be a placeholder).
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            spiffe_id
                .try_into()
                .map_err(|_| refuse("not usable in a URI".into()))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let not_after = now() + self.workload_cert_lifetime;
        params.not_before = now() - BACKDATE;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        // Read back as the tunnel reads it, so the serial logged is the one agents compare.
        let serial = ward_tunnel::identity::cert_info(cert.der())
            .map_err(|e| CaError::Csr(format!("the signed certificate does not parse: {e}")))?
            .serial
            .to_string();
        let not_after = std::time::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(not_after.unix_timestamp()).unwrap_or_default());
        Ok(SignedWorkload {
            cert_pem: cert.pem(),
            not_after,
            serial,
        })
    }

    /// A serving certificate for `names` (DNS names or IP addresses) plus [`SERVER_NAME`].
    pub fn issue_server_cert(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, SERVER_NAME);
        params.distinguished_name = dn;
        let mut sans = vec![SanType::DnsName(SERVER_NAME.try_into()?)];
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into()?),
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now() - BACKDATE;
        params.not_after = now() + lifetime;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key))
    }

    /// The node named by a client certificate this CA signed; the chain was verified during the
    /// TLS handshake.
    pub fn node_of(&self, leaf: &CertificateDer<'_>) -> Result<PeerNode, CaError> {
        peer_node(leaf, &self.trust_domain)
    }
}

/// The node of a client certificate and when the certificate stops being valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerNode {
    pub node: String,
    /// For a node certificate this CA issued: the node's join, less [`BACKDATE`].
    pub not_before: std::time::SystemTime,
    pub not_after: std::time::SystemTime,
}

pub fn peer_node(leaf: &[u8], trust_domain: &str) -> Result<PeerNode, CaError> {
    let (_, cert) = X509Certificate::from_der(leaf)
        .map_err(|e| CaError::PeerCert(format!("cannot parse: {e}")))?;
    let prefix = format!("spiffe://{trust_domain}/node/");
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CaError::PeerCert(format!("bad subject alternative names: {e}")))?
        .ok_or_else(|| CaError::PeerCert("no subject alternative name".into()))?;
    let node = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(uri) => uri.strip_prefix(&prefix),
            _ => None,
        })
        .ok_or_else(|| CaError::PeerCert(format!("no URI SAN {prefix}<node>")))?;
    check_node_name(node)?;
    let time = |t: x509_parser::time::ASN1Time| {
        std::time::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or_default())
    };
    Ok(PeerNode {
        node: node.into(),
        not_before: time(cert.validity().not_before),
        not_after: time(cert.validity().not_after),
    })
}

/// A PKCS#10 request, its signature verified. Only its public key is ever used.
/// Names the key of a CSR (the SHA-256 of its public key, hexadecimal): what a join token is
/// spent for, so that the same join retried with the same key is recognized.
pub fn csr_key(csr_pem: &str) -> Result<String, CaError> {
    Ok(crate::sha256_hex(
        parse_csr(csr_pem)?.public_key.subject_public_key_info(),
    ))
}

fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
    if csr_pem.len() > 16 * 1024 {
        return Err(CaError::Csr("larger than 16 KiB".into()));
    }
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::Csr(e.to_string()))
}

pub fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> (KeyPair, String) {
        let key = KeyPair::generate().expect("key");
        let csr = CertificateParams::new(vec!["ignored.example".into()])
            .expect("params")
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        (key, csr)
    }

    fn ca(dir: &std::path::Path, td: &str) -> Ca {
        let state = StateDir::open(dir).expect("state dir");
        Ca::load_or_create(&state, td, Duration::from_secs(3600)).expect("CA")
    }

    #[test]
    fn renewal_keeps_the_join_and_never_reaches_past_the_maximum_age() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let hour = Duration::from_secs(3600);
        let ca = ca(tmp.path(), "example.org").with_node_cert_max_age(2 * hour);
        let (_, csr) = csr();
        let peer_of = |pem: &str| {
            ca.node_of(&pem_to_der(pem).expect("PEM certificate"))
                .expect("node")
        };
        let joined = peer_of(&ca.sign_node("node-a", &csr).expect("signed"));
        let renewed = peer_of(&ca.renew_node(&joined, &csr).expect("renewed"));
        assert_eq!(renewed.not_before, joined.not_before, "the join is kept");
        // Joined 90 minutes ago: the renewal ends at the maximum age, 30 minutes from now.
        let earlier = PeerNode {
            not_before: joined.not_before - 90 * Duration::from_secs(60),
            ..joined.clone()
        };
        let renewed = peer_of(&ca.renew_node(&earlier, &csr).expect("renewed"));
        let left = renewed
            .not_after
            .duration_since(std::time::SystemTime::now())
            .expect("still valid");
        assert!(
            left <= Duration::from_secs(30 * 60) && left > Duration::from_secs(29 * 60),
            "{left:?}"
        );
        // Past the maximum age: refused, the node must join again.
        let old = PeerNode {
            not_before: joined.not_before - 2 * hour,
            ..joined
        };
        let err = ca.renew_node(&old, &csr).expect_err("too old");
        assert!(matches!(err, CaError::NodeMaxAge { .. }), "{err}");
        assert!(err.to_string().contains("join again"), "{err}");
        // A maximum age below the lifetime bounds the first certificate too.
        let short = ca.with_node_cert_max_age(Duration::from_secs(600));
        let first = short
            .node_of(&pem_to_der(&short.sign_node("node-b", &csr).expect("signed")).expect("der"))
            .expect("node");
        let left = first
            .not_after
            .duration_since(std::time::SystemTime::now())
            .expect("valid");
        assert!(left <= Duration::from_secs(600), "{left:?}");
    }

    #[test]
    fn node_certificate_names_the_node_and_nothing_the_csr_asked() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ca = ca(tmp.path(), "example.org");
        let (_, csr) = csr();
        let pem = ca.sign_node("node-a", &csr).expect("signed");
        let der = pem_to_der(&pem).expect("PEM certificate");
        let peer = ca.node_of(&der).expect("a node certificate");
        assert_eq!(peer.node, "node-a");
        let left = peer
            .not_after
            .duration_since(std::time::SystemTime::now())
            .expect("valid in the future");
        assert!(left <= Duration::from_secs(3600) && left > Duration::from_secs(3500));
        let (_, parsed) = X509Certificate::from_der(&der).expect("parse");
        let sans = format!("{:?}", parsed.subject_alternative_name());
        assert!(!sans.contains("ignored.example"), "{sans}");
    }

    #[test]
    fn ca_survives_a_restart_and_refuses_another_trust_domain() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let first = ca(tmp.path(), "example.org").cert_pem().to_owned();
        let again = ca(tmp.path(), "example.org").cert_pem().to_owned();
        assert_eq!(first, again, "the CA is created once");
        let state = StateDir::open(tmp.path()).expect("state dir");
        let err = Ca::load_or_create(&state, "other.org", Duration::from_secs(60))
            .err()
            .expect("another trust domain must be refused");
        assert!(err.to_string().contains("example.org"), "{err}");
    }

    #[test]
    fn a_ca_dir_is_read_never_written_and_a_key_of_another_ca_is_refused() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let (made, other) = (tmp.path().join("made"), tmp.path().join("other"));
        let original = ca(&made, "example.org").cert_pem().to_owned();
        ca(&other, "example.org");
        let hour = Duration::from_secs(3600);
        let loaded = Ca::load(&made, "example.org", hour).expect("the CA init-ca made");
        assert_eq!(loaded.cert_pem(), original);
        let err = Ca::load(&made, "other.org", hour)
            .err()
            .expect("trust domain");
        assert!(err.to_string().contains("example.org"), "{err}");
        // A directory with no CA: named, and nothing is created in it.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).expect("dir");
        let err = Ca::load(&empty, "example.org", hour).err().expect("no CA");
        assert!(err.to_string().contains("init-ca"), "{err}");
        assert_eq!(std::fs::read_dir(&empty).expect("dir").count(), 0);
        // Another CA's key beside this certificate (a Secret made from two runs).
        std::fs::copy(other.join(CA_KEY_FILE), made.join(CA_KEY_FILE)).expect("copy");
        let err = Ca::load(&made, "example.org", hour)
            .err()
            .expect("mismatch");
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn bad_csrs_and_node_names_are_refused() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ca = ca(tmp.path(), "example.org");
        let (_, good) = csr();
        assert!(matches!(
            ca.sign_node("node-a", "garbage"),
            Err(CaError::Csr(_))
        ));
        let mut tampered = good.clone().into_bytes();
        let middle = tampered.len() / 2;
        tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).expect("ascii");
        assert!(
            ca.sign_node("node-a", &tampered).is_err(),
            "a tampered CSR must not verify"
        );
        for bad in ["", "Node", "a/b", "../x", "-x", &"a".repeat(300)] {
            assert!(
                matches!(ca.sign_node(bad, &good), Err(CaError::NodeName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn workload_certificate_carries_the_spiffe_id_and_works_for_the_tunnel() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ca = ca(tmp.path(), "example.org");
        let (key, csr) = csr();
        let id = "spiffe://example.org/ns/demo/sa/web";
        let signed = ca.sign_workload(id, &csr).expect("signed");
        let left = signed
            .not_after
            .duration_since(std::time::SystemTime::now())
            .expect("valid in the future");
        assert!(left <= Duration::from_secs(3600) && left > Duration::from_secs(3500));
        let pem = signed.cert_pem;
        // The tunnel takes it as it is: SPIFFE ID, key matching, chain to the CA.
        let svid = ward_tunnel::Svid::from_pem(&pem, &key.serialize_pem()).expect("usable SVID");
        assert_eq!(svid.spiffe_id().as_str(), id);
        let trust =
            ward_tunnel::TrustStore::new("example.org", &[ca.cert_der().clone()]).expect("trust");
        let der = pem_to_der(&pem).expect("der");
        assert_eq!(
            trust
                .check_peer(std::slice::from_ref(&der))
                .expect("accepted")
                .as_str(),
            id
        );
        // A proper subject, and the SPIFFE ID as the only name.
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("parses");
        assert_eq!(parsed.subject().to_string(), "O=example.org");
        let names: Vec<String> = parsed
            .subject_alternative_name()
            .expect("SAN parses")
            .expect("has SANs")
            .value
            .general_names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect();
        assert_eq!(names, vec![format!("URI({id:?})")]);
    }

    #[test]
    fn workload_certificates_follow_their_own_lifetime_and_name_their_serial() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ca =
            ca(tmp.path(), "example.org").with_workload_cert_lifetime(Duration::from_secs(600));
        assert_eq!(ca.node_cert_lifetime(), Duration::from_secs(3600));
        let (_, csr) = csr();
        let signed = ca
            .sign_workload("spiffe://example.org/ns/demo/sa/web", &csr)
            .expect("signed");
        let left = signed
            .not_after
            .duration_since(std::time::SystemTime::now())
            .expect("valid in the future");
        assert!(
            left <= Duration::from_secs(600) && left > Duration::from_secs(500),
            "{left:?}"
        );
        let der = pem_to_der(&signed.cert_pem).expect("der");
        let (_, parsed) = X509Certificate::from_der(&der).expect("parse");
        let hex: String = parsed
            .raw_serial()
            .iter()
            .skip_while(|b| **b == 0)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(signed.serial, hex);
        assert_eq!(
            crate::revocation::canonical_serial(&signed.serial).as_deref(),
            Ok(signed.serial.as_str()),
            "the serial logged is the one `revoke` takes"
        );
        let other = ca
            .sign_workload("spiffe://example.org/ns/demo/sa/web", &csr)
            .expect("signed");
        assert_ne!(other.serial, signed.serial);
    }

    #[test]
    fn workload_ids_no_workload_may_have_are_refused() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ca = ca(tmp.path(), "example.org");
        let (_, csr) = csr();
        for (bad, why) in [
            ("spiffe://other.org/ns/demo/sa/web", "trust domain"),
            ("spiffe://example.org", "trust domain, not a workload"),
            ("spiffe://example.org/node/node-b", "node's ID"),
            ("spiffe://example.org/a/../b", "'..'"),
            ("https://example.org/web", "spiffe://"),
        ] {
            match ca.sign_workload(bad, &csr) {
                Err(CaError::WorkloadId { reason, .. }) => {
                    assert!(reason.contains(why), "{bad}: {reason} should say {why}")
                }
                other => panic!("{bad} must be refused, got {other:?}"),
            }
        }
        let rsa_or_other = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key");
        let csr = CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .serialize_request(&rsa_or_other)
            .expect("csr")
            .pem()
            .expect("pem");
        assert!(
            matches!(
                ca.sign_workload("spiffe://example.org/ns/demo/sa/web", &csr),
                Err(CaError::Csr(reason)) if reason.contains("P-256")
            ),
            "a non-P-256 key must be refused"
        );
    }

    #[test]
    fn certificate_of_another_trust_domain_names_no_node() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let other = ca(&tmp.path().join("other"), "other.org");
        let (_, csr) = csr();
        let der = pem_to_der(&other.sign_node("node-a", &csr).expect("signed")).expect("der");
        assert!(matches!(
            peer_node(&der, "example.org"),
            Err(CaError::PeerCert(_))
        ));
    }
}
