//! Egress decisions at `connect()` and `sendmsg()`: TCP, connected and unconnected UDP, SCTP, after
//! a Service's cluster IP is translated to a backend ([`service`]). A refusal makes the call fail
//! with EPERM at once (ECONNREFUSED for a Service without backends). ICMP sockets are decided per
//! packet by the `cgroup_skb/egress` backstop; any other protocol is refused for an isolated
//! workload here.
use agent_common::*;
use aya_ebpf::programs::SockAddrContext;

use crate::{
    context, dns, events, flows, ipcache,
    maps::{self, count},
    policy, redirect,
    service::{self, Destination},
    ALLOW, REFUSE,
};

/// The call's errno when a Service has no ready backend.
const ECONNREFUSED: i32 = 111;

/// The workload of the calling task, by its cgroup or the nearest mapped ancestor.
#[inline(always)]
pub fn current_workload() -> (u64, Option<u32>) {
    let cgroup_id = context::task_cgroup();
    let identity = maps::workload(cgroup_id, context::task_ancestor_cgroup);
    (cgroup_id, identity)
}

/// Egress decision for connect() (`connecting`) and sendmsg(): the local identity from the
/// calling task's cgroup, the remote from the destination.
#[inline(always)]
pub fn egress(ctx: &SockAddrContext, family: u8, connecting: bool) -> i32 {
    let (protocol, _) = context::call_protocol_and_port(ctx);
    if protocol == PROTO_ICMP || protocol == PROTO_ICMPV6 {
        // Each message is decided by its type, per packet.
        return ALLOW;
    }
    let (remote_addr, remote_port) = context::call_address(ctx, family);
    let (cgroup_id, local) = current_workload();
    let cookie = context::socket_cookie(ctx);
    let gen = (maps::generation() & 1) as u8;
    let mut call = Call {
        cgroup_id,
        cookie,
        family,
        protocol,
        remote_addr,
        remote_port,
        service: ServiceAddr::default(),
    };
    // A Service's cluster IP: policy below judges the backend the call now goes to.
    let translated = if maps::has_services() {
        service::translate(ctx, &mut call, gen)
    } else {
        Destination::Direct
    };
    match translated {
        Destination::Direct => {}
        Destination::Translated => {
            context::set_call_address(ctx, family, &call.remote_addr, call.remote_port)
        }
        Destination::NoBackend => {
            // Refused at once, as kube-proxy's reject does, whoever calls.
            context::set_errno(ECONNREFUSED);
            return match local {
                Some(local) => refuse_undecided(&call, local, reasons::NO_BACKEND),
                None => REFUSE,
            };
        }
    }
    let (remote_addr, remote_port) = (call.remote_addr, call.remote_port);
    let Some(local) = local else {
        if !maps::unmapped_refused(cgroup_id) {
            return ALLOW;
        }
        return refuse_undecided(&call, 0, reasons::UNMAPPED_CGROUP);
    };
    if protocol != PROTO_TCP && protocol != PROTO_UDP && protocol != PROTO_SCTP {
        // UDP-Lite and the like: no rule can name them.
        if !policy::isolated(local, DIRECTION_EGRESS, gen) {
            return ALLOW;
        }
        return refuse_undecided(&call, local, reasons::PROTOCOL);
    }
    if protocol == PROTO_UDP && !policy::isolated(local, DIRECTION_EGRESS, gen) {
        // No egress rule to decide, no DNS name to learn: only the record of the datagram, which
        // names its sender and lets its replies in. A datagram to a socket connected to this one
        // needs none: that socket takes it as its peer's, and its own datagrams here are named
        // by the socket lookup at this socket's ingress.
        if records_datagrams(connecting, &remote_addr)
            && (connecting || !sends_to_connected_loopback(ctx, family, &remote_addr, remote_port))
        {
            record_datagram(
                &remote_addr,
                context::call_source_port(ctx),
                remote_port,
                local,
            );
        }
        return ALLOW;
    }
    let remote = ipcache::destination_identity(ctx, &remote_addr, remote_port, protocol, gen);
    let mut d = policy::decide(local, remote, DIRECTION_EGRESS, protocol, remote_port, gen);
    // The remote a verdict record names: the DNS name when an address learned from it decided.
    let mut named = remote;
    if d.fqdn && !d.settled {
        let what = policy::pack_flow(DIRECTION_EGRESS, protocol, remote_port);
        let who = (u64::from(local) << 32) | u64::from(remote);
        let packed = dns::decide_learned(who, &remote_addr, what, gen);
        let learned = policy::unpack(packed);
        // The name is what the record names when it changed the verdict.
        if packed != 0 && (learned.verdict, learned.rule) != (d.verdict, d.rule) {
            (d, named) = (learned, dns::learned_name(packed));
        }
    }
    let src_port = if protocol == PROTO_UDP {
        context::call_source_port(ctx)
    } else {
        0
    };
    if protocol == PROTO_UDP
        && d.isolated
        && d.verdict == VERDICT_DENY
        && src_port != 0
        && flows::is_answer(flows::sending(
            local,
            protocol,
            &remote_addr,
            src_port,
            remote_port,
        ))
    {
        // The answer to a datagram the workload's ingress admitted (or a flow it started).
        return ALLOW;
    }
    // DNS of a workload whose rules name DNS names goes to the proxy, which learns the answers.
    // (Nothing of it stays on this frame: the connect hook's frames share 512 bytes.)
    let mut proxy_port = 0;
    if d.fqdn
        && remote_port == dns::DNS_PORT
        && (protocol == PROTO_TCP || protocol == PROTO_UDP)
        && (d.verdict == VERDICT_ALLOW || d.verdict == VERDICT_AUDIT)
    {
        if let Some(port) = dns::proxy_port() {
            let who = (u64::from(local) << 32) | u64::from(remote);
            if dns::redirect(ctx, &call, port, who, d.rule) {
                proxy_port = port;
                // Constants in each branch: no address on this frame.
                if dns::proxy_is_v4(&call) {
                    context::redirect_call(
                        ctx,
                        family,
                        dns::PROXY_IP4,
                        dns::PROXY_IP6_MAPPED,
                        port,
                    );
                } else {
                    context::redirect_call(ctx, family, dns::PROXY_IP4, dns::PROXY_IP6, port);
                }
            }
        }
    }
    // Only a datagram that leaves names its sender (and lets its replies in).
    if protocol == PROTO_UDP && !(d.isolated && d.verdict == VERDICT_DENY) && src_port != 0 {
        if proxy_port != 0 {
            dns::record_sent(&call, src_port, proxy_port, local);
        } else if records_datagrams(connecting, &remote_addr) {
            record_datagram(&remote_addr, src_port, remote_port, local);
        }
    }
    let (mut verdict, mut rule, mut report_it) = if d.isolated {
        (d.verdict, d.rule, true)
    } else {
        (VERDICT_ALLOW, d.rule, false)
    };
    if protocol != PROTO_TCP {
        // The tunnel carries TCP; a datagram or an SCTP association follows the rule's L4
        // verdict.
        if verdict == VERDICT_REDIRECT {
            verdict = VERDICT_ALLOW;
        }
    } else if verdict != VERDICT_DENY && verdict != VERDICT_REDIRECT {
        // The destination's ingress rule may require mTLS where the source's own does not.
        if let Some(demand) = policy::mtls_demand(local, remote, protocol, remote_port, gen) {
            (verdict, rule, report_it) = (VERDICT_REDIRECT, demand, true);
        }
    }
    let mut reason = reasons::NONE;
    if verdict == VERDICT_REDIRECT {
        if let Some(why) = send_to_tunnel(
            ctx,
            family,
            remote_addr,
            remote_port,
            cookie,
            local,
            remote,
            rule,
        ) {
            (verdict, reason) = (VERDICT_NO_TUNNEL, why);
        }
    }
    let refused = verdict == VERDICT_DENY || verdict == VERDICT_NO_TUNNEL;
    if !report_it {
        return ALLOW;
    }
    count(counters::verdict(DIRECTION_EGRESS, verdict));
    report(&call, local, named, verdict, rule, reason);
    if refused {
        REFUSE
    } else {
        ALLOW
    }
}

