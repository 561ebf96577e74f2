"""Hand-made frames on the guest's tap (AF_PACKET), for what a guest kernel would never send.

A Linux guest keeps 127.0.0.1, ::1 and its own address to itself, and never
sends a Solicit with thousands of IA_NAs or a SYN advertising MSS 1; a test
of what ferryd does with such frames must write them itself. An AF_PACKET
socket on ``tap0`` sends Ethernet frames to ferryd's MAC and reads ferryd's
answers; frames are built and parsed with ferryd's own wire code. Run with
ferryd's venv Python inside the guest namespace (``ip netns exec GUEST
python rawframes.py [--wait S] COMMAND ...``); results are JSON lines.

  ``frames HEXFILE UDPPORT TIMEOUT``  send every frame of HEXFILE (one hex
      frame per line), then print the first UDP datagram to UDPPORT that
      comes back (hex of the whole frame), or null.
  ``mss SRC DST PORT MSS BYTES``  open a TCP connection from SRC to DST:PORT
      by hand with a SYN advertising MSS, ask the peer (a tcptool ``source``)
      for BYTES bytes, acknowledge everything, and report the payload sizes
      of the data segments. Run it with no address on tap0, so the guest's
      own kernel stays silent (it would reset a connection it does not know).
  ``probe SRC4 SRC6 PORT KIND:DST...``  send, for each KIND:DST in turn (KIND
      tcp, udp or icmp), one TCP SYN, UDP datagram or ICMP echo request from
      the guest's address of DST's family to DST:PORT, and print one JSON
      object mapping each "KIND DST" to the first answer about it:
      ``{"answer": "rst"|"synack"|"unreachable"|"udp"|"echo-reply"|"none",
      ...}`` (``type``/``code`` for ICMP errors); "none" after ``--wait`` s.
  ``flood SRC DST PORT COUNT``  send COUNT UDP datagrams (each from another
      source port), print ``{"sent": COUNT}``, then read a number N from
      stdin, wait until N ICMP errors about them came back (or ``--wait``
      seconds passed) and print ``{"errors": n}``.
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, ip_address
from pathlib import Path

from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ethernet import ETH_P_IP, ETH_P_IPV6, build_ethernet, parse_ethernet_untrusted
from ferryd.wire.icmp import build_icmp, echo_rest, parse_icmp_untrusted
from ferryd.wire.ip import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IpAddress,
    IpPacket,
    build_ip,
    parse_ipv4_untrusted,
    parse_ipv6_untrusted,
)
from ferryd.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions, build_tcp, parse_tcp_untrusted
from ferryd.wire.udp import build_udp, parse_udp_untrusted

FERRY_MAC = bytes.fromhex("9a559a559a55")
ETH_P_ALL = 0x0003


class Tap:
    """An AF_PACKET socket on the guest's tap: frames to ferryd, and ferryd's frames back."""

    def __init__(self, ifname: str = "tap0") -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        #: The tap's own MAC: the guest's, the source of what it sends.
        self.mac: bytes = self.sock.getsockname()[4]

    def send_frame(self, frame: bytes) -> None:
        self.sock.send(frame)

    def send_ip(self, src: IpAddress, dst: IpAddress, proto: int, l4: bytes) -> None:
        """One IP packet from the guest to ferryd's MAC."""
        ethertype = ETH_P_IP if isinstance(src, IPv4Address) else ETH_P_IPV6
        self.sock.send(
            build_ethernet(FERRY_MAC, self.mac, ethertype, build_ip(src, dst, proto, l4))
        )

    def frames(self, deadline: float) -> Iterator[bytes]:
        """Each frame ferryd sends to the guest until *deadline* (the guest's own skipped).

        Ends early if the tap goes down: ferryd closed it, it is gone.
        """
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                frame, addr = self.sock.recvfrom(70000)
            except TimeoutError:
                return
            except OSError as exc:
                if exc.errno == errno.ENETDOWN:
                    return
                raise
            if addr[2] != socket.PACKET_OUTGOING:
                yield frame

    def ip_frames(self, deadline: float) -> Iterator[tuple[bytes, IpPacket]]:
        """Each IP frame from ferryd's MAC until *deadline*, and its packet (malformed skipped)."""
        for frame in self.frames(deadline):
            try:
                eth = parse_ethernet_untrusted(frame)
                if eth.src != FERRY_MAC:
                    continue
                if eth.ethertype == ETH_P_IP:
                    yield frame, parse_ipv4_untrusted(eth.payload)
                elif eth.ethertype == ETH_P_IPV6:
                    yield frame, parse_ipv6_untrusted(eth.payload)
            except MalformedPacket:
                continue

    def packets(self, deadline: float) -> Iterator[IpPacket]:
        """Each IP packet from ferryd's MAC until *deadline* (malformed ones skipped)."""
        for _frame, ip in self.ip_frames(deadline):
            yield ip


