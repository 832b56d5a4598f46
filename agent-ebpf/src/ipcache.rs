//! Remote identity: address → identity for peers with their own addresses, listening sockets for
//! peers that share this host's addresses.
use agent_common::*;
use aya_ebpf::maps::lpm_trie::Key;

use crate::maps::{IPCACHE, IPCACHE_LPM, LISTENERS};

#[inline(always)]
pub fn is_loopback(addr: &[u8; 16]) -> bool {
    let v4_mapped = addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff;
    (v4_mapped && addr[12] == 127) || (addr[..15] == [0; 15] && addr[15] == 1)
}

/// Identity of an address, without looking at listeners. Its own BPF function: its two keys
/// stay off its callers' frames.
#[inline(never)]
pub fn address_identity(addr: &[u8; 16], gen: u8) -> u32 {
    let key = IpcacheKey {
        generation: gen,
        _pad: [0; 3],
        addr: *addr,
    };
    // SAFETY: copied out at once.
    if let Some(v) = unsafe { IPCACHE.get(key) } {
        return v.identity;
    }
    if is_loopback(addr) {
        return IDENTITY_HOST;
    }
    let key = Key::new(
        8 + 128,
        IpcacheLpmData {
            generation: gen,
            addr: *addr,
        },
    );
    match IPCACHE_LPM.get(&key) {
        Some(v) => v.identity,
        None => IDENTITY_WORLD,
    }
}

/// Identity of a destination this host's sockets connect to: a host address resolves to the
/// workload listening on that port in the caller's network namespace.
#[inline(always)]
pub fn destination_identity(addr: &[u8; 16], port: u16, protocol: u8, netns: u64, gen: u8) -> u32 {
    let identity = address_identity(addr, gen);
    if identity != IDENTITY_HOST {
        return identity;
    }
    let key = ListenerKey {
        netns,
        port,
        protocol,
        _pad: [0; 5],
    };
    // SAFETY: copied out at once.
    match unsafe { LISTENERS.get(key) } {
        Some(l) => l.identity,
        None => IDENTITY_HOST,
    }
}
