#!/usr/bin/python3
"""Hand-made packets and odd sockets for ward's fail-closed tests (tests/tests/fail_closed.rs).

Standard library only: every byte of a packet is written here, so a test controls exactly what
the kernel programs have to parse (extension header chains, bad lengths, raw protocols).
Each mode prints plain lines; outcomes are `ok`, `eperm`, `timeout`, `refused` or
`error <errno>`, as the Rust peer prints them.

  ingress6 SRC DST WAIT_S TCP_PORTS UDP_PORTS LAYOUTS
      For every port (comma-separated lists) and layout (comma-separated; headers joined by
      `+`, `NAMExN` for N in a row): sends one hand-made TCP SYN and one UDP datagram (payload
      `<layout>@<port>`) from SRC to DST through an IPv6 raw socket, then for WAIT_S seconds
      watches for the listener's answers. Prints `tcp <port> <layout> synack|rst|none` and
      `udp <port> <layout> reply|none`.
      Headers: hbh, dst (PadN options), rt0 (routing type 0, segments left 0), frag (atomic
      fragment: offset 0, M=0), ah (authentication header), badlen (destination options whose
      length points far past the packet's end).
  raw-send SRC DST KIND PORT MARK [SPORT]
      One hand-made packet through a raw socket (IP_HDRINCL): KIND is tcp-syn (a SYN carrying
      MARK as data), udp (MARK as payload) or proto253 (MARK as the payload of IP protocol 253),
      from source port SPORT (default: one from the process id). Prints the outcome of sendto.
  watch
      Raw sockets for TCP, UDP, UDP-Lite and protocol 253, IPv4 and IPv6: prints `watching`, then
      `seen <family> <protocol> <mark>` for every packet that carries a `ward-mark-` token.
  udplite-send DST PORT MARK connected|unconnected
      A UDP-Lite datagram (no privilege needed); prints the outcome of connect and send.
  udplite-listen ADDR PORT
      Prints `listening <port>`, then `datagram <payload>` for each datagram received.
  sockopt tcp|udp DST PORT dstopts|hopopts TIMEOUT_S
      An ordinary socket with the sticky IPV6_DSTOPTS or IPV6_HOPOPTS option (the kernel adds
      the header to every packet): TCP connects, UDP sends and waits for a reply.
  udp-connected DST PORT TIMEOUT_S [SPORT]
      socket(); connect(); send() with no bind() (with SPORT: bound to that port first), then
      waits for a reply.
  udp-sendto DST PORT TIMEOUT_S SPORT [SRC]
      An unconnected socket bound to SPORT (on SRC, default any address): sendto(), then waits
      for a reply.
  udp-listen ADDR PORT
      A UDP socket with SO_REUSEADDR: prints `listening <port>`, then `datagram <payload>` for
      each datagram received.
  udp-decoy ADDR PORT PEER PEER_PORT
      A UDP socket with SO_REUSEADDR bound to ADDR:PORT and connected to PEER:PEER_PORT: prints
      `connected`, then waits.
  sink ADDR PORT
      TCP: prints `listening <port>`; for each connection reads to the end and answers with the
      byte count.
  bulk DST PORT BYTES TIMEOUT_S
      TCP: sends BYTES bytes, half-closes, prints `ok <count the sink answered>`.
  sctp-support
      Prints `supported`, or `unsupported <errno> <name>` when this kernel has no SCTP.
  sctp-listen ADDR PORT
      SCTP (one-to-one): prints `listening <port>`, then `accepted <peer>` per association.
  sctp-connect DST PORT TIMEOUT_S
"""

import errno
import ipaddress
import os
import select
import socket
import struct
import sys
import time

MARK = b"ward-mark-"
PROTO_UDPLITE = 136
PROTO_253 = 253
# Python names these only on some builds.
IPV6_HOPOPTS = getattr(socket, "IPV6_HOPOPTS", 54)
IPV6_DSTOPTS = getattr(socket, "IPV6_DSTOPTS", 59)

NH_HBH, NH_TCP, NH_UDP, NH_RT, NH_FRAG, NH_AH, NH_DST = 0, 6, 17, 43, 44, 51, 60


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def reported(attempt):
    """Runs attempt() and says how it went: "ok" (or what it returned), "timeout", or the error."""
    try:
        say(attempt() or "ok")
    except socket.timeout:
        say("timeout")
    except OSError as error:
        say(outcome(error))


