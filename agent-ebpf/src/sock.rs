//! `bind()`: which workload bound a TCP or UDP socket, kept with the socket, for senders on this
//! host that share its address (they find the socket by lookup, [`crate::ipcache`]).
use agent_common::*;
use aya_ebpf::programs::SockContext;

use crate::{context, sock_addr::current_workload, ALLOW};

/// Records in the socket's own storage which workload bound it ([`IDENTITY_HOST`] for a process
/// of no workload, so that a port an earlier agent's record names is never read for it), in the
/// binding task's context. Never refuses a bind.
#[inline(always)]
pub fn record_owner(ctx: &SockContext) -> i32 {
    let protocol = context::bound_protocol(ctx);
    if protocol != u32::from(PROTO_TCP) && protocol != u32::from(PROTO_UDP) {
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
    let identity = current_workload().1.unwrap_or(IDENTITY_HOST);
    context::record_socket_owner(ctx, identity);
    ALLOW
}
