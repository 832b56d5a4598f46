//! Kubernetes Services at `connect()` and `sendmsg()`: a call to a cluster IP and port is
//! translated to one of its ready backends before policy is decided, so policy judges the pod the
//! connection reaches, as NetworkPolicy means it. `recvmsg()` and `getpeername()` show the cluster
//! IP again, so a client sees the address it asked for (UDP clients such as glibc's resolver accept
//! replies only from it).
use agent_common::*;
use aya_ebpf::programs::SockAddrContext;

use crate::{
    context,
    maps::{self, BACKENDS, SERVICES, SERVICE_SOCKETS},
    sock_addr::Call,
};

/// What [`translate`] found the call's destination to be.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Not a Service's cluster IP and port.
    Direct,
    /// A Service's: the call now goes to one of its backends.
    Translated,
    /// A Service's cluster IP and port with no ready backend.
    NoBackend,
}

/// Translates the call to a backend if it goes to a Service (generation bit `gen`): sets `call`'s
/// remote to the backend and its service to the cluster IP and port, and records the socket's
/// frontend for [`show_frontend`]. The caller rewrites the call's address (there, the family is a
/// constant, and the verifier sees which fields of the context the hook writes).
///
/// A function of its own (not inlined), so that its keys take no room in the connect hook's
/// frame: the verifier allows 512 bytes of stack for a program and its calls together.
#[inline(never)]
pub fn translate(ctx: &SockAddrContext, call: &mut Call, gen: u8) -> Destination {
    let service = ServiceKey {
        addr: call.remote_addr,
        port: call.remote_port,
        protocol: call.protocol,
        generation: gen,
    };
    // SAFETY: the value is copied out at once.
    let Some(value) = (unsafe { SERVICES.get(service) }).copied() else {
        return Destination::Direct;
    };
    call.service = ServiceAddr {
        addr: service.addr,
        port: service.port,
        _pad: [0; 2],
    };
    // A socket keeps its backend (every datagram of an unconnected UDP socket goes to one); with
    // client affinity, every socket of the client's network namespace does.
    let seed = if value.flags & SERVICE_FLAG_CLIENT_AFFINITY != 0 {
        context::netns_cookie(ctx)
    } else {
        call.cookie
    };
    let backend = match value.count {
        0 => None,
        count => {
            let slot = (mix(seed) % u64::from(count)) as u32;
            // SAFETY: as above. A slot below the count is always there within one generation.
            unsafe { BACKENDS.get(BackendKey { service, slot }) }.copied()
        }
    };
    let Some(backend) = backend else {
        call.remote_addr = [0; 16];
        call.remote_port = 0;
        return Destination::NoBackend;
    };
    let key = ServiceSocketKey {
        cookie: call.cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 6],
    };
    let _ = SERVICE_SOCKETS.insert(key, call.service, 0);
    call.remote_addr = backend.addr;
    call.remote_port = backend.port;
    Destination::Translated
}

/// `recvmsg()` and `getpeername()`: a socket translated to a backend sees the cluster IP and port
/// it asked for as the source of replies and as its peer (while the node has Services: once the
/// last one is gone, a socket still talking to a former backend sees the backend).
#[inline(always)]
pub fn show_frontend(ctx: &SockAddrContext, family: u8) -> i32 {
    // `accept()` runs this hook too: a node without Services or a DNS proxy pays two array
    // loads.
    if !maps::has_services() && crate::dns::proxy_port().is_none() {
        return 1;
    }
    let (addr, port) = context::call_address(ctx, family);
    let key = ServiceSocketKey {
        cookie: context::socket_cookie(ctx),
        addr,
        port,
        _pad: [0; 6],
    };
    // SAFETY: the value is copied out at once.
    if let Some(frontend) = unsafe { SERVICE_SOCKETS.get(key) }.copied() {
        context::set_call_address(ctx, family, &frontend.addr, frontend.port);
    }
    1
}

/// Spreads sequential socket cookies over the backends (Fibonacci hashing).
#[inline(always)]
fn mix(seed: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32
}
