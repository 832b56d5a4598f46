//! Access to what the kernel hands a program: its context's fields, the sockets it points to, and
//! the helpers that take it. The unsafe reads of ward's kernel side live here, each with its
//! reason; the programs call these as plain functions.
//!
//! Every field is read with one volatile load at its own offset: the verifier rejects a load
//! through a context pointer the compiler has moved or widened.
use core::ptr::null_mut;

use agent_common::SocketOwner;
use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_addr, bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_SK_STORAGE_GET_F_CREATE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_ktime_get_ns, bpf_set_retval,
        bpf_sk_ancestor_cgroup_id, bpf_sk_cgroup_id, bpf_sk_fullsock, bpf_sk_lookup_tcp,
        bpf_sk_lookup_udp, bpf_sk_release, bpf_sk_storage_get, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
    programs::{SkBuffContext, SockAddrContext, SockContext},
    EbpfContext,
};

use crate::maps;

/// One field of a structure the kernel passed in, read with a single load.
macro_rules! field {
    ($ptr:expr, $($field:tt)+) => {
        // SAFETY: `$ptr` is a context or a socket the kernel gave this program run, valid for the
        // whole run; the verifier checks the offset.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($field)+)) }
    };
}

/// The socket cookie of the context's socket.
#[inline(always)]
pub fn socket_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: every program type ward attaches may call this helper with its context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The cookie of the network namespace of the context's socket.
#[inline(always)]
pub fn netns_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: as above.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// `CLOCK_BOOTTIME`, which counts suspended time as user space's clock of the same name does.
#[inline(always)]
pub fn boot_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The tuple a socket lookup takes for a packet from `src:sport` to `dst:dport` (addresses
/// mapped to IPv6, ports in host order), as IPv4 when `v4`, and its size.
#[inline(always)]
fn lookup_tuple(
    src: &[u8; 16],
    sport: u16,
    dst: &[u8; 16],
    dport: u16,
    v4: bool,
) -> (bpf_sock_tuple, u32) {
    // SAFETY: a zeroed tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if v4 {
        let addr = |a: &[u8; 16]| u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        // SAFETY: writing a union field of plain integers.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.saddr = addr(src);
            t.daddr = addr(dst);
            t.sport = sport.to_be();
            t.dport = dport.to_be();
            core::mem::size_of_val(t)
        }
    } else {
        let words = |a: &[u8; 16]| {
            let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        };
        // SAFETY: as above.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.saddr = words(src);
            t.daddr = words(dst);
            t.sport = sport.to_be();
            t.dport = dport.to_be();
            core::mem::size_of_val(t)
        }
    };
    (tuple, size as u32)
}

/// The socket of `protocol` (TCP or UDP) the kernel's own lookup finds, in the calling socket's
/// network namespace, for a packet from `src` to `dst` (address and port); null when none. The
/// caller releases it.
#[inline(always)]
fn caller_lookup(
    ctx: &SockAddrContext,
    protocol: u8,
    src: (&[u8; 16], u16),
    dst: (&[u8; 16], u16),
    v4: bool,
) -> *mut bpf_sock {
    let (mut tuple, size) = lookup_tuple(src.0, src.1, dst.0, dst.1, v4);
    let netns = BPF_F_CURRENT_NETNS as i64 as u64;
    // SAFETY: the tuple is on this frame with its exact size.
    unsafe {
        if protocol == agent_common::PROTO_TCP {
            bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), &mut tuple, size, netns, 0)
        }
    }
}

/// Whether a socket of `protocol` (TCP or UDP) listens on loopback `port` (IPv4 `127.0.0.1`, or
/// `::1`) in the network namespace of the calling socket.
#[inline(always)]
pub fn loopback_listener(ctx: &SockAddrContext, protocol: u8, v4: bool, port: u16) -> bool {
    let loopback = if v4 {
        agent_common::map_v4([127, 0, 0, 1])
    } else {
        let mut one = [0; 16];
        one[15] = 1;
        one
    };
    let sk = caller_lookup(ctx, protocol, (&loopback, 0), (&loopback, port), v4);
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket the lookup returned, released once.
    unsafe { bpf_sk_release(sk as *mut _) };
    true
}

