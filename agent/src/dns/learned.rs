//! The addresses workloads learned from DNS answers: kept here (the mirror) and in the kernel's
//! learned-address map, in each policy generation bit with the name selectors the bit's policy
//! matches the name to. The names are pinned beside them (`ward_dnsname`), so a restarted agent
//! adopts what the kernel holds and decides it again under its own policy.
//!
//! Bounded: at most `dns.maxLearned` (workload, address) pairs; past it the pair that expires
//! first is evicted (logged, counted). Expired pairs are removed every second; the kernel ignores
//! them from their expiry on anyway.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use agent_common::{
    LearnedKey, LearnedValue, FIRST_FQDN_NAME, LAST_FQDN_NAME, MAX_LEARNED_NAMES,
    MAX_LEARNED_SELECTORS,
};

use crate::{
    config::DnsSettings,
    kernel::{self, dns::DnsMaps, GenerationFollower, KernelError},
    metrics::Metrics,
    policy::Compiled,
};

/// The names learned addresses came from, by name identity, for verdict records. Process-wide:
/// verdict records are named on other threads than the proxy's.
static NAMES: RwLock<BTreeMap<u32, String>> = RwLock::new(BTreeMap::new());

/// The DNS name of a name identity (`FIRST_FQDN_NAME + id`), if it is one still held.
pub fn name_of(identity: u32) -> Option<String> {
    if !(FIRST_FQDN_NAME..=LAST_FQDN_NAME).contains(&identity) {
        return None;
    }
    NAMES
        .read()
        .expect("names lock poisoned")
        .get(&identity)
        .cloned()
}

/// `CLOCK_BOOTTIME` in nanoseconds: the kernel's `bpf_ktime_get_boot_ns`.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// A learned (workload, address) pair: the names it was learned from (at most
/// [`MAX_LEARNED_NAMES`], the most recent last), each with when it stops counting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Entry {
    names: Vec<(u32, u64)>,
}

impl Entry {
    fn expires_ns(&self) -> u64 {
        self.names.iter().map(|(_, e)| *e).max().unwrap_or(0)
    }
}

/// A name held, with the chain its last answer went through (itself first).
struct Name {
    chain: Vec<String>,
    refs: usize,
}

type Pair = (u32, [u8; 16]);

struct Inner {
    maps: DnsMaps,
    /// The policy each generation bit holds.
    policy: [Option<Arc<Compiled>>; 2],
    entries: HashMap<Pair, Entry>,
    /// Each (pair, name) by when it stops counting.
    by_expiry: BTreeSet<(u64, Pair, u32)>,
    names: BTreeMap<u32, Name>,
    ids: HashMap<String, u32>,
    next_id: u32,
    /// When an eviction was last logged, and how many since.
    evictions_logged: Option<Instant>,
    evicted_unlogged: u64,
    /// The proxy's port, and whether the hooks were last told to send DNS there: only while a
    /// generation's policy names DNS names (otherwise no packet pays for it).
    proxy_port: u16,
    proxy_on: Option<bool>,
    /// Names let go, still shown in verdict records for a while: the allowed flows of the last
    /// second are named after the kernel's counts are read.
    retired: std::collections::VecDeque<(Instant, u32)>,
}

/// How long a name let go still names verdict records.
const NAME_GRACE: Duration = Duration::from_secs(10);

pub struct Learned {
    inner: Mutex<Inner>,
    min_ttl: Duration,
    max_ttl: Duration,
    max_entries: usize,
    metrics: Arc<Metrics>,
}

/// What [`Learned::learn`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Learnt {
    /// The workload's policy names none of the chain's names: nothing learned.
    NotInPolicy,
    /// This many addresses, until at least `ttl`.
    Addresses { count: usize, ttl: Duration },
}

