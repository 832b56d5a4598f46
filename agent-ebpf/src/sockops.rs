//! sockops: tags sockets with workload identity and files connecting sockets under their 4-tuple
//! for the receiving side's ingress check.
use agent_common::*;
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
    },
    programs::SockOpsContext,
};

use crate::{
    context::{self, field},
    maps::{self, ACCEPTING, CONNECTING, LISTENERS, ORIGINAL_DST, OWNERS, REDIRECTS, SOCKETS},
    v6_bytes,
};

const AF_INET: u32 = 2;

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
        op: field!(ctx.ops, op),
        family: field!(ctx.ops, family),
        local_ip4: field!(ctx.ops, local_ip4),
        remote_ip4: field!(ctx.ops, remote_ip4),
        local_ip6: [
            field!(ctx.ops, local_ip6[0]),
            field!(ctx.ops, local_ip6[1]),
            field!(ctx.ops, local_ip6[2]),
            field!(ctx.ops, local_ip6[3]),
        ],
        remote_ip6: [
            field!(ctx.ops, remote_ip6[0]),
            field!(ctx.ops, remote_ip6[1]),
            field!(ctx.ops, remote_ip6[2]),
            field!(ctx.ops, remote_ip6[3]),
        ],
        local_port: field!(ctx.ops, local_port),
        remote_port: field!(ctx.ops, remote_port),
        new_state: field!(ctx.ops, __bindgen_anon_1.args[1]),
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
pub fn sockops(ctx: SockOpsContext) -> u32 {
    // SAFETY: valid context.
    let op: u32 = field!(ctx.ops, op);
    // sockops runs for every callback of every socket (RTO and window init, ECN, state changes):
    // leave at once unless it is one ward acts on.
    let relevant = match op {
        BPF_SOCK_OPS_TCP_LISTEN_CB
        | BPF_SOCK_OPS_TCP_CONNECT_CB
        | BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => true,
        BPF_SOCK_OPS_STATE_CB => field!(ctx.ops, __bindgen_anon_1.args[1]) == BPF_TCP_CLOSE,
        _ => false,
    };
    if !relevant {
        return 1;
    }
    let cookie = context::socket_cookie(&ctx);
    let ops = read_ops(&ctx);
    match ops.op {
        BPF_SOCK_OPS_TCP_LISTEN_CB => {
            if let Some(identity) = maps::socket_owner(cookie) {
                let key = ListenerKey {
                    netns: context::netns_cookie(&ctx),
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
