//! The packet programs: the ingress check of every flow's first packet, and the egress backstop
//! for whatever never passed a `connect()`/`sendmsg()` decision (raw sockets, ICMP, SCTP,
//! UDP-Lite, other IP protocols).
//!
//! Fail mode: for a workload isolated in the packet's direction, a packet the parser cannot
//! finish, or of a protocol no rule can name, is refused with a reason; a workload no policy
//! selects is never touched.
use agent_common::*;
use aya_ebpf::programs::SkBuffContext;

use crate::{
    context::{self, full_socket},
    dns, events, flows, ipcache,
    maps::{self, count, CONNECTING, UDP_FLOWS},
    packet::{self, Packet, TCP_FLAG_ACK, TCP_FLAG_SYN},
    policy, redirect, v6_bytes, ALLOW, REFUSE,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const AF_INET: u32 = 2;

/// The workload of the packet's socket, by its cgroup or the nearest mapped ancestor.
#[inline(always)]
fn packet_workload(ctx: &SkBuffContext) -> (u64, Option<u32>) {
    let cgroup_id = context::skb_cgroup(ctx);
    let identity = maps::workload(cgroup_id, |level| context::skb_ancestor_cgroup(ctx, level));
    (cgroup_id, identity)
}

/// One verdict record of a packet program. `p`'s sender is the workload on egress. Its own BPF
/// function (so its own stack frame); `what` packs the rule, direction, verdict and reason
/// ([`what`]), as a BPF call takes five arguments.
#[inline(never)]
fn report(ctx: &SkBuffContext, p: &Packet, local: u32, remote: u32, what: u64) {
    let rule = (what >> 32) as u32;
    let direction = (what >> 16) as u8;
    let verdict = (what >> 8) as u8;
    let reason = what as u8;
    count(counters::verdict(direction, verdict));
    let f = &p.flow;
    let egress = direction == DIRECTION_EGRESS;
    let (local_addr, local_port, remote_addr, remote_port) = if egress {
        (f.local_addr, f.local_port, f.remote_addr, f.remote_port)
    } else {
        (f.remote_addr, f.remote_port, f.local_addr, f.local_port)
    };
    let (local_port, remote_port) = if packet::is_icmp(f.protocol) {
        (0, icmp_type_port(p.icmp_type()))
    } else {
        (local_port, remote_port)
    };
    // The ephemeral side's port stays out of both keys: every connection of a client to a
    // service is one flow to count, and one budget for events.
    let (key_local_port, key_remote_port) = if egress || packet::is_icmp(f.protocol) {
        (0, remote_port)
    } else {
        (local_port, 0)
    };
    if is_counted(verdict) {
        events::tally(&FlowCountKey {
            local_identity: local,
            remote_identity: remote,
            rule,
            local_addr,
            remote_addr,
            local_port: key_local_port,
            remote_port: key_remote_port,
            family: p.family,
            protocol: f.protocol,
            direction,
            verdict,
            service_addr: [0; 16],
            service_port: 0,
            _pad: [0; 2],
        });
        return;
    }
    let event_flow = EventLimitKey {
        local_identity: local,
        remote_identity: remote,
        remote_addr,
        port: key_local_port | key_remote_port,
        protocol: f.protocol,
        direction,
        verdict,
        _pad: [0; 3],
    };
    events::emit(&event_flow, rule, |ev| {
        // On a listener the cookie is the listening socket's.
        ev.cgroup_id = context::skb_cgroup(ctx);
        ev.cookie = context::socket_cookie(ctx);
        ev.local_port = local_port;
        ev.remote_port = remote_port;
        ev.local_addr = local_addr;
        ev.family = p.family;
        ev.reason = reason;
    });
}

/// Records a policy verdict and turns it into the program's answer: a deny, or an `mtls:
/// required` rule the packet cannot meet, refuses it.
#[inline(always)]
fn answer(ctx: &SkBuffContext, p: &Packet, local: u32, remote: u32, what: u64) -> i32 {
    report(ctx, p, local, remote, what);
    let verdict = (what >> 8) as u8;
    if verdict == VERDICT_DENY || verdict == VERDICT_NO_TUNNEL {
        REFUSE
    } else {
        ALLOW
    }
}

/// [`report`]'s packed rule, direction, verdict and reason.
#[inline(always)]
fn what(rule: u32, direction: u8, verdict: u8, reason: u8) -> u64 {
    (u64::from(rule) << 32)
        | (u64::from(direction) << 16)
        | (u64::from(verdict) << 8)
        | u64::from(reason)
}

/// A refusal no rule made: the packet cannot be decided (`reason`).
#[inline(always)]
fn refuse_undecided(ctx: &SkBuffContext, p: &Packet, direction: u8, local: u32, reason: u8) -> i32 {
    answer(
        ctx,
        p,
        local,
        IDENTITY_WORLD,
        what(0, direction, VERDICT_DENY, reason),
    )
}

/// A refusal of a packet the parser could not finish.
#[inline(never)]
fn refuse_unparsed(ctx: &SkBuffContext, direction: u8, local: u32, reason: u8) -> i32 {
    refuse_undecided(ctx, &Packet::unparsed(), direction, local, reason)
}

/// What both packet programs do first: find the packet's workload, and settle what no rule
/// decides: a socket of no workload (untouched, or refused with `unmappedCgroups: deny`) and a
/// packet the parser could not finish (refused for an isolated workload). `Err` is the verdict;
/// `Ok` carries the workload and the full policy generation on to the protocol's decision.
#[inline(always)]
fn decidable(
    ctx: &SkBuffContext,
    direction: u8,
    parsed: Result<Packet, u8>,
) -> Result<(Packet, u32, u32), i32> {
    let (cgroup_id, local) = packet_workload(ctx);
    let full_gen = maps::generation();
    let Some(local) = local else {
        if !maps::unmapped_refused(cgroup_id) {
            return Err(ALLOW);
        }
        return Err(match &parsed {
            Ok(p) => refuse_undecided(ctx, p, direction, 0, reasons::UNMAPPED_CGROUP),
            Err(_) => refuse_unparsed(ctx, direction, 0, reasons::UNMAPPED_CGROUP),
        });
    };
    match parsed {
        Ok(p) => Ok((p, local, full_gen)),
        Err(reason) if policy::isolated(local, direction, (full_gen & 1) as u8) => {
            Err(refuse_unparsed(ctx, direction, local, reason))
        }
        Err(_) => Err(ALLOW),
    }
}

/// A protocol no rule can name (UDP-Lite, GRE, raw IP protocols): refused for an isolated
/// workload.
#[inline(always)]
fn refuse_if_isolated(ctx: &SkBuffContext, p: &Packet, direction: u8, local: u32, gen: u8) -> i32 {
    if !policy::isolated(local, direction, gen) {
        return ALLOW;
    }
    refuse_undecided(ctx, p, direction, local, reasons::PROTOCOL)
}

/// The policy port of a packet: its destination port, or its ICMP type.
#[inline(always)]
fn policy_port(p: &Packet) -> u16 {
    if packet::is_icmp(p.flow.protocol) {
        icmp_type_port(p.icmp_type())
    } else {
        p.flow.remote_port
    }
}

/// Whether `local` may exchange the packet an ICMP error carries with its peer: the error is
/// about a packet of `local` (`local_sent`: it sent the packet, else it received it) and that
/// packet's flow is one policy lets through in either direction (the flow itself or its reply).
#[inline(never)]
fn error_belongs_to_allowed_flow(
    ctx: &SkBuffContext,
    p: &Packet,
    local: u32,
    local_sent: bool,
    gen: u8,
) -> bool {
    let Ok(inner) = packet::parse_quoted(ctx, p.l4 + 8) else {
        return false;
    };
    let f = &inner.flow;
    // The carried packet went from `local` to the error's sender's side, or the reverse.
    let (mine, peer, my_port, peer_port) = if local_sent {
        (f.local_addr, f.remote_addr, f.local_port, f.remote_port)
    } else {
        (f.remote_addr, f.local_addr, f.remote_port, f.local_port)
    };
    let outer = &p.flow;
    let my_outer = if local_sent {
        outer.remote_addr
    } else {
        outer.local_addr
    };
    if mine != my_outer || (!local_sent && peer != outer.remote_addr) {
        return false;
    }
    let (my_port, peer_port) = if packet::is_icmp(f.protocol) {
        let t = icmp_type_port(inner.icmp_type());
        (t, t)
    } else {
        (my_port, peer_port)
    };
    let remote = ipcache::address_identity(&peer, gen);
    // The flow `local` started towards the peer's port, or the one the peer started to its own.
    let (first, second) = if local_sent {
        (DIRECTION_EGRESS, DIRECTION_INGRESS)
    } else {
        (DIRECTION_INGRESS, DIRECTION_EGRESS)
    };
    let (first_port, second_port) = if local_sent {
        (peer_port, my_port)
    } else {
        (my_port, peer_port)
    };
    !policy::decide(local, remote, first, f.protocol, first_port, gen).refuses()
        || !policy::decide(local, remote, second, f.protocol, second_port, gen).refuses()
}

/// Ingress decision on the first packet of a flow: a TCP SYN, or a UDP datagram of a flow whose
/// verdict for the current policy generation is not cached yet. Established TCP pays one header
/// read. A dropped SYN never reaches the listener.
#[inline(always)]
pub fn ingress(ctx: &SkBuffContext) -> i32 {
    if packet::is_established_tcp(ctx) {
        return ALLOW;
    }
    let parsed = packet::parse(ctx);
    if let Ok(p) = &parsed {
        if p.flow.protocol == PROTO_TCP
            && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN
        {
            return ALLOW;
        }
    }
    let (p, local, full_gen) = match decidable(ctx, DIRECTION_INGRESS, parsed) {
        Ok(decidable) => decidable,
        Err(verdict) => return verdict,
    };
    let gen = (full_gen & 1) as u8;
    match p.flow.protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => ingress_ports(ctx, &p, local, full_gen),
        PROTO_ICMP | PROTO_ICMPV6 => icmp(ctx, &p, DIRECTION_INGRESS, local, gen),
        _ => refuse_if_isolated(ctx, &p, DIRECTION_INGRESS, local, gen),
    }
}

