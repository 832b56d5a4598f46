//! ward's control plane: serves policy, identities, the IP cache, the trust bundle and (from a
//! Kubernetes cluster) workloads and Services to agents over one mTLS gRPC stream each, and signs
//! node certificates.
//!
//! [`run`] wires the parts: the CA and join tokens ([`ca`], [`tokens`]), the policy set read from
//! the policy directory and compiled before it is served ([`policy_set`]) and the directory's
//! watcher, the workload registry ([`registry`]), the versioned resource sets ([`resources`],
//! [`hub`]), the per-agent streams ([`session`]) and TLS ([`tls`]); with `--kubernetes`, the
//! cluster's watches ([`kubernetes`]) and the SERVICE resources built from them
//! ([`service_resources`]).
pub mod ca;
pub mod crd;
pub mod etcd_store;
pub mod history;
pub mod hub;
pub mod kubernetes;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod node_status;
pub mod policy_set;
pub mod registry;
pub mod replication;
pub mod resources;
pub mod revocation;
pub mod service;
pub mod service_resources;
pub mod session;
pub mod state_dir;
#[cfg(any(test, feature = "testing"))]
pub mod test_helpers;
pub mod tls;
pub mod token_review;
pub mod tokens;
pub mod webhook;

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use ward_host::watch::{every_entry, WatchError, Watcher};

