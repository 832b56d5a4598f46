//! Keeps a workload's certificate fresh: a new key and CSR, signed by the control plane
//! (`SignWorkload`), installed in the [`SvidStore`], renewed at half its lifetime. A failed
//! renewal keeps the current certificate and retries with a growing delay.
use std::{future::Future, sync::Arc, time::Duration};

use crate::{
    identity::SpiffeId,
    svid::{Svid, SvidStore},
};

/// The first retry after a failed signing; the delay doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_millis(100);
pub const MAX_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    #[error("generating a key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("signing refused or failed: {reason}")]
    Sign { reason: String },
    #[error("the signed certificate is unusable: {0}")]
    Unusable(#[from] crate::identity::IdentityError),
    #[error("asked for {wanted}, the certificate names {got}")]
    WrongIdentity { wanted: SpiffeId, got: SpiffeId },
}

/// Who signs workload certificates: the agent implements it with the control plane's
/// `SignWorkload` call.
pub trait SvidSigner: Send + Sync + 'static {
    /// The PEM certificate chain (leaf first) for `spiffe_id` with the key of `csr_pem`, or why
    /// not.
    fn sign(
        &self,
        spiffe_id: &SpiffeId,
        csr_pem: String,
    ) -> impl Future<Output = Result<String, String>> + Send;
}

/// A fresh ECDSA P-256 key and a CSR carrying only it (the signer decides every field).
pub fn new_request() -> Result<(rcgen::KeyPair, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    Ok((key, csr))
}

/// One certificate for `id`, signed by `signer`.
pub async fn obtain<S: SvidSigner>(signer: &S, id: &SpiffeId) -> Result<Svid, RenewalError> {
    let (key, csr) = new_request()?;
    let chain = signer
        .sign(id, csr)
        .await
        .map_err(|reason| RenewalError::Sign { reason })?;
    let svid = Svid::from_pem(&chain, &key.serialize_pem())?;
    if svid.spiffe_id() != id {
        return Err(RenewalError::WrongIdentity {
            wanted: id.clone(),
            got: svid.spiffe_id().clone(),
        });
    }
    Ok(svid)
}

/// Obtains a certificate for workload `id` now (unless `store` has one), then renews it at
/// half its lifetime, until the task is dropped (the workload left the node: abort the task and
/// [`SvidStore::remove`] the certificate).
pub async fn keep_fresh<S: SvidSigner>(store: Arc<SvidStore>, signer: Arc<S>, id: SpiffeId) {
    let mut retry = FIRST_RETRY;
    loop {
        let due = store
            .get(&id)
            .map(|svid| {
                svid.renew_at()
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        tokio::time::sleep(due).await;
        match obtain(signer.as_ref(), &id).await {
            Ok(svid) => {
                tracing::info!(
                    spiffe_id = %id,
                    serial = %svid.serial(),
                    renew_in = ?svid.renew_at().duration_since(std::time::SystemTime::now()).unwrap_or_default(),
                    "workload certificate installed"
                );
                store.insert(svid);
                retry = FIRST_RETRY;
            }
            Err(e) => {
                let current = store.get(&id);
                tracing::warn!(
                    spiffe_id = %id,
                    error = %e,
                    retry_in = ?retry,
                    keeping = current.as_ref().map(|c| c.serial().to_string()).unwrap_or_else(|| "none".into()),
                    "workload certificate renewal failed; the current certificate stays in use"
                );
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    };

    use super::*;
    use crate::test_helpers::TestCa;

    /// Signs with a test CA, failing while `failing` is set; may answer for another identity.
    struct FakeControlPlane {
        ca: TestCa,
        lifetime: Duration,
        failing: Mutex<bool>,
        answer_for: Mutex<Option<String>>,
        calls: AtomicUsize,
    }

    impl FakeControlPlane {
        fn new(lifetime: Duration) -> Arc<Self> {
            Arc::new(FakeControlPlane {
                ca: TestCa::new("example.org"),
                lifetime,
                failing: Mutex::new(false),
                answer_for: Mutex::new(None),
                calls: AtomicUsize::new(0),
            })
        }
    }

    impl SvidSigner for FakeControlPlane {
        async fn sign(&self, spiffe_id: &SpiffeId, csr_pem: String) -> Result<String, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if *self.failing.lock().expect("lock") {
                return Err("control plane unreachable".into());
            }
            let id = self
                .answer_for
                .lock()
                .expect("lock")
                .clone()
                .unwrap_or_else(|| spiffe_id.to_string());
            Ok(self.ca.sign_csr(&id, &csr_pem, self.lifetime))
        }
    }

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/ns/a/sa/web").expect("id")
    }

    async fn wait_for(what: &str, done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn certificate_is_obtained_at_once_and_renewed_at_half_life() {
        let signer = FakeControlPlane::new(Duration::from_secs(2));
        let store = SvidStore::new();
        let task = tokio::spawn(keep_fresh(store.clone(), signer.clone(), id()));
        wait_for("the first certificate", || store.get(&id()).is_some()).await;
        let first = store.get(&id()).expect("first").serial().clone();
        // Lifetime 2 s (from a minute back): renewal is due about a second later.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            store.get(&id()).expect("current").serial(),
            &first,
            "not yet"
        );
        wait_for("the renewal", || {
            store.get(&id()).is_some_and(|s| s.serial() != &first)
        })
        .await;
        task.abort();
    }

    #[tokio::test]
    async fn a_failing_renewal_keeps_the_current_certificate_and_retries() {
        let signer = FakeControlPlane::new(Duration::from_secs(2));
        let store = SvidStore::new();
        let task = tokio::spawn(keep_fresh(store.clone(), signer.clone(), id()));
        wait_for("the first certificate", || store.get(&id()).is_some()).await;
        let first = store.get(&id()).expect("first").serial().clone();
        *signer.failing.lock().expect("lock") = true;
        let calls = signer.calls.load(Ordering::SeqCst);
        wait_for("two failed renewals", || {
            signer.calls.load(Ordering::SeqCst) >= calls + 2
        })
        .await;
        assert_eq!(
            store.get(&id()).expect("still there").serial(),
            &first,
            "the current certificate stays while renewal fails"
        );
        *signer.failing.lock().expect("lock") = false;
        wait_for("the renewal once signing works", || {
            store.get(&id()).is_some_and(|s| s.serial() != &first)
        })
        .await;
        task.abort();
    }

    #[tokio::test]
    async fn a_certificate_for_another_identity_is_not_installed() {
        let signer = FakeControlPlane::new(Duration::from_secs(3600));
        *signer.answer_for.lock().expect("lock") =
            Some("spiffe://example.org/ns/a/sa/other".into());
        match obtain(signer.as_ref(), &id()).await {
            Err(RenewalError::WrongIdentity { got, .. }) => {
                assert_eq!(got.as_str(), "spiffe://example.org/ns/a/sa/other")
            }
            other => panic!("expected WrongIdentity, got {other:?}"),
        }
    }
}