/// Whether a datagram the caller's `sendmsg()` sends from its port to loopback `dport` (IPv4
/// `127.0.0.1`, or `::1` with `v4` false) goes to a UDP socket connected to that very port: the
/// socket the kernel's own lookup finds for it is connected (a connected socket is matched only
/// to its peer). The source is taken to be the destination address, as the kernel picks it for
/// these two; a call that names another source (`IP_PKTINFO`), or a socket bound to another
/// address, is never taken to. A `sendmsg` hook's only (it reads the call's source). Its own BPF
/// function: the lookup's tuple stays off the hook's frame.
#[inline(never)]
pub fn sends_to_connected_loopback(ctx: &SockAddrContext, v4: bool, dport: u16) -> bool {
    let sk = field!(ctx.sock_addr, __bindgen_anon_1.sk);
    let sport = field!(sk, src_port) as u16;
    let loopback = if v4 {
        let named = field!(ctx.sock_addr, msg_src_ip4);
        let bound = field!(sk, src_ip4);
        let one = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        if (named != 0 && named != one) || (bound != 0 && bound != one) {
            return false;
        }
        agent_common::map_v4([127, 0, 0, 1])
    } else {
        let one = 1u32.to_be();
        let named = [
            field!(ctx.sock_addr, msg_src_ip6[0]),
            field!(ctx.sock_addr, msg_src_ip6[1]),
            field!(ctx.sock_addr, msg_src_ip6[2]),
            field!(ctx.sock_addr, msg_src_ip6[3]),
        ];
        let bound = [
            field!(sk, src_ip6[0]),
            field!(sk, src_ip6[1]),
            field!(sk, src_ip6[2]),
            field!(sk, src_ip6[3]),
        ];
        // Neither `::` nor `::1`.
        let elsewhere = |a: [u32; 4]| (a[0] | a[1] | a[2]) != 0 || (a[3] != 0 && a[3] != one);
        if elsewhere(named) || elsewhere(bound) {
            return false;
        }
        let mut one = [0; 16];
        one[15] = 1;
        one
    };
    if sport == 0 {
        return false;
    }
    let found = caller_lookup(
        ctx,
        agent_common::PROTO_UDP,
        (&loopback, sport),
        (&loopback, dport),
        v4,
    );
    if found.is_null() {
        return false;
    }
    let connected = FullSocket(found).dst_port() != 0;
    // SAFETY: a socket the lookup returned, released once.
    unsafe { bpf_sk_release(found as *mut _) };
    connected
}

/// What a caller's socket lookup found at a destination on this host.
pub enum Receiver {
    /// No socket would receive there.
    None,
    /// A socket bound before ward's bind program was attached: it has no [`SocketOwner`].
    Unrecorded,
    /// The socket's [`SocketOwner`].
    Owner(u32),
}

/// The socket of `protocol` (TCP or UDP) that would receive what the caller sends to `dst:dport`
/// in its own network namespace (a listener, or a bound UDP socket: the kernel's own lookup),
/// and the workload that bound it. The caller is taken to send from its own port, and from
/// `dst` itself, the address the kernel picks to reach an address of this host: so a UDP socket
/// connected to the caller is found too.
#[inline(always)]
pub fn receiver(ctx: &SockAddrContext, protocol: u8, dst: &[u8; 16], dport: u16) -> Receiver {
    let v4 = agent_common::is_v4_mapped(dst);
    let sk = caller_lookup(
        ctx,
        protocol,
        (dst, call_source_port(ctx)),
        (dst, dport),
        v4,
    );
    if sk.is_null() {
        return Receiver::None;
    }
    // SAFETY: a socket the lookup returned, valid until its release below; no value is created.
    let owner = unsafe { bpf_sk_storage_get(socket_owners(), sk as *mut _, null_mut(), 0) }
        as *const SocketOwner;
    let found = if owner.is_null() {
        Receiver::Unrecorded
    } else {
        // SAFETY: a value of the socket storage map, valid while the socket is held.
        Receiver::Owner(unsafe { (*owner).identity })
    };
    // SAFETY: released once.
    unsafe { bpf_sk_release(sk as *mut _) };
    found
}

/// Records in the bound socket's own storage the workload that bound it.
#[inline(always)]
pub fn record_socket_owner(ctx: &SockContext, identity: u32) {
    let mut owner = SocketOwner { identity, _pad: 0 };
    // SAFETY: the context's socket; the value is copied into the storage this call creates.
    let stored = unsafe {
        bpf_sk_storage_get(
            socket_owners(),
            ctx.sock as *mut _,
            (&mut owner as *mut SocketOwner).cast(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    } as *mut SocketOwner;
    if !stored.is_null() {
        // A socket binds once; this keeps a value an earlier call left (none should) right.
        // SAFETY: a value of the socket storage map, valid during this program run.
        unsafe { (*stored).identity = identity };
    }
}

/// The socket storage map of socket owners, as a helper takes it.
#[inline(always)]
fn socket_owners() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&maps::SOCKET_OWNERS).cast_mut().cast()
}

/// `TCP_SYN_SENT`, the state of a socket whose SYN is on its way.
pub const TCP_SYN_SENT: u32 = 2;

