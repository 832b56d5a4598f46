//! `ward run`: wires configuration, policy, the kernel datapath, the cgroup watcher, events, the
//! admin socket and metrics together, and owns reload and shutdown.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use agent_common::{
    map_names, IDENTITY_HOST, MAX_CGROUPS, MAX_IPCACHE, MAX_IPCACHE_PREFIXES, MAX_POLICY_ENTRIES,
};
use anyhow::{bail, Context as _};
use futures_util::StreamExt as _;
use inotify::{Inotify, WatchMask};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, watch},
};

use crate::{
    admin,
    cgroups::{self, CgroupTree, CgroupWatcher},
    config::{Config, HostAddresses},
    control::{self, RemoteState, RemoteUpdate, ReportedWorkload},
    events::{self, Names, SharedNames},
    flows::FlowHub,
    identity,
    kernel::{self, ApplyStats, Attachment, Datapath},
    metrics::{self, Metrics},
    paths,
    policy::{self, Compiled, RuleIds, WorkloadInfo},
    status::{PolicyStatus, Status, WorkloadStatus},
    tunnel::Tunnel,
};

pub struct RunOptions {
    pub config: PathBuf,
    pub keep_enforcing: bool,
    /// `--control-plane`: overrides `controlPlane.address`.
    pub control_plane: Option<String>,
}

/// Reads the configuration file, with the command line's control-plane address over the file's.
fn load_config(file: &Path, control_plane: Option<&str>) -> anyhow::Result<Config> {
    let mut config = Config::load(file)?;
    if let Some(address) = control_plane {
        config.override_control_plane_address(address)?;
    }
    Ok(config)
}

/// Everything derived from one configuration and its policy files, or, in control-plane mode,
/// from the configuration and the control plane's state.
struct Desired {
    config: Config,
    /// This node's workloads.
    workloads: Vec<WorkloadInfo>,
    /// Other nodes' workloads (control-plane mode): identities that rules may name as peers.
    peers: Vec<WorkloadInfo>,
    compiled: Arc<Compiled>,
    addresses: BTreeMap<[u8; 16], u32>,
}

impl Desired {
    /// `remote` is the control plane's state to enforce (in control-plane mode; `None` until
    /// the first update, which means no policy).
    fn build(
        config: Config,
        remote: Option<&RemoteState>,
        rule_ids: &mut RuleIds,
        documents: &mut policy::DocumentCache,
    ) -> anyhow::Result<Self> {
        let mut workloads = identity::workload_infos(&config)?;
        let mut peers = Vec::new();
        let set = match (&config.control_plane, remote) {
            (None, _) => policy::load(&config.policies)?,
            (Some(_), None) => policy::PolicySet::default(),
            (Some(_), Some(state)) => {
                peers = remote_identities(state, &mut workloads);
                policy::parse_documents_cached(
                    documents,
                    state
                        .policies
                        .iter()
                        .map(|(name, yaml)| (name.as_str(), yaml.as_str())),
                )?
            }
        };
        let compiled = policy::compile_with_peers(&set, &workloads, &peers, rule_ids)?;
        let mut addresses = address_identities(&config, &workloads)?;
        if let Some(state) = remote {
            for (address, identity) in &state.ipcache {
                // This host's own addresses and this node's workloads win.
                addresses
                    .entry(kernel::mapped(*address))
                    .or_insert(*identity);
            }
        }
        if config.tunnel.is_none() {
            if let Some(rule) = compiled.rules.values().find(|r| r.mtls) {
                tracing::warn!(policy = %rule.policy, rule = %rule.rule, "mtls: required, but this agent runs no tunnel (tunnel: in the configuration, with controlPlane:); connections that need it are refused");
            }
        }
        Ok(Desired {
            config,
            workloads,
            peers,
            compiled: Arc::new(compiled),
            addresses,
        })
    }

    /// Names for verdict lines: this node's workloads, other nodes' by SPIFFE ID.
    fn names(&self) -> Names {
        let all: Vec<WorkloadInfo> = self.peers.iter().chain(&self.workloads).cloned().collect();
        Names::new(&self.compiled, &all)
    }

    /// cgroup id → identity for the cgroups of this node's workloads.
    fn cgroup_identities(&self, tree: &CgroupTree) -> BTreeMap<u64, u32> {
        tree.iter()
            .filter_map(|(id, path)| {
                identity::workload_of_cgroup(&self.config, path)
                    .map(|i| (*id, self.workloads[i].identity))
            })
            .collect()
    }
}

