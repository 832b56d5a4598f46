//! The agent's side of the control plane: joins with a one-time token, streams policy,
//! identities and the IP cache over mTLS, hands each merged state to the agent to apply
//! atomically, ACKs or NACKs it, reports this node's workloads, renews the node certificate at
//! half-life, and keeps the last applied state on disk so that an agent restarted without its
//! control plane enforces what it last had.
//!
//! This module depends on nothing else in the agent: the agent gives it the workloads to report
//! and receives [`RemoteUpdate`]s.
mod certs;
mod client;
mod state;

use std::{collections::BTreeMap, net::IpAddr, os::unix::fs::PermissionsExt as _, path::PathBuf};

use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};

pub use client::WorkloadSigner;
pub use state::RemoteState;
#[cfg(test)]
pub use state::{RemoteIdentity, RemoteWorkload};

/// The DNS name the control plane's serving certificate always carries.
pub const DEFAULT_SERVER_NAME: &str = "ward-control";

/// `controlPlane:` in the agent's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControlPlaneConfig {
    /// `host:port` of `ward-control` (or `https://host:port`); several replicas comma-separated
    /// (`cp-a:7443,cp-b:7443`), tried in turn: when the stream to one ends, the agent moves on
    /// to the next, resuming with the versions it holds.
    pub address: String,
    /// This node's name; its certificate, reports and logs carry it. May be left out when
    /// `ward run --node-name` (or `WARD_NODE_NAME`, from Kubernetes' downward API) gives it.
    #[serde(default)]
    pub node_name: String,
    /// A file holding the one-time join token; needed for the first join, and again only if
    /// the node certificate expires.
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// The control plane's CA certificate (PEM), the only issuer trusted for its serving
    /// certificate.
    pub ca_file: PathBuf,
    /// Where the node key, certificate and last applied state are kept (created 0700).
    pub state_dir: PathBuf,
    /// The name verified in the control plane's serving certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    DEFAULT_SERVER_NAME.into()
}

/// One workload of this node, as reported to the control plane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportedWorkload {
    pub name: String,
    pub spiffe_id: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<IpAddr>,
    /// The port of its own tunnel listener at its addresses (it runs in a pod's network
    /// namespace); 0 when the node's tunnel serves it.
    pub tunnel_port: u16,
}

/// A new complete state from the control plane. The agent compiles and applies all of it or
/// nothing, then answers on `ack`: `Ok` is ACKed, `Err(message)` is NACKed with the message and
/// the previous state stays in force (the next update is again relative to it).
#[derive(Debug)]
pub struct RemoteUpdate {
    pub state: RemoteState,
    pub ack: oneshot::Sender<Result<(), String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("controlPlane.{field}: {reason}")]
    Field { field: String, reason: String },
    #[error("{file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("the node has no valid certificate and controlPlane.joinTokenFile is not set")]
    NoToken,
    #[error(
        "join refused by the control plane: {0}; put a new token in controlPlane.joinTokenFile"
    )]
    Join(String),
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    #[error("connecting: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("control plane: {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the control plane closed the stream")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ControlPlaneConfig {
    /// The replicas' addresses, in the order they are tried.
    pub fn addresses(&self) -> Vec<&str> {
        self.address
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect()
    }

    /// Checks every field; the error names the field, the value and the reason.
    pub fn validate(&self) -> Result<(), ControlError> {
        let field = |field: &str, reason: String| {
            Err(ControlError::Field {
                field: field.into(),
                reason,
            })
        };
        if self.addresses().is_empty() {
            return field("address", format!("{:?} is not host:port", self.address));
        }
        for given in self.addresses() {
            let address = given.trim_start_matches("https://");
            if address.is_empty() || !address.contains(':') || address.contains('/') {
                return field("address", format!("{given:?} is not host:port"));
            }
            if given.contains("://") && !given.starts_with("https://") {
                return field("address", format!("{given:?}: only https:// is spoken"));
            }
        }
        // Empty: given on the command line (checked once the flags are applied).
        let name = &self.node_name;
        let name_ok = name.is_empty()
            || (name.len() <= 253
                && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'));
        if !name_ok {
            return field(
                "nodeName",
                format!(
                    "{:?}: lowercase letters, digits, '-' and '.', starting with a letter or digit",
                    self.node_name
                ),
            );
        }
        if !self.state_dir.is_absolute() {
            return field(
                "stateDir",
                format!("{} is not an absolute path", self.state_dir.display()),
            );
        }
        if self.server_name.is_empty() {
            return field("serverName", "must not be empty".into());
        }
        Ok(())
    }
}

/// The state the agent last applied from the control plane, if any was saved in `stateDir`.
pub fn load_last_applied(cfg: &ControlPlaneConfig) -> Option<RemoteState> {
    state::load(&cfg.state_dir)
}

/// Streams from the control plane until `updates` is closed (the agent is stopping). Failures
/// (the control plane unreachable, a refused certificate, a dropped stream) are logged and
/// retried with capped exponential backoff; only a bad configuration returns an error.
pub async fn run(
    cfg: ControlPlaneConfig,
    tunnel_address: Option<std::net::SocketAddr>,
    reports: watch::Receiver<Vec<ReportedWorkload>>,
    updates: mpsc::Sender<RemoteUpdate>,
) -> Result<(), ControlError> {
    cfg.validate()?;
    let dir_error = |source| ControlError::Read {
        file: cfg.state_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&cfg.state_dir).map_err(dir_error)?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(dir_error)?;
    std::fs::metadata(&cfg.ca_file).map_err(|source| ControlError::Read {
        file: cfg.ca_file.clone(),
        source,
    })?;
    tracing::info!(
        address = cfg.address,
        node = cfg.node_name,
        state_dir = %cfg.state_dir.display(),
        server_name = cfg.server_name,
        "control plane client starting"
    );
    client::Client::new(cfg, tunnel_address, reports, updates)
        .run()
        .await;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory.
    pub fn temp_dir(label: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ward-control-client-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn parse(text: &str) -> Result<ControlPlaneConfig, String> {
        let cfg: ControlPlaneConfig =
            ward_policy::yaml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn configuration_parses_with_defaults() {
        let cfg = parse("address: 10.0.0.1:7443\nnodeName: node-a\ncaFile: /etc/ward/ca.pem\nstateDir: /var/lib/ward/control\njoinTokenFile: /etc/ward/token\n")
            .expect("valid");
        assert_eq!(cfg.server_name, DEFAULT_SERVER_NAME);
        assert_eq!(cfg.join_token_file, Some(PathBuf::from("/etc/ward/token")));
    }

    #[test]
    fn bad_configuration_names_the_field() {
        let base = "caFile: /ca.pem\nstateDir: /s\n";
        let cases = [
            ("address: nope\nnodeName: a\n", "address"),
            ("address: 'http://a:1'\nnodeName: a\n", "address"),
            ("address: a:1\nnodeName: Node_A\n", "nodeName"),
            (
                "address: a:1\nnodeName: a\nstateDir: rel\ncaFile: /c\n",
                "stateDir",
            ),
            ("address: a:1\nnodeName: a\nnodeNmae: b\n", "nodeNmae"),
        ];
        for (text, field) in cases {
            let text = if text.contains("stateDir") {
                text.to_string()
            } else {
                format!("{text}{base}")
            };
            let e = parse(&text).expect_err(&text);
            assert!(e.contains(field), "{text:?} gave {e}");
        }
    }
}
