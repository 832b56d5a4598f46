//! The enforcer: owns the kernel datapath and the state in force, and keeps the two equal. It
//! reloads configuration and policy, applies the control plane's states (ACK or NACK), maps
//! workload cgroups and answers status requests.
//!
//! Compiling policy and writing maps take from milliseconds to seconds (a 100,000-entry apply
//! writes and deletes every entry once and sleeps while the kernel switches generations). So the
//! enforcer's loop runs on its own OS thread, `ward-state`, with a current-thread tokio runtime
//! of its own for its inputs: the cgroup and file watchers it creates there, and channels from
//! the rest of the agent (reload commands from signals, status requests from the admin socket,
//! updates from the control-plane client, each answered on a oneshot). The runtime that serves
//! the tunnel's connections, the admin socket, metrics and events never runs an apply and never
//! waits for one: a caller that needs the enforcer's answer awaits a channel. The generation
//! writer's sleep blocks only this thread, whose inputs wait for the apply anyway. One thread
//! owning all kernel writes also keeps applies in order without locks.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use agent_common::{map_names, MAX_CGROUPS, MAX_IPCACHE, MAX_IPCACHE_PREFIXES, MAX_POLICY_ENTRIES};
use anyhow::{bail, Context as _};
use tokio::sync::{mpsc, oneshot, watch};
use ward_host::watch::{WatchError, Watcher};

use crate::{
    cgroups::{self, CgroupTree, CgroupWatcher},
    config::{Config, RunFlags},
    control::{self, RemoteState, RemoteUpdate, ReportedWorkload},
    desired::{load_config, reported, Desired},
    dns::DnsProxy,
    events::SharedNames,
    kernel::{self, ApplyStats, Attachment, Datapath, VerdictMaps},
    metrics::Metrics,
    paths,
    policy::{self, RuleIds},
    status::{PolicyStatus, Status, WorkloadStatus},
    tunnel::Tunnel,
};

/// The next update from the control plane; never, in local mode.
async fn next_update(updates: &mut Option<mpsc::Receiver<RemoteUpdate>>) -> Option<RemoteUpdate> {
    match updates {
        Some(updates) => updates.recv().await,
        None => std::future::pending().await,
    }
}

/// Whether the configuration file or a policy file (a policy path, or a policy file in a policy
/// directory) was modified at or after `since`; a file that cannot be read counts as changed.
fn modified_since(config: &Config, since: SystemTime) -> bool {
    let newer = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_or(true, |modified| modified >= since)
    };
    newer(&config.file)
        || config.policies.iter().any(|path| {
            if !path.is_dir() {
                return newer(path);
            }
            newer(path)
                || std::fs::read_dir(path).map_or(true, |entries| {
                    entries.flatten().any(|entry| {
                        policy::load::is_policy_file(&entry.file_name()) && newer(&entry.path())
                    })
                })
        })
}

/// Watches the configuration file and every policy path (a file, or a directory's policy files):
/// writes, replacements, moves in and out, and a ConfigMap volume's `..data` swap.
fn watch_files(config: &Config) -> Result<Watcher, WatchError> {
    let mut watcher = Watcher::new()?;
    watcher.watch_file(&config.file)?;
    for path in &config.policies {
        watcher.watch_path(path, policy::load::is_policy_file)?;
    }
    Ok(watcher)
}

/// What the enforcer is asked to do besides its own inputs.
pub enum Command {
    /// Re-read configuration and policy (the reason is logged).
    Reload(&'static str),
}

/// The enforcer's inputs from the rest of the agent. Dropping the command sender stops it.
pub struct Inputs {
    pub commands: mpsc::Receiver<Command>,
    pub status_requests: mpsc::Receiver<oneshot::Sender<Status>>,
    /// Control-plane mode: the client's updates, each ACKed or NACKed.
    pub updates: Option<mpsc::Receiver<RemoteUpdate>>,
}

/// The running agent's state, owned by the enforcer's loop.
pub struct Enforcer {
    config_file: PathBuf,
    /// When start-up began reading the configuration and policy: a file modified since, before
    /// the watch began, is read again.
    read_at: SystemTime,
    /// `--control-plane`, applied to every read of the configuration.
    run_flags: RunFlags,
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
    /// The DNS proxy of DNS-aware egress.
    dns: Option<DnsProxy>,
    /// The cgroup tree as last scanned.
    tree: CgroupTree,
}

impl Enforcer {
    /// Start-up up to the first apply: reads the configuration, builds the desired state (in
    /// control-plane mode from the state last applied), loads the programs and writes the first
    /// generation. Blocking; nothing is attached yet.
    pub fn start(config_file: PathBuf, run_flags: RunFlags) -> anyhow::Result<Self> {
        let read_at = SystemTime::now();
        let mut rule_ids = RuleIds::default();
        let mut documents = policy::DocumentCache::default();
        let config = load_config(&config_file, &run_flags)?;
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
        let config = &desired.config;
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
        let stats = dp.apply(desired.target())?;
        let metrics = Arc::new(Metrics::new(Some(dp.take_counters()?)));
        let mut enforcer = Enforcer {
            config_file,
            read_at,
            run_flags,
            remote,
            documents,
            reports: None,
            cgroup_root,
            attachment: Attachment::Attached,
            names: Arc::new(RwLock::new(desired.names())),
            desired,
            rule_ids,
            cgroups: dp.cgroup_ids().into_iter().map(|id| (id, 0)).collect(),
            metrics,
            last_apply: stats,
            last_error: None,
            tunnel: None,
            dns: None,
            tree: CgroupTree::new(),
            dp,
        };
        enforcer.record_apply(stats);
        Ok(enforcer)
    }