/// Gives this node's workloads the control plane's numbers for their SPIFFE IDs (the same as the
/// local ones unless two IDs collided) and returns every other identity as a peer, with the
/// addresses the IP cache gives it.
fn remote_identities(state: &RemoteState, workloads: &mut [WorkloadInfo]) -> Vec<WorkloadInfo> {
    let mut local: std::collections::HashMap<String, Vec<usize>> = Default::default();
    for (i, w) in workloads.iter().enumerate() {
        local.entry(w.spiffe_id.clone()).or_default().push(i);
    }
    let mut addresses: std::collections::HashMap<u32, Vec<IpAddr>> = Default::default();
    for (address, identity) in &state.ipcache {
        addresses.entry(*identity).or_default().push(*address);
    }
    let mut peers = Vec::new();
    for remote in &state.identities {
        if let Some(indices) = local.get(&remote.spiffe_id) {
            for &i in indices {
                workloads[i].identity = remote.identity;
            }
            continue;
        }
        peers.push(WorkloadInfo {
            identity: remote.identity,
            name: remote.spiffe_id.clone(),
            spiffe_id: remote.spiffe_id.clone(),
            namespace: remote.namespace.clone(),
            labels: remote.labels.clone(),
            // The control plane does not distribute namespace labels or named ports yet: remote
            // peers match namespaceSelectors only by name, and named ports only locally.
            namespace_labels: Default::default(),
            ports: Vec::new(),
            addresses: addresses.remove(&remote.identity).unwrap_or_default(),
        });
    }
    peers
}

/// What this node reports to the control plane.
fn reported(workloads: &[WorkloadInfo]) -> Vec<ReportedWorkload> {
    workloads
        .iter()
        .map(|w| ReportedWorkload {
            name: w.name.clone(),
            spiffe_id: w.spiffe_id.clone(),
            namespace: w.namespace.clone(),
            labels: w.labels.clone(),
            addresses: w.addresses.clone(),
        })
        .collect()
}

/// The next update from the control plane; never, in local mode.
async fn next_update(updates: &mut Option<mpsc::Receiver<RemoteUpdate>>) -> Option<RemoteUpdate> {
    match updates {
        Some(updates) => updates.recv().await,
        None => std::future::pending().await,
    }
}

/// The IP cache: workload addresses name their workload; this host's own addresses name the host,
/// behind which the kernel tells workloads apart by their listening sockets.
fn address_identities(
    config: &Config,
    workloads: &[WorkloadInfo],
) -> anyhow::Result<BTreeMap<[u8; 16], u32>> {
    let host: Vec<IpAddr> = match &config.host_addresses {
        HostAddresses::List(list) => list.clone(),
        HostAddresses::Auto => nix::ifaddrs::getifaddrs()
            .context("listing this host's addresses")?
            .filter_map(|ifa| {
                let a = ifa.address?;
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect(),
    };
    let mut out: BTreeMap<[u8; 16], u32> = host
        .into_iter()
        .map(|a| (kernel::mapped(a), IDENTITY_HOST))
        .collect();
    for w in workloads {
        for a in &w.addresses {
            if out.get(&kernel::mapped(*a)) == Some(&IDENTITY_HOST) {
                tracing::warn!(workload = %w.name, address = %a, "address belongs to this host; the workload is told apart by its listening sockets instead");
                continue;
            }
            out.insert(kernel::mapped(*a), w.identity);
        }
    }
    Ok(out)
}

fn preflight() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("ward run loads kernel programs and needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); run it as root, e.g. with sudo");
    }
    // The tunnel holds two sockets per carried connection: use what the hard limit allows.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open file limit");
            }
        }
    }
    Ok(())
}

/// Whether a changed file in a watched directory is one the agent reads.
fn is_policy_or_config(name: Option<&std::ffi::OsStr>, config: &Config) -> bool {
    let Some(name) = name else { return false };
    config.file.file_name() == Some(name)
        || Path::new(name)
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml")
}