/// The ingress decision of a protocol with ports (TCP, UDP, SCTP). A BPF function of its own
/// beside [`icmp`], so the two frames never add up.
#[inline(never)]
fn ingress_ports(ctx: &SkBuffContext, p: &Packet, local: u32, full_gen: u32) -> i32 {
    let gen = (full_gen & 1) as u8;
    let flow = &p.flow;
    let protocol = flow.protocol;
    // Replies belong to a flow the workload started, which its egress check decided: as in
    // Kubernetes, they are never refused by its ingress policy. A connected UDP socket receives
    // only from its peer (no map read); an unconnected one's sends were recorded (below).
    if protocol == PROTO_UDP && is_connected_peer(ctx, flow) {
        return ALLOW;
    }
    // A workload no policy isolates on ingress has nothing decided here. What it admits matters
    // only to its answers, and only while its egress is isolated (an admission lasts one policy
    // generation): otherwise no record is read or written (TCP keeps none).
    if !policy::isolated(local, DIRECTION_INGRESS, gen)
        && (protocol == PROTO_TCP || !policy::isolated(local, DIRECTION_EGRESS, gen))
    {
        return ALLOW;
    }
    // `local`'s record of the flow (TCP keeps none), when it was read: for the reply test here and
    // the admission's record below.
    let mut known = -1;
    // A UDP sender named by its socket, connected to this receiver: its datagrams are never
    // replies, and its flow is admitted only for `local`'s answers while `local`'s egress is
    // isolated (else they need no record: their receiver is connected to them, `sendmsg`).
    let mut connected_sender = false;
    // A peer on this host is named by its connecting socket, found by the SYN's 4-tuple; only
    // peers elsewhere are named by address. The agent's delivery of a tunneled connection is
    // named by the workload its certificate proved, for the 4-tuple the agent recorded (only
    // the running tunnel records them: without it, no lookup).
    let mut tunneled = false;
    let remote = match protocol {
        PROTO_TCP => {
            let delivery = if maps::tunnel().is_some() {
                // SAFETY: copied out at once.
                unsafe { CONNECTING.get(flow) }.copied()
            } else {
                None
            };
            match delivery {
                Some(c) => {
                    tunneled = c.flags & CONNECTING_FLAG_TUNNEL != 0;
                    c.identity
                }
                None => tcp_sender(ctx, p, gen),
            }
        }
        PROTO_UDP => match ipcache::address_identity(&flow.local_addr, gen) {
            // A sender on an address workloads share is named anew for each datagram: by its
            // socket, else by the record its `sendmsg` hook made. An admission never passes it:
            // it is keyed by addresses and ports, and another workload may take the port a
            // closed socket of the admitted one left.
            IDENTITY_HOST => match connected_udp_sender(ctx, p) {
                identity @ 0.. => {
                    connected_sender = true;
                    identity as u32
                }
                _ => {
                    known = flows::receiving(local, flow);
                    if flows::is_reply(known) {
                        return ALLOW;
                    }
                    flows::sender(
                        protocol,
                        &flow.remote_addr,
                        flows::ports(flow.local_port, flow.remote_port),
                    )
                }
            },
            // A sender with an address of its own: the flow's admission under the policy in
            // force passes its next datagrams.
            by_address => {
                known = flows::receiving(local, flow);
                if flows::is_known(known) {
                    return ALLOW;
                }
                by_address
            }
        },
        _ => {
            known = flows::receiving(local, flow);
            if flows::is_reply(known) {
                return ALLOW;
            }
            match ipcache::address_identity(&flow.local_addr, gen) {
                IDENTITY_HOST => flows::sender(
                    protocol,
                    &flow.remote_addr,
                    flows::ports(flow.local_port, flow.remote_port),
                ),
                by_address => by_address,
            }
        }
    };
    let d = policy::decide(
        local,
        remote,
        DIRECTION_INGRESS,
        protocol,
        flow.remote_port,
        gen,
    );
    let admitted = !(d.isolated && d.verdict == VERDICT_DENY);
    if protocol == PROTO_UDP && !admitted {
        // A refusal under the policy in force is cached: the next datagrams of the flow are
        // refused without another verdict record.
        // SAFETY: copied out at once.
        if let Some(cached) = unsafe { UDP_FLOWS.get(flow) }.copied() {
            if cached.generation == full_gen && cached.verdict == VERDICT_DENY {
                return REFUSE;
            }
        }
        let cached = UdpFlowValue {
            generation: full_gen,
            rule: d.rule,
            verdict: d.verdict,
            _pad: [0; 7],
        };
        let _ = UDP_FLOWS.insert(flow, cached, 0);
    }
    if protocol != PROTO_TCP && admitted && known != i64::from(CONNECTING_FLAG_ADMITTED) {
        // The workload may answer what it admitted, whatever its egress policy says, and its
        // answers do not make the flow its own. (A record of the flow `local` started would have
        // let the packet in above as a reply.)
        let answer_ports = flows::ports(flow.remote_port, flow.local_port);
        if connected_sender {
            if policy::isolated(local, DIRECTION_EGRESS, gen) {
                // Not read above: written only when not there yet.
                flows::record(
                    protocol,
                    &flow.local_addr,
                    answer_ports,
                    local,
                    CONNECTING_FLAG_ADMITTED,
                );
            }
        } else {
            flows::admit(protocol, &flow.local_addr, answer_ports, local);
        }
    }
    if !d.isolated {
        return ALLOW;
    }
    // A rule that requires mTLS admits only what came through the tunnel (TCP; a datagram follows
    // the L4 verdict).
    let verdict = match d.verdict {
        VERDICT_REDIRECT if protocol == PROTO_TCP && !tunneled => VERDICT_NO_TUNNEL,
        VERDICT_REDIRECT => VERDICT_ALLOW,
        v => v,
    };
    answer(
        ctx,
        p,
        local,
        remote,
        what(d.rule, DIRECTION_INGRESS, verdict, reasons::NONE),
    )
}