use crate::{
    ca::Ca, hub::Hub, policy_set::NodeError, registry::Registry, service::ControlService,
    state_dir::StateDir, tls::ServingCert, tokens::JoinTokens,
};

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_NODE_CERT_LIFETIME: Duration = Duration::from_secs(3600);
pub const DEFAULT_WORKLOAD_CERT_LIFETIME: Duration = Duration::from_secs(3600);
pub const DEFAULT_NODE_LEASE: Duration = Duration::from_secs(3600);
pub const DEFAULT_NODE_CERT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// SHA-256 of `text`, in lowercase hexadecimal: how used join tokens are kept and policy sources
/// are recorded.
pub fn sha256_hex(data: impl AsRef<[u8]>) -> String {
    ring::digest::digest(&ring::digest::SHA256, data.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How long a shutdown waits for connections to close once every agent stream has been ended.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Options {
    pub policy_dir: PathBuf,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Where the CA's files are when not in `state_dir` (read only).
    pub ca_dir: Option<PathBuf>,
    /// Where /metrics, /healthz and /readyz are served.
    pub metrics_listen: Option<SocketAddr>,
    pub token_file: Option<PathBuf>,
    pub trust_domain: String,
    pub node_cert_lifetime: Duration,
    /// How long after its join a node's certificates may reach, renewals included.
    pub node_cert_max_age: Duration,
    /// Where each new policy history record is POSTed.
    pub history_webhook: Option<String>,
    /// Lifetime of the workload certificates `SignWorkload` issues.
    pub workload_cert_lifetime: Duration,
    /// Extra DNS names or addresses for the serving certificate.
    pub server_names: Vec<String>,
    /// A node without a stream for this long is removed with its workloads.
    pub node_lease: Duration,
    /// Read workloads, NetworkPolicies and Services from a Kubernetes cluster.
    pub kubernetes: Option<KubernetesOptions>,
    /// Share identities, nodes and spent join tokens with other replicas through etcd.
    pub etcd: Option<etcd_store::EtcdOptions>,
}

#[derive(Clone, Debug, Default)]
pub struct KubernetesOptions {
    /// `None`: in-cluster, else `KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// `<namespace>/<name>`: agents may join with this service account's tokens
    /// ([`token_review`]).
    pub agent_service_account: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    State(#[from] state_dir::StateDirError),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error(transparent)]
    Tokens(#[from] tokens::TokenError),
    #[error("policy history: {0}")]
    History(#[from] history::HistoryError),
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{file}: not a registry this control plane wrote: {source}")]
    Registry {
        file: PathBuf,
        source: serde_json::Error,
    },
    #[error("--trust-domain {0:?}: lowercase letters, digits, '-' and '.' only")]
    TrustDomain(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("revocation list refused, so as not to serve revoked certificates as valid: {0}")]
    Revocation(#[from] revocation::RevocationError),
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubernetesError),
    #[error("the shared store: {0}")]
    Store(#[from] etcd_store::StoreError),
    #[error("{0}: no CA here; with --etcd-endpoints every replica serves the same CA, which is not created at start: create it once with `ward-control init-ca --state-dir DIR --trust-domain TD` and give every replica the same ca.pem, ca-key.pem and trust-domain files (in --state-dir, or mounted at --ca-dir)")]
    NoSharedCa(PathBuf),
}

pub(crate) fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source works");
    u64::from_le_bytes(bytes)
}

fn check_trust_domain(td: &str) -> Result<(), ControlError> {
    let ok = !td.is_empty()
        && td.split('.').all(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(ControlError::TrustDomain(td.into()))
    }
}

/// Reads the policy directory and serves it if it is valid and compiles for every node of the
/// registry; logs every problem otherwise, and the previous set stays served.
fn load_policies(dir: &Path, hub: &Hub, reason: &str) {
    let started = Instant::now();
    let (workloads, generation) = hub.workload_infos();
    let read =
        policy_set::read(dir, &hub.cluster_documents()).and_then(|read| match policy_set::compile(
            &read.set, &workloads,
        ) {
            Ok(()) => Ok(read),
            Err(failed) => {
                let NodeError { node, error } = *failed;
                tracing::error!(
                    reason,
                    node,
                    "policy does not compile for the registered workloads"
                );
                Err(vec![error])
            }
        });
    match read {
        Ok(read) => {
            for warning in &read.set.warnings {
                tracing::warn!(reason, %warning, "policy warning");
            }
            let count = read.resources.len();
            let sources = read.sources.clone();
            let (previous, _) = hub.policies_and_workloads();
            match hub.set_policies(read) {
                Some(version) => {
                    tracing::info!(
                        reason,
                        policies = count,
                        %version,
                        read_ms = started.elapsed().as_secs_f64() * 1e3,
                        "policy set updated"
                    );
                    record_history(
                        hub,
                        reason,
                        version.to_string(),
                        count,
                        &sources,
                        dir,
                        &previous,
                    );
                }
                None => tracing::debug!(reason, "policy directory unchanged"),
            }
            if hub.registry_generation() != generation {
                // The registry changed while the set compiled, and its check may have seen the
                // previous set: check this one.
                hub.recheck_registry();
            }
        }
        Err(errors) => {
            for e in &errors {
                tracing::error!(reason, error = %e, "policy refused");
            }
            metrics::counters().policy_refusals.inc();
            tracing::error!(
                reason,
                errors = errors.len(),
                dir = %dir.display(),
                "policy directory refused whole; the previous policy set stays served"
            );
        }
    }
}

/// Compiles the served policy set again whenever the registry changes (coalescing bursts). A set
/// that no longer compiles for some node stays served: the registry reports what runs, and the
/// agent of that node refuses the update it cannot apply (NACK) and keeps enforcing what it has.
/// Each new error is logged once, and so is the set compiling again.
async fn recheck_policies(hub: Arc<Hub>) {
    let mut changes = hub.subscribe_registry();
    let mut failing: Option<String> = None;
    while changes.changed().await.is_ok() {
        let hub = hub.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let (set, nodes) = hub.policies_and_workloads();
            policy_set::compile(&set, &nodes)
        })
        .await;
        match checked {
            Ok(Ok(())) => {
                if failing.take().is_some() {
                    tracing::info!("the served policy set compiles again for every node");
                }
            }
            Ok(Err(failed)) => {
                let NodeError { node, error } = *failed;
                let text = format!("{node}: {error}");
                if failing.as_ref() != Some(&text) {
                    tracing::error!(
                        node,
                        %error,
                        "after a registry change the served policy set does not compile for this node; it stays served, and the node's agent refuses it and keeps what it enforces"
                    );
                    failing = Some(text);
                }
            }
            Err(e) => tracing::error!(error = %e, "compiling the served policy set failed"),
        }
    }
}

/// Watches every entry of the policy directory; failing here fails the start, so a typo in
/// --policy-dir is seen at once.
fn watch_policy_dir(dir: &Path) -> Result<Watcher, ControlError> {
    let mut watcher = Watcher::new()?;
    watcher.watch_dir(dir, every_entry)?;
    Ok(watcher)
}

/// Watches the revocation file (which need not exist yet).
fn watch_revocations(file: &Path) -> Result<Watcher, ControlError> {
    let mut watcher = Watcher::new()?;
    watcher.watch_file(file)?;
    Ok(watcher)
}

/// Reads the revocation file and serves it if it is valid; logs the problem otherwise, and the
/// list in force stays.
fn load_revocations(file: &Path, hub: &Hub, reason: &str) {
    match revocation::read(file) {
        Ok(revocations) => {
            apply_revocations(hub, REVOCATION_FILE, revocations, reason);
        }
        Err(e) => tracing::error!(
            reason,
            error = %e,
            revoked = hub.revoked().len(),
            "revocation file refused whole; the previous revocation list stays in force"
        ),
    }
}

/// Adds the set just served to the policy history, and logs the change with its access diff's
/// counts (one event a version; `ward-control show` prints the diff).
fn record_history(
    hub: &Hub,
    reason: &str,
    served: String,
    policies: usize,
    sources: &[history::SourceDigest],
    dir: &Path,
    previous: &ward_policy::PolicySet,
) {
    let (new, by_node) = hub.policies_and_workloads();
    let workloads: Vec<ward_policy::WorkloadInfo> = by_node.into_values().flatten().collect();
    // Computed before the history's lock is taken: other tasks read the history meanwhile.
    let diff = hub
        .with_history(|writer| writer.wants_diff())
        .unwrap_or(false)
        .then(|| history::diff(previous, &new, &workloads));
    let recorded = hub.with_history(|writer| {
        writer.record(&history::Served {
            reason,
            served,
            policies,
            sources,
            dir,
            diff,
        })
    });
    match recorded {
        None | Some(Ok(None)) => {}
        Some(Ok(Some(record))) => history::log_recorded(&record),
        Some(Err(e)) => {
            tracing::error!(reason, error = %e, "the policy history could not be written")
        }
    }
}

/// The revocations of the state directory's file, as [`apply_revocations`] names their source.
const REVOCATION_FILE: &str = "file";

/// Puts in force what `source` revokes now, with what the other sources revoke, and logs what
/// changed.
pub(crate) fn apply_revocations(
    hub: &Hub,
    source: &'static str,
    revocations: revocation::Revocations,
    reason: &str,
) {
    let revocations = hub.revocations_from(source, revocations);
    match hub.set_revoked(revocations.serials) {
        Some(change) => tracing::info!(
            reason,
            added = change.added,
            removed = change.removed,
            revoked = change.total,
            version = %change.version.map(|v| v.to_string()).unwrap_or_default(),
            "revocation list updated"
        ),
        None => tracing::debug!(reason, "revocation list unchanged"),
    }
    for node in hub.set_revoked_nodes(revocations.nodes) {
        tracing::warn!(
            reason,
            node,
            "node revoked: its stream ends, its renewals, workload certificates and joins are refused, and its workloads leave the IP cache"
        );
    }
}

/// Runs `load` on `path` after each burst of changes the watcher reports, until the watch ends;
/// `what` names the watched path in the log ("revocation file", "policy directory").
async fn follow(
    what: &'static str,
    path: PathBuf,
    mut watcher: Watcher,
    hub: Arc<Hub>,
    load: fn(&Path, &Hub, &str),
) {
    loop {
        match watcher.changed().await {
            Ok(()) => {}
            // The queue overflowed or reading failed: read again to be sure, once.
            Err(e @ WatchError::Events(_)) => {
                tracing::warn!(error = %e, "reading {what} events")
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "{what} watch ended; restart the control plane to follow changes");
                return;
            }
        }
        let (path, hub) = (path.clone(), hub.clone());
        let _ = tokio::task::spawn_blocking(move || load(&path, &hub, "file change")).await;
    }
}

/// Removes nodes gone for longer than `lease`, checking a few times per lease.
async fn expire_nodes(hub: Arc<Hub>, lease: Duration) {
    let period = (lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for node in hub.expire_nodes(lease) {
            tracing::info!(
                node,
                lease_s = lease.as_secs_f64(),
                "node removed: no stream for longer than its lease; its workloads leave the IP cache"
            );
        }
    }
}

/// Writes the registry after each change, coalescing bursts.
async fn persist_registry(hub: Arc<Hub>, state: StateDir) {
    let mut changes = hub.subscribe_registry();
    while changes.changed().await.is_ok() {
        let json = hub.registry_json();
        let state = state.clone();
        let written = tokio::task::spawn_blocking(move || {
            state.write_atomic(&state.registry(), json.as_bytes(), 0o600)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "saving the workload registry failed"),
            Err(e) => tracing::error!(error = %e, "saving the workload registry failed"),
        }
    }
}

/// Runs the control plane until `shutdown` completes. Prints `listening on <addr>` on stdout
/// once it accepts connections.
pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> Result<(), ControlError> {
    check_trust_domain(&opts.trust_domain)?;
    let state = StateDir::open(&opts.state_dir)?;
    let ca = match &opts.ca_dir {
        Some(dir) => Ca::load(dir, &opts.trust_domain, opts.node_cert_lifetime)?,
        None if opts.etcd.is_some() && !state.ca_key().exists() => {
            return Err(ControlError::NoSharedCa(state.ca_key()))
        }
        None => Ca::load_or_create(&state, &opts.trust_domain, opts.node_cert_lifetime)?,
    };
    let ca = Arc::new(
        ca.with_workload_cert_lifetime(opts.workload_cert_lifetime)
            .with_node_cert_max_age(opts.node_cert_max_age),
    );
    let store = match &opts.etcd {
        Some(etcd) => Some(etcd_store::EtcdStore::connect(etcd, &opts.trust_domain).await?),
        None => None,
    };
    // With a shared store, the registry is the store's (read by `replication::start`).
    let registry =
        match state.read(&state.registry())? {
            Some(text) if store.is_none() => Registry::from_json(&opts.trust_domain, &text)
                .map_err(|source| ControlError::Registry {
                    file: state.registry(),
                    source,
                })?,
            _ => Registry::new(&opts.trust_domain),
        };
    let mut tokens = JoinTokens::new(opts.token_file.as_deref(), &state)?;
    if let Some(store) = &store {
        tokens = tokens.shared(store.clone(), tokio::runtime::Handle::current());
    }
    let tokens = Arc::new(tokens);
    let hub = Arc::new(Hub::new(registry, ca.cert_pem(), random_u64()));
    if let Some(store) = store {
        replication::start(hub.clone(), store, opts.node_lease).await?;
    }
    let webhook = opts
        .history_webhook
        .as_deref()
        .map(webhook::Webhook::start)
        .transpose()?;
    let mut writer =
        history::Writer::open(state.path().join(history::HISTORY_FILE))?.with_webhook(webhook);
    if let Some(store) = hub.store() {
        writer = writer.shared(store.clone());
    }
    hub.keep_history(writer);
    let policy_watcher = watch_policy_dir(&opts.policy_dir)?;
    load_policies(&opts.policy_dir, &hub, "start");
    let watcher = tokio::spawn(follow(
        "policy directory",
        opts.policy_dir.clone(),
        policy_watcher,
        hub.clone(),
        load_policies,
    ));
    // Watch before reading, so a revocation written in between is not missed. A malformed file
    // fails the start: serving no revocations would silently readmit revoked certificates.
    let revocation_changes = watch_revocations(&state.revoked())?;
    apply_revocations(
        &hub,
        REVOCATION_FILE,
        revocation::read(&state.revoked())?,
        "start",
    );
    // Only the revocation file is followed: the state directory holds other files, written
    // often, whose changes are not the watcher's to report.
    let revocation_watcher = tokio::spawn(follow(
        "revocation file",
        state.revoked(),
        revocation_changes,
        hub.clone(),
        load_revocations,
    ));
    let mut reviewer = None;
    if opts.kubernetes.is_none() {
        // No cluster, no Services: an empty set, so an agent that held some from an earlier
        // control plane drops them. With a cluster the set waits for the first listing.
        hub.set_services(Default::default());
    }
    if let Some(k) = &opts.kubernetes {
        let client = kubernetes::client(k.kubeconfig.as_deref()).await?;
        reviewer = k
            .agent_service_account
            .as_deref()
            .map(|account| Arc::new(token_review::TokenReviewer::new(client.clone(), account)));
        hub.follow_cluster();
        let (dir, policy_hub) = (opts.policy_dir.clone(), hub.clone());
        let publish = move |documents| {
            policy_hub.set_cluster_documents(documents);
            load_policies(&dir, &policy_hub, "cluster change");
        };
        tokio::spawn(kubernetes::follow(
            client,
            hub.clone(),
            opts.trust_domain.clone(),
            publish,
        ));
    }
    let shared = hub.store().is_some();
    if !shared {
        tokio::spawn(persist_registry(hub.clone(), state.clone()));
    }
    tokio::spawn(node_status::persist(hub.clone(), state.clone()));
    tokio::spawn(recheck_policies(hub.clone()));
    tokio::spawn(expire_nodes(hub.clone(), opts.node_lease));

    if let Some(addr) = opts.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ControlError::Listen { addr, source })?;
        let hub = hub.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, hub).await {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        });
    }
    let listener = listener::bind(opts.listen).map_err(|source| ControlError::Listen {
        addr: opts.listen,
        source,
    })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ControlError::Listen {
            addr: opts.listen,
            source,
        })?;
    let mut names = vec!["localhost".to_string()];
    if !bound.ip().is_unspecified() {
        names.push(bound.ip().to_string());
    }
    names.extend(opts.server_names.iter().cloned());
    let serving = ServingCert::issue(&ca, names.clone(), SERVING_CERT_LIFETIME)?;
    tokio::spawn(serving.clone().keep_fresh(ca.clone()));
    let config = tls::server_config(&ca, serving)?;

    let service = ward_proto::control_server::ControlServer::new(
        ControlService::new(hub.clone(), ca.clone(), tokens).with_token_review(reviewer),
    )
    .max_decoding_message_size(limits::MAX_AGENT_MESSAGE_BYTES)
    .max_encoding_message_size(limits::MAX_SERVER_MESSAGE_BYTES);
    tracing::info!(
        listen = %bound,
        trust_domain = opts.trust_domain,
        policy_dir = %opts.policy_dir.display(),
        state_dir = %opts.state_dir.display(),
        token_file = ?opts.token_file,
        node_cert_lifetime_s = opts.node_cert_lifetime.as_secs(),
        node_cert_max_age_s = opts.node_cert_max_age.as_secs(),
        workload_cert_lifetime_s = opts.workload_cert_lifetime.as_secs(),
        revoked = hub.revoked().len(),
        store = if shared { "etcd" } else { "state directory" },
        node_lease_s = opts.node_lease.as_secs_f64(),
        server_names = ?names,
        identities = hub.len(ward_proto::ResourceType::Identity),
        addresses = hub.len(ward_proto::ResourceType::Ipcache),
        "control plane ready"
    );
    println!("listening on {bound}");
    // At shutdown every agent stream ends (agents reconnect elsewhere or later); connections
    // that still do not close are left behind after SHUTDOWN_GRACE.
    let (stopping, stopped) = tokio::sync::oneshot::channel();
    let closing_hub = hub.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: ending agent streams");
        closing_hub.close();
        let _ = stopping.send(());
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(16))
        .concurrency_limit_per_connection(32)
        .serve_with_incoming_shutdown(service, listener::incoming(listener, config), signal);
    let served = tokio::select! {
        served = server => served,
        () = async {
            if stopped.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(grace_s = SHUTDOWN_GRACE.as_secs(), "connections still open at the end of the shutdown grace; closing them");
            Ok(())
        }
    };
    watcher.abort();
    revocation_watcher.abort();
    if !shared {
        // The last registry change may still be queued for writing.
        let _ = state.write_atomic(&state.registry(), hub.registry_json().as_bytes(), 0o600);
    }
    served?;
    Ok(())
}

/// Parses `90s`, `30m`, `1h`, `2d` or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 90s, 30m or 1h"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{text:?}: unit must be s, m, h or d")),
    };
    if seconds == 0 {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn a_missing_policy_directory_is_an_error_naming_it() {
        let err = watch_policy_dir(Path::new("/nonexistent/ward-policy")).expect_err("missing");
        assert!(
            err.to_string().contains("/nonexistent/ward-policy"),
            "{err}"
        );
    }

    #[test]
    fn trust_domains_are_checked() {
        assert!(check_trust_domain("cluster.local").is_ok());
        assert!(check_trust_domain("Example.org").is_err());
        assert!(check_trust_domain("a..b").is_err());
    }
}