/// Whether a UDP call's datagrams are recorded ([`record_datagram`]). A socket connected to a
/// loopback address needs no record: its replies pass its ingress as its peer's (the receiving
/// socket is connected to them), and its receiver, in the same network namespace, finds it by
/// the kernel's socket lookup ([`crate::context::datagram_sender`]). A map write per socket saved.
/// Its own BPF function: inlined into the connect hook, it crashed the BPF backend (LLVM 22).
#[inline(never)]
fn records_datagrams(connecting: bool, remote_addr: &[u8; 16]) -> bool {
    !(connecting && ipcache::is_loopback(remote_addr))
}

/// Whether a `sendmsg()` to `remote_addr:remote_port` goes to a UDP socket on loopback connected
/// to the caller's port ([`context::sends_to_connected_loopback`]).
#[inline(always)]
fn sends_to_connected_loopback(
    ctx: &SockAddrContext,
    family: u8,
    remote_addr: &[u8; 16],
    remote_port: u16,
) -> bool {
    let v4 = family == 4;
    let loopback = if v4 {
        map_v4([127, 0, 0, 1])
    } else {
        let mut one = [0; 16];
        one[15] = 1;
        one
    };
    *remote_addr == loopback && context::sends_to_connected_loopback(ctx, v4, remote_port)
}

