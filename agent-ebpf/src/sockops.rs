//! sockops: names listening sockets by workload for peers on this host that share an address,
//! and files connections redirected to the mTLS tunnel under their 4-tuple.
use agent_common::*;
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
    },
    programs::SockOpsContext,
};

use crate::{
    context::{self, field},
    maps::{self, CONNECTING, LISTENERS, ORIGINAL_DST, OWNERS, REDIRECTS, SOCKETS},
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

/// The 4-tuple of a connecting socket, as the receiver's ingress check looks it up.
#[inline(always)]
fn sockops_tuple(ops: &Ops) -> FlowKey {
    let (local_addr, remote_addr) = if ops.family == AF_INET {
        (
            map_v4(ops.local_ip4.to_ne_bytes()),
            map_v4(ops.remote_ip4.to_ne_bytes()),
        )
    } else {
        (v6_bytes(ops.local_ip6), v6_bytes(ops.remote_ip6))
    };
    FlowKey {
        local_addr,
        remote_addr,
        local_port: ops.local_port as u16,
        remote_port: u16::from_be((ops.remote_port >> 16) as u16),
        protocol: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// Acts at the few callbacks where ward needs a map write: a listener at `listen()` (by port, for
/// peers that share an address), and a connection redirected to the tunnel at `TCP_CONNECT_CB`,
/// before its SYN leaves (by 4-tuple: where it was going, for the agent, and its workload). Only
/// those connections are tagged at `connect()`: any other's receiver on this host finds the
/// connecting socket itself by the SYN's 4-tuple (`skb::tcp_sender`). Each record the hooks made
/// for this (the owner at `bind()`, the tag at `connect()`) is taken, not left for a close
/// callback; only a tagged socket asks for state callbacks, until its connection is established
/// or fails, to take its 4-tuple record back. Every other callback of every socket leaves at once
/// (a connection's establishment too, unless its socket is one of those: the state-callback flag
/// marks them).
pub fn sockops(ctx: SockOpsContext) -> u32 {
    // SAFETY: valid context.
    let op: u32 = field!(ctx.ops, op);
    // sockops runs for every callback of every socket (RTO and window init, ECN, state changes):
    // leave at once unless it is one ward acts on.
    let relevant = match op {
        BPF_SOCK_OPS_TCP_LISTEN_CB | BPF_SOCK_OPS_TCP_CONNECT_CB => true,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            field!(ctx.ops, bpf_sock_ops_cb_flags) & BPF_SOCK_OPS_STATE_CB_FLAG != 0
        }
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
            let key = ListenerKey {
                netns: context::netns_cookie(&ctx),
                port: ops.local_port as u16,
                protocol: PROTO_TCP,
                _pad: [0; 5],
            };
            match maps::socket_owner(cookie) {
                Some(identity) => {
                    let _ = LISTENERS.insert(key, ListenerValue { identity, _pad: 0 }, 0);
                    let _ = OWNERS.remove(cookie);
                }
                // A port a process of no workload listens on drops the record a workload's
                // earlier listener left there, as a UDP bind does.
                None => {
                    let _ = LISTENERS.remove(key);
                }
            }
        }
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: copied out at once.
            if let Some(tag) = unsafe { SOCKETS.get(cookie) }.copied() {
                let _ = SOCKETS.remove(cookie);
                let tuple = sockops_tuple(&ops);
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
                        let key = RedirectKey {
                            flow: tuple,
                            netns: context::netns_cookie(&ctx),
                        };
                        let _ = REDIRECTS.insert(key, original, 0);
                        let _ = ORIGINAL_DST.remove(cookie);
                    }
                }
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        // The receiver's SYN check has read the 4-tuple record; no more callbacks for this socket.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let _ = CONNECTING.remove(sockops_tuple(&ops));
            let _ = ctx.set_cb_flags(0);
        }
        // A connection that never got established (refused, reset, timed out).
        BPF_SOCK_OPS_STATE_CB if ops.new_state == BPF_TCP_CLOSE => {
            let _ = CONNECTING.remove(sockops_tuple(&ops));
            let _ = OWNERS.remove(cookie);
        }
        _ => {}
    }
    1
}
