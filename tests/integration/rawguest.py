"""Hand-made frames from the guest namespace, for what a guest kernel would never send.

A Linux guest keeps 127.0.0.1, ::1 and its own address to itself, so a test
of what ferryd does with such destinations must write the frames itself: an
AF_PACKET socket on the guest's tap sends one Ethernet frame to ferryd's
MAC and reads ferryd's answers. Run with ferryd's venv Python inside the
guest namespace (``ip netns exec GUEST python rawguest.py ...``); frames are
built and parsed with ferryd's own wire code.

Usage:
  ``rawguest.py probe SRC4 SRC6 PORT KIND:DST...`` sends, for each
  KIND:DST in turn (KIND tcp, udp or icmp), one TCP SYN, UDP datagram or ICMP
  echo request from the guest's address of DST's family to DST:PORT, and
  prints one JSON object mapping each "KIND DST" to the first answer about
  it: ``{"answer": "rst"|"synack"|"unreachable"|"udp"|"echo-reply"|"none",
  ...}`` (``type``/``code`` for ICMP errors); "none" after ``--wait`` seconds.
  ``rawguest.py flood SRC DST PORT COUNT`` sends COUNT UDP datagrams (each
  from another source port), prints ``{"sent": COUNT}``, then reads a number
  N from stdin, waits until N ICMP errors about them came back (or
  ``--wait`` seconds passed) and prints ``{"errors": n}``.
"""

from __future__ import annotations

import argparse
import json
import random
import select
import socket
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, ip_address

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
from ferryd.wire.tcp import RST, SYN, build_tcp, parse_tcp_untrusted
from ferryd.wire.udp import build_udp, parse_udp_untrusted

FERRY_MAC = bytes.fromhex("9a559a559a55")
ETH_P_ALL = 0x0003


def open_tap(ifname: str) -> tuple[socket.socket, bytes]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, 0))
    return sock, sock.getsockname()[4]


def send(
    sock: socket.socket, mac: bytes, src: IpAddress, dst: IpAddress, proto: int, l4: bytes
) -> None:
    ethertype = ETH_P_IP if isinstance(src, IPv4Address) else ETH_P_IPV6
    sock.send(build_ethernet(FERRY_MAC, mac, ethertype, build_ip(src, dst, proto, l4)))


def frames(sock: socket.socket, deadline: float) -> Iterator[IpPacket]:
    """Each IP packet ferryd sends until ``deadline`` (outgoing frames skipped)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return
        data, addr = sock.recvfrom(65536)
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        try:
            eth = parse_ethernet_untrusted(data)
            if eth.src != FERRY_MAC:
                continue
            if eth.ethertype == ETH_P_IP:
                yield parse_ipv4_untrusted(eth.payload)
            elif eth.ethertype == ETH_P_IPV6:
                yield parse_ipv6_untrusted(eth.payload)
        except MalformedPacket:
            continue


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
    sock: socket.socket,
    mac: bytes,
    kind: str,
    src: IpAddress,
    dst: IpAddress,
    port: int,
    wait: float,
) -> dict[str, object]:
    sport = random.randrange(20000, 60000)
    if kind == "tcp":
        proto, l4 = IPPROTO_TCP, build_tcp(src, dst, sport, port, 1000, 0, SYN, 65535)
    elif kind == "udp":
        proto, l4 = IPPROTO_UDP, build_udp(src, dst, sport, port, b"probe")
    else:
        proto = IPPROTO_ICMP if dst.version == 4 else IPPROTO_ICMPV6
        l4 = build_icmp(src, dst, 8 if dst.version == 4 else 128, 0, echo_rest(sport, 1), b"x")
    send(sock, mac, src, dst, proto, l4)
    for ip in frames(sock, time.monotonic() + wait):
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


def flood(src: IpAddress, dst: IpAddress, port: int, count: int, wait: float) -> None:
    sock, mac = open_tap("tap0")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sports = {20000 + i for i in range(count)}
    for sport in sorted(sports):
        send(sock, mac, src, dst, IPPROTO_UDP, build_udp(src, dst, sport, port, b"flood"))
    print(json.dumps({"sent": count}), flush=True)
    expected = int(sys.stdin.readline())
    errors = 0
    for ip in frames(sock, time.monotonic() + wait):
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--wait", type=float, default=5.0)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    for name in ("src4", "src6"):
        p.add_argument(name, type=ip_address)
    p.add_argument("port", type=int)
    p.add_argument("targets", nargs="+")
    f = sub.add_parser("flood")
    for name in ("src", "dst"):
        f.add_argument(name, type=ip_address)
    f.add_argument("port", type=int)
    f.add_argument("count", type=int)
    args = parser.parse_args()
    if args.cmd == "probe":
        sock, mac = open_tap("tap0")
        answers = {}
        for target in args.targets:
            kind, _, text = target.partition(":")
            dst = ip_address(text)
            src = args.src4 if dst.version == 4 else args.src6
            answers[f"{kind} {text}"] = probe(sock, mac, kind, src, dst, args.port, args.wait)
        print(json.dumps(answers), flush=True)
    else:
        flood(args.src, args.dst, args.port, args.count, args.wait)


if __name__ == "__main__":
    main()
