//! `bind()`: which workload owns a TCP socket, for sockops to read at `listen()`.
use agent_common::*;
use aya_ebpf::{helpers::bpf_get_socket_cookie, programs::SockContext, EbpfContext};

use crate::{maps::OWNERS, sock_addr::current_workload, ALLOW};

/// Records which workload bound a TCP socket, in the binding task's context: sockops reads it at
/// `listen()`, where not every kernel lets it ask for the task's cgroup. Never refuses a bind.
#[inline(always)]
pub fn record_owner(ctx: &SockContext) -> i32 {
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
            return crate::REFUSE;
        }
    }
    if let (_, Some(identity)) = current_workload() {
        // SAFETY: valid context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = OWNERS.insert(cookie, OwnerValue { identity, _pad: 0 }, 0);
    }
    ALLOW
}