impl Learned {
    /// Opens the pinned maps and adopts what they hold (an earlier agent's learned addresses
    /// and names); expired pairs are dropped.
    pub fn open(
        pin_dir: &Path,
        settings: &DnsSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Learned>, KernelError> {
        let maps = DnsMaps::open(pin_dir)?;
        let now = boot_ns();
        let mut inner = Inner {
            policy: [None, None],
            entries: HashMap::new(),
            by_expiry: BTreeSet::new(),
            names: BTreeMap::new(),
            ids: HashMap::new(),
            next_id: 0,
            evictions_logged: None,
            evicted_unlogged: 0,
            retired: std::collections::VecDeque::new(),
            proxy_port: settings.proxy_port,
            proxy_on: None,
            maps,
        };
        let names: BTreeMap<u32, String> = inner.maps.names().into_iter().collect();
        // A bound lowered since (maxTtlSeconds) holds for what is adopted too.
        let latest = now + settings.max_ttl.as_nanos() as u64;
        for (key, value) in inner.maps.learned() {
            let pair = (key.local_identity, key.addr);
            let expires = value.expires_ns.min(latest);
            let known: Vec<u32> = value
                .names
                .iter()
                .rev()
                .filter(|n| **n != 0)
                .map(|n| n.wrapping_sub(FIRST_FQDN_NAME))
                .filter(|id| names.contains_key(id))
                .collect();
            if expires <= now || known.is_empty() {
                let _ = inner.maps.remove_learned(&key);
                continue;
            }
            let entry = inner.entries.entry(pair).or_default();
            for id in known {
                if !entry.names.iter().any(|(n, _)| *n == id) {
                    entry.names.push((id, expires));
                    inner.by_expiry.insert((expires, pair, id));
                }
            }
        }
        let mut refs_of: HashMap<u32, usize> = HashMap::new();
        for entry in inner.entries.values() {
            for (id, _) in &entry.names {
                *refs_of.entry(*id).or_default() += 1;
            }
        }
        for (id, name) in names {
            let refs = refs_of.get(&id).copied().unwrap_or(0);
            if refs == 0 {
                let _ = inner.maps.remove_name(id);
                continue;
            }
            inner.next_id = inner.next_id.max(id + 1);
            inner.ids.insert(name.clone(), id);
            // The chain is not pinned: until the name is answered again, its own name decides.
            inner.names.insert(
                id,
                Name {
                    chain: vec![name],
                    refs,
                },
            );
        }
        NAMES.write().expect("names lock poisoned").extend(
            inner
                .names
                .iter()
                .map(|(id, n)| (FIRST_FQDN_NAME + id, n.chain[0].clone())),
        );
        // A bound lowered since (maxLearned) holds for what is adopted too.
        let mut evicted = 0;
        while inner.entries.len() > settings.max_learned {
            inner.evict_first()?;
            evicted += 1;
        }
        metrics.dns_learned_evictions.inc_by(evicted);
        let adopted = inner.entries.len();
        if adopted > 0 {
            tracing::info!(
                addresses = adopted,
                names = inner.names.len(),
                "adopted the addresses workloads learned from DNS before this start"
            );
        }
        let learned = Learned {
            inner: Mutex::new(inner),
            min_ttl: settings.min_ttl,
            max_ttl: settings.max_ttl,
            max_entries: settings.max_learned,
            metrics,
        };
        learned.count();
        Ok(Arc::new(learned))
    }

    /// Whether a policy generation names DNS names: the proxy is needed.
    pub fn names_in_policy(&self) -> bool {
        let inner = self.inner.lock().expect("learned lock poisoned");
        inner.policy.iter().flatten().any(|c| !c.fqdn.is_empty())
    }

    /// Whether the policy of `local` (in either generation bit) names any of `names`.
    pub fn in_policy(&self, local: u32, names: &[&str]) -> bool {
        let inner = self.inner.lock().expect("learned lock poisoned");
        inner
            .policy
            .iter()
            .flatten()
            .any(|c| !c.fqdn_identities(local, names).is_empty())
    }

    /// Installs the addresses of an answer `local` got for `chain` (the asked name first), if its
    /// policy names one of the chain's names; before the answer reaches the workload, so a
    /// connection right after it finds them. Each address counts for its TTL within the bounds.
    pub fn learn(
        &self,
        local: u32,
        chain: &[String],
        addresses: &[(IpAddr, u32)],
    ) -> Result<Learnt, KernelError> {
        let names: Vec<&str> = chain.iter().map(String::as_str).collect();
        let mut inner = self.inner.lock().expect("learned lock poisoned");
        if !inner
            .policy
            .iter()
            .flatten()
            .any(|c| !c.fqdn_identities(local, &names).is_empty())
        {
            return Ok(Learnt::NotInPolicy);
        }
        let id = inner.intern(chain)?;
        let now = boot_ns();
        let mut shortest = self.max_ttl;
        for (address, ttl) in addresses {
            let ttl = Duration::from_secs((*ttl).into()).clamp(self.min_ttl, self.max_ttl);
            shortest = shortest.min(ttl);
            let pair = (local, kernel::mapped(*address));
            inner.add(pair, id, now + ttl.as_nanos() as u64)?;
        }
        while inner.entries.len() > self.max_entries {
            let evicted = inner.evict_first()?;
            self.metrics.dns_learned_evictions.inc();
            inner.evicted_unlogged += 1;
            if inner
                .evictions_logged
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
            {
                tracing::warn!(
                    evicted = inner.evicted_unlogged,
                    limit = self.max_entries,
                    last_workload = evicted.0,
                    "learned DNS addresses are at dns.maxLearned: the ones expiring first were evicted (their workloads must resolve them again)"
                );
                inner.evictions_logged = Some(Instant::now());
                inner.evicted_unlogged = 0;
            }
        }
        drop(inner);
        self.count();
        Ok(Learnt::Addresses {
            count: addresses.len(),
            ttl: shortest,
        })
    }

    /// Removes the pairs whose time is up. Returns how many.
    pub fn expire(&self) -> usize {
        let now = boot_ns();
        let mut inner = self.inner.lock().expect("learned lock poisoned");
        let due: Vec<(Pair, u32)> = inner
            .by_expiry
            .iter()
            .take_while(|(expires, _, _)| *expires <= now)
            .map(|(_, pair, id)| (*pair, *id))
            .collect();
        for (pair, id) in &due {
            if let Err(e) = inner.remove_name(*pair, *id) {
                tracing::warn!(error = %e, "removing an expired learned DNS address");
            }
        }
        while let Some((at, id)) = inner.retired.front().copied() {
            if at.elapsed() < NAME_GRACE {
                break;
            }
            inner.retired.pop_front();
            // Unless the name came back meanwhile.
            if !inner.names.contains_key(&id) {
                NAMES
                    .write()
                    .expect("names lock poisoned")
                    .remove(&(FIRST_FQDN_NAME + id));
            }
        }
        drop(inner);
        self.count();
        due.len()
    }

    fn count(&self) {
        let inner = self.inner.lock().expect("learned lock poisoned");
        self.metrics.dns_learned.set(inner.entries.len() as i64);
        self.metrics.dns_names.set(inner.names.len() as i64);
    }
}

impl GenerationFollower for Learned {
    /// Writes every learned pair into bit `bit` with the selectors of `compiled`, and removes
    /// those its policy no longer names.
    fn follow(&self, bit: u8, compiled: &Arc<Compiled>) {
        let mut inner = self.inner.lock().expect("learned lock poisoned");
        let slot = usize::from(bit & 1);
        if inner.policy[slot]
            .as_ref()
            .is_some_and(|held| Arc::ptr_eq(held, compiled))
        {
            return;
        }
        inner.policy[slot] = Some(compiled.clone());
        let wanted = inner.policy.iter().flatten().any(|c| !c.fqdn.is_empty());
        if inner.proxy_on != Some(wanted) {
            let port = wanted.then_some(inner.proxy_port);
            match inner.maps.set_proxy(port) {
                Ok(()) => inner.proxy_on = Some(wanted),
                Err(e) => tracing::warn!(error = %e, "pointing the hooks at the DNS proxy"),
            }
        }
        let pairs: Vec<Pair> = inner.entries.keys().copied().collect();
        for pair in pairs {
            if let Err(e) = inner.write(bit & 1, pair) {
                tracing::warn!(error = %e, "writing a learned DNS address into the new policy generation");
            }
        }
    }
}

impl Inner {
    /// The id of the name `chain[0]`, its chain as given; a new id for a new name.
    fn intern(&mut self, chain: &[String]) -> Result<u32, KernelError> {
        let name = &chain[0];
        if let Some(id) = self.ids.get(name).copied() {
            if let Some(held) = self.names.get_mut(&id) {
                held.chain = chain.to_vec();
            }
            return Ok(id);
        }
        // Ids are reused only once the whole range went round.
        let span = LAST_FQDN_NAME - FIRST_FQDN_NAME + 1;
        let mut id = self.next_id % span;
        while self.names.contains_key(&id) {
            id = (id + 1) % span;
        }
        self.next_id = id + 1;
        self.maps.set_name(id, name)?;
        NAMES
            .write()
            .expect("names lock poisoned")
            .insert(FIRST_FQDN_NAME + id, name.clone());
        self.ids.insert(name.clone(), id);
        self.names.insert(
            id,
            Name {
                chain: chain.to_vec(),
                refs: 0,
            },
        );
        Ok(id)
    }

