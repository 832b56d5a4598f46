//! The one IP packet parser of the `cgroup_skb` programs. Packet data starts at the IP header.
//!
//! IPv6 extension headers (hop-by-hop, routing, fragment, destination options, authentication)
//! are walked with a bounded loop; whatever the walk cannot finish is an error with a reason, and
//! the caller refuses it for an isolated workload: a packet is never let through because it was
//! not understood.
use agent_common::*;
use aya_ebpf::programs::SkBuffContext;

use crate::context;

/// How many IPv6 extension headers the walk reads before it gives up on a chain.
pub const MAX_EXTENSION_HEADERS: usize = 8;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// A parsed packet: its flow as the sender sees it (the sender is "local" in [`FlowKey`]'s
/// terms, as in the connecting side's record), and what the checks need besides.
pub struct Packet {
    pub flow: FlowKey,
    pub family: u8,
    /// Offset of the transport header.
    pub l4: u32,
    /// TCP flags; for ICMP and ICMPv6 the message type.
    pub tcp_flags: u8,
}

impl Packet {
    #[inline(always)]
    pub fn icmp_type(&self) -> u8 {
        self.tcp_flags
    }

    /// Stands for a packet the parser could not finish, in its verdict record.
    #[inline(always)]
    pub fn unparsed() -> Packet {
        Packet {
            flow: FlowKey::default(),
            family: 0,
            l4: 0,
            tcp_flags: 0,
        }
    }
}

/// Whether the packet is TCP without SYN (or with SYN and ACK): a flow the ingress check already
/// decided, which is most inbound packets. Read straight from the packet's linear data (the
/// transport header is pulled in before the socket's filter runs), in a few loads; `false` sends
/// the packet to the full parser, which also sees IPv6 extension headers.
#[inline(always)]
pub fn is_established_tcp(ctx: &SkBuffContext) -> bool {
    let (start, end) = context::packet_bounds(ctx);
    if start + 20 > end {
        return false;
    }
    // The bounds checked above and below keep every read inside the packet.
    let first = context::packet_byte(start);
    let flags_at = match first >> 4 {
        4 => {
            if context::packet_byte(start + 9) != PROTO_TCP {
                return false;
            }
            start + usize::from(first & 0x0f) * 4 + 13
        }
        6 => {
            if start + 40 > end {
                return false;
            }
            if context::packet_byte(start + 6) != PROTO_TCP {
                return false;
            }
            start + 40 + 13
        }
        _ => return false,
    };
    if flags_at + 1 > end {
        return false;
    }
    let flags = context::packet_byte(flags_at);
    flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN
}

/// The packet's own headers.
#[inline(always)]
pub fn parse(ctx: &SkBuffContext) -> Result<Packet, u8> {
    let mut p = Packet::unparsed();
    match parse_into(ctx, 0, false, &mut p) {
        reasons::NONE => Ok(p),
        reason => Err(reason),
    }
}

/// The headers of the packet an ICMP error carries at `offset`: only the first eight bytes of
/// its transport header are sure to be there.
#[inline(always)]
pub fn parse_quoted(ctx: &SkBuffContext, offset: u32) -> Result<Packet, u8> {
    let mut p = Packet::unparsed();
    match parse_into(ctx, offset, true, &mut p) {
        reasons::NONE => Ok(p),
        reason => Err(reason),
    }
}