def frames(tap: Tap, hexfile: str, port: int, timeout: float) -> None:
    lines = Path(hexfile).read_text().split()
    for line in lines:
        tap.send_frame(bytes.fromhex(line))
    for frame, ip in tap.ip_frames(time.monotonic() + timeout):
        try:
            udp = (
                parse_udp_untrusted(ip, verify_checksum=False) if ip.proto == IPPROTO_UDP else None
            )
        except MalformedPacket:
            continue
        if udp is not None and udp.dport == port:
            print(json.dumps({"sent": len(lines), "reply": frame.hex()}))
            return
    print(json.dumps({"sent": len(lines), "reply": None}))


def mss(tap: Tap, src: IpAddress, dst: IpAddress, port: int, mss_value: int, nbytes: int) -> None:
    sport = 40000 + secrets.randbelow(20000)
    isn = secrets.randbits(32)

    def send(seq: int, ack: int, flags: int, payload: bytes = b"", **opts: int) -> None:
        options = TcpOptions(mss=opts["mss"]) if "mss" in opts else TcpOptions()
        seg = build_tcp(src, dst, sport, port, seq, ack, flags, 0xFFFF, options, payload)
        tap.send_ip(src, dst, IPPROTO_TCP, seg)

    def segments(timeout: float):  # type: ignore[no-untyped-def]
        for ip in tap.packets(time.monotonic() + timeout):
            if ip.proto != IPPROTO_TCP:
                continue
            try:
                seg = parse_tcp_untrusted(ip, verify_checksum=False)
            except MalformedPacket:
                continue
            if seg.dport == sport:
                yield seg

    send(isn, 0, SYN, mss=mss_value)
    synack = next(s for s in segments(10) if s.flags & SYN)
    rcv = (synack.seq + 1) & 0xFFFFFFFF
    request = f"{nbytes} 7\n".encode()
    send(isn + 1, rcv, ACK | PSH, request)
    sizes: list[int] = []
    got, fin = 0, False
    for seg in segments(60):
        if seg.flags & RST:
            break
        n = len(seg.payload)
        if n and seg.seq == rcv:
            sizes.append(n)
            got += n
            rcv = (rcv + n) & 0xFFFFFFFF
        if seg.flags & FIN and seg.seq == rcv:
            rcv = (rcv + 1) & 0xFFFFFFFF
            fin = True
        # Cumulative ACK of what arrived in order; the window stays wide open.
        send(isn + 1 + len(request), rcv, ACK)
        if fin:
            send(isn + 1 + len(request), rcv, ACK | FIN)
            break
    print(
        json.dumps(
            {
                "synack_mss": synack.options.mss,
                "bytes": got,
                "segments": len(sizes),
                "largest": max(sizes, default=0),
                "fin": fin,
            }
        )
    )


def icmp_error_about(ip: IpPacket, proto: int, dst: IpAddress, sport: int) -> dict[str, int] | None:
    """type and code if ``ip`` is an ICMP error quoting our packet to ``dst`` from ``sport``."""
    if ip.proto not in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        return None
    icmp = parse_icmp_untrusted(ip)
    if icmp.type not in (3, 1) or (ip.proto == IPPROTO_ICMP) != (icmp.type == 3):
        return None
    quote = bytes(icmp.body)
    if ip.version == 4:
        qproto, qdst, l4 = quote[9], ip_address(quote[16:20]), quote[20:]
    else:
        qproto, qdst, l4 = quote[6], ip_address(quote[24:40]), quote[40:]
    at = 4 if qproto in (IPPROTO_ICMP, IPPROTO_ICMPV6) else 0  # echo identifier, or port
    if qproto != proto or qdst != dst or int.from_bytes(l4[at : at + 2], "big") != sport:
        return None
    return {"type": icmp.type, "code": icmp.code}