def outcome(error):
    if error.errno == errno.EPERM:
        return "eperm"
    if error.errno == errno.ECONNREFUSED:
        return "refused"
    if error.errno in (errno.ETIMEDOUT, errno.EAGAIN, errno.EINPROGRESS):
        return "timeout"
    return "error %d" % error.errno


def family_of(address):
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def packed(address):
    return ipaddress.ip_address(address).packed


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def pseudo_header(src, dst, protocol, length):
    if len(src) == 16:
        return src + dst + struct.pack("!I3xB", length, protocol)
    return src + dst + struct.pack("!xBH", protocol, length)


def with_checksum(segment, offset, src, dst, protocol):
    total = checksum(pseudo_header(src, dst, protocol, len(segment)) + segment)
    if protocol == NH_UDP and total == 0:
        total = 0xFFFF
    return segment[:offset] + struct.pack("!H", total) + segment[offset + 2 :]


def tcp_syn(src, dst, sport, dport, data=b""):
    header = struct.pack(
        "!HHIIBBHHH", sport, dport, int.from_bytes(os.urandom(4), "big"), 0, 5 << 4, 0x02,
        65535, 0, 0,
    )
    return with_checksum(header + data, 16, src, dst, NH_TCP)


def udp(src, dst, sport, dport, payload):
    header = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return with_checksum(header + payload, 6, src, dst, NH_UDP)


def ipv4(src, dst, protocol, payload):
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, protocol, 0, src, dst
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def ipv6(src, dst, next_header, payload):
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64, src, dst) + payload


def extension(name, next_header):
    """One extension header (its own next-header value, its bytes)."""
    if name in ("hbh", "dst"):
        # PadN of 4 bytes fills the 8 bytes of the smallest header.
        return (NH_HBH if name == "hbh" else NH_DST), bytes([next_header, 0, 1, 4, 0, 0, 0, 0])
    if name == "badlen":
        # Says 201 * 8 bytes; the packet ends long before.
        return NH_DST, bytes([next_header, 200, 1, 4, 0, 0, 0, 0])
    if name == "rt0":
        return NH_RT, bytes([next_header, 0, 0, 0, 0, 0, 0, 0])
    if name == "frag":
        return NH_FRAG, struct.pack("!BBHI", next_header, 0, 0, int.from_bytes(os.urandom(4), "big"))
    if name == "ah":
        # Payload length in 4-octet units minus 2: 24 bytes with a 96-bit ICV.
        return NH_AH, struct.pack("!BBHII", next_header, 4, 0, 0x1000, 1) + bytes(12)
    raise SystemExit("unknown extension header %r" % name)


def layout_headers(layout):
    names = []
    for part in layout.split("+"):
        if part == "plain":
            continue
        if "x" in part:
            name, count = part.split("x")
            names.extend([name] * int(count))
        else:
            names.append(part)
    return names


def ipv6_with(layout, src, dst, protocol, transport):
    """An IPv6 packet whose headers are `layout`, then the transport segment."""
    chain = b""
    next_header = protocol
    for name in reversed(layout_headers(layout)):
        next_header, header = extension(name, next_header)
        chain = header + chain
    return ipv6(src, dst, next_header, chain + transport)


