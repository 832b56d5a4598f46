//! ward's kernel programs: one per attach point, the shared logic in small modules.
//!
//! Fail modes: a socket whose cgroup belongs to no workload, or a workload that no policy selects
//! in a direction, is never touched. For a selected workload the default is deny (fail closed):
//! a missing policy entry denies, an unknown remote is `IDENTITY_WORLD`.
#![no_std]
#![no_main]

mod events;
mod ipcache;
mod maps;
mod policy;

use agent_common::*;
use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, sock_ops},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};

use crate::maps::{
    count, ACCEPTING, CONNECTING, LISTENERS, ORIGINAL_DST, OWNERS, REDIRECTS, SOCKETS, UDP_FLOWS,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const AF_INET: u32 = 2;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

fn v6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// Egress decision for connect() and sendmsg(): the local identity from the calling task's
/// cgroup, the remote from the destination. A refusal makes the syscall fail with EPERM at once.
#[inline(always)]
fn egress(ctx: &SockAddrContext, family: u8, remote_addr: [u8; 16]) -> i32 {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (protocol, user_port) = unsafe { ((*sa).protocol as u8, (*sa).user_port) };
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return ALLOW;
    }
    // SAFETY: no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let Some(local) = maps::cgroup_identity(cgroup_id) else {
        return ALLOW;
    };
    let remote_port = u16::from_be(user_port as u16);
    let gen = (maps::generation() & 1) as u8;
    // SAFETY: valid context for these helpers in cgroup_sock_addr programs.
    let (netns, cookie) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_socket_cookie(ctx.as_ptr()),
        )
    };
    let remote = ipcache::destination_identity(&remote_addr, remote_port, protocol, netns, gen);
    let d = policy::decide(local, remote, DIRECTION_EGRESS, protocol, remote_port, gen);
    // Only a datagram that leaves names its sender (and lets its replies in).
    if protocol == PROTO_UDP && !(d.isolated && d.verdict == VERDICT_DENY) {
        record_udp_sender(ctx, local, remote_addr, remote_port);
    }
    let (mut verdict, mut rule, mut report) = if d.isolated {
        (d.verdict, d.rule, true)
    } else {
        (VERDICT_ALLOW, d.rule, false)
    };
    if protocol == PROTO_UDP {
        // The tunnel carries TCP; a datagram follows the rule's L4 verdict.
        if verdict == VERDICT_REDIRECT {
            verdict = VERDICT_ALLOW;
        }
    } else if verdict != VERDICT_DENY && verdict != VERDICT_REDIRECT {
        // The destination's ingress rule may require mTLS where the source's own does not.
        if let Some(demand) = policy::mtls_demand(local, remote, protocol, remote_port, gen) {
            (verdict, rule, report) = (VERDICT_REDIRECT, demand, true);
        }
    }
    if verdict == VERDICT_REDIRECT
        && !redirect(
            ctx,
            family,
            remote_addr,
            remote_port,
            cookie,
            local,
            remote,
            rule,
        )
    {
        verdict = VERDICT_NO_TUNNEL;
    }
    let refused = verdict == VERDICT_DENY || verdict == VERDICT_NO_TUNNEL;
    // A workload no policy isolates is tagged all the same: sockops learns a connecting socket's
    // workload from its tag.
    if protocol == PROTO_TCP && !refused {
        let tag = SocketValue {
            local_identity: local,
            remote_identity: remote,
            rule,
            verdict,
            direction: DIRECTION_EGRESS,
            _pad: [0; 2],
        };
        let _ = SOCKETS.insert(cookie, tag, 0);
    }
    if !report {
        return ALLOW;
    }
    count(counters::verdict(DIRECTION_EGRESS, verdict));
    let flow = EventLimitKey {
        local_identity: local,
        remote_identity: remote,
        remote_addr,
        remote_port,
        protocol,
        direction: DIRECTION_EGRESS,
        verdict,
        _pad: [0; 3],
    };
    events::emit(&flow, rule, |ev| {
        ev.cgroup_id = cgroup_id;
        ev.cookie = cookie;
        ev.family = family;
    });
    if refused {
        REFUSE
    } else {
        ALLOW
    }
}

