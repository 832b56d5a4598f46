//! The kernel datapath: loads ward's programs, adopts or creates their pinned maps and links, and
//! writes identities and compiled policy into the maps without ever opening a hole.
pub mod dns;
pub mod features;
mod generations;
mod link;
pub mod services;
pub mod tunnel;

use generations::Generations;
pub use generations::{ApplyStats, GenerationFollower, Target};

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use agent_common::{
    map_names, program_names, CgroupValue, ConnectingValue, DnsFlow, DnsName, DnsProxyConfig,
    EventLimitKey, EventLimitValue, FlowCountKey, FlowKey, IpcacheKey, IpcacheLpmData,
    IpcacheValue, LearnedKey, LearnedValue, ListenerKey, ListenerValue, OriginalDst, PolicyKey,
    PolicyValue, RedirectKey, RedirectedSocket, ServiceAddr, ServiceSocketKey, Settings,
    SocketOwner, StateValue, TunnelConfig, UdpFlowValue, MAX_CGROUPS, MAX_CONNECTING, MAX_IPCACHE,
    MAX_IPCACHE_PREFIXES, MAX_LISTENERS, MAX_POLICY_ENTRIES, MAX_SERVICE_BACKENDS_TOTAL,
    MAX_SERVICE_FRONTENDS, MAX_UDP_FLOWS,
};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkbAttachType, Program,
    },
    Ebpf, EbpfLoader,
};

use crate::{
    paths,
    status::{MapStatus, ProgramStatus},
};

/// Each program and the attach point its link holds.
const ATTACH_POINTS: [(&str, &str); 12] = [
    (program_names::POST_BIND4, "cgroup/post_bind4"),
    (program_names::POST_BIND6, "cgroup/post_bind6"),
    (program_names::RECVMSG4, "cgroup/recvmsg4"),
    (program_names::RECVMSG6, "cgroup/recvmsg6"),
    (program_names::GETPEERNAME4, "cgroup/getpeername4"),
    (program_names::GETPEERNAME6, "cgroup/getpeername6"),
    (program_names::CONNECT4, "cgroup/connect4"),
    (program_names::CONNECT6, "cgroup/connect6"),
    (program_names::SENDMSG4, "cgroup/sendmsg4"),
    (program_names::SENDMSG6, "cgroup/sendmsg6"),
    (program_names::INGRESS, "cgroup_skb/ingress"),
    (program_names::EGRESS, "cgroup_skb/egress"),
];

/// The variable a `floor` build (kernel programs that return at once) needs set to 1 to run.
pub const FLOOR_BUILD_VAR: &str = "WARD_FLOOR_BUILD";

/// The eBPF object built from `agent-ebpf` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("this ward binary was built without its kernel programs (AYA_BUILD_SKIP was set); rebuild it with `cargo build`")]
    NoObject,
    #[error("this ward binary was built with the `floor` feature: its kernel programs return at once and enforce nothing (it exists for `cargo xtask bench connect --floor`); it runs only with {FLOOR_BUILD_VAR}=1")]
    FloorBuild,
    #[error("loading the kernel programs failed: {0}; is this a kernel with BPF, BTF and cgroup BPF (6.1 or later), and does ward run as root?")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel refused program {name}: {}", summarize(error))]
    Program {
        name: &'static str,
        error: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinned map {path} has key/value sizes {found:?} but this agent expects {expected:?}: its layout changed without a new ABI version; run `ward uninstall` first")]
    Layout {
        path: PathBuf,
        found: (u32, u32),
        expected: (u32, u32),
    },
    #[error("cannot open cgroup {0}: {1}")]
    Cgroup(PathBuf, std::io::Error),
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning link {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("{0}")]
    Paths(#[from] paths::PathError),
}

/// The verifier's log ends with its reason; the thousands of lines before it help nobody reading
/// an error message (`RUST_LOG=debug` logs the whole of it).
fn summarize(e: &aya::programs::ProgramError) -> String {
    let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = e
    else {
        return e.to_string();
    };
    let log = verifier_log.to_string();
    tracing::debug!(verifier_log = %log, "verifier output");
    let tail: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(6)..].join(" | ");
    format!("{io_error}; verifier: {tail}")
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> KernelError {
    move |source| KernelError::Map { name, source }
}

/// Pinned map `name` in `pin_dir`, opened as the typed map `T` of its kind (`kind`: `Map::HashMap`,
/// `Map::LruHashMap`, ...), for the parts of the agent that hold their own handles.
fn pinned<T: TryFrom<Map, Error = aya::maps::MapError>>(
    pin_dir: &Path,
    name: &'static str,
    kind: fn(MapData) -> Map,
) -> Result<T, KernelError> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    T::try_from(kind(data)).map_err(map_err(name))
}

