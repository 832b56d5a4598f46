//! The datapath's writer: the policy, IP cache and service maps hold two generations (the low bit
//! of the generation number in every key), one in force and one standby, and this module owns both.
//! An apply writes into the standby bit only what differs from what that bit holds and switches
//! the kernel to it with one write to the state map; the bit that went out of force is brought up
//! to date the same way once programs still reading it have finished ([`GENERATION_SETTLE`]
//! later, in [`Generations::catch_up`]): in steady state both bits hold the policy in force and a
//! one-rule change costs a few map writes. A policy equal to the one in force switches nothing.
//! Blocking (the next apply may wait out the previous one's settle): the agent runs it off the
//! runtime that carries connections.
mod diff;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::{
    map_names, BackendKey, IpcacheKey, IpcacheLpmData, IpcacheValue, PolicyKey, PolicyValue,
    ServiceAddr, ServiceKey, ServiceValue, StateValue,
};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData},
    Ebpf, Pod,
};

use super::{ignore_missing, map_err, mapped, services::ServiceTable, take, KernelError};
use crate::policy::Compiled;

/// Time for programs that read the previous generation to finish before its entries change.
/// Programs run for microseconds under RCU; this is orders of magnitude more.
const GENERATION_SETTLE: Duration = Duration::from_millis(20);

/// What one policy apply wrote.
#[derive(Clone, Copy, Debug)]
pub struct ApplyStats {
    pub at: Instant,
    pub generation: u32,
    pub entries: usize,
    pub addresses: usize,
    pub prefixes: usize,
    /// Service frontends (cluster IP, port, protocol) and their backends.
    pub frontends: usize,
    pub backends: usize,
    /// Entries (policy, IP cache, prefixes and services together) written to the generation that
    /// went into force: the changes only, or everything when that bit's content was not known.
    pub written: usize,
    /// Entries removed from that generation before it went into force.
    pub removed: usize,
    /// From the start of the apply to the switch: when the kernel enforces the new policy.
    pub enforced_after: Duration,
    /// The whole apply, up to the switch and the bookkeeping after it; the previous generation
    /// is caught up later ([`Generations::catch_up`]).
    pub duration: Duration,
    /// Whether the kernel switched to a new generation: not when the policy and IP cache equal
    /// those in force.
    pub switched: bool,
}

/// The content of one generation: a compiled policy, the IP cache and the Services, shared with
/// the caller rather than copied.
struct Content {
    compiled: Arc<Compiled>,
    addresses: Arc<BTreeMap<[u8; 16], u32>>,
    services: Arc<ServiceTable>,
    /// `compiled.prefixes` as the trie keys them (mapped address, length in bits), so that two
    /// spellings of one prefix are one entry here as in the kernel.
    prefixes: BTreeMap<([u8; 16], u32), u32>,
}

impl Content {
    fn new(target: &Target<'_>) -> Self {
        let Target {
            compiled,
            addresses,
            services,
        } = target;
        Content {
            compiled: (*compiled).clone(),
            addresses: (*addresses).clone(),
            services: (*services).clone(),
            prefixes: compiled
                .prefixes
                .iter()
                .map(|(net, identity)| (mapped_prefix(net), *identity))
                .collect(),
        }
    }
}

/// Map writes of one generation update.
#[derive(Clone, Copy, Debug, Default)]
struct Writes {
    written: usize,
    removed: usize,
}

/// The maps that hold both generations.
struct GenerationMaps {
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    ipcache: HashMap<MapData, IpcacheKey, IpcacheValue>,
    lpm: LpmTrie<MapData, IpcacheLpmData, IpcacheValue>,
    frontends: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, ServiceAddr>,
}

/// Told which policy each generation bit holds, so maps kept beside the generations (the
/// addresses learned from DNS, whose entries name policy identities) follow them: before a bit
/// goes into force, and when the bit that went out of force is caught up.
pub trait GenerationFollower: Send + Sync {
    fn follow(&self, bit: u8, compiled: &Arc<Compiled>);
}

/// What an apply installs: the policy, the IP cache and the Services.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub compiled: &'a Arc<Compiled>,
    pub addresses: &'a Arc<BTreeMap<[u8; 16], u32>>,
    pub services: &'a Arc<ServiceTable>,
}

/// The maps an apply writes, the generation in force and what each generation bit holds.
pub(super) struct Generations {
    maps: GenerationMaps,
    state: Array<MapData, StateValue>,
    generation: u32,
    /// Per generation bit, the content its entries are known to equal; `None` when unknown (at
    /// start, or after a write to it failed). In steady state both name the one content in force.
    holds: [Option<Arc<Content>>; 2],
    /// After a switch, until [`Generations::catch_up`]: the bit that went out of force, and
    /// when no program can still be reading it.
    behind: Option<(u8, Instant)>,
    followers: Vec<Arc<dyn GenerationFollower>>,
}