/// Points a connect() at the agent's outbound tunnel listener and records where it was going,
/// for sockops to file under the connection's 4-tuple. False when no tunnel runs on this node.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn redirect(
    ctx: &SockAddrContext,
    family: u8,
    addr: [u8; 16],
    port: u16,
    cookie: u64,
    local: u32,
    remote: u32,
    rule: u32,
) -> bool {
    let Some(t) = maps::tunnel() else {
        return false;
    };
    let original = OriginalDst {
        addr,
        port,
        family,
        _pad: 0,
        local_identity: local,
        remote_identity: remote,
        rule,
    };
    if ORIGINAL_DST.insert(cookie, original, 0).is_err() {
        return false;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context is valid and these fields are writable in connect hooks.
    unsafe {
        if family == 4 {
            (*sa).user_ip4 = t.ip4;
        } else {
            (*sa).user_ip6[0] = t.ip6[0];
            (*sa).user_ip6[1] = t.ip6[1];
            (*sa).user_ip6[2] = t.ip6[2];
            (*sa).user_ip6[3] = t.ip6[3];
        }
        (*sa).user_port = u32::from(t.port.to_be());
    }
    true
}

/// The UDP counterpart of sockops' `TCP_CONNECT_CB` record: a datagram from a bound socket of a
/// workload names its sender to the receiving side's ingress check, by source port, because peers
/// on this host share their addresses. (An unbound socket's first datagram gets its port only
/// after this hook; the receiver then sees it by address, as *host*.)
#[inline(always)]
fn record_udp_sender(
    ctx: &SockAddrContext,
    identity: u32,
    remote_addr: [u8; 16],
    remote_port: u16,
) {
    // SAFETY: `sk` of a sock_addr context is a valid socket for the whole program run.
    let src_port = unsafe {
        let sk =
            core::ptr::read_volatile(core::ptr::addr_of!((*ctx.sock_addr).__bindgen_anon_1.sk));
        core::ptr::read_volatile(core::ptr::addr_of!((*sk).src_port))
    } as u16;
    if src_port == 0 {
        return;
    }
    let key = udp_sender_key(remote_addr, src_port, remote_port);
    // SAFETY: copied out at once.
    if unsafe { CONNECTING.get(key) }.is_some_and(|v| v.identity == identity) {
        return;
    }
    let _ = CONNECTING.insert(
        key,
        ConnectingValue {
            identity,
            flags: 0,
            cookie: 0,
        },
        0,
    );
}

/// Whether a datagram answers one that `local` sent from its destination port to its source,
/// as [`record_udp_sender`] recorded it.
#[inline(always)]
fn is_udp_reply(local: u32, flow: &FlowKey) -> bool {
    let key = udp_sender_key(flow.local_addr, flow.remote_port, flow.local_port);
    // SAFETY: copied out at once.
    unsafe { CONNECTING.get(key) }.is_some_and(|v| v.identity == local)
}

/// UDP senders are keyed without their source address: an unconnected socket's is chosen by the
/// route after the hook, and on this host it is a shared one anyway.
#[inline(always)]
fn udp_sender_key(destination: [u8; 16], src_port: u16, dst_port: u16) -> FlowKey {
    FlowKey {
        local_addr: [0; 16],
        remote_addr: destination,
        local_port: src_port,
        remote_port: dst_port,
        protocol: PROTO_UDP,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn v4_destination(ctx: &SockAddrContext) -> [u8; 16] {
    // SAFETY: valid context.
    map_v4(unsafe { (*ctx.sock_addr).user_ip4 }.to_ne_bytes())
}

#[inline(always)]
fn v6_destination(ctx: &SockAddrContext) -> [u8; 16] {
    // SAFETY: valid context.
    v6_bytes(unsafe { (*ctx.sock_addr).user_ip6 })
}

#[cgroup_sock_addr(connect4)]
pub fn ward_connect4(ctx: SockAddrContext) -> i32 {
    egress(&ctx, 4, v4_destination(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn ward_connect6(ctx: SockAddrContext) -> i32 {
    egress(&ctx, 6, v6_destination(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ward_sendmsg4(ctx: SockAddrContext) -> i32 {
    egress(&ctx, 4, v4_destination(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ward_sendmsg6(ctx: SockAddrContext) -> i32 {
    egress(&ctx, 6, v6_destination(&ctx))
}

/// A parsed packet: its flow as the sender sees it (the sender is "local" in [`FlowKey`]'s
/// terms, as in the connecting side's record), and what the ingress check needs besides.
struct Packet {
    flow: FlowKey,
    family: u8,
    tcp_flags: u8,
}

#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Result<Packet, i64> {
    // SAFETY: valid context.
    let eth_proto = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16) as u32;
    let mut flow = FlowKey::default();
    let (family, l4) = if eth_proto == ETH_P_IP {
        let vihl: u8 = ctx.load(0)?;
        flow.protocol = ctx.load::<u8>(9)?;
        flow.local_addr = map_v4(ctx.load::<[u8; 4]>(12)?);
        flow.remote_addr = map_v4(ctx.load::<[u8; 4]>(16)?);
        (4u8, ((vihl & 0x0f) as usize) * 4)
    } else if eth_proto == ETH_P_IPV6 {
        flow.protocol = ctx.load::<u8>(6)?;
        flow.local_addr = ctx.load(8)?;
        flow.remote_addr = ctx.load(24)?;
        (6u8, 40usize)
    } else {
        return Err(0);
    };
    if flow.protocol != PROTO_TCP && flow.protocol != PROTO_UDP {
        return Err(0);
    }
    flow.local_port = u16::from_be(ctx.load::<u16>(l4)?);
    flow.remote_port = u16::from_be(ctx.load::<u16>(l4 + 2)?);
    let tcp_flags = if flow.protocol == PROTO_TCP {
        ctx.load::<u8>(l4 + 13)?
    } else {
        0
    };
    Ok(Packet {
        flow,
        family,
        tcp_flags,
    })
}

/// Ingress decision on the first packet of a flow: a TCP SYN, or a UDP datagram of a flow whose
/// verdict for the current policy generation is not cached yet. Established traffic pays one
/// header read. A dropped SYN never reaches the listener.
#[cgroup_skb(ingress)]
pub fn ward_ingress(ctx: SkBuffContext) -> i32 {
    let Ok(p) = parse(&ctx) else {
        return ALLOW;
    };
    let flow = &p.flow;
    let protocol = flow.protocol;
    if protocol == PROTO_TCP && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN {
        return ALLOW;
    }
    // SAFETY: valid context for this program type.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let Some(local) = maps::cgroup_identity(cgroup_id) else {
        return ALLOW;
    };
    // Replies belong to a flow the workload started, which its egress check decided: as in
    // Kubernetes, they are never refused by its ingress policy. (A TCP reply is no SYN.)
    if protocol == PROTO_UDP && is_udp_reply(local, flow) {
        return ALLOW;
    }
    let full_gen = maps::generation();
    let gen = (full_gen & 1) as u8;
    if protocol == PROTO_UDP {
        // SAFETY: copied out at once.
        if let Some(cached) = unsafe { UDP_FLOWS.get(flow) }.copied() {
            if cached.generation == full_gen {
                return if cached.verdict == VERDICT_DENY {
                    REFUSE
                } else {
                    ALLOW
                };
            }
        }
    }
    // A peer on this host is named by its connecting socket, recorded before its SYN left; only
    // peers with their own addresses are named by address.
    // The agent's delivery of a tunneled connection is named by the workload its certificate
    // proved, for the 4-tuple the agent recorded.
    let mut tunneled = false;
    let remote = if protocol == PROTO_TCP {
        // SAFETY: copied out at once.
        match unsafe { CONNECTING.get(flow) } {
            Some(c) => {
                tunneled = c.flags & CONNECTING_FLAG_TUNNEL != 0;
                c.identity
            }
            None => ipcache::address_identity(&flow.local_addr, gen),
        }
    } else {
        match ipcache::address_identity(&flow.local_addr, gen) {
            IDENTITY_HOST => {
                let key = udp_sender_key(flow.remote_addr, flow.local_port, flow.remote_port);
                // SAFETY: copied out at once.
                unsafe { CONNECTING.get(key) }.map_or(IDENTITY_HOST, |c| c.identity)
            }
            by_address => by_address,
        }
    };
    let d = policy::decide(
        local,
        remote,
        DIRECTION_INGRESS,
        protocol,
        flow.remote_port,
        gen,
    );
    if protocol == PROTO_UDP {
        let cached = UdpFlowValue {
            generation: full_gen,
            rule: d.rule,
            verdict: d.verdict,
            _pad: [0; 7],
        };
        let _ = UDP_FLOWS.insert(flow, cached, 0);
    }
    if !d.isolated {
        return ALLOW;
    }
    // A rule that requires mTLS admits only what came through the tunnel (TCP; a datagram follows
    // the L4 verdict).
    let verdict = match d.verdict {
        VERDICT_REDIRECT if protocol == PROTO_TCP && !tunneled => VERDICT_NO_TUNNEL,
        VERDICT_REDIRECT => VERDICT_ALLOW,
        v => v,
    };
    let refused = verdict == VERDICT_DENY || verdict == VERDICT_NO_TUNNEL;
    count(counters::verdict(DIRECTION_INGRESS, verdict));
    if protocol == PROTO_TCP && !refused {
        let tag = SocketValue {
            local_identity: local,
            remote_identity: remote,
            rule: d.rule,
            verdict,
            direction: DIRECTION_INGRESS,
            _pad: [0; 2],
        };
        let _ = ACCEPTING.insert(flow, tag, 0);
    }
    let event_flow = EventLimitKey {
        local_identity: local,
        remote_identity: remote,
        remote_addr: flow.local_addr,
        remote_port: flow.local_port,
        protocol,
        direction: DIRECTION_INGRESS,
        verdict,
        _pad: [0; 3],
    };
    events::emit(&event_flow, d.rule, |ev| {
        ev.cgroup_id = cgroup_id;
        // SAFETY: valid context; on a listener this is the listening socket's cookie.
        ev.cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        ev.local_port = flow.remote_port;
        ev.local_addr = flow.remote_addr;
        ev.family = p.family;
    });
    if refused {
        REFUSE
    } else {
        ALLOW
    }
}

/// Records which workload bound a TCP socket, in the binding task's context: sockops reads it at
/// `listen()`, where not every kernel lets it ask for the task's cgroup. Never refuses a bind.
#[inline(always)]
fn record_owner(ctx: &SockContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let protocol = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.sock).protocol)) };
    if protocol != u32::from(PROTO_TCP) {
        return ALLOW;
    }
    #[cfg(feature = "verifier-reject")]
    {
        // A read far past the end of `bpf_sock`: every kernel's verifier refuses it.
        // SAFETY: never run; the program is refused at load.
        let past_end = unsafe { core::ptr::read_volatile(ctx.sock.cast::<u8>().add(4000)) };
        if past_end != 0 {
            return REFUSE;
        }
    }
    // SAFETY: bind() runs in the task's context.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if let Some(identity) = maps::cgroup_identity(cgroup_id) {
        // SAFETY: valid context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = OWNERS.insert(cookie, OwnerValue { identity, _pad: 0 }, 0);
    }
    ALLOW
}

#[cgroup_sock(post_bind4)]
pub fn ward_postbind4(ctx: SockContext) -> i32 {
    record_owner(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn ward_postbind6(ctx: SockContext) -> i32 {
    record_owner(&ctx)
}

/// Reads one `bpf_sock_ops` field with a single load at its own offset: the verifier rejects
/// loads through a context pointer the compiler has moved.
macro_rules! ops_field {
    ($ctx:expr, $($field:tt)+) => {
        // SAFETY: the context pointer is valid for the whole program run.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx.ops).$($field)+)) }
    };
}

/// The `bpf_sock_ops` fields ward uses, read once at program entry before any branch: the
/// verifier rejects a load through a context pointer the compiler moved into another block.
struct Ops {
    op: u32,
    family: u32,
    local_ip4: u32,
    remote_ip4: u32,
    local_ip6: [u32; 4],
    remote_ip6: [u32; 4],
    local_port: u32,
    remote_port: u32,
    new_state: u32,
}

#[inline(always)]
fn read_ops(ctx: &SockOpsContext) -> Ops {
    Ops {
        op: ops_field!(ctx, op),
        family: ops_field!(ctx, family),
        local_ip4: ops_field!(ctx, local_ip4),
        remote_ip4: ops_field!(ctx, remote_ip4),
        local_ip6: [
            ops_field!(ctx, local_ip6[0]),
            ops_field!(ctx, local_ip6[1]),
            ops_field!(ctx, local_ip6[2]),
            ops_field!(ctx, local_ip6[3]),
        ],
        remote_ip6: [
            ops_field!(ctx, remote_ip6[0]),
            ops_field!(ctx, remote_ip6[1]),
            ops_field!(ctx, remote_ip6[2]),
            ops_field!(ctx, remote_ip6[3]),
        ],
        local_port: ops_field!(ctx, local_port),
        remote_port: ops_field!(ctx, remote_port),
        new_state: ops_field!(ctx, __bindgen_anon_1.args[1]),
    }
}

/// The 4-tuple of a sockops socket as the connecting side sees it.
#[inline(always)]
fn sockops_tuple(ops: &Ops, connector_is_local: bool) -> FlowKey {
    let (local_addr, remote_addr) = if ops.family == AF_INET {
        (
            map_v4(ops.local_ip4.to_ne_bytes()),
            map_v4(ops.remote_ip4.to_ne_bytes()),
        )
    } else {
        (v6_bytes(ops.local_ip6), v6_bytes(ops.remote_ip6))
    };
    let local_port = ops.local_port as u16;
    let remote_port = u16::from_be((ops.remote_port >> 16) as u16);
    let (la, ra, lp, rp) = if connector_is_local {
        (local_addr, remote_addr, local_port, remote_port)
    } else {
        (remote_addr, local_addr, remote_port, local_port)
    };
    FlowKey {
        local_addr: la,
        remote_addr: ra,
        local_port: lp,
        remote_port: rp,
        protocol: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// Tags sockets with workload identity (a listener's from its `bind()`, a connecting socket's from
/// its `connect()`): listeners (for peers that share an address), connecting
/// sockets before their SYN leaves (for the receiving side's ingress check), and accepted sockets
/// with the verdict their SYN got. Entries go when the socket closes.
#[sock_ops]
pub fn ward_sockops(ctx: SockOpsContext) -> u32 {
    // SAFETY: valid context.
    let op: u32 = ops_field!(ctx, op);
    // sockops runs for every callback of every socket (RTO and window init, ECN, state changes):
    // leave at once unless it is one ward acts on.
    let relevant = match op {
        BPF_SOCK_OPS_TCP_LISTEN_CB
        | BPF_SOCK_OPS_TCP_CONNECT_CB
        | BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => true,
        BPF_SOCK_OPS_STATE_CB => ops_field!(ctx, __bindgen_anon_1.args[1]) == BPF_TCP_CLOSE,
        _ => false,
    };
    if !relevant {
        return 1;
    }
    // SAFETY: valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let ops = read_ops(&ctx);
    match ops.op {
        BPF_SOCK_OPS_TCP_LISTEN_CB => {
            if let Some(identity) = maps::socket_owner(cookie) {
                let key = ListenerKey {
                    // SAFETY: valid context.
                    netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
                    port: ops.local_port as u16,
                    protocol: PROTO_TCP,
                    _pad: [0; 5],
                };
                let _ = LISTENERS.insert(key, ListenerValue { identity, _pad: 0 }, 0);
                // The owner entry goes when the listener closes.
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: copied out at once.
            if let Some(tag) = unsafe { SOCKETS.get(cookie) }.copied() {
                let tuple = sockops_tuple(&ops, true);
                let v = ConnectingValue {
                    identity: tag.local_identity,
                    flags: 0,
                    cookie,
                };
                let _ = CONNECTING.insert(tuple, v, 0);
                // A connection redirected to the tunnel: the agent finds where it was going by
                // the 4-tuple it accepts.
                if tag.verdict == VERDICT_REDIRECT {
                    // SAFETY: copied out at once.
                    if let Some(original) = unsafe { ORIGINAL_DST.get(cookie) }.copied() {
                        let _ = REDIRECTS.insert(tuple, original, 0);
                        let _ = ORIGINAL_DST.remove(cookie);
                    }
                }
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let _ = CONNECTING.remove(sockops_tuple(&ops, true));
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let flow = sockops_tuple(&ops, false);
            // SAFETY: copied out at once.
            if let Some(tag) = unsafe { ACCEPTING.get(flow) }.copied() {
                let _ = SOCKETS.insert(cookie, tag, 0);
                let _ = ACCEPTING.remove(flow);
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ops.new_state == BPF_TCP_CLOSE => {
            let _ = SOCKETS.remove(cookie);
            let _ = OWNERS.remove(cookie);
            let _ = CONNECTING.remove(sockops_tuple(&ops, true));
        }
        _ => {}
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