def warm_up(dst_text):
    """Waits until DST answers (a port unreachable for the discard port will do), so that no
    hand-made packet is lost while the link or the neighbour entry is still coming up."""
    sock = socket.socket(family_of(dst_text), socket.SOCK_DGRAM)
    sock.connect((dst_text, 9))
    sock.settimeout(0.1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sock.send(b"warm-up")
            sock.recv(64)
            return
        except socket.timeout:
            continue
        except ConnectionRefusedError:
            return
    raise SystemExit("no answer from %s within 10 s: is the link up?" % dst_text)


def ingress6(src_text, dst_text, wait, tcp_ports, udp_ports, layouts):
    src, dst = packed(src_text), packed(dst_text)
    tx = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    rx_tcp = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    rx_udp = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
    warm_up(dst_text)
    base = 20000 + (os.getpid() % 200) * 100
    tcp_sent, udp_sent = {}, {}
    sport = base
    for port in tcp_ports:
        for layout in layouts:
            sport += 1
            tcp_sent[sport] = (port, layout)
            tx.sendto(ipv6_with(layout, src, dst, NH_TCP, tcp_syn(src, dst, sport, port)),
                      (dst_text, 0))
            time.sleep(0.002)
    for port in udp_ports:
        for layout in layouts:
            sport += 1
            udp_sent[sport] = (port, layout)
            payload = ("%s@%d" % (layout, port)).encode()
            tx.sendto(ipv6_with(layout, src, dst, NH_UDP, udp(src, dst, sport, port, payload)),
                      (dst_text, 0))
            time.sleep(0.002)
    tcp_seen, udp_seen = {}, set()
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([rx_tcp, rx_udp], [], [], left)
        for rx in ready:
            data, peer = rx.recvfrom(65535)
            if packed(peer[0]) != dst or len(data) < 8:
                continue
            their_port, our_port = struct.unpack("!HH", data[:4])
            if rx is rx_tcp and len(data) >= 14 and tcp_sent.get(our_port, (None,))[0] == their_port:
                flags = data[13]
                tcp_seen.setdefault(our_port, "rst" if flags & 0x04 else "synack")
            elif rx is rx_udp and udp_sent.get(our_port, (None,))[0] == their_port:
                udp_seen.add(our_port)
    for sport, (port, layout) in tcp_sent.items():
        say("tcp %d %s %s" % (port, layout, tcp_seen.get(sport, "none")))
    for sport, (port, layout) in udp_sent.items():
        say("udp %d %s %s" % (port, layout, "reply" if sport in udp_seen else "none"))


def raw_send(src_text, dst_text, kind, port, mark, sport=None):
    family = family_of(dst_text)
    src, dst = packed(src_text), packed(dst_text)
    data = mark.encode()
    if sport is None:
        sport = 30000 + os.getpid() % 20000
    if kind == "tcp-syn":
        protocol, segment = NH_TCP, tcp_syn(src, dst, sport, port, data)
    elif kind == "udp":
        protocol, segment = NH_UDP, udp(src, dst, sport, port, data)
    elif kind == "proto253":
        protocol, segment = PROTO_253, data
    else:
        raise SystemExit("unknown kind %r" % kind)
    if family == socket.AF_INET:
        packet = ipv4(src, dst, protocol, segment)
    else:
        packet = ipv6(src, dst, protocol, segment)
    sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        sock.sendto(packet, (dst_text, 0))
        say("ok")
    except OSError as error:
        say(outcome(error))


def watch():
    sockets = {}
    for family, name in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        for protocol, pname in ((NH_TCP, "tcp"), (NH_UDP, "udp"), (PROTO_UDPLITE, "udplite"),
                                (PROTO_253, "proto253")):
            sockets[socket.socket(family, socket.SOCK_RAW, protocol)] = (name, pname)
    say("watching")
    while True:
        ready, _, _ = select.select(list(sockets), [], [])
        for sock in ready:
            data = sock.recv(65535)
            at = data.find(MARK)
            if at < 0:
                continue
            end = at
            while end < len(data) and 0x21 <= data[end] <= 0x7E:
                end += 1
            family, protocol = sockets[sock]
            say("seen %s %s %s" % (family, protocol, data[at:end].decode()))


def udplite_send(dst_text, port, mark, how):
    try:
        sock = socket.socket(family_of(dst_text), socket.SOCK_DGRAM, PROTO_UDPLITE)
    except OSError as error:
        say("socket " + outcome(error))
        return
    try:
        if how == "connected":
            sock.connect((dst_text, port))
            sock.send(mark.encode())
        else:
            sock.sendto(mark.encode(), (dst_text, port))
        say("ok")
    except OSError as error:
        say(outcome(error))


def udplite_listen(address, port):
    sock = socket.socket(family_of(address), socket.SOCK_DGRAM, PROTO_UDPLITE)
    sock.bind((address, port))
    say("listening %d" % sock.getsockname()[1])
    while True:
        data = sock.recv(65535)
        say("datagram " + data.decode(errors="replace").strip())


def sockopt(protocol, dst_text, port, option, timeout):
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET6, kind)
    name = IPV6_DSTOPTS if option == "dstopts" else IPV6_HOPOPTS
    # Next header (the kernel fills it in), length 0 (8 bytes), PadN of 4.
    sock.setsockopt(socket.IPPROTO_IPV6, name, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
    sock.settimeout(timeout)

    def attempt():
        if protocol == "tcp":
            sock.connect((dst_text, port))
        else:
            sock.sendto(b"sockopt-" + option.encode(), (dst_text, port))
            sock.recv(512)

    reported(attempt)


def udp_connected(dst_text, port, timeout, sport=None):
    sock = socket.socket(family_of(dst_text), socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    if sport is not None:
        sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", sport))

    def attempt():
        sock.connect((dst_text, port))
        sock.send(b"connected, never bound")
        sock.recv(512)

    reported(attempt)


def udp_sendto(dst_text, port, timeout, sport, src=None):
    sock = socket.socket(family_of(dst_text), socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    if src is None:
        src = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
    sock.bind((src, sport))

    def attempt():
        sock.sendto(b"unconnected, bound", (dst_text, port))
        sock.recvfrom(512)

    reported(attempt)


def udp_listen(address, port):
    sock = socket.socket(family_of(address), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    say("listening %d" % sock.getsockname()[1])
    while True:
        data = sock.recv(2048)
        say("datagram %s" % data.decode(errors="replace"))


def udp_decoy(address, port, peer, peer_port):
    sock = socket.socket(family_of(address), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.connect((peer, peer_port))
    say("connected")
    while True:
        time.sleep(60)


def sink(address, port):
    sock = socket.socket(family_of(address), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(8)
    say("listening %d" % sock.getsockname()[1])
    while True:
        conn, peer = sock.accept()
        total = 0
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            total += len(chunk)
        say("received %d from %s" % (total, peer[0]))
        conn.sendall(b"%d\n" % total)
        conn.close()


def bulk(dst_text, port, count, timeout):
    sock = socket.socket(family_of(dst_text), socket.SOCK_STREAM)
    sock.settimeout(timeout)

    def attempt():
        sock.connect((dst_text, port))
        block = b"w" * 65536
        left = count
        while left > 0:
            sent = sock.send(block[: min(left, len(block))])
            left -= sent
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(64)
            if not chunk:
                break
            answer += chunk
        return "ok " + answer.decode().strip()

    reported(attempt)


def sctp_socket(family):
    return socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_SCTP)


def sctp_support():
    try:
        sctp_socket(socket.AF_INET).close()
        say("supported")
    except OSError as error:
        say("unsupported %d %s" % (error.errno, errno.errorcode.get(error.errno, "?")))


def sctp_listen(address, port):
    sock = sctp_socket(family_of(address))
    sock.bind((address, port))
    sock.listen(8)
    say("listening %d" % sock.getsockname()[1])
    while True:
        conn, peer = sock.accept()
        say("accepted %s" % (peer,))
        conn.close()


def sctp_connect(dst_text, port, timeout):
    sock = sctp_socket(family_of(dst_text))
    sock.settimeout(timeout)
    reported(lambda: sock.connect((dst_text, port)))


def ports(text):
    return [int(p) for p in text.split(",") if p]


def main(args):
    mode, rest = args[0], args[1:]
    if mode == "ingress6":
        src, dst, wait, tcp, udp_ports, layouts = rest
        ingress6(src, dst, float(wait), ports(tcp), ports(udp_ports), layouts.split(","))
    elif mode == "raw-send":
        src, dst, kind, port, mark = rest[:5]
        sport = int(rest[5]) if len(rest) > 5 else None
        raw_send(src, dst, kind, int(port), mark, sport)
    elif mode == "watch":
        watch()
    elif mode == "udplite-send":
        dst, port, mark, how = rest
        udplite_send(dst, int(port), mark, how)
    elif mode == "udplite-listen":
        udplite_listen(rest[0], int(rest[1]))
    elif mode == "sockopt":
        protocol, dst, port, option, timeout = rest
        sockopt(protocol, dst, int(port), option, float(timeout))
    elif mode == "udp-connected":
        sport = int(rest[3]) if len(rest) > 3 else None
        udp_connected(rest[0], int(rest[1]), float(rest[2]), sport)
    elif mode == "udp-sendto":
        src = rest[4] if len(rest) > 4 else None
        udp_sendto(rest[0], int(rest[1]), float(rest[2]), int(rest[3]), src)
    elif mode == "udp-listen":
        udp_listen(rest[0], int(rest[1]))
    elif mode == "udp-decoy":
        udp_decoy(rest[0], int(rest[1]), rest[2], int(rest[3]))
    elif mode == "sink":
        sink(rest[0], int(rest[1]))
    elif mode == "bulk":
        bulk(rest[0], int(rest[1]), int(rest[2]), float(rest[3]))
    elif mode == "sctp-support":
        sctp_support()
    elif mode == "sctp-listen":
        sctp_listen(rest[0], int(rest[1]))
    elif mode == "sctp-connect":
        sctp_connect(rest[0], int(rest[1]), float(rest[2]))
    else:
        raise SystemExit("unknown mode %r\n%s" % (mode, __doc__))


if __name__ == "__main__":
    main(sys.argv[1:])
