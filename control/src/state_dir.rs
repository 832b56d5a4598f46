//! The control plane's state directory: every file it keeps, their permissions, and writes that a
//! crash cannot leave half done.
use std::{
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("state directory {dir}: {source}")]
    Create {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: cannot write: {source}")]
    Write {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    Corrupt { file: PathBuf, reason: String },
}

/// The name of the revocation file in the state directory.
pub const REVOKED_FILE: &str = "revoked";
/// The CA certificate agents trust (`ward-control ca-cert` prints it).
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The trust domain the CA and this state belong to.
pub const TRUST_DOMAIN_FILE: &str = "trust-domain";

#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Creates the directory (mode 0700: it holds the CA's private key) if it does not exist.
    pub fn open(dir: &Path) -> Result<Self, StateDirError> {
        let create = |source| StateDirError::Create {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(create)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(create)?;
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    /// An exclusive lock on the directory (`flock` on its `.lock` file), held until the file is
    /// dropped; waits for another process holding it.
    pub fn lock(&self) -> Result<std::fs::File, StateDirError> {
        let file = self.dir.join(".lock");
        let write = |source| StateDirError::Write {
            file: file.clone(),
            source,
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&file)
            .map_err(write)?;
        lock.lock().map_err(write)?;
        Ok(lock)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    pub fn ca_key(&self) -> PathBuf {
        self.dir.join(CA_KEY_FILE)
    }

    /// SHA-256 of every join token already used, one hex digest a line.
    pub fn used_tokens(&self) -> PathBuf {
        self.dir.join("used-tokens")
    }

    /// Workloads reported by the nodes and the identities allocated to them.
    pub fn registry(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    /// Serials of revoked workload certificates, one a line (see [`crate::revocation`]).
    pub fn revoked(&self) -> PathBuf {
        self.dir.join(REVOKED_FILE)
    }

    /// Which trust domain this state belongs to.
    pub fn trust_domain(&self) -> PathBuf {
        self.dir.join(TRUST_DOMAIN_FILE)
    }

    /// `None` when the file does not exist.
    pub fn read(&self, file: &Path) -> Result<Option<String>, StateDirError> {
        match std::fs::read_to_string(file) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateDirError::Read {
                file: file.to_owned(),
                source,
            }),
        }
    }

    /// Replaces `file` with `contents` so a reader or a crash sees the old file or the new one,
    /// never a mix (see [`ward_host::atomic::write`]).
    pub fn write_atomic(
        &self,
        file: &Path,
        contents: &[u8],
        mode: u32,
    ) -> Result<(), StateDirError> {
        ward_host::atomic::write(file, contents, mode).map_err(|source| StateDirError::Write {
            file: file.to_owned(),
            source,
        })
    }

    /// Appends one line and syncs it before returning, so a token recorded as used stays used.
    pub fn append_line(&self, file: &Path, line: &str) -> Result<(), StateDirError> {
        ward_host::atomic::append(file, format!("{line}\n").as_bytes(), 0o600).map_err(|source| {
            StateDirError::Write {
                file: file.to_owned(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_keeps_the_mode() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let state = StateDir::open(&tmp.path().join("s")).expect("state dir");
        let file = state.ca_key();
        state
            .write_atomic(&file, b"one", 0o600)
            .expect("first write");
        state
            .write_atomic(&file, b"two", 0o600)
            .expect("second write");
        assert_eq!(state.read(&file).expect("read").as_deref(), Some("two"));
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the CA key must stay private");
        let dir_mode = std::fs::metadata(state.path())
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert_eq!(state.read(&state.registry()).expect("read missing"), None);
    }
}