/// The identity of a TCP SYN's sender no record names: the workload of its connecting socket
/// on this host ([`context::syn_sender`]), else its address's. Its own BPF function: the
/// lookup's tuple stays off the ingress decision's frame.
#[inline(never)]
fn tcp_sender(ctx: &SkBuffContext, p: &Packet, gen: u8) -> u32 {
    let flow = &p.flow;
    match context::syn_sender(ctx, flow, p.family == 4) {
        Some(identity) => identity,
        None => ipcache::address_identity(&flow.local_addr, gen),
    }
}

/// Whether the receiving socket is connected to the datagram's sender: the workload chose that
/// peer at `connect()`, where its egress was decided, so this is the flow's reply (no record of
/// it is kept).
#[inline(always)]
fn is_connected_peer(ctx: &SkBuffContext, flow: &FlowKey) -> bool {
    let Some(sk) = full_socket(ctx) else {
        return false;
    };
    let (family, dst_port, dst_ip4, dst_ip6) = sk.peer();
    if dst_port == 0 || u16::from_be(dst_port) != flow.local_port {
        return false;
    }
    let peer = if family == AF_INET {
        map_v4(dst_ip4.to_ne_bytes())
    } else {
        v6_bytes(dst_ip6)
    };
    peer == flow.local_addr
}