    /// Holds name `id` for `pair` until `expires_ns` (a new answer sets a new time), the most
    /// recent of its names; past [`MAX_LEARNED_NAMES`] its oldest name goes. In the kernel too.
    fn add(&mut self, pair: Pair, id: u32, expires_ns: u64) -> Result<(), KernelError> {
        let entry = self.entries.entry(pair).or_default();
        match entry.names.iter().position(|(n, _)| *n == id) {
            Some(at) => {
                let (_, old) = entry.names.remove(at);
                self.by_expiry.remove(&(old, pair, id));
            }
            None => {
                if let Some(name) = self.names.get_mut(&id) {
                    name.refs += 1;
                }
            }
        }
        entry.names.push((id, expires_ns));
        self.by_expiry.insert((expires_ns, pair, id));
        let dropped = (entry.names.len() > MAX_LEARNED_NAMES).then(|| entry.names.remove(0));
        if let Some((old_id, old_expires)) = dropped {
            self.by_expiry.remove(&(old_expires, pair, old_id));
            self.release(old_id);
        }
        for bit in 0..2 {
            self.write(bit, pair)?;
        }
        Ok(())
    }

    /// The kernel entry of `pair` in `bit`: the selectors of all its names under that bit's
    /// policy (none: removed), its latest expiry, its names most recent first.
    fn write(&mut self, bit: u8, pair: Pair) -> Result<(), KernelError> {
        let key = LearnedKey {
            generation: bit,
            _pad: [0; 3],
            local_identity: pair.0,
            addr: pair.1,
        };
        let Some(entry) = self.entries.get(&pair) else {
            return self.maps.remove_learned(&key);
        };
        let selectors = match &self.policy[usize::from(bit)] {
            Some(compiled) => {
                let names: Vec<&str> = entry
                    .names
                    .iter()
                    .filter_map(|(id, _)| self.names.get(id))
                    .flat_map(|n| n.chain.iter().map(String::as_str))
                    .collect();
                compiled.fqdn_identities(pair.0, &names)
            }
            None => Vec::new(),
        };
        if selectors.is_empty() {
            return self.maps.remove_learned(&key);
        }
        let mut value = LearnedValue {
            expires_ns: entry.expires_ns(),
            ..Default::default()
        };
        for (slot, selector) in value.selectors.iter_mut().zip(&selectors) {
            *slot = *selector;
        }
        for (slot, (id, _)) in value.names.iter_mut().zip(entry.names.iter().rev()) {
            *slot = FIRST_FQDN_NAME + id;
        }
        if selectors.len() > MAX_LEARNED_SELECTORS {
            tracing::debug!(
                workload_identity = pair.0,
                selectors = selectors.len(),
                "an address's names matched more selectors than the kernel keeps; the first {MAX_LEARNED_SELECTORS} decide"
            );
        }
        self.maps.set_learned(key, value)
    }