/// Parses the headers at `offset` into `out`: `NONE`, or the [`reasons`] code of what it could
/// not finish. Its own BPF function, writing straight into the caller's packet so that its frame
/// stays small (it runs below the ICMP error check).
#[inline(never)]
fn parse_into(ctx: &SkBuffContext, offset: u32, quoted: bool, out: &mut Packet) -> u8 {
    if offset == 0 && !quoted && parse_direct(ctx, out) {
        return reasons::NONE;
    }
    let Some(word) = load4(ctx, offset) else {
        return reasons::MALFORMED;
    };
    let first = (word >> 24) as u8;
    let l4 = match first >> 4 {
        4 => {
            let ihl = u32::from(first & 0x0f) * 4;
            if ihl < 20 {
                return reasons::MALFORMED;
            }
            // fragment field, time to live, protocol
            let Some(word) = load4(ctx, offset + 6) else {
                return reasons::MALFORMED;
            };
            if (word >> 16) & 0x1fff != 0 {
                return reasons::FRAGMENT;
            }
            out.flow.protocol = word as u8;
            let (Some(source), Some(destination)) =
                (load4(ctx, offset + 12), load4(ctx, offset + 16))
            else {
                return reasons::MALFORMED;
            };
            out.flow.local_addr = map_v4(source.to_be_bytes());
            out.flow.remote_addr = map_v4(destination.to_be_bytes());
            out.family = 4;
            offset + ihl
        }
        6 => {
            if !load16(ctx, offset + 8, &mut out.flow.local_addr)
                || !load16(ctx, offset + 24, &mut out.flow.remote_addr)
            {
                return reasons::MALFORMED;
            }
            // payload length, next header, hop limit
            let Some(word) = load4(ctx, offset + 4) else {
                return reasons::MALFORMED;
            };
            out.family = 6;
            match walk_extension_headers(ctx, (word >> 8) as u8, offset + 40) {
                Ok((protocol, l4)) => {
                    out.flow.protocol = protocol;
                    l4
                }
                Err(reason) => return reason,
            }
        }
        _ => return reasons::MALFORMED,
    };
    out.l4 = l4;
    let protocol = out.flow.protocol;
    if has_ports(protocol) {
        let Some(ports) = load4(ctx, l4) else {
            return reasons::MALFORMED;
        };
        out.flow.local_port = (ports >> 16) as u16;
        out.flow.remote_port = ports as u16;
        if protocol == PROTO_TCP && !quoted {
            // data offset, flags, window
            let Some(word) = load4(ctx, l4 + 12) else {
                return reasons::MALFORMED;
            };
            out.tcp_flags = (word >> 16) as u8;
        }
    } else if is_icmp(protocol) {
        let Some(word) = load4(ctx, l4) else {
            return reasons::MALFORMED;
        };
        out.tcp_flags = (word >> 24) as u8;
    }
    reasons::NONE
}

/// The common packet, read straight from its linear data (no helper call): IPv4 without options
/// and not a non-first fragment, or IPv6 whose next header is the transport, carrying TCP, UDP,
/// UDP-Lite or SCTP, with the transport header's start (TCP: up to its window) in the linear data.
/// Writes nothing and answers `false` for any other packet, which the full parser then reads, so
/// both give the same result for every packet this one takes.
#[inline(always)]
fn parse_direct(ctx: &SkBuffContext, out: &mut Packet) -> bool {
    let (start, end) = context::packet_bounds(ctx);
    // The bounds checked before each read keep it inside the packet (and ask for no more of it
    // than the full parser's reads do).
    if start + 28 > end {
        return false;
    }
    let first = context::packet_byte(start);
    let (protocol, l4) = match first {
        // Version 4, header of 20 bytes: options go to the full parser.
        0x45 => {
            // Fragment offset (13 bits after 3 flag bits): a non-first fragment has no ports.
            if context::packet_byte(start + 6) & 0x1f != 0 || context::packet_byte(start + 7) != 0 {
                return false;
            }
            (context::packet_byte(start + 9), 20)
        }
        _ if first >> 4 == 6 => {
            if start + 40 > end {
                return false;
            }
            (context::packet_byte(start + 6), 40)
        }
        _ => return false,
    };
    // Extension headers, ICMP and other protocols go to the full parser.
    if !has_ports(protocol) {
        return false;
    }
    let at = start + l4;
    if at + 4 > end {
        return false;
    }
    let mut tcp_flags = 0;
    if protocol == PROTO_TCP {
        // The full parser reads the word of data offset, flags and window.
        if at + 16 > end {
            return false;
        }
        tcp_flags = context::packet_byte(at + 13);
    }
    if l4 == 20 {
        let byte = |i: usize| context::packet_byte(start + i);
        out.flow.local_addr = map_v4([byte(12), byte(13), byte(14), byte(15)]);
        out.flow.remote_addr = map_v4([byte(16), byte(17), byte(18), byte(19)]);
        out.family = 4;
    } else {
        for i in 0..16 {
            out.flow.local_addr[i] = context::packet_byte(start + 8 + i);
            out.flow.remote_addr[i] = context::packet_byte(start + 24 + i);
        }
        out.family = 6;
    }
    let port = |i: usize| {
        u16::from_be_bytes([
            context::packet_byte(at + i),
            context::packet_byte(at + i + 1),
        ])
    };
    out.flow.local_port = port(0);
    out.flow.remote_port = port(2);
    out.flow.protocol = protocol;
    out.l4 = l4 as u32;
    out.tcp_flags = tcp_flags;
    true
}

