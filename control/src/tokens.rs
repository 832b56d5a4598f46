//! One-time join tokens. The operator lists them in the token file (re-read at every join, so
//! tokens can be added without a restart): one token a line, optionally followed by the only node
//! name it may join as. A token works once; the SHA-256 of every used token is kept in the state
//! directory so that a restart does not make it usable again.
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::state_dir::{StateDir, StateDirError};

/// Shorter tokens could be guessed; they are ignored with a warning.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("joining is disabled: the control plane was started without --token-file")]
    Disabled,
    #[error("unknown join token")]
    Unknown,
    #[error("join token already used")]
    Used,
    #[error("join token is bound to node {bound:?}")]
    WrongNode { bound: String },
    #[error("{file}: cannot read the token file: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateDirError),
    #[error("the shared store: {0}")]
    Store(#[from] crate::etcd_store::StoreError),
}

pub struct JoinTokens {
    file: Option<PathBuf>,
    state: StateDir,
    /// SHA-256 (hex) of the used tokens; the lock also makes check-and-record one step.
    used: Mutex<HashSet<String>>,
    /// With replicas, a token is spent in the store they share (which every replica checks),
    /// not in this replica's state directory.
    shared: Option<(crate::etcd_store::EtcdStore, tokio::runtime::Handle)>,
}

