//! The node's key and certificate: a new key for every request (a join keeps its key until it
//! succeeds), the CSR sent with it, the files in the control-plane state directory, and when to
//! renew.
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

pub const KEY_FILE: &str = "node-key.pem";
pub const CERT_FILE: &str = "node-cert.pem";
/// The key a join is asked for, kept until the join succeeds: a join retried (on any replica)
/// after its answer was lost presents the same key, which the control plane recognizes as the
/// one the token was spent for.
pub const JOIN_KEY_FILE: &str = "join-key.pem";

/// Renewal never comes sooner than this after the certificate was obtained, so a very short
/// lifetime cannot turn into a renewal loop.
const MIN_RENEW_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a key: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("the control plane returned an unusable certificate: {0}")]
    Bad(String),
}

/// A node certificate with its key, as held in memory.
#[derive(Clone)]
pub struct NodeCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
    /// When to start renewing: half of the lifetime left when the certificate was obtained.
    pub renew_at: SystemTime,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert")
            .field("not_after", &self.not_after)
            .field("renew_at", &self.renew_at)
            .finish_non_exhaustive()
    }
}

/// A fresh key and a CSR for it. The control plane decides every field of the certificate, so
/// the request carries nothing but the key.
pub fn new_request() -> Result<(String, String), CertError> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    Ok((key.serialize_pem(), csr))
}

/// The key and CSR of a join: the key kept in `state_dir` from an earlier attempt that did not
/// complete, or a new one, kept there until [`finish_join`].
pub fn join_request(state_dir: &Path) -> Result<(String, String), CertError> {
    let file = state_dir.join(JOIN_KEY_FILE);
    let kept = std::fs::read_to_string(&file)
        .ok()
        .and_then(|pem| rcgen::KeyPair::from_pem(&pem).ok());
    let key = match kept {
        Some(key) => key,
        None => {
            let key = rcgen::KeyPair::generate()?;
            ward_host::atomic::write(&file, key.serialize_pem().as_bytes(), 0o600)
                .map_err(|source| CertError::Io { file, source })?;
            key
        }
    };
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    Ok((key.serialize_pem(), csr))
}

/// Forgets the join key once its certificate is saved.
pub fn finish_join(state_dir: &Path) {
    let _ = std::fs::remove_file(state_dir.join(JOIN_KEY_FILE));
}

fn not_after(cert_pem: &str) -> Result<SystemTime, CertError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| CertError::Bad(format!("not a PEM certificate: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CertError::Bad(format!("cannot parse: {e}")))?;
    let seconds = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or_default();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

impl NodeCert {
    /// A certificate just obtained (or just loaded): renewal is due at half its remaining life.
    pub fn new(cert_pem: String, key_pem: String) -> Result<NodeCert, CertError> {
        let not_after = not_after(&cert_pem)?;
        let now = SystemTime::now();
        let left = not_after.duration_since(now).unwrap_or_default();
        let renew_at = now + (left / 2).max(MIN_RENEW_DELAY.min(left));
        Ok(NodeCert {
            cert_pem,
            key_pem,
            not_after,
            renew_at,
        })
    }

    pub fn is_expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }

    /// The certificate in `state_dir`, if there is a usable one.
    pub fn load(state_dir: &Path) -> Option<NodeCert> {
        let cert = std::fs::read_to_string(state_dir.join(CERT_FILE)).ok()?;
        let key = std::fs::read_to_string(state_dir.join(KEY_FILE)).ok()?;
        match NodeCert::new(cert, key) {
            Ok(cert) => Some(cert),
            Err(e) => {
                tracing::warn!(dir = %state_dir.display(), error = %e, "ignoring the stored node certificate");
                None
            }
        }
    }

    /// Key first, then certificate: a crash in between leaves a key without its certificate,
    /// which [`NodeCert::load`] ignores, never a certificate without its key.
    pub fn save(&self, state_dir: &Path) -> Result<(), CertError> {
        ward_host::atomic::write(&state_dir.join(KEY_FILE), self.key_pem.as_bytes(), 0o600)
            .map_err(|source| CertError::Io {
                file: state_dir.join(KEY_FILE),
                source,
            })?;
        ward_host::atomic::write(&state_dir.join(CERT_FILE), self.cert_pem.as_bytes(), 0o644)
            .map_err(|source| CertError::Io {
                file: state_dir.join(CERT_FILE),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(lifetime: Duration) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["n".to_string()]).expect("params");
        params.not_before = time::OffsetDateTime::now_utc() - Duration::from_secs(300);
        params.not_after = time::OffsetDateTime::now_utc() + lifetime;
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_join_retried_presents_the_same_key_until_it_succeeds() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = super::super::tests::temp_dir("join");
        let (key, _) = join_request(&dir).expect("first attempt");
        let (again, _) = join_request(&dir).expect("a retry");
        assert_eq!(key, again, "the same key");
        let mode = std::fs::metadata(dir.join(JOIN_KEY_FILE))
            .expect("kept")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        finish_join(&dir);
        let (next, _) = join_request(&dir).expect("a later join");
        assert_ne!(next, key, "a new key once the join is done");
    }

    #[test]
    fn renewal_is_due_at_half_the_life_left_not_half_since_not_before() {
        let (cert, key) = self_signed(Duration::from_secs(100));
        let node = NodeCert::new(cert, key).expect("usable");
        let until_renew = node
            .renew_at
            .duration_since(SystemTime::now())
            .expect("renewal lies ahead although not_before is 5 minutes back");
        assert!(
            until_renew > Duration::from_secs(45) && until_renew <= Duration::from_secs(50),
            "{until_renew:?}"
        );
        assert!(!node.is_expired());
    }

    #[test]
    fn stored_certificate_round_trips_and_the_key_stays_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = super::super::tests::temp_dir("certs");
        assert!(NodeCert::load(&dir).is_none());
        let (cert, key) = self_signed(Duration::from_secs(3600));
        let node = NodeCert::new(cert.clone(), key).expect("usable");
        node.save(&dir).expect("save");
        let loaded = NodeCert::load(&dir).expect("stored certificate");
        assert_eq!(loaded.cert_pem, cert);
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn requests_carry_a_key_the_certificate_can_be_parsed_from() {
        let (key, csr) = new_request().expect("request");
        assert!(key.contains("PRIVATE KEY") && csr.contains("CERTIFICATE REQUEST"));
        assert!(NodeCert::new("garbage".into(), key).is_err());
    }
}
