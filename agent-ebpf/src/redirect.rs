//! Sockets the hooks send to the agent: DNS to the proxy ([`crate::dns`]) and connections to the
//! mTLS tunnel ([`crate::sock_addr`]). Where each was going is kept by socket cookie from the
//! hook until the egress packet program sees its packet and files it under the packet's 4-tuple
//! and the socket's network namespace ([`RedirectKey`]), which is what the agent sees when it
//! accepts or receives.
use agent_common::*;
use aya_ebpf::programs::{SkBuffContext, SockAddrContext};

use crate::{
    context,
    maps::{REDIRECTED_SOCKETS, REDIRECTS},
    packet,
};

/// Records where the calling socket was going, with its network namespace.
#[inline(always)]
pub fn record(ctx: &SockAddrContext, cookie: u64, original: OriginalDst) -> bool {
    let record = RedirectedSocket {
        netns: context::netns_cookie(ctx),
        original,
    };
    REDIRECTED_SOCKETS.insert(cookie, record, 0).is_ok()
}

/// The packet's socket's record and where the packet is filed, when the hooks sent the socket
/// to the agent and the packet goes to the agent's `port`; `None` for any other packet.
#[inline(always)]
pub fn pending(ctx: &SkBuffContext, port: u16) -> Option<(u64, RedirectedSocket, RedirectKey)> {
    let cookie = context::socket_cookie(ctx);
    // SAFETY: copied out at once.
    let record = unsafe { REDIRECTED_SOCKETS.get(cookie) }.copied()?;
    let p = packet::parse(ctx).ok()?;
    if p.flow.remote_port != port {
        return None;
    }
    let key = RedirectKey {
        flow: p.flow,
        netns: record.netns,
    };
    Some((cookie, record, key))
}

/// The tunnel's part of the egress packet program: the SYN of a connection the connect hook sent
/// to the tunnel at `port` files where it was going, once, before it leaves. Called only for a
/// TCP socket in `SYN_SENT` connected to `port`.
#[inline(never)]
pub fn file_tunnel_connection(ctx: &SkBuffContext, port: u16) {
    let Some((cookie, record, key)) = pending(ctx, port) else {
        return;
    };
    let _ = REDIRECTS.insert(key, record.original, 0);
    let _ = REDIRECTED_SOCKETS.remove(cookie);
}
