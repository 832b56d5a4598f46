//! DNS-aware egress in the kernel: the addresses a workload learned from DNS answers, and the
//! redirect of its DNS to the agent's proxy, which learns them.
//!
//! A workload whose egress rules name DNS names (its isolation entry has [`POLICY_FLAG_FQDN`])
//! sends its DNS (TCP and UDP, port 53, to a resolver its policy allows) to the proxy on loopback
//! in its own network namespace, when a proxy listens there; with no proxy (no agent running) the
//! call goes to the resolver it named, and only addresses learned before count. The proxy finds
//! where a query was going by the packet's 4-tuple and namespace ([`file_redirect`], in `ward_dnsflow`).
use agent_common::*;
use aya_ebpf::programs::{SkBuffContext, SockAddrContext};

use crate::{
    context, flows,
    maps::{DNS_FLOWS, DNS_PROXY, LEARNED, REDIRECTED_SOCKETS, SERVICE_SOCKETS},
    policy, redirect,
    sock_addr::Call,
};

pub const DNS_PORT: u16 = 53;
const SOCK_STREAM: u32 = 1;

/// The proxy's port, when the agent runs one.
#[inline(always)]
pub fn proxy_port() -> Option<u16> {
    DNS_PROXY.get(0).filter(|c| c.enabled != 0).map(|c| c.port)
}