/// The workload of the socket on this host, in the receiving socket's network namespace, that
/// sent the TCP SYN `flow` (`local` is the sender): the socket connecting from the flow's source
/// to its destination, found by the kernel's own socket lookup ([`flow_sender`]). Only a socket
/// in `SYN_SENT` counts: a listener bound to the flow's source port is not the sender, and a
/// hand-made SYN cannot borrow its workload.
#[inline(always)]
pub fn syn_sender(ctx: &SkBuffContext, flow: &agent_common::FlowKey, v4: bool) -> Option<u32> {
    flow_sender(ctx, flow, v4, false)
}

/// The workload of the UDP socket on this host, in the receiving socket's network namespace, that
/// sent the datagram `flow` ([`flow_sender`]): the socket bound to the datagram's source, counted
/// only when it is connected (the lookup matches a connected socket only to the datagram's
/// destination). `None` also when the sender is unconnected (its `sendmsg` hook recorded it) or
/// closed already. A hand-made datagram borrows no workload but one connected to this very
/// destination.
#[inline(always)]
pub fn datagram_sender(ctx: &SkBuffContext, flow: &agent_common::FlowKey, v4: bool) -> Option<u32> {
    flow_sender(ctx, flow, v4, true)
}

/// The workload of the sending socket of `flow` (`local` is the sender) on this host: the socket
/// the kernel's own lookup finds for a packet from the flow's destination to its source, in the
/// receiving socket's network namespace, when it is the sender ([`syn_sender`],
/// [`datagram_sender`]), named by its cgroup (or nearest mapped ancestor) as [`maps::workload`]
/// names one. `None` when there is none: the sender is elsewhere, in another namespace, or of no
/// workload.
#[inline(always)]
fn flow_sender(
    ctx: &SkBuffContext,
    flow: &agent_common::FlowKey,
    v4: bool,
    udp: bool,
) -> Option<u32> {
    // The tuple of a packet the sending socket would receive: from the destination to it.
    let (mut tuple, size) = lookup_tuple(
        &flow.remote_addr,
        flow.remote_port,
        &flow.local_addr,
        flow.local_port,
        v4,
    );
    let netns = BPF_F_CURRENT_NETNS as i64 as u64;
    // SAFETY: the tuple is on this frame with its exact size; a socket found is released below.
    let sk = unsafe {
        if udp {
            bpf_sk_lookup_udp(ctx.as_ptr(), &mut tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, netns, 0)
        }
    };
    if sk.is_null() {
        return None;
    }
    let sending = if udp {
        FullSocket(sk).dst_port() != 0
    } else {
        FullSocket(sk).state() == TCP_SYN_SENT
    };
    let found = if sending {
        // SAFETY: a socket the lookup returned, valid until its release below.
        let cgroup = unsafe { bpf_sk_cgroup_id(sk as *mut _) };
        // SAFETY: as above.
        maps::workload(cgroup, |level| unsafe {
            bpf_sk_ancestor_cgroup_id(sk as *mut _, level)
        })
    } else {
        None
    };
    // SAFETY: released once.
    unsafe { bpf_sk_release(sk as *mut _) };
    found
}

/// The calling task's cgroup, and its ancestor at `level` (0 past its depth): programs that run
/// in a task's context (connect, sendmsg, bind).
#[inline(always)]
pub fn task_cgroup() -> u64 {
    // SAFETY: no preconditions in a program that runs in a task's context.
    unsafe { bpf_get_current_cgroup_id() }
}

#[inline(always)]
pub fn task_ancestor_cgroup(level: i32) -> u64 {
    // SAFETY: as above.
    unsafe { bpf_get_current_ancestor_cgroup_id(level) }
}

/// The cgroup of a packet's socket, and its ancestor at `level`.
#[inline(always)]
pub fn skb_cgroup(ctx: &SkBuffContext) -> u64 {
    // SAFETY: valid context for this helper in cgroup_skb programs.
    unsafe { bpf_skb_cgroup_id(ctx.skb.skb) }
}

#[inline(always)]
pub fn skb_ancestor_cgroup(ctx: &SkBuffContext, level: i32) -> u64 {
    // SAFETY: as above.
    unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) }
}

/// The start and end of the packet's linear data, as the verifier's packet pointers.
#[inline(always)]
pub fn packet_bounds(ctx: &SkBuffContext) -> (usize, usize) {
    (
        field!(ctx.skb.skb, data) as usize,
        field!(ctx.skb.skb, data_end) as usize,
    )
}

/// One byte of the packet's linear data. The caller has checked `at < end` of
/// [`packet_bounds`] in the same function, so that the verifier knows it.
#[inline(always)]
pub fn packet_byte(at: usize) -> u8 {
    // SAFETY: inside the bounds the caller checked against the packet's end.
    unsafe { *(at as *const u8) }
}

/// A full socket (not a request or time-wait one), as `bpf_sk_fullsock` returns it.
#[derive(Clone, Copy)]
pub struct FullSocket(*mut bpf_sock);

