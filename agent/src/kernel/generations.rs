//! The datapath's writer: the policy and IP cache maps hold two generations, one in force and one
//! being written. An apply writes the next generation in full, switches the kernel to it with one
//! write to the state map, waits for programs still reading the previous one, then removes it.
//! Blocking (it sleeps [`GENERATION_SETTLE`]): the agent runs it off the runtime that carries
//! connections.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use agent_common::{
    map_names, IpcacheKey, IpcacheLpmData, IpcacheValue, PolicyKey, PolicyValue, StateValue,
};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData},
    Ebpf, Pod,
};

use super::{map_err, mapped, take, KernelError};
use crate::policy::Compiled;

/// Time for programs that read the previous generation to finish before its entries go. Programs
/// run for microseconds under RCU; this is orders of magnitude more.
const GENERATION_SETTLE: Duration = Duration::from_millis(20);

/// What one policy apply wrote.
#[derive(Clone, Copy, Debug)]
pub struct ApplyStats {
    pub at: Instant,
    pub generation: u32,
    pub entries: usize,
    pub addresses: usize,
    pub prefixes: usize,
    pub duration: Duration,
}

/// The maps an apply writes, and the generation in force.
pub(super) struct Generations {
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    ipcache: HashMap<MapData, IpcacheKey, IpcacheValue>,
    lpm: LpmTrie<MapData, IpcacheLpmData, IpcacheValue>,
    state: Array<MapData, StateValue>,
    generation: u32,
}

impl Generations {
    /// Takes the maps from the loaded object; the generation in force is the kernel's.
    pub(super) fn open(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        let state: Array<MapData, StateValue> = take(ebpf, map_names::STATE)?;
        let current = state.get(&0, 0).map_err(map_err(map_names::STATE))?;
        Ok(Generations {
            policy: take(ebpf, map_names::POLICY)?,
            ipcache: take(ebpf, map_names::IPCACHE)?,
            lpm: take(ebpf, map_names::IPCACHE_LPM)?,
            state,
            generation: current.generation,
        })
    }

    /// Installs a compiled policy and the IP cache as the next generation, then switches the
    /// kernel to it with one write. A connection sees either the old or the new generation in
    /// full, never a mix; on error the old generation stays in force untouched.
    pub(super) fn apply(
        &mut self,
        compiled: &Compiled,
        addresses: &BTreeMap<[u8; 16], u32>,
    ) -> Result<ApplyStats, KernelError> {
        let started = Instant::now();
        let next = self.generation.wrapping_add(1);
        let next_bit = (next & 1) as u8;
        // Leftovers of an apply that died half-way belong to the inactive generation.
        self.remove_generation(next_bit)?;
        if let Err(e) = self.write_generation(next_bit, compiled, addresses) {
            self.remove_generation(next_bit)?;
            return Err(e);
        }
        self.state
            .set(0, StateValue::new(next), 0)
            .map_err(map_err(map_names::STATE))?;
        let previous_bit = (self.generation & 1) as u8;
        self.generation = next;
        std::thread::sleep(GENERATION_SETTLE);
        self.remove_generation(previous_bit)?;
        Ok(ApplyStats {
            at: Instant::now(),
            generation: next,
            entries: compiled.entries.len(),
            addresses: addresses.len(),
            prefixes: compiled.prefixes.len(),
            duration: started.elapsed(),
        })
    }

    fn write_generation(
        &mut self,
        bit: u8,
        compiled: &Compiled,
        addresses: &BTreeMap<[u8; 16], u32>,
    ) -> Result<(), KernelError> {
        for (key, value) in &compiled.entries {
            let key = PolicyKey {
                generation: bit,
                ..*key
            };
            self.policy
                .insert(key, *value, 0)
                .map_err(map_err(map_names::POLICY))?;
        }
        for (addr, identity) in addresses {
            let key = IpcacheKey {
                generation: bit,
                _pad: [0; 3],
                addr: *addr,
            };
            self.ipcache
                .insert(
                    key,
                    IpcacheValue {
                        identity: *identity,
                    },
                    0,
                )
                .map_err(map_err(map_names::IPCACHE))?;
        }
        for (net, identity) in &compiled.prefixes {
            let (addr, len) = mapped_prefix(net);
            let key = Key::new(
                8 + len,
                IpcacheLpmData {
                    generation: bit,
                    addr,
                },
            );
            self.lpm
                .insert(
                    &key,
                    IpcacheValue {
                        identity: *identity,
                    },
                    0,
                )
                .map_err(map_err(map_names::IPCACHE_LPM))?;
        }
        Ok(())
    }

    fn remove_generation(&mut self, bit: u8) -> Result<(), KernelError> {
        remove_where(&mut self.policy, map_names::POLICY, |k| k.generation == bit)?;
        remove_where(&mut self.ipcache, map_names::IPCACHE, |k| {
            k.generation == bit
        })?;
        let stale: Vec<Key<IpcacheLpmData>> = self
            .lpm
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().generation == bit)
            .collect();
        for key in stale {
            ignore_missing(self.lpm.remove(&key)).map_err(map_err(map_names::IPCACHE_LPM))?;
        }
        Ok(())
    }
}

/// Removes the entries of a hash map whose key is `stale`.
fn remove_where<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    stale: impl Fn(&K) -> bool,
) -> Result<(), KernelError> {
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| stale(k))
        .collect();
    for key in keys {
        ignore_missing(map.remove(&key)).map_err(map_err(name))?;
    }
    Ok(())
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        r => r,
    }
}

fn mapped_prefix(net: &ipnet::IpNet) -> ([u8; 16], u32) {
    match net {
        ipnet::IpNet::V4(n) => (mapped(n.network().into()), 96 + u32::from(n.prefix_len())),
        ipnet::IpNet::V6(n) => (n.network().octets(), u32::from(n.prefix_len())),
    }
}