/// The decision of an egress call to `addr` that no enforcing rule settled by its identity
/// (`who`: the local identity in the high half, the remote's below), when the local workload
/// learned the address from a DNS name (unexpired): the rules of the address and of the name's
/// selectors merge as one peer's. `what` and the answer are packed as
/// [`policy::decide_packed`]'s, with the name's id in bits 12 to 31 ([`learned_name`]); 0 when
/// the address was not learned. Its own BPF function: the learned value stays off the connect
/// hook's frame.
#[inline(never)]
pub fn decide_learned(who: u64, addr: &[u8; 16], what: u32, gen: u8) -> u64 {
    let (local, remote) = ((who >> 32) as u32, who as u32);
    let key = LearnedKey {
        generation: gen,
        _pad: [0; 3],
        local_identity: local,
        addr: *addr,
    };
    // The value is read in place, not copied: the connect hook's frames share 512 bytes.
    let Some(learned) = LEARNED.get_ptr(key) else {
        return 0;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let (expires_ns, name) = unsafe { ((*learned).expires_ns, (*learned).names[0]) };
    if expires_ns <= context::boot_ns() {
        return 0;
    }
    // SAFETY: as above.
    let packed =
        policy::decide_as::<false>(local, remote, unsafe { &(*learned).selectors }, what, gen);
    let id = u64::from(name.wrapping_sub(FIRST_FQDN_NAME) & LEARNED_NAME_MASK);
    packed | (id << LEARNED_NAME_SHIFT)
}

/// Where [`decide_learned`] puts the name's id, below the rule.
const LEARNED_NAME_SHIFT: u32 = 12;
const LEARNED_NAME_MASK: u32 = MAX_FQDN_NAME_ID;

/// The name identity [`decide_learned`]'s answer carries.
#[inline(always)]
pub fn learned_name(packed: u64) -> u32 {
    FIRST_FQDN_NAME + ((packed >> LEARNED_NAME_SHIFT) as u32 & LEARNED_NAME_MASK)
}

/// Prepares sending a DNS call (TCP or UDP to port 53, already allowed) to the proxy listening on
/// loopback `port` in the caller's network namespace (the caller then rewrites the call's address
/// to [`proxy_addr`]: there, the family is a constant, and the verifier sees which fields of the
/// context the hook writes), and records where it was going: for the proxy
/// (until the packet program files it under the 4-tuple) and for `recvmsg()`/`getpeername()`,
/// which show the resolver again (glibc takes answers only from the server it asked). `who` packs
/// the local identity (high half) and the resolver's. Returns false, and records nothing, when no
/// proxy listens there: the call goes where it was going.
///
/// Each step is a BPF function of its own, so that no two of their records share a frame: the
/// connect hook's frames share 512 bytes, and 6.1's verifier counts them whole.
#[inline(never)]
pub fn redirect(ctx: &SockAddrContext, call: &Call, port: u16, who: u64, rule: u32) -> bool {
    let v4 = proxy_is_v4(call);
    if !proxy_listens(ctx, call.protocol, v4, port) {
        return false;
    }
    if !record_socket(ctx, call, who, rule) {
        return false;
    }
    show_resolver(call, v4, port);
    true
}

#[inline(never)]
fn proxy_listens(ctx: &SockAddrContext, protocol: u8, v4: bool, port: u16) -> bool {
    context::loopback_listener(ctx, protocol, v4, port)
}

/// Where the socket's DNS was going, for the packet program to file.
#[inline(never)]
fn record_socket(ctx: &SockAddrContext, call: &Call, who: u64, rule: u32) -> bool {
    let original = OriginalDst {
        addr: call.remote_addr,
        port: call.remote_port,
        family: call.family,
        _pad: 0,
        local_identity: (who >> 32) as u32,
        remote_identity: who as u32,
        rule,
    };
    redirect::record(ctx, call.cookie, original)
}

/// The resolver, for `recvmsg()` and `getpeername()` to show in place of the proxy.
#[inline(never)]
fn show_resolver(call: &Call, v4: bool, port: u16) {
    let shown = ServiceSocketKey {
        cookie: call.cookie,
        addr: proxy_addr(v4),
        port,
        _pad: [0; 6],
    };
    let original = ServiceAddr {
        addr: call.remote_addr,
        port: call.remote_port,
        _pad: [0; 2],
    };
    let _ = SERVICE_SOCKETS.insert(shown, original, 0);
}

/// Whether the call reaches the IPv4 proxy: an IPv4 call, or a v4-mapped destination on an IPv6
/// socket (which then connects to the proxy's address mapped).
#[inline(always)]
pub fn proxy_is_v4(call: &Call) -> bool {
    call.family == 4 || is_v4_mapped(&call.remote_addr)
}

/// The proxy's loopback address, as the kernel keys addresses.
#[inline(always)]
pub fn proxy_addr(v4: bool) -> [u8; 16] {
    if v4 {
        map_v4([127, 0, 0, 1])
    } else {
        let mut one = [0; 16];
        one[15] = 1;
        one
    }
}

/// The proxy's address as `bpf_sock_addr.user_ip4` holds it (network order).
pub const PROXY_IP4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ... and as `user_ip6` does: `::1`, or `::ffff:127.0.0.1` for an IPv6 socket's IPv4 call.
pub const PROXY_IP6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
pub const PROXY_IP6_MAPPED: [u32; 4] = [
    0,
    0,
    u32::from_ne_bytes([0, 0, 0xff, 0xff]),
    u32::from_ne_bytes([127, 0, 0, 1]),
];

/// Records that `local` sent a datagram from `src_port` to the proxy at `port` (where its
/// answer comes from), as [`flows::record`] does for any datagram.
#[inline(never)]
pub fn record_sent(call: &Call, src_port: u16, port: u16, local: u32) {
    let proxy = proxy_addr(proxy_is_v4(call));
    flows::record(PROTO_UDP, &proxy, flows::ports(src_port, port), local, 0);
}

/// Whether the egress packet program files a packet of a socket of `kind` connected to `dst_port`
/// (0: unconnected) for the proxy at `port`: a socket connected to the proxy's port, or an
/// unconnected UDP socket (whose datagram may go there).
#[inline(always)]
pub fn may_go_to_proxy(kind: u32, dst_port: u16, port: u16) -> bool {
    dst_port == port || (kind != SOCK_STREAM && dst_port == 0)
}

/// The egress packet program's part: a TCP or UDP packet of a socket the hooks sent to the proxy
/// at `port` files where it was going under the packet's 4-tuple and the socket's namespace (a
/// TCP connection once, at its first packet; a UDP socket at every datagram, as it may ask again
/// from another port or of another resolver). Called only where [`may_go_to_proxy`].
#[inline(never)]
pub fn file_redirect(ctx: &SkBuffContext, kind: u32, port: u16) {
    let Some((cookie, record, key)) = redirect::pending(ctx, port) else {
        return;
    };
    let flow = DnsFlow {
        original: record.original,
        filed_ns: context::boot_ns(),
    };
    let _ = DNS_FLOWS.insert(key, flow, 0);
    if kind == SOCK_STREAM {
        let _ = REDIRECTED_SOCKETS.remove(cookie);
    }
}
