//! Flows a workload took part in, recorded so their replies pass, and so a receiver on this host
//! can name the sender when addresses are shared.
//!
//! Records live in the connecting map, keyed like a sender's view of the flow without its own
//! address (an unconnected socket's is chosen by the route after the hook, and on this host it
//! is a shared one anyway): `(destination, source port, destination port, protocol)`. For ICMP
//! echo the source port is the echo identifier.
use agent_common::*;

use crate::maps::{self, CONNECTING};

#[inline(always)]
pub fn sender_key(protocol: u8, destination: [u8; 16], src_port: u16, dst_port: u16) -> FlowKey {
    FlowKey {
        local_addr: [0; 16],
        remote_addr: destination,
        local_port: src_port,
        remote_port: dst_port,
        protocol,
        _pad: [0; 3],
    }
}

/// Source and destination port in one argument.
#[inline(always)]
pub fn ports(src_port: u16, dst_port: u16) -> u32 {
    (u32::from(src_port) << 16) | u32::from(dst_port)
}

/// Records that `identity` sent on the flow to `destination` with `ports` (flags 0), or that
/// its ingress admitted a flow the remote started ([`CONNECTING_FLAG_ADMITTED`], keyed as the
/// workload's answer would be), under the policy generation in force (in `cookie`: an admission
/// lasts until the policy changes; the next datagram is admitted again or not). Its own BPF
/// function, so the key is on its own small frame.
#[inline(never)]
pub fn record(protocol: u8, destination: &[u8; 16], ports: u32, identity: u32, flags: u32) {
    let key = sender_key(protocol, *destination, (ports >> 16) as u16, ports as u16);
    let generation = u64::from(maps::generation());
    // An answer to a flow admitted under the policy in force keeps the admission: the flow stays
    // the remote's, which the policy in force lets in (a write per answer saved). A record that
    // is already there saves the write too: ephemeral ports come round again while the records
    // of their earlier flows are still kept.
    // SAFETY: copied out at once.
    if unsafe { CONNECTING.get(key) }.is_some_and(|v| {
        v.identity == identity
            && v.cookie == generation
            && (v.flags == flags || (flags == 0 && v.flags == CONNECTING_FLAG_ADMITTED))
    }) {
        return;
    }
    write(&key, identity, flags, generation);
}

/// Records that `identity`'s ingress admitted the flow whose answer goes to `destination` with
/// `ports` ([`record`] with [`CONNECTING_FLAG_ADMITTED`]), for a caller that has just found no
/// current admission of `identity` there ([`receiving`] was not [`CONNECTING_FLAG_ADMITTED`]):
/// the write [`record`] would make, without reading the record again.
#[inline(never)]
pub fn admit(protocol: u8, destination: &[u8; 16], ports: u32, identity: u32) {
    let key = sender_key(protocol, *destination, (ports >> 16) as u16, ports as u16);
    let generation = u64::from(maps::generation());
    write(&key, identity, CONNECTING_FLAG_ADMITTED, generation);
}

/// The write of [`record`] and [`admit`].
#[inline(always)]
fn write(key: &FlowKey, identity: u32, flags: u32, generation: u64) {
    let value = ConnectingValue {
        identity,
        flags,
        cookie: generation,
    };
    let _ = CONNECTING.insert(key, value, 0);
}

/// The flags of the record [`record`] made for `identity`, -1 when there is none (an
/// admission made under an earlier policy generation counts as none).
#[inline(never)]
pub fn recorded(protocol: u8, destination: &[u8; 16], ports: u32, identity: u32) -> i64 {
    let key = sender_key(protocol, *destination, (ports >> 16) as u16, ports as u16);
    // SAFETY: copied out at once.
    let Some(v) = (unsafe { CONNECTING.get(key) }).copied() else {
        return -1;
    };
    let stale =
        v.flags & CONNECTING_FLAG_ADMITTED != 0 && v.cookie != u64::from(maps::generation());
    if v.identity != identity || stale {
        return -1;
    }
    i64::from(v.flags)
}

/// The identity that recorded sending on this flow, if any (a peer on this host, named by its
/// source port because addresses are shared).
#[inline(never)]
pub fn sender(protocol: u8, destination: &[u8; 16], ports: u32) -> u32 {
    let key = sender_key(protocol, *destination, (ports >> 16) as u16, ports as u16);
    // SAFETY: copied out at once.
    unsafe { CONNECTING.get(key) }.map_or(IDENTITY_HOST, |c| c.identity)
}

/// Whether [`receiving`]'s flags say the packet answers a flow `local` started itself.
#[inline(always)]
pub fn is_reply(flags: i64) -> bool {
    flags == 0
}

/// Whether [`receiving`]'s flags say `local` has a record of the packet's flow: one it started
/// itself (the packet is a reply), or one its ingress admitted under the policy in force.
#[inline(always)]
pub fn is_known(flags: i64) -> bool {
    flags >= 0
}

/// The flags of `local`'s record of the flow a packet from `flow`'s sender to `local` belongs to
/// ([`recorded`]).
#[inline(always)]
pub fn receiving(local: u32, flow: &FlowKey) -> i64 {
    recorded(
        flow.protocol,
        &flow.local_addr,
        ports(flow.remote_port, flow.local_port),
        local,
    )
}

/// The flags of `local`'s record of the flow it sends on from `src_port` to
/// `remote_addr:remote_port`, -1 when there is none: [`CONNECTING_FLAG_ADMITTED`] when the flow
/// is one its ingress admitted under the policy in force (its answers pass whatever its egress
/// rules say), 0 when it started the flow itself and was allowed.
#[inline(always)]
pub fn sending(
    local: u32,
    protocol: u8,
    remote_addr: &[u8; 16],
    src_port: u16,
    remote_port: u16,
) -> i64 {
    recorded(protocol, remote_addr, ports(src_port, remote_port), local)
}

/// Whether [`sending`]'s flags say the flow answers an admitted one.
#[inline(always)]
pub fn is_answer(flags: i64) -> bool {
    flags >= 0 && (flags as u32) & CONNECTING_FLAG_ADMITTED != 0
}
