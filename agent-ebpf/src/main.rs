//! ward's kernel programs: one thin entry point per attach point over the modules that hold
//! the logic, by attach class: `sock_addr` (connect, sendmsg), `service` (cluster IPs: connect,
//! sendmsg, recvmsg, getpeername), `skb` (ingress, egress backstop), `sock` (bind),
//! `redirect` (what the hooks send to the agent).
//!
//! Fail modes: a socket whose cgroup belongs to no workload (itself or an ancestor), or a
//! workload that no policy selects in a direction, is never touched (unless
//! `unmappedCgroups: deny`). For a selected workload the default is deny (fail closed): a
//! missing policy entry denies, an unknown remote is `IDENTITY_WORLD`, and a packet that cannot
//! be parsed or whose protocol no rule can name is refused.
#![no_std]
#![no_main]

mod context;
mod dns;
mod events;
mod flows;
mod ipcache;
mod maps;
mod packet;
mod policy;
mod redirect;
mod service;
mod skb;
mod sock;
mod sock_addr;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// The `floor` build (`cargo xtask bench connect --floor`): every program returns `ALLOW` at
/// once, so the benchmark measures what attaching ward's programs costs before any of their
/// work. The read is volatile so that the rest of each program, and the maps it uses, stay in the
/// object the agent loads. Never in a release: the agent refuses to run such a build unless told
/// (`WARD_FLOOR_BUILD=1`).
#[cfg(feature = "floor")]
static FLOOR: u8 = 1;

macro_rules! floor {
    () => {
        #[cfg(feature = "floor")]
        // SAFETY: a plain read of a static.
        if unsafe { core::ptr::read_volatile(&FLOOR) } != 0 {
            return ALLOW;
        }
    };
}

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

#[cgroup_sock_addr(connect4)]
pub fn ward_connect4(ctx: SockAddrContext) -> i32 {
    floor!();
    sock_addr::egress(&ctx, 4, true)
}

#[cgroup_sock_addr(connect6)]
pub fn ward_connect6(ctx: SockAddrContext) -> i32 {
    floor!();
    sock_addr::egress(&ctx, 6, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ward_sendmsg4(ctx: SockAddrContext) -> i32 {
    floor!();
    sock_addr::egress(&ctx, 4, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ward_sendmsg6(ctx: SockAddrContext) -> i32 {
    floor!();
    sock_addr::egress(&ctx, 6, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ward_recvmsg4(ctx: SockAddrContext) -> i32 {
    floor!();
    service::show_frontend(&ctx, 4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ward_recvmsg6(ctx: SockAddrContext) -> i32 {
    floor!();
    service::show_frontend(&ctx, 6)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ward_getpeer4(ctx: SockAddrContext) -> i32 {
    floor!();
    service::show_frontend(&ctx, 4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn ward_getpeer6(ctx: SockAddrContext) -> i32 {
    floor!();
    service::show_frontend(&ctx, 6)
}

#[cgroup_skb(ingress)]
pub fn ward_ingress(ctx: SkBuffContext) -> i32 {
    floor!();
    skb::ingress(&ctx)
}

#[cgroup_skb(egress)]
pub fn ward_egress(ctx: SkBuffContext) -> i32 {
    floor!();
    skb::egress(&ctx)
}

#[cgroup_sock(post_bind4)]
pub fn ward_postbind4(ctx: SockContext) -> i32 {
    floor!();
    sock::record_owner(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn ward_postbind6(ctx: SockContext) -> i32 {
    floor!();
    sock::record_owner(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