/// The workload of a UDP datagram's connected sending socket on this host
/// ([`context::datagram_sender`]), -1 when there is none. Its own BPF function: the lookup's
/// tuple stays off the ingress decision's frame.
#[inline(never)]
fn connected_udp_sender(ctx: &SkBuffContext, p: &Packet) -> i64 {
    context::datagram_sender(ctx, &p.flow, p.family == 4).map_or(-1, i64::from)
}

/// ICMP and ICMPv6 for an isolated workload, either direction: neighbour discovery always
/// passes; errors pass when the packet they carry belongs to a flow policy allows; echo replies
/// pass as the replies of the requests the workload sent; every other message is decided by
/// its type (`icmpType` in policy).
/// Its own BPF function: it has its own stack frame.
#[inline(never)]
fn icmp(ctx: &SkBuffContext, p: &Packet, direction: u8, local: u32, gen: u8) -> i32 {
    let protocol = p.flow.protocol;
    let icmp_type = p.icmp_type();
    if packet::is_icmpv6_link_control(protocol, icmp_type)
        || !policy::isolated(local, direction, gen)
    {
        return ALLOW;
    }
    let egress = direction == DIRECTION_EGRESS;
    if packet::is_icmp_error(protocol, icmp_type) {
        // On egress the workload reports a packet it received; on ingress one it sent.
        if error_belongs_to_allowed_flow(ctx, p, local, !egress, gen) {
            return ALLOW;
        }
        return refuse_undecided(ctx, p, direction, local, reasons::ICMP_ERROR);
    }
    let (request, reply) = packet::echo_types(protocol);
    let peer_addr = if egress {
        p.flow.remote_addr
    } else {
        p.flow.local_addr
    };
    if icmp_type == reply && !egress {
        let Ok(id) = packet::echo_id(ctx, p) else {
            return refuse_undecided(ctx, p, direction, local, reasons::MALFORMED);
        };
        if flows::recorded(protocol, &peer_addr, flows::ports(id, 0), local) == 0 {
            return ALLOW;
        }
    }
    let remote = ipcache::address_identity(&peer_addr, gen);
    let d = policy::decide(local, remote, direction, protocol, policy_port(p), gen);
    let verdict = match d.verdict {
        VERDICT_REDIRECT => VERDICT_ALLOW,
        v => v,
    };
    if egress && icmp_type == request && verdict != VERDICT_DENY {
        if let Ok(id) = packet::echo_id(ctx, p) {
            flows::record(protocol, &peer_addr, flows::ports(id, 0), local, 0);
        }
    }
    answer(
        ctx,
        p,
        local,
        remote,
        what(d.rule, direction, verdict, reasons::NONE),
    )
}