impl Generations {
    /// Takes the maps from the loaded object; the generation in force is the kernel's. What the
    /// maps hold (an earlier agent's entries) is unknown until the first apply rewrites it.
    pub(super) fn open(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        let state: Array<MapData, StateValue> = take(ebpf, map_names::STATE)?;
        let current = state.get(&0, 0).map_err(map_err(map_names::STATE))?;
        Ok(Generations {
            maps: GenerationMaps {
                policy: take(ebpf, map_names::POLICY)?,
                ipcache: take(ebpf, map_names::IPCACHE)?,
                lpm: take(ebpf, map_names::IPCACHE_LPM)?,
                frontends: take(ebpf, map_names::SERVICES)?,
                backends: take(ebpf, map_names::BACKENDS)?,
            },
            state,
            generation: current.generation,
            holds: [None, None],
            behind: None,
            followers: Vec::new(),
        })
    }

    /// Adds a follower, told at once of each bit whose content is known.
    pub(super) fn follow(&mut self, follower: Arc<dyn GenerationFollower>) {
        for bit in [bit(self.generation.wrapping_add(1)), bit(self.generation)] {
            if let Some(held) = &self.holds[usize::from(bit)] {
                follower.follow(bit, &held.compiled);
            }
        }
        self.followers.push(follower);
    }

    /// Installs a compiled policy, the IP cache and the Services as the next generation, then
    /// switches the kernel to it with one write. A connection sees either the old or the new
    /// generation in full, never a mix; on error the generation in force stays, untouched.
    ///
    /// The standby bit gets only the changes from what it holds (everything, when that is not
    /// known). The previous bit is left for [`Generations::catch_up`], which this calls first
    /// when an earlier switch still needs it (waiting out what remains of that settle). When the
    /// content equals what the bit in force holds, nothing is written and nothing switches.
    pub(super) fn apply(&mut self, target: Target<'_>) -> Result<ApplyStats, KernelError> {
        self.catch_up();
        let started = Instant::now();
        let target = Arc::new(Content::new(&target));
        let current = bit(self.generation);
        let next = self.generation.wrapping_add(1);
        let standby = bit(next);
        let in_force = self.holds[usize::from(current)].clone();
        let standby_held = self.holds[usize::from(standby)].take();
        // In steady state both bits hold the content in force: one walk tells whether anything
        // changed and what the standby bit needs.
        let changes = GenerationChanges::between(standby_held.as_deref(), &target);
        let unchanged = match (&in_force, &standby_held) {
            (Some(f), Some(s)) if Arc::ptr_eq(f, s) => changes.is_empty(),
            (Some(f), _) => GenerationChanges::between(Some(f), &target).is_empty(),
            (None, _) => false,
        };
        if unchanged {
            // Equal content: share the new copy, so that the old one can be freed.
            self.holds[usize::from(standby)] = standby_held;
            let in_force = in_force.expect("unchanged implies a known content in force");
            for held in self.holds.iter_mut().flatten() {
                if Arc::ptr_eq(held, &in_force) {
                    *held = target.clone();
                }
            }
            let stats = self.stats(
                &target,
                started,
                started.elapsed(),
                Writes::default(),
                false,
            );
            return Ok(stats);
        }
        let writes = self.write(standby, standby_held.is_some(), &changes, &target)?;
        self.state
            .set(0, StateValue::new(next, state_flags(&target)), 0)
            .map_err(map_err(map_names::STATE))?;
        let enforced_after = started.elapsed();
        self.generation = next;
        self.behind = Some((current, Instant::now() + GENERATION_SETTLE));
        Ok(self.stats(&target, started, enforced_after, writes, true))
    }

    /// When the bit that went out of force at the last switch can be written: `None` when it is
    /// up to date (or no switch happened yet).
    pub(super) fn catch_up_due(&self) -> Option<Instant> {
        self.behind.map(|(_, due)| due)
    }

    /// Brings the bit that went out of force at the last switch to the content in force, once no
    /// program reads it ([`GENERATION_SETTLE`] after the switch; sleeps what remains of that). A
    /// failure is logged, not returned: the policy is in force, and the next apply rewrites that
    /// bit in full.
    pub(super) fn catch_up(&mut self) {
        let Some((previous, due)) = self.behind.take() else {
            return;
        };
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let Some(target) = self.holds[usize::from(bit(self.generation))].clone() else {
            return;
        };
        let started = Instant::now();
        let held = self.holds[usize::from(previous)].take();
        let changes = GenerationChanges::between(held.as_deref(), &target);
        match self.write(previous, held.is_some(), &changes, &target) {
            Ok(writes) => tracing::debug!(
                generation = self.generation,
                written = writes.written,
                removed = writes.removed,
                duration_ms = started.elapsed().as_secs_f64() * 1e3,
                "previous generation caught up"
            ),
            Err(e) => tracing::warn!(
                generation = self.generation,
                error = %e,
                "the policy is in force, but updating the previous generation failed; the next apply rewrites it in full"
            ),
        }
    }

