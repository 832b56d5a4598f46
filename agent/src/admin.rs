//! The local admin socket: `ward status`, `ward flows` and `ward log-level` talk to the running agent
//! over a Unix socket that serves root only, one JSON request per connection.
use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    flows::{FlowFilter, FlowHub},
    logging,
    status::Status,
};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    Flows { follow: bool, filter: FlowFilter },
    LogLevel { level: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The enforcer answers status requests; it owns the datapath.
pub type StatusRequests = mpsc::Sender<oneshot::Sender<Status>>;

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, hub: Arc<FlowHub>, status: StatusRequests) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                continue;
            }
        };
        let (hub, status) = (hub.clone(), status.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, hub, status).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

async fn write_json<T: Serialize>(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    value: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn handle(
    stream: UnixStream,
    hub: Arc<FlowHub>,
    status: StatusRequests,
) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    // Read the request even when refusing, so the client is never cut off mid-write.
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    if uid != 0 {
        tracing::warn!(uid, "admin request from a non-root user refused");
        let refusal = Reply {
            ok: false,
            error: Some("permission denied: the admin socket serves root only".into()),
        };
        return write_json(&mut write, &refusal).await;
    }
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            return write_json(
                &mut write,
                &Reply {
                    ok: false,
                    error: Some(format!("bad request: {e}")),
                },
            )
            .await
        }
    };
    match request {
        Request::Status => {
            let (tx, rx) = oneshot::channel();
            status
                .send(tx)
                .await
                .map_err(|_| std::io::Error::other("agent is stopping"))?;
            let s = rx
                .await
                .map_err(|_| std::io::Error::other("agent is stopping"))?;
            write_json(&mut write, &s).await
        }
        Request::LogLevel { level } => {
            let reply = match logging::set_level(&level) {
                Ok(()) => Reply {
                    ok: true,
                    error: None,
                },
                Err(e) => Reply {
                    ok: false,
                    error: Some(e),
                },
            };
            write_json(&mut write, &reply).await
        }
        Request::Flows { follow, filter } => {
            // Subscribe before reading history so nothing falls between the two.
            let mut live = hub.subscribe();
            for r in hub.recent(&filter) {
                write_json(&mut write, &r).await?;
            }
            if !follow {
                return Ok(());
            }
            loop {
                match live.recv().await {
                    Ok(r) if filter.matches(&r) => write_json(&mut write, &r).await?,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(
                            skipped = n,
                            "a slow `ward flows --follow` client skipped records"
                        );
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                }
            }
        }
    }
}

/// Client side: sends one request and returns a reader over the reply lines.
pub async fn request(
    path: &Path,
    request: &Request,
) -> anyhow::Result<tokio::io::Lines<BufReader<UnixStream>>> {
    use anyhow::Context as _;
    let mut stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach the agent at {} (is `ward run` running, and are you root?)",
            path.display()
        )
    })?;
    write_json(&mut stream, request).await?;
    Ok(BufReader::new(stream).lines())
}