/// Records that `local` sends a datagram from `src_port` (0: not bound yet, nothing to record) to
/// `remote_addr:remote_port` ([`flows::record`]).
#[inline(always)]
fn record_datagram(remote_addr: &[u8; 16], src_port: u16, remote_port: u16, local: u32) {
    if src_port != 0 {
        flows::record(
            PROTO_UDP,
            remote_addr,
            flows::ports(src_port, remote_port),
            local,
            0,
        );
    }
}

/// The call being decided, as its verdict record names it.
pub struct Call {
    pub cgroup_id: u64,
    pub cookie: u64,
    pub family: u8,
    pub protocol: u8,
    pub remote_addr: [u8; 16],
    pub remote_port: u16,
    /// The Service's cluster IP and port the call was translated from (zero when none).
    pub service: ServiceAddr,
}

#[inline(always)]
fn report(call: &Call, local: u32, remote: u32, verdict: u8, rule: u32, reason: u8) {
    if is_counted(verdict) {
        events::tally(&FlowCountKey {
            local_identity: local,
            remote_identity: remote,
            rule,
            local_addr: [0; 16],
            remote_addr: call.remote_addr,
            local_port: 0,
            remote_port: call.remote_port,
            family: call.family,
            protocol: call.protocol,
            direction: DIRECTION_EGRESS,
            verdict,
            service_addr: call.service.addr,
            service_port: call.service.port,
            _pad: [0; 2],
        });
        return;
    }
    let flow = EventLimitKey {
        local_identity: local,
        remote_identity: remote,
        remote_addr: call.remote_addr,
        port: call.remote_port,
        protocol: call.protocol,
        direction: DIRECTION_EGRESS,
        verdict,
        _pad: [0; 3],
    };
    events::emit(&flow, rule, |ev| {
        ev.cgroup_id = call.cgroup_id;
        ev.cookie = call.cookie;
        ev.family = call.family;
        ev.reason = reason;
        ev.service_addr = call.service.addr;
        ev.service_port = call.service.port;
    });
}

/// A refusal no rule made (`reason`): counted, recorded, and `EPERM` for the caller.
#[inline(always)]
fn refuse_undecided(call: &Call, local: u32, reason: u8) -> i32 {
    count(counters::verdict(DIRECTION_EGRESS, VERDICT_DENY));
    report(call, local, IDENTITY_WORLD, VERDICT_DENY, 0, reason);
    REFUSE
}

/// Points a connect() at the agent's outbound tunnel listener and records where it was going,
/// for its SYN to file under the connection's 4-tuple ([`redirect`]). `Some(reason)` when it cannot: no tunnel
/// runs on this node ([`reasons::NONE`]), or the agent holds no certificate for the workload yet
/// ([`reasons::NO_CERTIFICATE`]): refused now, never carried without one.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn send_to_tunnel(
    ctx: &SockAddrContext,
    family: u8,
    addr: [u8; 16],
    port: u16,
    cookie: u64,
    local: u32,
    remote: u32,
    rule: u32,
) -> Option<u8> {
    let Some(t) = maps::tunnel() else {
        return Some(reasons::NONE);
    };
    if !maps::certified(local) {
        return Some(reasons::NO_CERTIFICATE);
    }
    let original = OriginalDst {
        addr,
        port,
        family,
        _pad: 0,
        local_identity: local,
        remote_identity: remote,
        rule,
    };
    // Filed under the connection's 4-tuple by its SYN ([`redirect::file_tunnel_connection`]).
    if !redirect::record(ctx, cookie, original) {
        return Some(reasons::NONE);
    }
    context::redirect_call(ctx, family, t.ip4, t.ip6, t.port);
    None
}