/// The egress backstop. TCP and UDP sockets left through `connect()`/`sendmsg()`, which decided
/// them: one helper call and two loads, then out. Everything else of an isolated workload is
/// decided here, packet by packet.
#[inline(always)]
pub fn egress(ctx: &SkBuffContext) -> i32 {
    let Some(sk) = full_socket(ctx) else {
        // No socket, or a request or time-wait one: the kernel's TCP answering a flow that was
        // decided (a SYN-ACK, the last ACK). Raw sockets are always full sockets.
        return ALLOW;
    };
    let (kind, protocol) = sk.kind_and_protocol();
    if (kind == SOCK_STREAM && protocol == u32::from(PROTO_TCP))
        || (kind == SOCK_DGRAM && protocol == u32::from(PROTO_UDP))
    {
        // While policy names DNS names: DNS the hooks sent to the proxy is filed for it.
        if let Some(port) = dns::proxy_port() {
            if dns::may_go_to_proxy(kind, sk.dst_port(), port) {
                dns::file_redirect(ctx, kind, port);
            }
        }
        // While the tunnel runs: the SYN of a connection the connect hook sent to it.
        if kind == SOCK_STREAM && sk.state() == context::TCP_SYN_SENT {
            if let Some(t) = maps::tunnel() {
                if sk.dst_port() == t.port {
                    redirect::file_tunnel_connection(ctx, t.port);
                }
            }
        }
        return ALLOW;
    }
    let parsed = packet::parse(ctx);
    let (p, local, full_gen) = match decidable(ctx, DIRECTION_EGRESS, parsed) {
        Ok(decidable) => decidable,
        Err(verdict) => return verdict,
    };
    let gen = (full_gen & 1) as u8;
    match p.flow.protocol {
        PROTO_ICMP | PROTO_ICMPV6 => icmp(ctx, &p, DIRECTION_EGRESS, local, gen),
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => egress_ports(ctx, &p, local, gen),
        _ => refuse_if_isolated(ctx, &p, DIRECTION_EGRESS, local, gen),
    }
}