    fn stats(
        &self,
        content: &Content,
        started: Instant,
        enforced_after: Duration,
        writes: Writes,
        switched: bool,
    ) -> ApplyStats {
        ApplyStats {
            at: Instant::now(),
            generation: self.generation,
            entries: content.compiled.entries.len(),
            addresses: content.addresses.len(),
            prefixes: content.compiled.prefixes.len(),
            frontends: content.services.frontends.len(),
            backends: content.services.backends.len(),
            written: writes.written,
            removed: writes.removed,
            enforced_after,
            duration: started.elapsed(),
            switched,
        }
    }

    /// Makes generation bit `bit`, which no program reads and whose entry in `holds` the caller
    /// took, hold `target`. `known`: the bit holds what `changes` start from; otherwise it is
    /// emptied first and `changes` must start from nothing. On error the bit stays unknown.
    fn write(
        &mut self,
        bit: u8,
        known: bool,
        changes: &GenerationChanges<'_>,
        target: &Arc<Content>,
    ) -> Result<Writes, KernelError> {
        let cleared = if known {
            0
        } else {
            self.maps.remove_generation(bit)?
        };
        let writes = self.maps.write_changes(bit, changes)?;
        self.holds[usize::from(bit)] = Some(target.clone());
        for follower in &self.followers {
            follower.follow(bit, &target.compiled);
        }
        Ok(Writes {
            written: writes.written,
            removed: cleared + writes.removed,
        })
    }
}

/// What a generation bit needs to go from one content to another, map by map.
struct GenerationChanges<'a> {
    entries: diff::Changes<'a, PolicyKey, PolicyValue>,
    addresses: diff::Changes<'a, [u8; 16], u32>,
    prefixes: diff::Changes<'a, ([u8; 16], u32), u32>,
    frontends: diff::Changes<'a, ServiceKey, ServiceValue>,
    backends: diff::Changes<'a, BackendKey, ServiceAddr>,
}

impl<'a> GenerationChanges<'a> {
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.addresses.is_empty()
            && self.prefixes.is_empty()
            && self.frontends.is_empty()
            && self.backends.is_empty()
    }

    /// From `from` (`None`: an empty generation) to `to`.
    fn between(from: Option<&'a Content>, to: &'a Content) -> Self {
        static NO_ENTRIES: BTreeMap<PolicyKey, PolicyValue> = BTreeMap::new();
        static NO_ADDRESSES: BTreeMap<[u8; 16], u32> = BTreeMap::new();
        static NO_PREFIXES: BTreeMap<([u8; 16], u32), u32> = BTreeMap::new();
        static NO_SERVICES: ServiceTable = ServiceTable {
            frontends: BTreeMap::new(),
            backends: BTreeMap::new(),
            names: BTreeMap::new(),
        };
        let (entries, addresses, prefixes, services) = match from {
            Some(from) => (
                &from.compiled.entries,
                &*from.addresses,
                &from.prefixes,
                &*from.services,
            ),
            None => (&NO_ENTRIES, &NO_ADDRESSES, &NO_PREFIXES, &NO_SERVICES),
        };
        GenerationChanges {
            entries: diff::between(entries, &to.compiled.entries),
            addresses: diff::between(addresses, &to.addresses),
            prefixes: diff::between(prefixes, &to.prefixes),
            frontends: diff::between(&services.frontends, &to.services.frontends),
            backends: diff::between(&services.backends, &to.services.backends),
        }
    }
}