/// Watches the configuration file and every policy path for changes.
fn watch_files(config: &Config) -> std::io::Result<inotify::EventStream<Vec<u8>>> {
    let inotify = Inotify::init()?;
    let mask = WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE;
    let mut dirs: Vec<PathBuf> = config
        .policies
        .iter()
        .chain(std::iter::once(&config.file))
        .map(|p| match p.parent() {
            _ if p.is_dir() => p.clone(),
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        inotify.watches().add(&dir, mask)?;
    }
    inotify.into_event_stream(vec![0u8; 16 * 1024])
}

/// Signal handlers, installed before anything is attached so a signal at any time after start
/// takes the orderly way out.
struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// The running agent's state, owned by the main loop.
struct Agent {
    config_file: PathBuf,
    /// `--control-plane`, applied to every read of the configuration.
    control_plane_address: Option<String>,
    /// The control plane's state in force (control-plane mode), kept for reloads.
    remote: Option<RemoteState>,
    /// The control plane's policy documents as last parsed.
    documents: policy::DocumentCache,
    /// This node's workloads, as the control-plane client reports them.
    reports: Option<watch::Sender<Vec<ReportedWorkload>>>,
    cgroup_root: PathBuf,
    dp: Datapath,
    attachment: Attachment,
    desired: Desired,
    rule_ids: RuleIds,
    /// cgroup id → identity as the kernel has it.
    cgroups: BTreeMap<u64, u32>,
    names: SharedNames,
    metrics: Arc<Metrics>,
    last_apply: ApplyStats,
    last_error: Option<String>,
    /// The mTLS tunnel, when configured.
    tunnel: Option<Tunnel>,
}

impl Agent {
    /// Keeps the kernel's cgroup map equal to the workloads' cgroups in `tree`.
    fn sync_cgroups(&mut self, tree: &CgroupTree) -> anyhow::Result<()> {
        let desired = self.desired.cgroup_identities(tree);
        for (id, identity) in &desired {
            if self.cgroups.get(id) != Some(identity) {
                self.dp.set_cgroup(*id, *identity)?;
                tracing::debug!(cgroup_id = id, identity, "cgroup mapped");
            }
        }
        for id in self.cgroups.keys().filter(|id| !desired.contains_key(id)) {
            self.dp.remove_cgroup(*id)?;
        }
        self.cgroups = desired;
        self.metrics
            .set_map(map_names::CGROUPS, self.cgroups.len(), MAX_CGROUPS);
        Ok(())
    }

    fn record_apply(&mut self, stats: ApplyStats) {
        self.last_apply = stats;
        self.last_error = None;
        self.metrics
            .policy_apply_seconds
            .observe(stats.duration.as_secs_f64());
        self.metrics
            .policy_generation
            .set(i64::from(stats.generation));
        self.metrics
            .set_map(map_names::POLICY, stats.entries, MAX_POLICY_ENTRIES);
        self.metrics
            .set_map(map_names::IPCACHE, stats.addresses, MAX_IPCACHE / 2);
        self.metrics.set_map(
            map_names::IPCACHE_LPM,
            stats.prefixes,
            MAX_IPCACHE_PREFIXES / 2,
        );
    }

    fn reject(&mut self, reason: &str, error: String, what: &str) {
        tracing::error!(reason, error = %error, "{what}; the previous policy stays in force");
        self.metrics.policy_apply_failures.inc();
        self.last_error = Some(error);
    }

    /// Re-reads configuration and policy; applies all of it or nothing.
    fn reload(&mut self, reason: &str) -> anyhow::Result<()> {
        let built = load_config(&self.config_file, self.control_plane_address.as_deref()).and_then(
            |config| {
                let remote = self.remote.as_ref();
                Desired::build(config, remote, &mut self.rule_ids, &mut self.documents)
            },
        );
        let next = match built {
            Ok(next) => next,
            Err(e) => {
                self.reject(reason, format!("{e:#}"), "policy rejected");
                return Ok(());
            }
        };
        let current = &self.desired.config;
        if next.config.pin_dir != current.pin_dir
            || next.config.cgroup_root != current.cgroup_root
            || next.config.control_plane != current.control_plane
            || next.config.tunnel != current.tunnel
        {
            self.reject(
                reason,
                "pinDir, cgroupRoot, controlPlane and tunnel take effect only at restart".into(),
                "policy rejected",
            );
            return Ok(());
        }
        // A refusal is logged and counted by `install`; the agent keeps running.
        if self.install(next, reason)?.is_ok() {
            self.refresh_tunnel();
        }
        if let Some(reports) = &self.reports {
            let workloads = reported(&self.desired.workloads);
            reports.send_if_modified(|current| {
                let changed = *current != workloads;
                *current = workloads;
                changed
            });
        }
        Ok(())
    }

    /// Applies a state from the control plane, all of it or nothing, with the configuration in
    /// force. `Err` carries the reason for the NACK; the previous state stays.
    fn apply_remote(&mut self, state: RemoteState) -> anyhow::Result<Result<(), String>> {
        const REASON: &str = "control plane";
        let started = std::time::Instant::now();
        let config = self.desired.config.clone();
        let next = match Desired::build(
            config,
            Some(&state),
            &mut self.rule_ids,
            &mut self.documents,
        ) {
            Ok(next) => next,
            Err(e) => {
                let error = format!("{e:#}");
                self.reject(REASON, error.clone(), "policy rejected");
                return Ok(Err(error));
            }
        };
        let compiled_in = started.elapsed();
        let applied = self.install(next, REASON)?;
        if applied.is_ok() {
            tracing::info!(
                versions = ?state.versions,
                policies = state.policies.len(),
                identities = state.identities.len(),
                addresses = state.ipcache.len(),
                generation = self.last_apply.generation,
                compile_ms = compiled_in.as_secs_f64() * 1e3,
                total_ms = started.elapsed().as_secs_f64() * 1e3,
                "control plane state applied"
            );
            self.remote = Some(state);
            self.refresh_tunnel();
        }
        Ok(applied)
    }

    /// Gives the tunnel the state in force.
    fn refresh_tunnel(&mut self) {
        if let Some(tunnel) = &mut self.tunnel {
            tunnel.update(
                &self.desired.workloads,
                &self.desired.peers,
                self.desired.compiled.clone(),
                self.remote.as_ref(),
            );
        }
    }

    /// Writes `next` to the kernel and makes it the state in force; on a refusal by the kernel
    /// nothing changes and the reason is returned. `Err` only when the cgroup map cannot be
    /// brought in line afterwards.
    fn install(&mut self, next: Desired, reason: &str) -> anyhow::Result<Result<(), String>> {
        match self.dp.apply(&next.compiled, &next.addresses) {
            Err(e) => {
                let error = e.to_string();
                self.reject(reason, error.clone(), "policy rejected by the kernel");
                Ok(Err(error))
            }
            Ok(stats) => {
                *self.names.write().expect("names lock poisoned") = next.names();
                self.desired = next;
                self.record_apply(stats);
                self.sync_cgroups(&cgroups::scan(&self.cgroup_root)?)?;
                // After the sync, so that `deny` never meets a workload's cgroup unmapped.
                let unmapped = self.desired.config.unmapped_cgroups.kernel_value();
                self.dp.set_settings(&self.cgroup_root, unmapped)?;
                tracing::info!(
                    reason,
                    generation = stats.generation,
                    entries = stats.entries,
                    duration_ms = stats.duration.as_secs_f64() * 1e3,
                    "policy applied"
                );
                Ok(Ok(()))
            }
        }
    }

    fn status(&self) -> Status {
        let uname = nix::sys::utsname::uname().ok();
        let kernel = uname.map_or_else(
            || "unknown".into(),
            |u| u.release().to_string_lossy().into_owned(),
        );
        let config = &self.desired.config;
        let workloads = self
            .desired
            .workloads
            .iter()
            .map(|w| WorkloadStatus {
                name: w.name.clone(),
                spiffe_id: w.spiffe_id.clone(),
                identity: w.identity,
                cgroups: self
                    .cgroups
                    .values()
                    .filter(|id| **id == w.identity)
                    .count(),
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            kernel,
            kernel_features: kernel::features::probe().to_string(),
            pin_dir: config.pin_dir.display().to_string(),
            cgroup_root: self.cgroup_root.display().to_string(),
            attachment: format!("{:?}", self.attachment).to_lowercase(),
            programs: self.dp.programs(),
            policy: PolicyStatus {
                generation: self.last_apply.generation,
                entries: self.last_apply.entries,
                rules: self.desired.compiled.rules.len(),
                files: match &self.remote {
                    Some(remote) => remote
                        .policies
                        .iter()
                        .map(|(name, _)| format!("control plane: {name}"))
                        .collect(),
                    None => config
                        .policies
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect(),
                },
                last_applied: format!(
                    "{:.1} ms ago",
                    self.last_apply.at.elapsed().as_secs_f64() * 1e3
                ),
                last_error: self.last_error.clone(),
            },
            workloads,
            control_plane: match (&config.control_plane, &self.remote) {
                (None, _) => "none (local mode: configuration and policy files)".into(),
                (Some(cp), None) => format!(
                    "{} as node {}: nothing applied yet (no policy)",
                    cp.address, cp.node_name
                ),
                (Some(cp), Some(remote)) => format!(
                    "{} as node {}: applied {}",
                    cp.address,
                    cp.node_name,
                    remote
                        .versions
                        .iter()
                        .map(|(kind, version)| format!("{kind} {version}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            maps: self.dp.maps(
                self.last_apply.entries,
                self.last_apply.addresses,
                self.last_apply.prefixes,
                self.cgroups.len(),
            ),
        }
    }

    /// Reacts to signals, file changes, cgroup changes and admin requests until told to stop.
    async fn serve(
        &mut self,
        signals: Signals,
        mut status_requests: mpsc::Receiver<oneshot::Sender<Status>>,
        mut updates: Option<mpsc::Receiver<RemoteUpdate>>,
    ) -> anyhow::Result<()> {
        let mut watcher = CgroupWatcher::new(&self.cgroup_root).context("watching cgroups")?;
        self.sync_cgroups(&cgroups::scan(&self.cgroup_root)?)?;
        let mut files = watch_files(&self.desired.config).context("watching policy files")?;
        let Signals {
            mut hangup,
            mut terminate,
            mut interrupt,
        } = signals;
        loop {
            tokio::select! {
                _ = hangup.recv() => self.reload("SIGHUP")?,
                Some(Ok(event)) = files.next() => {
                    if is_policy_or_config(event.name.as_deref(), &self.desired.config) {
                        // Editors write in several steps; settle, then take everything at once.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        while tokio::time::timeout(Duration::from_millis(1), files.next()).await.is_ok() {}
                        self.reload("file change")?;
                    }
                }
                tree = watcher.changed() => self.sync_cgroups(&tree.context("watching cgroups")?)?,
                Some(reply) = status_requests.recv() => {
                    let _ = reply.send(self.status());
                }
                Some(update) = next_update(&mut updates) => {
                    let result = self.apply_remote(update.state)?;
                    // Ok is ACKed, Err(reason) NACKed; the client waits for the answer.
                    let _ = update.ack.send(result);
                }
                _ = terminate.recv() => return Ok(()),
                _ = interrupt.recv() => return Ok(()),
            }
        }
    }
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    preflight()?;
    let signals = Signals::install()?;
    let mut rule_ids = RuleIds::default();
    let mut documents = policy::DocumentCache::default();
    let config = load_config(&opts.config, opts.control_plane.as_deref())?;
    // In control-plane mode, what was last applied is enforced from the start, so an agent
    // restarted while the control plane is away keeps its policy.
    let mut remote = config
        .control_plane
        .as_ref()
        .and_then(control::load_last_applied);
    let desired = match Desired::build(
        config.clone(),
        remote.as_ref(),
        &mut rule_ids,
        &mut documents,
    ) {
        Ok(desired) => desired,
        Err(e) if remote.is_some() => {
            tracing::error!(error = format!("{e:#}"), "the last applied control-plane state does not compile; starting without policy until the control plane sends one");
            remote = None;
            Desired::build(config, None, &mut rule_ids, &mut documents)?
        }
        Err(e) => return Err(e),
    };
    if let Some(state) = &remote {
        tracing::info!(versions = ?state.versions, policies = state.policies.len(), addresses = state.ipcache.len(), "enforcing the last applied control-plane state");
    }
    let config = desired.config.clone();
    let cgroup_root = paths::cgroup_root(config.cgroup_root.as_deref())?;
    let features = kernel::features::probe();
    tracing::info!(
        config = %config.file.display(),
        cgroup_root = %cgroup_root.display(),
        pin_dir = %config.pin_dir.display(),
        admin_socket = %config.admin_socket.display(),
        workloads = config.workloads.len(),
        policies = ?config.policies,
        kernel = %features,
        "starting"
    );
    let missing = features.missing();
    if !missing.is_empty() {
        bail!(
            "this kernel (Linux {}) lacks what ward needs: {}; ward needs Linux {} or later with BPF, cgroup BPF and BTF",
            features.release,
            missing.join(", "),
            kernel::features::MINIMUM_KERNEL
        );
    }
    let mut dp = Datapath::load(&config.pin_dir)?;
    let stats = dp.apply(&desired.compiled, &desired.addresses)?;
    let hub = Arc::new(FlowHub::new(config.flow_log.as_deref()).context("opening the flow log")?);
    let metrics = Arc::new(Metrics::new(Some(dp.take_counters()?)));
    let names: SharedNames = Arc::new(RwLock::new(desired.names()));
    let mut agent = Agent {
        config_file: opts.config.clone(),
        control_plane_address: opts.control_plane.clone(),
        remote,
        documents,
        reports: None,
        cgroup_root: cgroup_root.clone(),
        attachment: Attachment::Attached,
        desired,
        rule_ids,
        cgroups: dp.cgroup_ids().into_iter().map(|id| (id, 0)).collect(),
        names: names.clone(),
        metrics: metrics.clone(),
        last_apply: stats,
        last_error: None,
        tunnel: None,
        dp,
    };
    agent.record_apply(stats);
    // The connect hook knows where the tunnel listens before it is attached.
    match (&config.tunnel, &config.control_plane) {
        (Some(settings), Some(cp)) => {
            let tunnel = Tunnel::start(
                settings.clone(),
                cp,
                &config.trust_domain,
                &config.pin_dir,
                hub.clone(),
            )
            .await?;
            agent.tunnel = Some(tunnel);
            agent.refresh_tunnel();
        }
        _ => kernel::tunnel::TunnelMaps::open(&config.pin_dir)?.set_outbound(None)?,
    }
    // Maps are complete before the programs see the first packet.
    agent
        .dp
        .set_settings(&cgroup_root, config.unmapped_cgroups.kernel_value())?;
    agent.sync_cgroups(&cgroups::scan(&cgroup_root)?)?;
    agent.attachment = agent.dp.attach(&cgroup_root)?;

    let ring = agent.dp.take_events()?;
    let (event_hub, event_metrics) = (hub.clone(), metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = events::run(ring, names, event_hub, event_metrics).await {
            tracing::error!(error = %e, "reading verdict events stopped");
        }
    });
    let (status_tx, status_rx) = mpsc::channel(8);
    let admin_listener = admin::bind(&config.admin_socket)
        .with_context(|| format!("binding the admin socket {}", config.admin_socket.display()))?;
    tokio::spawn(admin::serve(admin_listener, hub, status_tx));
    if let Some(addr) = config.metrics_address {
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, metrics).await {
                tracing::error!(%addr, error = %e, "metrics endpoint stopped");
            }
        });
    }
    tracing::info!(
        attachment = ?agent.attachment,
        generation = stats.generation,
        entries = stats.entries,
        addresses = stats.addresses,
        prefixes = stats.prefixes,
        cgroups = agent.cgroups.len(),
        "ready: enforcing"
    );

    let tunnel_address = config.tunnel.as_ref().map(|t| t.advertise);
    let updates = config.control_plane.clone().map(|cp_config| {
        let (reports_tx, reports_rx) = watch::channel(reported(&agent.desired.workloads));
        let (updates_tx, updates_rx) = mpsc::channel::<RemoteUpdate>(1);
        agent.reports = Some(reports_tx);
        // Retries everything itself with backoff; returns when the agent stops, or at once on a
        // bad configuration, which leaves the agent enforcing what it has.
        tokio::spawn(async move {
            if let Err(e) = control::run(cp_config, tunnel_address, reports_rx, updates_tx).await {
                tracing::error!(error = %e, "control plane client stopped");
            }
        });
        updates_rx
    });

    let served = agent.serve(signals, status_rx, updates).await;
    let _ = std::fs::remove_file(&config.admin_socket);
    if let Some(dir) = config.admin_socket.parent() {
        // Only if empty: the directory may be shared with other files.
        let _ = std::fs::remove_dir(dir);
    }
    if opts.keep_enforcing {
        tracing::info!(pin_dir = %config.pin_dir.display(), "stopping; programs stay attached and keep enforcing the last policy");
    } else {
        agent.dp.detach_and_unpin().context("detaching")?;
        tracing::info!("stopped; programs detached and pins removed");
    }
    served
}

/// `ward uninstall`: removes everything an agent left pinned.
pub fn uninstall(pin_dir: &Path) -> anyhow::Result<()> {
    preflight()?;
    if !pin_dir.exists() {
        println!("nothing pinned at {}", pin_dir.display());
        return Ok(());
    }
    let dp = Datapath::load(pin_dir)?;
    dp.detach_and_unpin()
        .with_context(|| format!("removing {}", pin_dir.display()))?;
    println!(
        "removed ward's programs, links and maps from {}",
        pin_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use agent_common::{DIRECTION_EGRESS, PROTO_TCP, VERDICT_ALLOW, VERDICT_DENY};

    use super::*;
    use crate::control::RemoteState;

    const CONFIG: &str = "trustDomain: x.test\nhostAddresses: [10.0.0.254]\ncontrolPlane: {address: '10.0.0.10:7443', nodeName: node-a, caFile: ca.pem, stateDir: /s}\nworkloads:\n  - {name: client, labels: {app: client}, addresses: [10.0.0.1]}\n";
    const EGRESS: &str = "apiVersion: ward.dev/v1\nkind: Policy\nmetadata:\n  name: client-egress\nspec:\n  selector:\n    labels: {app: client}\n  egress:\n    - to: [{labels: {app: db}}]\n      ports: [{port: 5432}]\n";

    fn config() -> Config {
        Config::parse(Path::new("/etc/ward/ward.yaml"), CONFIG).expect("valid configuration")
    }

    fn identity(spiffe_id: &str, identity: u32, app: &str) -> crate::control::RemoteIdentity {
        crate::control::RemoteIdentity {
            spiffe_id: spiffe_id.into(),
            identity,
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            namespace: None,
        }
    }

    fn state(policy: &str) -> RemoteState {
        let ip = |a: &str| a.parse::<IpAddr>().expect("address");
        RemoteState {
            policies: vec![("client-egress".into(), policy.into())],
            identities: vec![
                identity("spiffe://x.test/workload/client", 4242, "client"),
                identity("spiffe://x.test/workload/db", 777, "db"),
            ],
            ipcache: vec![
                (ip("10.0.0.1"), 4242),
                (ip("10.0.0.2"), 777),
                (ip("10.0.0.254"), 777),
            ],
            ..RemoteState::default()
        }
    }

    #[test]
    fn a_remote_state_gives_identities_peers_and_the_ip_cache() {
        let desired = Desired::build(
            config(),
            Some(&state(EGRESS)),
            &mut RuleIds::new(),
            &mut Default::default(),
        )
        .expect("compiles");
        assert_eq!(
            desired.workloads[0].identity, 4242,
            "the control plane's number"
        );
        assert_eq!(desired.peers.len(), 1);
        assert!(
            desired.peers[0]
                .addresses
                .contains(&"10.0.0.2".parse::<IpAddr>().expect("ip")),
            "a peer has its addresses from the IP cache, for CIDR rules"
        );
        let decide = |remote| {
            desired
                .compiled
                .decide(4242, remote, DIRECTION_EGRESS, PROTO_TCP, 5432)
                .verdict
        };
        assert_eq!(decide(777), VERDICT_ALLOW, "db on another node is a peer");
        assert_eq!(decide(778), VERDICT_DENY);
        let at = |a: &str| {
            desired
                .addresses
                .get(&kernel::mapped(a.parse().expect("ip")))
                .copied()
        };
        assert_eq!(at("10.0.0.2"), Some(777));
        assert_eq!(at("10.0.0.1"), Some(4242));
        assert_eq!(
            at("10.0.0.254"),
            Some(IDENTITY_HOST),
            "this host's address stays the host"
        );
    }

    #[test]
    fn a_remote_policy_that_does_not_compile_is_an_error_naming_it() {
        let bad = EGRESS.replace("ports:", "bogus: 1\n      ports:");
        let e = Desired::build(
            config(),
            Some(&state(&bad)),
            &mut RuleIds::new(),
            &mut Default::default(),
        )
        .err()
        .expect("refused");
        let text = format!("{e:#}");
        assert!(
            text.contains("client-egress") && text.contains("bogus"),
            "{text}"
        );
    }

    #[test]
    fn control_plane_mode_without_a_state_has_no_policy() {
        let desired = Desired::build(config(), None, &mut RuleIds::new(), &mut Default::default())
            .expect("builds");
        assert!(desired.compiled.entries.is_empty());
        assert!(desired.peers.is_empty());
    }
}