    /// The rest of start-up: gives the connect hook the tunnel (or none), has the DNS proxy's
    /// learned addresses follow the policy generations, completes the maps and attaches the
    /// programs. Returns the verdict events' ring. Blocking.
    pub fn attach(&mut self, tunnel: Option<Tunnel>, dns: DnsProxy) -> anyhow::Result<VerdictMaps> {
        self.dp.follow_generations(dns.learned());
        self.dns = Some(dns);
        // The connect hook knows where the tunnel listens before it is attached.
        match tunnel {
            Some(tunnel) => {
                self.tunnel = Some(tunnel);
                self.refresh_tunnel();
            }
            None => kernel::tunnel::TunnelMaps::open(&self.desired.config.pin_dir)?
                .set_outbound(None)?,
        }
        // Maps are complete before the programs see the first packet.
        let unmapped = self.desired.config.unmapped_cgroups.kernel_value();
        self.dp.set_settings(&self.cgroup_root, unmapped)?;
        self.sync_cgroups(&cgroups::scan(&self.cgroup_root)?)?;
        self.attachment = self.dp.attach(&self.cgroup_root)?;
        Ok(self.dp.take_verdicts()?)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.desired.config
    }

    /// Names for verdict lines, replaced at every apply.
    pub fn names(&self) -> SharedNames {
        self.names.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// This node's workloads as the control-plane client reports them, kept current.
    pub fn reports(&mut self) -> watch::Receiver<Vec<ReportedWorkload>> {
        let (reports_tx, reports_rx) = watch::channel(reported(
            &self.desired.workloads,
            &self.tunnel.as_ref().map(Tunnel::in_pod).unwrap_or_default(),
        ));
        self.reports = Some(reports_tx);
        reports_rx
    }

    fn log_ready(&self) {
        let stats = self.last_apply;
        tracing::info!(
            attachment = ?self.attachment,
            generation = stats.generation,
            entries = stats.entries,
            addresses = stats.addresses,
            prefixes = stats.prefixes,
            frontends = stats.frontends,
            cgroups = self.cgroups.len(),
            "ready: enforcing"
        );
    }

    /// Stops enforcing: removes the links (detaching the programs) and the pinned maps.
    pub fn detach_and_unpin(self) -> std::io::Result<()> {
        self.dp.detach_and_unpin()
    }

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
        self.tree = tree.clone();
        self.place_workloads();
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
        let started = std::time::Instant::now();
        let built = load_config(&self.config_file, &self.run_flags).and_then(|config| {
            let remote = self.remote.as_ref();
            Desired::build(config, remote, &mut self.rule_ids, &mut self.documents)
        });
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
        if self.install(next, reason, started.elapsed())?.is_ok() {
            self.refresh_tunnel();
        }
        self.send_reports();
        Ok(())
    }

    /// Tells the control-plane client this node's workloads, if they changed.
    fn send_reports(&self) {
        if let Some(reports) = &self.reports {
            let in_pod = self.tunnel.as_ref().map(Tunnel::in_pod).unwrap_or_default();
            let workloads = reported(&self.desired.workloads, &in_pod);
            reports.send_if_modified(|current| {
                let changed = *current != workloads;
                *current = workloads;
                changed
            });
        }
    }