/// The backstop's decision of a protocol with ports. A BPF function of its own beside [`icmp`].
#[inline(never)]
fn egress_ports(ctx: &SkBuffContext, p: &Packet, local: u32, gen: u8) -> i32 {
    let flow = &p.flow;
    let protocol = flow.protocol;
    // Hand-made TCP or UDP (a raw socket), or SCTP: decided by the destination's address and port.
    // The answers of admitted UDP flows; the packets of SCTP associations already allowed.
    let flags = flows::sending(
        local,
        protocol,
        &flow.remote_addr,
        flow.local_port,
        flow.remote_port,
    );
    if (protocol == PROTO_UDP && flows::is_answer(flags)) || (protocol == PROTO_SCTP && flags >= 0)
    {
        return ALLOW;
    }
    let remote = ipcache::address_identity(&flow.remote_addr, gen);
    let d = policy::decide(
        local,
        remote,
        DIRECTION_EGRESS,
        protocol,
        flow.remote_port,
        gen,
    );
    if !d.isolated {
        return ALLOW;
    }
    // A rule that requires mTLS cannot be met by a packet that skipped the connect hook.
    let verdict = match d.verdict {
        VERDICT_REDIRECT => VERDICT_NO_TUNNEL,
        v => v,
    };
    let refused = verdict == VERDICT_DENY || verdict == VERDICT_NO_TUNNEL;
    if !refused && protocol == PROTO_SCTP {
        let ports = flows::ports(flow.local_port, flow.remote_port);
        flows::record(protocol, &flow.remote_addr, ports, local, 0);
    }
    answer(
        ctx,
        p,
        local,
        remote,
        what(d.rule, DIRECTION_EGRESS, verdict, reasons::NONE),
    )
}