impl GenerationMaps {
    /// Writes `changes` into bit `bit`. Removals come first, so that a bit never holds more
    /// entries than the larger of the two contents (the maps are sized for two generations).
    fn write_changes(
        &mut self,
        bit: u8,
        changes: &GenerationChanges<'_>,
    ) -> Result<Writes, KernelError> {
        let GenerationChanges {
            entries,
            addresses,
            prefixes,
            frontends,
            backends,
        } = changes;
        for key in &entries.removed {
            ignore_missing(self.policy.remove(&policy_key(bit, key)))
                .map_err(map_err(map_names::POLICY))?;
        }
        for addr in &addresses.removed {
            ignore_missing(self.ipcache.remove(&ipcache_key(bit, addr)))
                .map_err(map_err(map_names::IPCACHE))?;
        }
        for prefix in &prefixes.removed {
            ignore_missing(self.lpm.remove(&lpm_key(bit, prefix)))
                .map_err(map_err(map_names::IPCACHE_LPM))?;
        }
        for key in &frontends.removed {
            ignore_missing(self.frontends.remove(&service_key(bit, key)))
                .map_err(map_err(map_names::SERVICES))?;
        }
        for key in &backends.removed {
            ignore_missing(self.backends.remove(&backend_key(bit, key)))
                .map_err(map_err(map_names::BACKENDS))?;
        }
        for (key, value) in &entries.written {
            self.policy
                .insert(policy_key(bit, key), **value, 0)
                .map_err(map_err(map_names::POLICY))?;
        }
        for (addr, identity) in &addresses.written {
            self.ipcache
                .insert(ipcache_key(bit, addr), ipcache_value(identity), 0)
                .map_err(map_err(map_names::IPCACHE))?;
        }
        for (prefix, identity) in &prefixes.written {
            self.lpm
                .insert(&lpm_key(bit, prefix), ipcache_value(identity), 0)
                .map_err(map_err(map_names::IPCACHE_LPM))?;
        }
        for (key, value) in &backends.written {
            self.backends
                .insert(backend_key(bit, key), **value, 0)
                .map_err(map_err(map_names::BACKENDS))?;
        }
        for (key, value) in &frontends.written {
            self.frontends
                .insert(service_key(bit, key), **value, 0)
                .map_err(map_err(map_names::SERVICES))?;
        }
        Ok(Writes {
            written: entries.written.len()
                + addresses.written.len()
                + prefixes.written.len()
                + frontends.written.len()
                + backends.written.len(),
            removed: entries.removed.len()
                + addresses.removed.len()
                + prefixes.removed.len()
                + frontends.removed.len()
                + backends.removed.len(),
        })
    }

    /// Removes every entry of generation bit `bit`; returns how many there were.
    fn remove_generation(&mut self, bit: u8) -> Result<usize, KernelError> {
        let policy = remove_where(&mut self.policy, map_names::POLICY, |k| k.generation == bit)?;
        let ipcache = remove_where(&mut self.ipcache, map_names::IPCACHE, |k| {
            k.generation == bit
        })?;
        let stale: Vec<Key<IpcacheLpmData>> = self
            .lpm
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().generation == bit)
            .collect();
        for key in &stale {
            ignore_missing(self.lpm.remove(key)).map_err(map_err(map_names::IPCACHE_LPM))?;
        }
        let frontends = remove_where(&mut self.frontends, map_names::SERVICES, |k| {
            k.generation == bit
        })?;
        let backends = remove_where(&mut self.backends, map_names::BACKENDS, |k| {
            k.service.generation == bit
        })?;
        Ok(policy + ipcache + stale.len() + frontends + backends)
    }
}

/// The flags of the state map for a generation holding `content`.
fn state_flags(content: &Content) -> u32 {
    if content.services.frontends.is_empty() {
        0
    } else {
        agent_common::STATE_FLAG_SERVICES
    }
}

/// The generation bit that map keys carry for generation `generation`.
fn bit(generation: u32) -> u8 {
    (generation & 1) as u8
}

fn policy_key(bit: u8, key: &PolicyKey) -> PolicyKey {
    PolicyKey {
        generation: bit,
        ..*key
    }
}

fn ipcache_key(bit: u8, addr: &[u8; 16]) -> IpcacheKey {
    IpcacheKey {
        generation: bit,
        _pad: [0; 3],
        addr: *addr,
    }
}

/// `prefix` is a mapped address and its length, as [`mapped_prefix`] gives them.
fn lpm_key(bit: u8, &(addr, len): &([u8; 16], u32)) -> Key<IpcacheLpmData> {
    // The trie matches the generation byte too: 8 more bits of prefix.
    Key::new(
        8 + len,
        IpcacheLpmData {
            generation: bit,
            addr,
        },
    )
}

fn service_key(bit: u8, key: &ServiceKey) -> ServiceKey {
    ServiceKey {
        generation: bit,
        ..*key
    }
}

fn backend_key(bit: u8, key: &BackendKey) -> BackendKey {
    BackendKey {
        service: service_key(bit, &key.service),
        slot: key.slot,
    }
}

fn ipcache_value(identity: &u32) -> IpcacheValue {
    IpcacheValue {
        identity: *identity,
    }
}

/// Removes the entries of a hash map whose key is `stale`; returns how many it removed.
fn remove_where<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    stale: impl Fn(&K) -> bool,
) -> Result<usize, KernelError> {
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| stale(k))
        .collect();
    for key in &keys {
        ignore_missing(map.remove(key)).map_err(map_err(name))?;
    }
    Ok(keys.len())
}

fn mapped_prefix(net: &ipnet::IpNet) -> ([u8; 16], u32) {
    match net {
        ipnet::IpNet::V4(n) => (mapped(n.network().into()), 96 + u32::from(n.prefix_len())),
        ipnet::IpNet::V6(n) => (n.network().octets(), u32::from(n.prefix_len())),
    }
}
