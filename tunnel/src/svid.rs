//! The workload certificates (X.509 SVIDs) this node holds, one per SPIFFE ID, replaced at
//! runtime as they are renewed. A replacement affects only handshakes that start afterwards:
//! connections already established keep the session they have.
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tokio_rustls::rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::{
    identity::{cert_info, IdentityError, Serial, SpiffeId},
    tls::provider,
};

/// Renewal never comes sooner than this after a certificate was installed, so that a very short
/// lifetime cannot turn into a renewal loop.
const MIN_RENEW_DELAY: Duration = Duration::from_secs(1);

/// A workload's certificate chain (leaf first) and key, ready for rustls.
pub struct Svid {
    spiffe_id: SpiffeId,
    serial: Serial,
    not_after: SystemTime,
    renew_at: SystemTime,
    certified: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// `chain` is the leaf followed by any intermediates; the leaf must carry a SPIFFE ID and
    /// match `key`.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Svid, IdentityError> {
        let bad = |reason: String| IdentityError::BadCertificate { reason };
        let leaf = chain
            .first()
            .ok_or_else(|| bad("the chain is empty".into()))?;
        let info = cert_info(leaf)?;
        let spiffe_id = info
            .spiffe_id
            .ok_or_else(|| bad("the leaf has no SPIFFE ID (URI SAN)".into()))?;
        let certified = CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| bad(format!("the key does not fit the certificate: {e}")))?;
        let now = SystemTime::now();
        let left = info.not_after.duration_since(now).unwrap_or_default();
        Ok(Svid {
            spiffe_id,
            serial: info.serial,
            not_after: info.not_after,
            renew_at: now + (left / 2).max(MIN_RENEW_DELAY.min(left)),
            certified: Arc::new(certified),
        })
    }

    /// A chain of PEM certificates (leaf first) and a PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Svid, IdentityError> {
        let bad = |reason: String| IdentityError::BadCertificate { reason };
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("certificate chain is not PEM: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| bad(format!("private key is not PEM: {e}")))?;
        Svid::new(chain, key)
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Half of the lifetime left when the certificate was installed: when to ask for the next.
    /// The current certificate stays in use until a new one replaces it.
    pub fn renew_at(&self) -> SystemTime {
        self.renew_at
    }

    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

/// The TLS server name (SNI) under which a node's inbound listener presents the certificate of
/// its workload `id`: a hash, because a SPIFFE ID is not a DNS name. It tells an observer no more
/// than which of the identities it can guess is being reached.
pub fn server_name_for(id: &SpiffeId) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{hex}.svid.ward")
}

#[derive(Default)]
struct Certificates {
    by_id: HashMap<SpiffeId, Arc<Svid>>,
    by_server_name: HashMap<String, SpiffeId>,
}

/// The certificates of this node's workloads. Cheap to read on every handshake; replaced whole
/// per identity.
pub struct SvidStore {
    certificates: RwLock<Certificates>,
    /// Bumped at every insert and removal, for those who act on which certificates are held.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for SvidStore {
    fn default() -> Self {
        SvidStore {
            certificates: RwLock::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl std::fmt::Debug for SvidStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let certs = self.read();
        f.debug_struct("SvidStore")
            .field("identities", &certs.by_id.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SvidStore {
    pub fn new() -> Arc<SvidStore> {
        Arc::new(SvidStore::default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Certificates> {
        self.certificates.read().expect("SVID store lock poisoned")
    }

    /// Installs `svid` for its SPIFFE ID, replacing (and returning) the previous one.
    pub fn insert(&self, svid: Svid) -> Option<Arc<Svid>> {
        let id = svid.spiffe_id.clone();
        let mut certs = self.certificates.write().expect("SVID store lock poisoned");
        certs
            .by_server_name
            .insert(server_name_for(&id), id.clone());
        let previous = certs.by_id.insert(id.clone(), Arc::new(svid));
        drop(certs);
        tracing::info!(spiffe_id = %id, rotated = previous.is_some(), "workload certificate installed");
        self.changes.send_modify(|n| *n += 1);
        previous
    }

    /// Forgets the certificate of a workload that left this node.
    pub fn remove(&self, id: &SpiffeId) -> Option<Arc<Svid>> {
        let mut certs = self.certificates.write().expect("SVID store lock poisoned");
        certs.by_server_name.remove(&server_name_for(id));
        let removed = certs.by_id.remove(id);
        drop(certs);
        self.changes.send_modify(|n| *n += 1);
        removed
    }

    /// Changes whenever a certificate is installed or removed.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn get(&self, id: &SpiffeId) -> Option<Arc<Svid>> {
        self.read().by_id.get(id).cloned()
    }

    /// The identity whose certificate is presented for the TLS server name `name`.
    pub fn identity_for_server_name(&self, name: &str) -> Option<SpiffeId> {
        self.read().by_server_name.get(name).cloned()
    }

    pub fn identities(&self) -> Vec<SpiffeId> {
        self.read().by_id.keys().cloned().collect()
    }
}

/// The inbound listener presents the certificate of the workload the client names (by SNI).
impl ResolvesServerCert for SvidStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        let certs = self.read();
        let id = certs.by_server_name.get(name)?;
        certs.by_id.get(id).map(|svid| svid.certified.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::test_helpers::TestCa;

    #[test]
    fn store_replaces_per_identity_and_finds_by_server_name() {
        let ca = TestCa::new("example.org");
        let store = SvidStore::new();
        let id = SpiffeId::parse("spiffe://example.org/ns/a/sa/web").expect("id");
        let first = ca.issue(id.as_str(), Duration::from_secs(3600));
        assert!(store.insert(first.svid()).is_none());
        let second = ca.issue(id.as_str(), Duration::from_secs(3600));
        let replaced = store.insert(second.svid()).expect("the first is replaced");
        assert_eq!(replaced.serial(), &first.serial);
        assert_eq!(store.get(&id).expect("current").serial(), &second.serial);
        assert_eq!(
            store.identity_for_server_name(&server_name_for(&id)),
            Some(id.clone())
        );
        assert!(store.remove(&id).is_some());
        assert!(store
            .identity_for_server_name(&server_name_for(&id))
            .is_none());
    }

    #[test]
    fn renewal_is_due_at_half_the_lifetime_left() {
        let ca = TestCa::new("example.org");
        let svid = ca
            .issue("spiffe://example.org/a", Duration::from_secs(100))
            .svid();
        let until = svid
            .renew_at()
            .duration_since(SystemTime::now())
            .expect("renewal lies ahead");
        assert!(
            until > Duration::from_secs(45) && until <= Duration::from_secs(50),
            "{until:?}"
        );
    }

    #[test]
    fn unusable_certificates_are_refused_with_the_reason() {
        let ca = TestCa::new("example.org");
        let a = ca.issue("spiffe://example.org/a", Duration::from_secs(3600));
        let b = ca.issue("spiffe://example.org/b", Duration::from_secs(3600));
        let err = Svid::from_pem(&a.chain_pem, &b.key_pem).expect_err("key of another");
        assert!(err.to_string().contains("does not fit"), "{err}");
        let err = Svid::from_pem("", &a.key_pem).expect_err("no certificate");
        assert!(err.to_string().contains("empty"), "{err}");
        let err = Svid::from_pem(ca.cert_pem(), &a.key_pem).expect_err("a CA has no SPIFFE ID");
        assert!(err.to_string().contains("SPIFFE ID"), "{err}");
        assert_ne!(
            server_name_for(&SpiffeId::parse("spiffe://example.org/a").expect("id")),
            server_name_for(&SpiffeId::parse("spiffe://example.org/b").expect("id"))
        );
    }
}