def probe(
    tap: Tap, kind: str, src: IpAddress, dst: IpAddress, port: int, wait: float
) -> dict[str, object]:
    sport = random.randrange(20000, 60000)
    if kind == "tcp":
        proto, l4 = IPPROTO_TCP, build_tcp(src, dst, sport, port, 1000, 0, SYN, 65535)
    elif kind == "udp":
        proto, l4 = IPPROTO_UDP, build_udp(src, dst, sport, port, b"probe")
    else:
        proto = IPPROTO_ICMP if dst.version == 4 else IPPROTO_ICMPV6
        l4 = build_icmp(src, dst, 8 if dst.version == 4 else 128, 0, echo_rest(sport, 1), b"x")
    tap.send_ip(src, dst, proto, l4)
    for ip in tap.packets(time.monotonic() + wait):
        if ip.dst != src:
            continue
        error = icmp_error_about(ip, proto, dst, sport)
        if error is not None:
            return {"answer": "unreachable", **error}
        if ip.src != dst:
            continue
        if kind == "tcp" and ip.proto == IPPROTO_TCP:
            seg = parse_tcp_untrusted(ip, verify_checksum=False)
            if seg.dport == sport:
                if seg.flags & RST:
                    return {"answer": "rst"}
                return {"answer": "synack" if seg.flags & SYN else "tcp"}
        elif kind == "udp" and ip.proto == IPPROTO_UDP:
            if parse_udp_untrusted(ip, verify_checksum=False).dport == sport:
                return {"answer": "udp"}
        elif kind == "icmp" and ip.proto == proto:
            icmp = parse_icmp_untrusted(ip)
            if icmp.type in (0, 129):
                return {"answer": "echo-reply"}
    return {"answer": "none"}


def flood(tap: Tap, src: IpAddress, dst: IpAddress, port: int, count: int, wait: float) -> None:
    tap.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sports = {20000 + i for i in range(count)}
    for sport in sorted(sports):
        tap.send_ip(src, dst, IPPROTO_UDP, build_udp(src, dst, sport, port, b"flood"))
    print(json.dumps({"sent": count}), flush=True)
    expected = int(sys.stdin.readline())
    errors = 0
    for ip in tap.packets(time.monotonic() + wait):
        if ip.dst != src or ip.proto not in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            continue
        icmp = parse_icmp_untrusted(ip)
        quote = bytes(icmp.body)
        l4 = quote[20:] if ip.version == 4 else quote[40:]
        if int.from_bytes(l4[0:2], "big") in sports:
            errors += 1
            if errors >= expected:
                break
    print(json.dumps({"errors": errors}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="rawframes.py")
    parser.add_argument("--wait", type=float, default=5.0)
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("frames")
    f.add_argument("hexfile")
    f.add_argument("port", type=int)
    f.add_argument("timeout", type=float)
    m = sub.add_parser("mss")
    for name in ("src", "dst"):
        m.add_argument(name, type=ip_address)
    for name in ("port", "mss", "bytes"):
        m.add_argument(name, type=int)
    p = sub.add_parser("probe")
    for name in ("src4", "src6"):
        p.add_argument(name, type=ip_address)
    p.add_argument("port", type=int)
    p.add_argument("targets", nargs="+")
    fl = sub.add_parser("flood")
    for name in ("src", "dst"):
        fl.add_argument(name, type=ip_address)
    fl.add_argument("port", type=int)
    fl.add_argument("count", type=int)
    args = parser.parse_args()
    tap = Tap()
    if args.cmd == "frames":
        frames(tap, args.hexfile, args.port, args.timeout)
    elif args.cmd == "mss":
        mss(tap, args.src, args.dst, args.port, args.mss, args.bytes)
    elif args.cmd == "probe":
        answers = {}
        for target in args.targets:
            kind, _, text = target.partition(":")
            dst = ip_address(text)
            src = args.src4 if dst.version == 4 else args.src6
            answers[f"{kind} {text}"] = probe(tap, kind, src, dst, args.port, args.wait)
        print(json.dumps(answers), flush=True)
    else:
        flood(tap, args.src, args.dst, args.port, args.count, args.wait)


if __name__ == "__main__":
    main()