/// Four bytes of the packet at `offset`, big-endian. Every small read goes through this one BPF
/// function: the compiler would otherwise merge reads of different sizes into one helper call
/// whose length the verifier cannot bound away from zero.
#[inline(never)]
pub fn load4(ctx: &SkBuffContext, offset: u32) -> Option<u32> {
    ctx.load::<[u8; 4]>(offset as usize)
        .ok()
        .map(u32::from_be_bytes)
}

/// Sixteen bytes (an IPv6 address) of the packet at `offset`.
#[inline(never)]
fn load16(ctx: &SkBuffContext, offset: u32, out: &mut [u8; 16]) -> bool {
    match ctx.load::<[u8; 16]>(offset as usize) {
        Ok(bytes) => {
            *out = bytes;
            true
        }
        Err(_) => false,
    }
}

/// Whether the protocol's header starts with 16-bit source and destination ports.
#[inline(always)]
pub fn has_ports(protocol: u8) -> bool {
    protocol == PROTO_TCP
        || protocol == PROTO_UDP
        || protocol == PROTO_SCTP
        || protocol == PROTO_UDPLITE
}

#[inline(always)]
pub fn is_icmp(protocol: u8) -> bool {
    protocol == PROTO_ICMP || protocol == PROTO_ICMPV6
}

/// Follows IPv6 extension headers from `next` at `offset` to the upper-layer protocol and its
/// offset. A non-first fragment, a chain longer than [`MAX_EXTENSION_HEADERS`] or a length that
/// points past the packet is an error.
#[inline(always)]
fn walk_extension_headers(ctx: &SkBuffContext, next: u8, offset: u32) -> Result<(u8, u32), u8> {
    let mut next = next;
    let mut offset = offset;
    for _ in 0..MAX_EXTENSION_HEADERS {
        if !is_extension_header(next) {
            return Ok((next, offset));
        }
        // next header, length, and a fragment header's offset field
        let word = load4(ctx, offset).ok_or(reasons::MALFORMED)?;
        let length = (word >> 16) & 0xff;
        let length = match next {
            IPV6_FRAGMENT => {
                if (word & 0xffff) >> 3 != 0 {
                    return Err(reasons::FRAGMENT);
                }
                8
            }
            IPV6_AUTH => (length + 2) * 4,
            _ => (length + 1) * 8,
        };
        next = (word >> 24) as u8;
        offset += length;
    }
    if is_extension_header(next) {
        Err(reasons::HEADER_CHAIN)
    } else {
        Ok((next, offset))
    }
}

#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_FRAGMENT | IPV6_AUTH
    )
}

/// ICMP and ICMPv6 messages that report an error about a packet, which they carry.
#[inline(always)]
pub fn is_icmp_error(protocol: u8, icmp_type: u8) -> bool {
    if protocol == PROTO_ICMP {
        // destination unreachable (fragmentation needed among them), source quench,
        // time exceeded, parameter problem
        matches!(icmp_type, 3 | 4 | 11 | 12)
    } else {
        // destination unreachable, packet too big, time exceeded, parameter problem
        matches!(icmp_type, 1..=4)
    }
}

/// ICMPv6 neighbour discovery (router and neighbour solicitation and advertisement, redirect)
/// and multicast listener discovery: the link does not work without them.
#[inline(always)]
pub fn is_icmpv6_link_control(protocol: u8, icmp_type: u8) -> bool {
    protocol == PROTO_ICMPV6 && matches!(icmp_type, 130..=137 | 143)
}

/// Echo request and echo reply types of the packet's ICMP flavour.
#[inline(always)]
pub fn echo_types(protocol: u8) -> (u8, u8) {
    if protocol == PROTO_ICMP {
        (8, 0)
    } else {
        (128, 129)
    }
}

/// The identifier of an ICMP echo request or reply.
#[inline(always)]
pub fn echo_id(ctx: &SkBuffContext, p: &Packet) -> Result<u16, u8> {
    load4(ctx, p.l4 + 4)
        .map(|word| (word >> 16) as u16)
        .ok_or(reasons::MALFORMED)
}
