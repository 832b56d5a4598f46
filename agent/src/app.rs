//! `ward run`: wires configuration, policy, the kernel datapath, the cgroup watcher and the event
//! log together, and owns reload and shutdown.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use agent_common::IDENTITY_HOST;
use anyhow::{bail, Context as _};
use futures_util::StreamExt as _;
use inotify::{Inotify, WatchMask};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cgroups::{self, CgroupTree, CgroupWatcher},
    config::{Config, HostAddresses},
    events::{self, Names, SharedNames},
    identity,
    kernel::{self, Datapath},
    paths,
    policy::{self, Compiled, RuleIds, WorkloadInfo},
};

pub struct RunOptions {
    pub config: PathBuf,
    pub keep_enforcing: bool,
}

/// Everything derived from one configuration and its policy files.
struct Desired {
    config: Config,
    workloads: Vec<WorkloadInfo>,
    compiled: Compiled,
    addresses: BTreeMap<[u8; 16], u32>,
}

impl Desired {
    fn build(config_file: &Path, rule_ids: &mut RuleIds) -> anyhow::Result<Self> {
        let config = Config::load(config_file)?;
        let workloads = identity::workload_infos(&config)?;
        let set = policy::load(&config.policies)?;
        let compiled = policy::compile(&set, &workloads, rule_ids)?;
        let addresses = address_identities(&config, &workloads)?;
        if let Some(rule) = compiled.rules.values().find(|r| r.mtls) {
            tracing::warn!(policy = %rule.policy, rule = %rule.rule, "mtls: required is recorded but the mTLS tunnel is not available in this version; such connections pass in plain TCP");
        }
        Ok(Desired { config, workloads, compiled, addresses })
    }

    /// cgroup id → identity for the cgroups of this node's workloads.
    fn cgroup_identities(&self, tree: &CgroupTree) -> BTreeMap<u64, u32> {
        tree.iter()
            .filter_map(|(id, path)| {
                identity::workload_of_cgroup(&self.config, path).map(|i| (*id, self.workloads[i].identity))
            })
            .collect()
    }
}