    /// Gives the tunnel where each local workload's processes run now: workloads in network
    /// namespaces of their own get tunnel listeners inside them. The control plane is told when
    /// that changes, so peers reach those workloads at their own addresses.
    fn place_workloads(&mut self) {
        if self.tunnel.is_none() && self.dns.is_none() {
            return;
        }
        let placements = self.desired.placements(&self.tree, &self.cgroup_root);
        if let Some(dns) = &mut self.dns {
            dns.place(&placements);
        }
        if self.tunnel.as_mut().is_some_and(|t| t.place(&placements)) {
            self.send_reports();
        }
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
        let applied = self.install(next, REASON, compiled_in)?;
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

    /// Writes `next` (read and compiled in `compiled_in`) to the kernel and makes it the state in
    /// force; on a refusal by the kernel nothing changes and the reason is returned. `Err` only
    /// when the cgroup map cannot be brought in line afterwards.
    fn install(
        &mut self,
        next: Desired,
        reason: &str,
        compiled_in: std::time::Duration,
    ) -> anyhow::Result<Result<(), String>> {
        match self.dp.apply(next.target()) {
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
                    written = stats.written,
                    removed = stats.removed,
                    entries = stats.entries,
                    frontends = stats.frontends,
                    switched = stats.switched,
                    compile_ms = compiled_in.as_secs_f64() * 1e3,
                    enforced_ms = stats.enforced_after.as_secs_f64() * 1e3,
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
            maps: self.dp.maps(&self.last_apply, self.cgroups.len()),
        }
    }

    /// Runs the loop on its own thread, `ward-state`, until the command sender is dropped or the
    /// loop fails; the enforcer comes back with how the loop ended, for shutdown.
    pub fn spawn(
        mut self,
        inputs: Inputs,
    ) -> std::io::Result<oneshot::Receiver<(Enforcer, anyhow::Result<()>)>> {
        let (done_tx, done_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("ward-state".into())
            .spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the enforcer's runtime")
                    .and_then(|runtime| runtime.block_on(self.serve(inputs)));
                let _ = done_tx.send((self, served));
            })?;
        Ok(done_rx)
    }

    /// Reacts to commands, file changes, cgroup changes, admin requests and control-plane
    /// updates until the command sender is dropped.
    async fn serve(&mut self, inputs: Inputs) -> anyhow::Result<()> {
        let Inputs {
            mut commands,
            mut status_requests,
            mut updates,
        } = inputs;
        let mut watcher = CgroupWatcher::new(&self.cgroup_root).context("watching cgroups")?;
        self.sync_cgroups(&cgroups::scan(&self.cgroup_root)?)?;
        let mut files = watch_files(&self.desired.config).context("watching policy files")?;
        let mut watching = true;
        // A change made before the watch began has no event: the files are read again if one
        // changed since start-up read them. Only then is the agent ready.
        if modified_since(&self.desired.config, self.read_at) {
            self.reload("file change during start-up")?;
        }
        self.log_ready();
        // A pod's processes join its cgroups after the cgroups appear, with no event to tell:
        // where workloads run is looked at again at this pace (for the tunnel and the DNS proxy).
        let mut placement = tokio::time::interval(PLACEMENT_INTERVAL);
        placement.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let catch_up = self.dp.catch_up_due();
            tokio::select! {
                _ = placement.tick(), if self.tunnel.is_some() || self.dns.is_some() => self.place_workloads(),
                // The generation that went out of force, once no program reads it.
                () = sleep_until(catch_up), if catch_up.is_some() => self.dp.catch_up(),
                command = commands.recv() => match command {
                    Some(Command::Reload(reason)) => self.reload(reason)?,
                    // The agent is stopping.
                    None => return Ok(()),
                },
                // Settled: editors write in several steps, taken at once.
                changed = files.changed(), if watching => match changed {
                    Ok(()) => self.reload("file change")?,
                    // The queue overflowed or reading failed: read again to be sure.
                    Err(e @ WatchError::Events(_)) => {
                        tracing::warn!(error = %e, "reading policy file events");
                        self.reload("file change")?;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "policy files are no longer watched; SIGHUP reloads them");
                        watching = false;
                    }
                },
                tree = watcher.changed() => self.sync_cgroups(&tree.context("watching cgroups")?)?,
                Some(reply) = status_requests.recv() => {
                    let _ = reply.send(self.status());
                }
                Some(update) = next_update(&mut updates) => {
                    let result = self.apply_remote(update.state)?;
                    // Ok is ACKed, Err(reason) NACKed; the client waits for the answer.
                    let _ = update.ack.send(result);
                }
            }
        }
    }
}

/// How often the tunnel looks again at where workloads' processes run (their network
/// namespaces).
const PLACEMENT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Sleeps until `at`; forever when `None` (the caller's `select!` branch is disabled then).
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