/// The full socket a packet belongs to (the receiver on ingress, the sender on egress).
#[inline(always)]
pub fn full_socket(ctx: &SkBuffContext) -> Option<FullSocket> {
    // SAFETY: valid context; `sk` may be null, checked below.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a non-null socket pointer of the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    (!full.is_null()).then_some(FullSocket(full))
}

impl FullSocket {
    /// `SOCK_STREAM`, `SOCK_DGRAM`, ... and the IP protocol.
    #[inline(always)]
    pub fn kind_and_protocol(self) -> (u32, u32) {
        (field!(self.0, type_), field!(self.0, protocol))
    }

    /// Its TCP state (`TCP_SYN_SENT`, ...).
    #[inline(always)]
    pub fn state(self) -> u32 {
        field!(self.0, state)
    }

    /// The port it is connected to (host order; 0 when it is not).
    #[inline(always)]
    pub fn dst_port(self) -> u16 {
        u16::from_be(field!(self.0, dst_port) as u16)
    }

    /// The family and the address and port (network order) it is connected to.
    #[inline(always)]
    pub fn peer(self) -> (u32, u16, u32, [u32; 4]) {
        (
            field!(self.0, family),
            field!(self.0, dst_port),
            field!(self.0, dst_ip4),
            [
                field!(self.0, dst_ip6[0]),
                field!(self.0, dst_ip6[1]),
                field!(self.0, dst_ip6[2]),
                field!(self.0, dst_ip6[3]),
            ],
        )
    }
}

/// The IP protocol of a `bind()`.
#[inline(always)]
pub fn bound_protocol(ctx: &SockContext) -> u32 {
    field!(ctx.sock, protocol)
}

/// The IP protocol of a `connect()`/`sendmsg()`, and the destination port (network order).
/// Plain loads, which the verifier takes for these fields.
#[inline(always)]
pub fn call_protocol_and_port(ctx: &SockAddrContext) -> (u8, u32) {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { ((*sa).protocol as u8, (*sa).user_port) }
}

#[inline(always)]
pub fn call_destination_v4(ctx: &SockAddrContext) -> u32 {
    // SAFETY: as above.
    unsafe { (*ctx.sock_addr).user_ip4 }
}

#[inline(always)]
pub fn call_destination_v6(ctx: &SockAddrContext) -> [u32; 4] {
    // SAFETY: as above.
    unsafe { (*ctx.sock_addr).user_ip6 }
}

/// The local port of the calling socket (host order; 0 before it is bound).
#[inline(always)]
pub fn call_source_port(ctx: &SockAddrContext) -> u16 {
    let sk = field!(ctx.sock_addr, __bindgen_anon_1.sk);
    field!(sk, src_port) as u16
}

/// The address and port (host order) a `connect()`/`sendmsg()` goes to, or a `recvmsg()`/
/// `getpeername()` reports, as the kernel keys addresses (IPv4 mapped).
#[inline(always)]
pub fn call_address(ctx: &SockAddrContext, family: u8) -> ([u8; 16], u16) {
    let addr = if family == 4 {
        agent_common::map_v4(call_destination_v4(ctx).to_ne_bytes())
    } else {
        crate::v6_bytes(call_destination_v6(ctx))
    };
    (addr, u16::from_be(call_protocol_and_port(ctx).1 as u16))
}

/// Sets the address and port (host order) of a `connect()`/`sendmsg()`, or what a `recvmsg()`/
/// `getpeername()` reports. `addr` as [`call_address`] gives it.
#[inline(always)]
pub fn set_call_address(ctx: &SockAddrContext, family: u8, addr: &[u8; 16], port: u16) {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    redirect_call(
        ctx,
        family,
        word(12),
        [word(0), word(4), word(8), word(12)],
        port,
    );
}

/// Makes the refused call fail with `errno` rather than `EPERM` (the program then returns 0).
#[inline(always)]
pub fn set_errno(errno: i32) {
    // SAFETY: no preconditions; the kernel allows it in connect and sendmsg hooks.
    unsafe {
        bpf_set_retval(-errno);
    }
}

/// Points a `connect()` at another destination (address in network order as the kernel keeps
/// it, port in host order).
#[inline(always)]
pub fn redirect_call(ctx: &SockAddrContext, family: u8, ip4: u32, ip6: [u32; 4], port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: the context is valid and these fields are writable in connect hooks.
    unsafe {
        if family == 4 {
            (*sa).user_ip4 = ip4;
        } else {
            (*sa).user_ip6[0] = ip6[0];
            (*sa).user_ip6[1] = ip6[1];
            (*sa).user_ip6[2] = ip6[2];
            (*sa).user_ip6[3] = ip6[3];
        }
        (*sa).user_port = u32::from(port.to_be());
    }
}
