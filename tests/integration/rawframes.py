"""A hostile guest's oversized or malformed frames on its tap (AF_PACKET), from its netns.

A real guest's kernel never sends what these tests need (a Solicit with
thousands of IA_NAs, a SYN advertising MSS 1), so frames are built with
ferry's own wire builders and sent on ``tap0`` through an AF_PACKET socket;
what ferryd answers is read from the same socket. Results are one JSON line.

  ``frames HEXFILE UDPPORT TIMEOUT``  send every frame of HEXFILE (one hex
      frame per line), then print the first UDP datagram to UDPPORT that
      comes back (hex of the whole frame), or null.
  ``mss SRC DST PORT MSS BYTES``  open a TCP connection from SRC to DST:PORT
      by hand with a SYN advertising MSS, ask the peer (a tcptool ``source``)
      for BYTES bytes, acknowledge everything, and report the payload sizes
      of the data segments. Run it with no address on tap0, so the guest's
      own kernel stays silent (it would reset a connection it does not know).
"""

from __future__ import annotations

import errno
import json
import secrets
import socket
import sys
import time
from ipaddress import ip_address
from pathlib import Path

from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ethernet import ETH_P_IP, ETH_P_IPV6, build_ethernet, parse_ethernet_untrusted
from ferryd.wire.ip import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    build_ip,
    parse_ipv4_untrusted,
    parse_ipv6_untrusted,
)
from ferryd.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions, build_tcp, parse_tcp_untrusted
from ferryd.wire.udp import parse_udp_untrusted

FERRY_MAC = bytes.fromhex("9a559a559a55")
ETH_P_ALL = 0x0003


def _open() -> tuple[socket.socket, bytes]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind(("tap0", 0))
    text = Path("/sys/class/net/tap0/address").read_text().strip()
    mac = bytes.fromhex(text.replace(":", ""))
    return sock, mac


def _incoming(sock: socket.socket, deadline: float) -> bytes | None:
    """The next frame ferryd sent to the guest, or None at the deadline."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            frame, addr = sock.recvfrom(70000)
        except TimeoutError:
            return None
        except OSError as exc:
            if exc.errno == errno.ENETDOWN:
                return None  # ferryd closed the tap: it is gone
            raise
        if addr[2] != socket.PACKET_OUTGOING:
            return frame
    return None


def _ip_of(frame: bytes):  # type: ignore[no-untyped-def]
    eth = parse_ethernet_untrusted(frame)
    if eth.ethertype == ETH_P_IP:
        return parse_ipv4_untrusted(eth.payload)
    if eth.ethertype == ETH_P_IPV6:
        return parse_ipv6_untrusted(eth.payload)
    return None


def frames(hexfile: str, port: int, timeout: float) -> None:
    sock, _mac = _open()
    lines = Path(hexfile).read_text().split()
    for line in lines:
        sock.send(bytes.fromhex(line))
    deadline = time.monotonic() + timeout
    while (frame := _incoming(sock, deadline)) is not None:
        try:
            ip = _ip_of(frame)
            udp = (
                parse_udp_untrusted(ip, verify_checksum=False)
                if ip is not None and ip.proto == IPPROTO_UDP
                else None
            )
            if udp is not None and udp.dport == port:
                print(json.dumps({"sent": len(lines), "reply": frame.hex()}))
                return
        except MalformedPacket:
            continue
    print(json.dumps({"sent": len(lines), "reply": None}))


def mss(src_text: str, dst_text: str, port: int, mss_value: int, nbytes: int) -> None:
    sock, mac = _open()
    src, dst = ip_address(src_text), ip_address(dst_text)
    ethertype = ETH_P_IP if src.version == 4 else ETH_P_IPV6
    sport = 40000 + secrets.randbelow(20000)
    isn = secrets.randbits(32)

    def send(seq: int, ack: int, flags: int, payload: bytes = b"", **opts: int) -> None:
        options = TcpOptions(mss=opts["mss"]) if "mss" in opts else TcpOptions()
        seg = build_tcp(src, dst, sport, port, seq, ack, flags, 0xFFFF, options, payload)
        sock.send(build_ethernet(FERRY_MAC, mac, ethertype, build_ip(src, dst, IPPROTO_TCP, seg)))

    def segments(timeout: float):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while (frame := _incoming(sock, deadline)) is not None:
            try:
                ip = _ip_of(frame)
                if ip is None or ip.proto != IPPROTO_TCP:
                    continue
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


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "frames":
        frames(args[0], int(args[1]), float(args[2]))
    elif cmd == "mss":
        mss(args[0], args[1], int(args[2]), int(args[3]), int(args[4]))
    else:
        sys.exit(f"unknown command {cmd!r}")
