#!/usr/bin/python3
"""DNS clients no library offers, for ward's DNS tests (tests/tests/dns.rs); standard library only.

  dns_client.py flood SERVER FORMAT FIRST COUNT WINDOW TIMEOUT_S [PACE]
      Asks A of FORMAT % n for n in FIRST..FIRST+COUNT over UDP from one socket, WINDOW queries
      in flight at most, each given TIMEOUT_S seconds; with PACE, sends PACE queries and pauses a
      millisecond. Prints one summary line:
      `sent=S answered=A noerror=N refused=R servfail=F other=O timeouts=T wrong_source=W`
      (wrong_source: answers from another address than SERVER, which glibc would drop).

  dns_client.py tcp-flood SERVER FORMAT COUNT TIMEOUT_S
      Opens COUNT TCP connections to SERVER port 53, asks A of FORMAT % n on the nth, and waits
      TIMEOUT_S seconds for the answers; prints the summary line of `flood` with `closed=`
      (connections closed without an answer) and `failed_connect=`.

  dns_client.py malformed SERVER udp|tcp
      Sends each malformed query of CASES to SERVER port 53 and prints per case
      `<case> rcode=<n> id=<id> from=<address>`, `<case> none` (no answer within 1.5 s) or
      `<case> closed` (TCP: the connection closed without an answer).
"""

import select
import selectors
import socket
import struct
import sys
import time


def qname(name):
    return b"".join(bytes([len(l)]) + l.encode() for l in name.split(".") if l) + b"\0"


def query(qid, name, flags=0x0100, questions=1):
    header = struct.pack(">HHHHHH", qid, flags, questions, 0, 0, 0)
    return header + (qname(name) + struct.pack(">HH", 1, 1)) * questions


def family(server):
    return socket.AF_INET6 if ":" in server else socket.AF_INET


CASES = [
    ("one-byte", b"\x12"),
    ("garbage", b"\x12\x34" + bytes(range(1, 11))),
    # A label that says it is longer than the message.
    ("label-past-end", struct.pack(">HHHHHH", 0x1235, 0x0100, 1, 0, 0, 0) + b"\x3fabc"),
    ("response-as-query", query(0x1236, "api.hostile.test.example", flags=0x8180)),
    ("two-questions", query(0x1237, "api.hostile.test.example", questions=2)),
    # Opcode 4, NOTIFY.
    ("notify", query(0x1238, "api.hostile.test.example", flags=0x2000)),
    ("oversized-garbage", b"\x12\x39" + b"\xff" * 3000),
]


def flood(server, fmt, first, count, window, timeout, pace):
    sock = socket.socket(family(server), socket.SOCK_DGRAM)
    sock.setblocking(False)
    pending = {}
    counts = {"answered": 0, "noerror": 0, "refused": 0, "servfail": 0, "other": 0}
    timeouts = wrong_source = sent = 0
    n = first
    end = first + count
    while n < end or pending:
        while n < end and len(pending) < window:
            qid = n & 0xFFFF
            try:
                sock.sendto(query(qid, fmt % n), (server, 53))
            except BlockingIOError:
                break
            pending[qid] = time.monotonic()
            n += 1
            sent += 1
            if pace and sent % pace == 0:
                time.sleep(0.001)
        ready, _, _ = select.select([sock], [], [], 0.02)
        while ready:
            try:
                data, source = sock.recvfrom(65535)
            except BlockingIOError:
                break
            if source[0] != server:
                wrong_source += 1
            qid = struct.unpack(">H", data[:2])[0]
            if pending.pop(qid, None) is None:
                continue
            counts["answered"] += 1
            rcode = data[3] & 0x0F
            key = {0: "noerror", 5: "refused", 2: "servfail"}.get(rcode, "other")
            counts[key] += 1
        now = time.monotonic()
        for qid, at in list(pending.items()):
            if now - at > timeout:
                del pending[qid]
                timeouts += 1
    print(
        f"sent={sent} answered={counts['answered']} noerror={counts['noerror']} "
        f"refused={counts['refused']} servfail={counts['servfail']} other={counts['other']} "
        f"timeouts={timeouts} wrong_source={wrong_source}"
    )


def tcp_flood(server, fmt, count, timeout):
    """COUNT TCP connections at once, one query on each; the answers awaited together."""
    poller = selectors.DefaultSelector()
    pending = 0
    failed_connect = 0
    for n in range(count):
        sock = socket.socket(family(server), socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((server, 53))
            payload = query(n & 0xFFFF, fmt % n)
            sock.sendall(struct.pack(">H", len(payload)) + payload)
        except OSError:
            failed_connect += 1
            sock.close()
            continue
        sock.setblocking(False)
        poller.register(sock, selectors.EVENT_READ, bytearray())
        pending += 1
    counts = {"answered": 0, "noerror": 0, "refused": 0, "servfail": 0, "other": 0}
    closed = 0
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in poller.select(0.05):
            sock, data = key.fileobj, key.data
            try:
                chunk = sock.recv(65535)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                chunk = b""
            if chunk:
                data += chunk
                if len(data) < 2 or len(data) < 2 + struct.unpack(">H", data[:2])[0]:
                    continue
                counts["answered"] += 1
                rcode = data[5] & 0x0F
                counts[{0: "noerror", 5: "refused", 2: "servfail"}.get(rcode, "other")] += 1
            else:
                closed += 1
            poller.unregister(sock)
            sock.close()
            pending -= 1
    print(
        f"sent={count - failed_connect} answered={counts['answered']} noerror={counts['noerror']} "
        f"refused={counts['refused']} servfail={counts['servfail']} other={counts['other']} "
        f"timeouts={pending} closed={closed} failed_connect={failed_connect} wrong_source=0"
    )


def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def malformed(server, transport):
    for case, payload in CASES:
        if transport == "udp":
            sock = socket.socket(family(server), socket.SOCK_DGRAM)
            sock.settimeout(1.5)
            sock.sendto(payload, (server, 53))
            try:
                data, source = sock.recvfrom(65535)
            except socket.timeout:
                print(f"{case} none", flush=True)
                continue
        else:
            sock = socket.create_connection((server, 53), timeout=1.5)
            source = sock.getpeername()
            sock.sendall(struct.pack(">H", len(payload)) + payload)
            try:
                length = read_exact(sock, 2)
                data = length and read_exact(sock, struct.unpack(">H", length)[0])
            except socket.timeout:
                print(f"{case} none", flush=True)
                continue
            except ConnectionResetError:
                data = None
            if not data:
                print(f"{case} closed", flush=True)
                continue
        qid = struct.unpack(">H", data[:2])[0]
        print(f"{case} rcode={data[3] & 0x0F} id={qid} from={source[0]}", flush=True)


def main():
    mode = sys.argv[1]
    if mode == "flood":
        server, fmt = sys.argv[2], sys.argv[3]
        first, count, window = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
        timeout = float(sys.argv[7])
        pace = int(sys.argv[8]) if len(sys.argv) > 8 else 0
        flood(server, fmt, first, count, window, timeout, pace)
    elif mode == "tcp-flood":
        tcp_flood(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    elif mode == "malformed":
        malformed(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