/// The IP cache: workload addresses name their workload; this host's own addresses name the host,
/// behind which the kernel tells workloads apart by their listening sockets.
fn address_identities(config: &Config, workloads: &[WorkloadInfo]) -> anyhow::Result<BTreeMap<[u8; 16], u32>> {
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
    let mut out: BTreeMap<[u8; 16], u32> = host.into_iter().map(|a| (kernel::mapped(a), IDENTITY_HOST)).collect();
    for w in workloads {
        for a in &w.addresses {
            if out.get(&kernel::mapped(*a)).is_some_and(|id| *id == IDENTITY_HOST) {
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
    Ok(())
}

/// Keeps the kernel's cgroup map equal to `desired`.
fn sync_cgroups(dp: &mut Datapath, current: &mut BTreeMap<u64, u32>, desired: BTreeMap<u64, u32>) -> anyhow::Result<()> {
    for (id, identity) in &desired {
        if current.get(id) != Some(identity) {
            dp.set_cgroup(*id, *identity)?;
            tracing::debug!(cgroup_id = id, identity, "cgroup mapped");
        }
    }
    for id in current.keys().filter(|id| !desired.contains_key(id)) {
        dp.remove_cgroup(*id)?;
    }
    *current = desired;
    Ok(())
}

/// Whether a changed file in a watched directory is one the agent reads.
fn is_policy_or_config(name: Option<&std::ffi::OsStr>, config: &Config) -> bool {
    let Some(name) = name else { return false };
    config.file.file_name() == Some(name)
        || Path::new(name).extension().is_some_and(|e| e == "yaml" || e == "yml")
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

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    preflight()?;
    let mut rule_ids = RuleIds::default();
    let mut desired = Desired::build(&opts.config, &mut rule_ids)?;
    let config = desired.config.clone();
    let cgroup_root = paths::cgroup_root(config.cgroup_root.as_deref())?;
    tracing::info!(
        config = %config.file.display(),
        cgroup_root = %cgroup_root.display(),
        pin_dir = %config.pin_dir.display(),
        workloads = config.workloads.len(),
        policies = ?config.policies,
        "starting"
    );
    let mut dp = Datapath::load(&config.pin_dir)?;
    let stats = dp.apply(&desired.compiled, &desired.addresses)?;
    let mut current: BTreeMap<u64, u32> = dp.cgroup_ids().into_iter().map(|id| (id, 0)).collect();
    sync_cgroups(&mut dp, &mut current, desired.cgroup_identities(&cgroups::scan(&cgroup_root)?))?;
    // Maps are complete before the programs see the first packet.
    let attachment = dp.attach(&cgroup_root)?;
    let names: SharedNames = Arc::new(RwLock::new(Names::new(&desired.compiled, &desired.workloads)));
    let ring = dp.take_events()?;
    let event_names = names.clone();
    tokio::spawn(async move {
        if let Err(e) = events::run(ring, event_names).await {
            tracing::error!(error = %e, "reading verdict events stopped");
        }
    });
    tracing::info!(
        attachment = ?attachment,
        generation = stats.generation,
        entries = stats.entries,
        addresses = stats.addresses,
        prefixes = stats.prefixes,
        cgroups = current.len(),
        "ready: enforcing"
    );

    let served = serve(&opts, &config, &cgroup_root, &mut dp, desired, current, &mut rule_ids, &names).await;
    if opts.keep_enforcing {
        tracing::info!(pin_dir = %config.pin_dir.display(), "stopping; programs stay attached and keep enforcing the last policy");
    } else {
        dp.detach_and_unpin().context("detaching")?;
        tracing::info!("stopped; programs detached and pins removed");
    }
    served
}

/// Reacts to signals, file changes and cgroup changes until told to stop.
#[allow(clippy::too_many_arguments)] // the agent's whole running state, owned by `run`
async fn serve(
    opts: &RunOptions,
    config: &Config,
    cgroup_root: &Path,
    dp: &mut Datapath,
    mut desired: Desired,
    mut current: BTreeMap<u64, u32>,
    rule_ids: &mut RuleIds,
    names: &SharedNames,
) -> anyhow::Result<()> {
    let mut watcher = CgroupWatcher::new(cgroup_root).context("watching cgroups")?;
    sync_cgroups(dp, &mut current, desired.cgroup_identities(&cgroups::scan(cgroup_root)?))?;
    let mut files = watch_files(config).context("watching policy files")?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        let reason = tokio::select! {
            _ = hangup.recv() => "SIGHUP",
            Some(Ok(event)) = files.next() => {
                if !is_policy_or_config(event.name.as_deref(), config) {
                    continue;
                }
                // Editors write in several steps; settle, then take everything at once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while tokio::time::timeout(Duration::from_millis(1), files.next()).await.is_ok() {}
                "file change"
            }
            tree = watcher.changed() => {
                let tree = tree.context("watching cgroups")?;
                sync_cgroups(dp, &mut current, desired.cgroup_identities(&tree))?;
                continue;
            }
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        };
        match Desired::build(&opts.config, rule_ids) {
            Err(e) => tracing::error!(reason, error = %format!("{e:#}"), "policy rejected; the previous policy stays in force"),
            Ok(next) if next.config.pin_dir != config.pin_dir || next.config.cgroup_root != config.cgroup_root => {
                tracing::error!(reason, "policy rejected: pinDir and cgroupRoot take effect only at restart")
            }
            Ok(next) => match dp.apply(&next.compiled, &next.addresses) {
                Err(e) => tracing::error!(reason, error = %e, "policy rejected by the kernel; the previous policy stays in force"),
                Ok(stats) => {
                    *names.write().expect("names lock poisoned") = Names::new(&next.compiled, &next.workloads);
                    desired = next;
                    sync_cgroups(dp, &mut current, desired.cgroup_identities(&cgroups::scan(cgroup_root)?))?;
                    tracing::info!(
                        reason,
                        generation = stats.generation,
                        entries = stats.entries,
                        duration_ms = stats.duration.as_secs_f64() * 1e3,
                        "policy applied"
                    );
                }
            },
        }
    }
}

/// `ward uninstall`: removes everything an agent left pinned.
pub fn uninstall(pin_dir: &Path) -> anyhow::Result<()> {
    preflight()?;
    if !pin_dir.exists() {
        println!("nothing pinned at {}", pin_dir.display());
        return Ok(());
    }
    let dp = Datapath::load(pin_dir)?;
    dp.detach_and_unpin().with_context(|| format!("removing {}", pin_dir.display()))?;
    println!("removed ward's programs, links and maps from {}", pin_dir.display());
    Ok(())
}