/// A removal of a key the map does not hold succeeds: the key is gone either way. (aya reports
/// it as the syscall's `ENOENT`.)
fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        r => r,
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> KernelError {
    move |error| KernelError::Program { name, error }
}

/// How the programs came to be attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Fresh links on the cgroup root.
    Attached,
    /// Links pinned by an earlier agent, now running this agent's programs.
    Adopted,
    /// Links of an agent with an older map layout, switched to this agent's programs and maps.
    Upgraded { from: String },
}

/// Where verdicts reach user space: refusals and audits as events, allowed flows as per-CPU
/// counts.
pub struct VerdictMaps {
    pub events: RingBuf<MapData>,
    pub flow_counts: PerCpuHashMap<MapData, FlowCountKey, u64>,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    cgroups: HashMap<MapData, u64, CgroupValue>,
    settings: Array<MapData, Settings>,
    generations: Generations,
}

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, KernelError> {
    let map = ebpf.take_map(name).ok_or(KernelError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(map_err(name))
}

impl Datapath {
    /// Loads the programs into the kernel (through the verifier) and opens the pinned maps,
    /// creating them on first start. Nothing is attached yet.
    pub fn load(pin_dir: &Path) -> Result<Self, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        if cfg!(feature = "floor") {
            if std::env::var_os(FLOOR_BUILD_VAR).is_none_or(|v| v != "1") {
                return Err(KernelError::FloorBuild);
            }
            tracing::warn!(
                "this build's kernel programs return at once: no policy is enforced (`floor` \
                 feature, for bench connect)"
            );
        }
        paths::prepare_pin_dir(pin_dir)?;
        check_pinned_layouts(pin_dir)?;
        // The socket owners' map is a BTF map, which carries no pinning of its own: pinned (and
        // adopted) by name here.
        let owners = pin_dir.join(map_names::SOCKET_OWNERS);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_pin_path(map_names::SOCKET_OWNERS, owners.as_path())
            .load(OBJECT)
            .map_err(KernelError::Load)?;
        for name in program_names::ALL {
            let program = ebpf.program_mut(name).ok_or(KernelError::Program {
                name,
                error: aya::programs::ProgramError::UnexpectedProgramType,
            })?;
            match program {
                Program::CgroupSock(p) => p.load(),
                Program::CgroupSockAddr(p) => p.load(),
                Program::CgroupSkb(p) => p.load(),
                _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
            }
            .map_err(prog_err(name))?;
        }
        Ok(Datapath {
            cgroups: take(&mut ebpf, map_names::CGROUPS)?,
            generations: Generations::open(&mut ebpf)?,
            settings: take(&mut ebpf, map_names::SETTINGS)?,
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Attaches every program to the cgroup root through a pinned link. Links pinned by an earlier
    /// agent are kept and switched to this agent's programs in place, so enforcement has no gap.
    pub fn attach(&mut self, cgroup_root: &Path) -> Result<Attachment, KernelError> {
        let older = older_abi(&self.pin_dir);
        if let Some(suffix) = &older {
            self.migrate_sockets(suffix)?;
        }
        let cgroup =
            File::open(cgroup_root).map_err(|e| KernelError::Cgroup(cgroup_root.to_owned(), e))?;
        let links = paths::links_dir(&self.pin_dir);
        let mut adopted = 0;
        for name in program_names::ALL {
            let pin = links.join(name);
            let program = self
                .ebpf
                .program_mut(name)
                .expect("loaded in Datapath::load");
            if pin.exists() {
                let link_fd = link::open_pinned(&pin).map_err(|source| KernelError::Link {
                    path: pin.clone(),
                    source,
                })?;
                let prog_fd = program.fd().map_err(prog_err(name))?;
                link::update_link(&link_fd, prog_fd.as_fd()).map_err(|source| {
                    KernelError::Link {
                        path: pin.clone(),
                        source,
                    }
                })?;
                adopted += 1;
                continue;
            }
            let mode = CgroupAttachMode::Single;
            let link: FdLink = match program {
                Program::CgroupSock(p) => {
                    let id = p.attach(&cgroup, mode).map_err(prog_err(name))?;
                    p.take_link(id).map_err(prog_err(name))?.try_into()
                }
                Program::CgroupSockAddr(p) => {
                    let id = p.attach(&cgroup, mode).map_err(prog_err(name))?;
                    p.take_link(id).map_err(prog_err(name))?.try_into()
                }
                Program::CgroupSkb(p) => {
                    let direction = if name == program_names::EGRESS {
                        CgroupSkbAttachType::Egress
                    } else {
                        CgroupSkbAttachType::Ingress
                    };
                    let id = p.attach(&cgroup, direction, mode).map_err(prog_err(name))?;
                    p.take_link(id).map_err(prog_err(name))?.try_into()
                }
                _ => unreachable!("Datapath::load checked the program types"),
            }
            .map_err(|e| KernelError::Link {
                path: pin.clone(),
                source: std::io::Error::other(e),
            })?;
            link.pin(&pin).map_err(|source| KernelError::Pin {
                path: pin.clone(),
                source,
            })?;
        }
        // Programs earlier agents attached and this one has not: detached with their links.
        for name in program_names::RETIRED {
            let pin = links.join(name);
            remove_if_present(&pin).map_err(|source| KernelError::Link { path: pin, source })?;
        }
        // The programs now read only this ABI's maps; older and retired ones are unreferenced.
        remove_stale_pins(&self.pin_dir).map_err(|source| KernelError::Link {
            path: self.pin_dir.clone(),
            source,
        })?;
        if let Some(suffix) = older {
            return Ok(Attachment::Upgraded { from: suffix });
        }
        Ok(if adopted == program_names::ALL.len() {
            Attachment::Adopted
        } else {
            Attachment::Attached
        })
    }

    /// Copies the socket state the kernel learned while an agent of an older ABI ran (listeners,
    /// connecting sockets, bound ones, and sockets translated to a Service's backend) into this
    /// ABI's maps, so the new programs know them from their first run. Maps whose layout changed
    /// would need a conversion here.
    fn migrate_sockets(&mut self, old_suffix: &str) -> Result<(), KernelError> {
        let copied = self
            .copy_from_older::<FlowKey, ConnectingValue>(map_names::CONNECTING, old_suffix)?
            + self
                .copy_from_older::<ListenerKey, ListenerValue>(map_names::LISTENERS, old_suffix)?
            + self.copy_from_older::<ServiceSocketKey, ServiceAddr>(
                map_names::SERVICE_SOCKETS,
                old_suffix,
            )?;
        tracing::info!(
            from = old_suffix,
            to = map_names::VERSION_SUFFIX,
            entries = copied,
            "migrated socket state from the previous map layout"
        );
        Ok(())
    }

    fn copy_from_older<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        old_suffix: &str,
    ) -> Result<usize, KernelError> {
        let base = name
            .strip_suffix(map_names::VERSION_SUFFIX)
            .expect("map names end in the version");
        let old_path = self.pin_dir.join(format!("{base}{old_suffix}"));
        let Ok(old) = MapData::from_pin(&old_path) else {
            return Ok(0);
        };
        let sizes = old
            .info()
            .map(|i| (i.key_size(), i.value_size()))
            .map_err(map_err(name))?;
        if sizes != (size_of::<K>() as u32, size_of::<V>() as u32) {
            tracing::warn!(map = %old_path.display(), "layout changed; its entries are re-learned as sockets open");
            return Ok(0);
        }
        let old: HashMap<MapData, K, V> =
            HashMap::try_from(Map::LruHashMap(old)).map_err(map_err(name))?;
        let new = self.ebpf.map_mut(name).ok_or(KernelError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        let mut new: HashMap<&mut MapData, K, V> = HashMap::try_from(new).map_err(map_err(name))?;
        let mut copied = 0;
        for (k, v) in old.iter().filter_map(Result::ok) {
            new.insert(k, v, 0).map_err(map_err(name))?;
            copied += 1;
        }
        Ok(copied)
    }

    /// Each program, its attach point and the program id its pinned link runs.
    pub fn programs(&self) -> Vec<ProgramStatus> {
        let links = paths::links_dir(&self.pin_dir);
        ATTACH_POINTS
            .iter()
            .map(|(name, attach_point)| {
                let pin = links.join(name);
                let program_id = PinnedLink::from_pin(&pin)
                    .ok()
                    .and_then(|l| FdLink::from(l).info().ok())
                    .map(|info| info.program_id());
                ProgramStatus {
                    name: (*name).into(),
                    attach_point: (*attach_point).into(),
                    program_id,
                    link_pinned: pin.exists(),
                }
            })
            .collect()
    }

    /// Fill levels of every map (entries the agent writes are counted from what it wrote).
    pub fn maps(&self, applied: &ApplyStats, cgroups: usize) -> Vec<MapStatus> {
        let count = |name: &'static str| -> usize {
            let Some(map) = self.ebpf.map(name) else {
                return 0;
            };
            let counted = match name {
                map_names::CONNECTING => {
                    HashMap::<_, FlowKey, ConnectingValue>::try_from(map).map(|m| m.keys().count())
                }
                map_names::LISTENERS => HashMap::<_, ListenerKey, ListenerValue>::try_from(map)
                    .map(|m| m.keys().count()),
                map_names::UDP_FLOWS => {
                    HashMap::<_, FlowKey, UdpFlowValue>::try_from(map).map(|m| m.keys().count())
                }
                _ => Ok(0),
            };
            counted.unwrap_or(0)
        };
        [
            (map_names::POLICY, applied.entries, MAX_POLICY_ENTRIES),
            (map_names::IPCACHE, applied.addresses, MAX_IPCACHE / 2),
            (
                map_names::IPCACHE_LPM,
                applied.prefixes,
                MAX_IPCACHE_PREFIXES / 2,
            ),
            (
                map_names::SERVICES,
                applied.frontends,
                MAX_SERVICE_FRONTENDS / 2,
            ),
            (
                map_names::BACKENDS,
                applied.backends,
                MAX_SERVICE_BACKENDS_TOTAL / 2,
            ),
            (map_names::CGROUPS, cgroups, MAX_CGROUPS),
            (
                map_names::CONNECTING,
                count(map_names::CONNECTING),
                MAX_CONNECTING,
            ),
            (
                map_names::LISTENERS,
                count(map_names::LISTENERS),
                MAX_LISTENERS,
            ),
            (
                map_names::UDP_FLOWS,
                count(map_names::UDP_FLOWS),
                MAX_UDP_FLOWS,
            ),
        ]
        .into_iter()
        .map(|(name, entries, capacity)| MapStatus {
            name: name.into(),
            entries,
            capacity,
        })
        .collect()
    }

    /// Removes the links (which detaches the programs) and the pinned maps.
    pub fn detach_and_unpin(self) -> std::io::Result<()> {
        let links = paths::links_dir(&self.pin_dir);
        for name in program_names::ALL.iter().chain(&program_names::RETIRED) {
            remove_if_present(&links.join(name))?;
        }
        remove_if_present(&links)?;
        for entry in std::fs::read_dir(&self.pin_dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ward_"))
            {
                std::fs::remove_file(path)?;
            }
        }
        match std::fs::remove_dir(&self.pin_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Tells the kernel the cgroup the programs attach to and what becomes of traffic of a
    /// cgroup below it that no workload maps (`unmappedCgroups`).
    pub fn set_settings(&mut self, cgroup_root: &Path, unmapped: u8) -> Result<(), KernelError> {
        use std::os::unix::fs::MetadataExt;
        let root_cgroup = std::fs::metadata(cgroup_root)
            .map_err(|e| KernelError::Cgroup(cgroup_root.to_owned(), e))?
            .ino();
        let settings = Settings {
            root_cgroup,
            unmapped,
            _pad: [0; 7],
        };
        self.settings
            .set(0, settings, 0)
            .map_err(map_err(map_names::SETTINGS))
    }

    pub fn set_cgroup(&mut self, cgroup_id: u64, identity: u32) -> Result<(), KernelError> {
        self.cgroups
            .insert(cgroup_id, CgroupValue { identity, _pad: 0 }, 0)
            .map_err(map_err(map_names::CGROUPS))
    }

    pub fn remove_cgroup(&mut self, cgroup_id: u64) -> Result<(), KernelError> {
        ignore_missing(self.cgroups.remove(&cgroup_id)).map_err(map_err(map_names::CGROUPS))
    }

    /// The cgroup ids the kernel currently maps to identities (adopted state included).
    pub fn cgroup_ids(&self) -> Vec<u64> {
        self.cgroups.keys().filter_map(Result::ok).collect()
    }

    /// The maps verdicts reach user space through: the events ring and the allowed-flow counts.
    pub fn take_verdicts(&mut self) -> Result<VerdictMaps, KernelError> {
        Ok(VerdictMaps {
            events: take(&mut self.ebpf, map_names::EVENTS)?,
            flow_counts: take(&mut self.ebpf, map_names::FLOW_COUNTS)?,
        })
    }

    pub fn take_counters(&mut self) -> Result<PerCpuArray<MapData, u64>, KernelError> {
        take(&mut self.ebpf, map_names::COUNTERS)
    }

    /// Installs a compiled policy, the IP cache and the Services as the next generation and
    /// switches the kernel to it; see [`Generations::apply`]. They are kept (shared, not copied)
    /// until the next apply, which writes only what differs from them. The generation that went
    /// out of force is brought up to date by [`Datapath::catch_up`], when
    /// [`Datapath::catch_up_due`] says.
    pub fn apply(&mut self, target: Target<'_>) -> Result<ApplyStats, KernelError> {
        self.generations.apply(target)
    }

    /// When the generation that went out of force at the last apply can be brought up to date.
    pub fn catch_up_due(&self) -> Option<Instant> {
        self.generations.catch_up_due()
    }

    /// Brings the generation that went out of force up to date; see [`Generations::catch_up`].
    pub fn catch_up(&mut self) {
        self.generations.catch_up();
    }

    /// Has `follower` told of every generation bit's policy from now on (at once of those known).
    pub fn follow_generations(&mut self, follower: Arc<dyn GenerationFollower>) {
        self.generations.follow(follower);
    }
}

/// Key and value sizes of every map this build pins, as the kernel reports them.
fn layouts() -> [(&'static str, usize, usize); 22] {
    [
        (
            map_names::CGROUPS,
            size_of::<u64>(),
            size_of::<CgroupValue>(),
        ),
        (
            map_names::POLICY,
            size_of::<PolicyKey>(),
            size_of::<PolicyValue>(),
        ),
        (
            map_names::IPCACHE,
            size_of::<IpcacheKey>(),
            size_of::<IpcacheValue>(),
        ),
        (
            map_names::IPCACHE_LPM,
            size_of::<Key<IpcacheLpmData>>(),
            size_of::<IpcacheValue>(),
        ),
        (map_names::STATE, size_of::<u32>(), size_of::<StateValue>()),
        (
            map_names::CONNECTING,
            size_of::<FlowKey>(),
            size_of::<ConnectingValue>(),
        ),
        (
            map_names::LISTENERS,
            size_of::<ListenerKey>(),
            size_of::<ListenerValue>(),
        ),
        (
            map_names::UDP_FLOWS,
            size_of::<FlowKey>(),
            size_of::<UdpFlowValue>(),
        ),
        (
            map_names::EVENT_LIMITS,
            size_of::<EventLimitKey>(),
            size_of::<EventLimitValue>(),
        ),
        (map_names::EVENTS, 0, 0),
        (
            map_names::FLOW_COUNTS,
            size_of::<FlowCountKey>(),
            size_of::<u64>(),
        ),
        (map_names::COUNTERS, size_of::<u32>(), size_of::<u64>()),
        (
            map_names::REDIRECTS,
            size_of::<RedirectKey>(),
            size_of::<OriginalDst>(),
        ),
        (map_names::CERTIFIED, size_of::<u32>(), size_of::<u32>()),
        (
            map_names::TUNNEL,
            size_of::<u32>(),
            size_of::<TunnelConfig>(),
        ),
        (map_names::SETTINGS, size_of::<u32>(), size_of::<Settings>()),
        (
            map_names::LEARNED,
            size_of::<LearnedKey>(),
            size_of::<LearnedValue>(),
        ),
        (map_names::DNS_NAMES, size_of::<u32>(), size_of::<DnsName>()),
        (
            map_names::DNS_PROXY,
            size_of::<u32>(),
            size_of::<DnsProxyConfig>(),
        ),
        (
            map_names::REDIRECTED_SOCKETS,
            size_of::<u64>(),
            size_of::<RedirectedSocket>(),
        ),
        (
            map_names::SOCKET_OWNERS,
            size_of::<i32>(),
            size_of::<SocketOwner>(),
        ),
        (
            map_names::DNS_FLOWS,
            size_of::<RedirectKey>(),
            size_of::<DnsFlow>(),
        ),
    ]
}

/// aya adopts a pinned map by name without looking at its layout; a mismatch would surface as a
/// verifier error or, worse, as misread entries. Refuse it clearly instead.
fn check_pinned_layouts(pin_dir: &Path) -> Result<(), KernelError> {
    for (name, key, value) in layouts() {
        let path = pin_dir.join(name);
        let Ok(map) = MapData::from_pin(&path) else {
            continue;
        };
        let info = map.info().map_err(map_err(name))?;
        let found = (info.key_size(), info.value_size());
        if found != (key as u32, value as u32) {
            return Err(KernelError::Layout {
                path,
                found,
                expected: (key as u32, value as u32),
            });
        }
    }
    Ok(())
}

/// The version suffix of maps an agent of another ABI left pinned, if any.
fn older_abi(pin_dir: &Path) -> Option<String> {
    let prefix = map_names::STATE.strip_suffix(map_names::VERSION_SUFFIX)?;
    std::fs::read_dir(pin_dir)
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let suffix = name.strip_prefix(prefix)?;
            (suffix != map_names::VERSION_SUFFIX).then(|| suffix.to_string())
        })
}

/// Removes every pinned map of another ABI version, and those this ABI once named otherwise.
fn remove_stale_pins(pin_dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(pin_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // The socket owners' map carries no ABI version (see `map_names::SOCKET_OWNERS`).
        let stale = (!name.ends_with(map_names::VERSION_SUFFIX)
            && name != map_names::SOCKET_OWNERS)
            || map_names::RETIRED.contains(&name.as_ref());
        if name.starts_with("ward_") && stale {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The 4-tuple of a connection or datagram as the kernel's maps key it (the connecting or
/// sending end local).
pub fn flow_key(from: std::net::SocketAddr, to: std::net::SocketAddr, protocol: u8) -> FlowKey {
    FlowKey {
        local_addr: mapped(from.ip()),
        remote_addr: mapped(to.ip()),
        local_port: from.port(),
        remote_port: to.port(),
        protocol,
        _pad: [0; 3],
    }
}

/// An address as the kernel keys it: IPv4 mapped into IPv6.
pub fn mapped(addr: std::net::IpAddr) -> [u8; 16] {
    match addr {
        std::net::IpAddr::V4(a) => agent_common::map_v4(a.octets()),
        std::net::IpAddr::V6(a) => a.octets(),
    }
}

#[cfg(test)]
mod tests {
    use aya::{maps::MapError, sys::SyscallError};

    use super::ignore_missing;

    fn delete_failed(errno: i32) -> Result<(), MapError> {
        Err(MapError::SyscallError(SyscallError {
            call: "bpf_map_delete_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        }))
    }

    #[test]
    fn removing_a_missing_key_succeeds_and_other_failures_stay_errors() {
        assert!(ignore_missing(delete_failed(libc::ENOENT)).is_ok());
        assert!(ignore_missing(Err(MapError::KeyNotFound)).is_ok());
        assert!(ignore_missing(delete_failed(libc::EPERM)).is_err());
        assert!(ignore_missing(Ok(())).is_ok());
    }
}
