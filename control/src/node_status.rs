//! Which policy version each node enforces: `<state-dir>/status.json`, rewritten (atomically) by
//! the running control plane whenever what it serves, what an agent acknowledges or a node's
//! stream changes, and read by `ward-control status`, which lists the nodes that lag.
use std::{path::Path, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{hub::Hub, state_dir::StateDir};

/// The status file's name in the state directory.
pub const STATUS_FILE: &str = "status.json";
/// Changes closer together than this are written once.
const COALESCE: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// When the control plane wrote this (UTC); the file says nothing of later moments.
    pub time: String,
    /// The POLICY version served, and its number in the policy history.
    pub served: Option<String>,
    pub served_history_version: Option<u64>,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    /// Whether its agent has a stream to this replica now.
    pub connected: bool,
    /// Known from the shared store, whose record says what it enforces: another replica holds
    /// its stream, or held it less than a node lease ago.
    #[serde(default)]
    pub elsewhere: bool,
    /// The POLICY version its agent last said it enforces (`None`: it holds none of this
    /// control plane's), and its number in the policy history when known.
    pub enforces: Option<String>,
    pub enforces_history_version: Option<u64>,
    /// Not enforcing what is served.
    pub lagging: bool,
}

/// The status now.
pub fn of(hub: &Hub) -> Status {
    let (served, nodes) = hub.node_status();
    let history = |version: &Option<String>| {
        version
            .as_deref()
            .and_then(|v| hub.with_history(|w| w.version_of(v)).flatten())
    };
    let served_version = history(&served);
    Status {
        time: time::OffsetDateTime::now_utc().to_string(),
        served_history_version: served_version,
        nodes: nodes
            .into_iter()
            .map(|n| NodeStatus {
                lagging: match n.elsewhere {
                    true => n.history_version != served_version,
                    false => n.policy != served,
                },
                enforces_history_version: n.history_version.or_else(|| history(&n.policy)),
                node: n.node,
                connected: n.connected,
                elsewhere: n.elsewhere,
                enforces: n.policy,
            })
            .collect(),
        served,
    }
}

/// Keeps the status file current until the hub goes.
pub async fn persist(hub: Arc<Hub>, state: StateDir) {
    let (mut status, mut served) = hub.subscribe_status();
    loop {
        let json = serde_json::to_vec_pretty(&of(&hub)).expect("a status serializes");
        let (state_dir, file) = (state.clone(), state.path().join(STATUS_FILE));
        let written =
            tokio::task::spawn_blocking(move || state_dir.write_atomic(&file, &json, 0o644)).await;
        if let Ok(Err(e)) = written {
            tracing::warn!(error = %e, "writing the node status failed");
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            changed = served.changed() => if changed.is_err() { return },
        }
        tokio::time::sleep(COALESCE).await;
        status.mark_unchanged();
        served.mark_unchanged();
    }
}

/// Reads the status file of `state_dir`.
pub fn read(state_dir: &Path) -> Result<Status, String> {
    let file = state_dir.join(STATUS_FILE);
    let text = std::fs::read_to_string(&file).map_err(|e| {
        format!(
            "{}: {e} (written by a running ward-control with this --state-dir)",
            file.display()
        )
    })?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))
}

/// `ward-control status`'s text: what is served, each node, then the nodes that lag.
pub fn table(status: &Status) -> String {
    let number = |n: Option<u64>| n.map_or("-".to_owned(), |n| n.to_string());
    let mut out = format!(
        "as of {}: serving policy version {} ({})\n{:<24} {:<9} {:>8}  {}\n",
        status.time,
        number(status.served_history_version),
        status.served.as_deref().unwrap_or("nothing yet"),
        "node",
        "connected",
        "enforces",
        "lagging"
    );
    for n in &status.nodes {
        out += &format!(
            "{:<24} {:<9} {:>8}  {}\n",
            n.node,
            match (n.connected, n.elsewhere) {
                (true, _) => "yes",
                (false, true) => "elsewhere",
                (false, false) => "no",
            },
            number(n.enforces_history_version),
            if n.lagging { "yes" } else { "no" }
        );
    }
    let lagging: Vec<&str> = status
        .nodes
        .iter()
        .filter(|n| n.lagging)
        .map(|n| n.node.as_str())
        .collect();
    out += &match lagging.is_empty() {
        true => "no node lags\n".to_owned(),
        false => format!("lagging: {}\n", lagging.join(" ")),
    };
    out
}
