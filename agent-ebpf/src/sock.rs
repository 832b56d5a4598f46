//! `bind()`: which workload owns a TCP socket, for sockops to read at `listen()`, and which
//! workload a bound UDP port belongs to, for peers on this host that send to it.
use agent_common::*;
use aya_ebpf::programs::SockContext;

use crate::{
    context,
    maps::{LISTENERS, OWNERS},
    sock_addr::current_workload,
    ALLOW,
};

/// Records which workload bound a TCP socket, in the binding task's context: sockops reads it at
/// `listen()`, where not every kernel lets it ask for the task's cgroup. Never refuses a bind.
#[inline(always)]
pub fn record_owner(ctx: &SockContext) -> i32 {
    let protocol = context::bound_protocol(ctx);
    if protocol == u32::from(PROTO_UDP) {
        record_udp_port(ctx);
        return ALLOW;
    }
    if protocol != u32::from(PROTO_TCP) {
        return ALLOW;
    }
    #[cfg(feature = "verifier-reject")]
    {
        // A read far past the end of `bpf_sock`: every kernel's verifier refuses it.
        // SAFETY: never run; the program is refused at load.
        let past_end = unsafe { core::ptr::read_volatile(ctx.sock.cast::<u8>().add(4000)) };
        if past_end != 0 {
            return crate::REFUSE;
        }
    }
    if let (_, Some(identity)) = current_workload() {
        let cookie = context::socket_cookie(ctx);
        let _ = OWNERS.insert(cookie, OwnerValue { identity, _pad: 0 }, 0);
    }
    ALLOW
}

/// A bound UDP port names its workload to senders on this host, which share its address (the
/// TCP counterpart is sockops' listener record). A port bound by no workload drops the record a
/// workload's earlier socket left there.
#[inline(always)]
fn record_udp_port(ctx: &SockContext) {
    let port = context::bound_port(ctx);
    let key = ListenerKey {
        netns: context::netns_cookie(ctx),
        port: port as u16,
        protocol: PROTO_UDP,
        _pad: [0; 5],
    };
    match current_workload() {
        (_, Some(identity)) => {
            let _ = LISTENERS.insert(key, ListenerValue { identity, _pad: 0 }, 0);
        }
        (_, None) => {
            let _ = LISTENERS.remove(key);
        }
    }
}
