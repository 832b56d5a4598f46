//! Remote identity: address → identity for peers with their own addresses, listening sockets for
//! peers that share this host's addresses.
use agent_common::*;
use aya_ebpf::{maps::lpm_trie::Key, programs::SockAddrContext};

use crate::{
    context::{self, Receiver},
    maps::{IPCACHE, IPCACHE_LPM, LISTENERS},
};

#[inline(always)]
pub fn is_loopback(addr: &[u8; 16]) -> bool {
    (is_v4_mapped(addr) && addr[12] == 127) || (addr[..15] == [0; 15] && addr[15] == 1)
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

/// Identity of a destination this host's sockets connect or send to: a host address resolves to
/// the workload that bound the socket that would receive there, in the caller's network
/// namespace. A socket bound before this agent's programs has no owner recorded with it: the port
/// record an earlier agent kept names it.
#[inline(always)]
pub fn destination_identity(
    ctx: &SockAddrContext,
    addr: &[u8; 16],
    port: u16,
    protocol: u8,
    gen: u8,
) -> u32 {
    let identity = address_identity(addr, gen);
    if identity != IDENTITY_HOST {
        return identity;
    }
    receiver_identity(ctx, addr, port, protocol)
}

/// The workload of the socket at a host address. Its own BPF function: the lookup's tuple stays
/// off its callers' frames.
#[inline(never)]
fn receiver_identity(ctx: &SockAddrContext, addr: &[u8; 16], port: u16, protocol: u8) -> u32 {
    match context::receiver(ctx, protocol, addr, port) {
        Receiver::Owner(identity) => identity,
        Receiver::None => IDENTITY_HOST,
        Receiver::Unrecorded => {
            let key = ListenerKey {
                netns: context::netns_cookie(ctx),
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
    }
}