/// A random token suitable for the token file.
pub fn generate() -> String {
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl JoinTokens {
    pub fn new(file: Option<&Path>, state: &StateDir) -> Result<Self, TokenError> {
        let used = state
            .read(&state.used_tokens())?
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        Ok(JoinTokens {
            file: file.map(Path::to_owned),
            state: state.clone(),
            used: Mutex::new(used),
            shared: None,
        })
    }

    /// Spends tokens in `store` from now on; `redeem` blocks on it through `runtime`, so it must
    /// run outside the runtime's own threads (as the join service's blocking task does).
    pub fn shared(
        mut self,
        store: crate::etcd_store::EtcdStore,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        self.shared = Some((store, runtime));
        self
    }

    /// Consumes `token` for `node` if it is listed, unused and not bound to another node; `issue`
    /// runs in between (holding the lock) so that a token is spent only when a certificate was
    /// actually issued, and two concurrent joins cannot both spend it. `key` names the key the
    /// certificate is for ([`crate::ca::csr_key`]): in a shared store the token is spent for
    /// `node` and `key`, and the same join retried with the same key on any replica (its first
    /// answer lost, or its replica gone before answering) is issued again.
    pub fn redeem<T, E: From<TokenError>>(
        &self,
        token: &str,
        node: &str,
        key: &str,
        issue: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let file = self.file.as_ref().ok_or(TokenError::Disabled)?;
        let text = std::fs::read_to_string(file).map_err(|source| TokenError::Read {
            file: file.clone(),
            source,
        })?;
        let wanted = crate::sha256_hex(token.trim());
        let mut used = self.used.lock().expect("token lock poisoned");
        let mut bound = None;
        let mut listed = false;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let Some(candidate) = fields.next() else {
                continue;
            };
            if candidate.len() < MIN_TOKEN_LEN {
                tracing::warn!(file = %file.display(), min = MIN_TOKEN_LEN, "ignoring a join token shorter than the minimum");
                continue;
            }
            // Compare digests rather than tokens, so the comparison's time says nothing about
            // how much of a guess was right.
            if crate::sha256_hex(candidate) == wanted {
                listed = true;
                bound = fields.next().map(str::to_owned);
                break;
            }
        }
        // With a shared store, the store says whether, and for whom, it was spent.
        if self.shared.is_none() && used.contains(&wanted) {
            return Err(TokenError::Used.into());
        }
        if !listed || token.trim().len() < MIN_TOKEN_LEN {
            return Err(TokenError::Unknown.into());
        }
        if let Some(bound) = bound.filter(|b| b != node) {
            return Err(TokenError::WrongNode { bound }.into());
        }
        if let Some((store, runtime)) = &self.shared {
            let claim = format!("{node} {key}");
            let spent_for = runtime
                .block_on(store.token_spent_for(&wanted))
                .map_err(TokenError::from)?;
            if spent_for.is_some_and(|spent| spent != claim) {
                return Err(TokenError::Used.into());
            }
            let issued = issue()?;
            // Two replicas may have issued at once: only the one that spends the token first
            // hands its certificate out (or both, when both answer the same join).
            if !runtime
                .block_on(store.spend_token(&wanted, &claim))
                .map_err(TokenError::from)?
            {
                return Err(TokenError::Used.into());
            }
            used.insert(wanted);
            return Ok(issued);
        }
        let issued = issue()?;
        self.state
            .append_line(&self.state.used_tokens(), &wanted)
            .map_err(TokenError::from)?;
        used.insert(wanted);
        Ok(issued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _tmp: tempfile::TempDir,
        file: PathBuf,
        state: StateDir,
    }

    fn fixture(tokens: &str) -> Fixture {
        let tmp = tempfile::tempdir().expect("temp dir");
        let file = tmp.path().join("tokens");
        std::fs::write(&file, tokens).expect("token file");
        let state = StateDir::open(&tmp.path().join("state")).expect("state dir");
        Fixture {
            _tmp: tmp,
            file,
            state,
        }
    }

    fn ok() -> Result<(), TokenError> {
        Ok(())
    }

    const T1: &str = "0123456789abcdef0123";
    const T2: &str = "fedcba9876543210fedc";
    const KEY: &str = "the key of the CSR";

    #[test]
    fn a_token_works_once_even_across_restarts() {
        let f = fixture(&format!("# tokens\n{T1}\n{T2} node-b\n"));
        let tokens = JoinTokens::new(Some(&f.file), &f.state).expect("tokens");
        tokens.redeem(T1, "node-a", KEY, ok).expect("first use");
        assert!(matches!(
            tokens.redeem(T1, "node-a", KEY, ok),
            Err(TokenError::Used)
        ));
        let restarted = JoinTokens::new(Some(&f.file), &f.state).expect("tokens");
        assert!(matches!(
            restarted.redeem(T1, "node-c", KEY, ok),
            Err(TokenError::Used)
        ));
    }

    #[test]
    fn a_failed_issue_does_not_spend_the_token() {
        let f = fixture(&format!("{T1}\n"));
        let tokens = JoinTokens::new(Some(&f.file), &f.state).expect("tokens");
        let failed: Result<(), TokenError> =
            tokens.redeem(T1, "node-a", KEY, || Err(TokenError::Unknown));
        assert!(failed.is_err());
        tokens.redeem(T1, "node-a", KEY, ok).expect("still usable");
    }

    #[test]
    fn unknown_short_and_node_bound_tokens_are_refused() {
        let f = fixture(&format!("short\n{T2} node-b\n"));
        let tokens = JoinTokens::new(Some(&f.file), &f.state).expect("tokens");
        assert!(matches!(
            tokens.redeem("short", "n", KEY, ok),
            Err(TokenError::Unknown)
        ));
        assert!(matches!(
            tokens.redeem("nope-nope-nope-nope", "n", KEY, ok),
            Err(TokenError::Unknown)
        ));
        assert!(matches!(
            tokens.redeem(T2, "node-a", KEY, ok),
            Err(TokenError::WrongNode { .. })
        ));
        tokens
            .redeem(T2, "node-b", KEY, ok)
            .expect("the bound node may use it");
    }

    #[test]
    fn tokens_added_later_are_accepted_without_restart() {
        let f = fixture("");
        let tokens = JoinTokens::new(Some(&f.file), &f.state).expect("tokens");
        assert!(tokens.redeem(T1, "n", KEY, ok).is_err());
        std::fs::write(&f.file, format!("{T1}\n")).expect("add a token");
        tokens.redeem(T1, "n", KEY, ok).expect("newly listed token");
    }

    #[test]
    fn without_a_token_file_joining_is_disabled() {
        let f = fixture("");
        let tokens = JoinTokens::new(None, &f.state).expect("tokens");
        assert!(matches!(
            tokens.redeem(T1, "n", KEY, ok),
            Err(TokenError::Disabled)
        ));
        assert_eq!(generate().len(), 48);
    }
}