    /// Lets `pair` no longer count as learned from name `id` (its time is up).
    fn remove_name(&mut self, pair: Pair, id: u32) -> Result<(), KernelError> {
        let Some(entry) = self.entries.get_mut(&pair) else {
            return Ok(());
        };
        let Some(at) = entry.names.iter().position(|(n, _)| *n == id) else {
            return Ok(());
        };
        let (_, expires) = entry.names.remove(at);
        let emptied = entry.names.is_empty();
        self.by_expiry.remove(&(expires, pair, id));
        self.release(id);
        if emptied {
            self.entries.remove(&pair);
        }
        for bit in 0..2 {
            self.write(bit, pair)?;
        }
        Ok(())
    }

    fn release(&mut self, id: u32) {
        let Some(name) = self.names.get_mut(&id) else {
            return;
        };
        name.refs = name.refs.saturating_sub(1);
        if name.refs == 0 {
            let name = self.names.remove(&id).expect("present");
            self.ids.remove(&name.chain[0]);
            self.retired.push_back((Instant::now(), id));
            let _ = self.maps.remove_name(id);
        }
    }

    /// Forgets `pair` with all its names, in the kernel first.
    fn remove(&mut self, pair: Pair) -> Result<(), KernelError> {
        for bit in 0..2 {
            self.maps.remove_learned(&LearnedKey {
                generation: bit,
                _pad: [0; 3],
                local_identity: pair.0,
                addr: pair.1,
            })?;
        }
        if let Some(entry) = self.entries.remove(&pair) {
            for (id, expires) in entry.names {
                self.by_expiry.remove(&(expires, pair, id));
                self.release(id);
            }
        }
        Ok(())
    }

    fn evict_first(&mut self) -> Result<Pair, KernelError> {
        let (_, pair, _) = *self.by_expiry.first().expect("more entries than the limit");
        self.remove(pair)?;
        Ok(pair)
    }
}
