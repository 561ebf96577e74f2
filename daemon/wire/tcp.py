"""TCP segments (RFC 9293) and the options ferry negotiates.

Options understood: MSS (RFC 9293 §3.7.1), window scale and timestamps
(RFC 7323), SACK-permitted (RFC 2018). Others are skipped by their length.
Option parsing follows RFC 9293 §3.1: EOL ends the list, NOP is one byte,
every other option carries a length of at least 2 that must fit the header;
an option of the wrong length is ignored rather than fatal (as Linux does),
but a length that runs past the header makes the segment malformed.
"""

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import NamedTuple

from ferryd.wire.checksum import complete_partial, fold, pseudo_header_sum, verify
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ip import IPPROTO_TCP, IpAddress, IpPacket

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

TCP_HLEN = 20
_TCP = struct.Struct("!HHIIBBHHH")

# Option kinds (RFC 9293 §3.1, RFC 7323, RFC 2018); TCP_REPAIR_OPTIONS takes
# the same numbers (the kernel's TCPOPT_*, include/net/tcp.h).
TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8
#: Largest window scale (RFC 7323 §2.3; the kernel's TCP_MAX_WSCALE).
MAX_WSCALE = 14


class TcpOptions(NamedTuple):
    """A segment's options. A named tuple rather than a frozen dataclass: built for
    every guest segment with timestamps and every ACK ferryd sends with them, and
    a frozen dataclass's __init__ sets each field through object.__setattr__ in
    Python (as FlowKey's docstring measured)."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamp: tuple[int, int] | None = None
    """(TSval, TSecr)."""


NO_OPTIONS = TcpOptions()


# Not frozen: built for every frame, and a frozen dataclass's __init__ sets
# each field through object.__setattr__ in Python (three times slower).
# Nothing assigns to a parsed frame; eq=False keeps hashing by identity.
@dataclass(slots=True, eq=False)
class TcpSegment:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: TcpOptions
    payload: memoryview


def _parse_options_untrusted(data: memoryview) -> TcpOptions:
    mss = wscale = None
    sack = False
    ts = None
    i, end = 0, len(data)
    while i < end:
        kind = data[i]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise MalformedPacket("TCP option truncated")
        olen = data[i + 1]
        if olen < 2 or i + olen > end:
            raise MalformedPacket(f"TCP option {kind} has bad length {olen}")
        if kind == TCPOPT_MSS and olen == 4:
            mss = (data[i + 2] << 8) | data[i + 3]
        elif kind == TCPOPT_WINDOW and olen == 3:
            wscale = min(data[i + 2], MAX_WSCALE)  # RFC 7323 §2.3: larger values mean 14
        elif kind == TCPOPT_SACK_PERM and olen == 2:
            sack = True
        elif kind == TCPOPT_TIMESTAMP and olen == 10:
            ts = struct.unpack_from("!II", data, i + 2)
        i += olen
    if mss is None and wscale is None and not sack and ts is None:
        return NO_OPTIONS
    return TcpOptions(mss, wscale, sack, ts)


def parse_tcp_untrusted(packet: IpPacket, verify_checksum: bool = True) -> TcpSegment:
    data = packet.payload
    if len(data) < TCP_HLEN:
        raise MalformedPacket(f"TCP segment of {len(data)} bytes is shorter than a header")
    sport, dport, seq, ack, off, flags, window, _csum, _urg = _TCP.unpack_from(data)
    hlen = (off >> 4) * 4
    if hlen < TCP_HLEN or hlen > len(data):
        raise MalformedPacket(f"TCP data offset {hlen} does not fit the {len(data)}-byte segment")
    if verify_checksum and not verify(
        data, pseudo_header_sum(packet.src, packet.dst, IPPROTO_TCP, len(data))
    ):
        raise MalformedPacket("TCP checksum is wrong")
    options = _parse_options_untrusted(data[TCP_HLEN:hlen]) if hlen > TCP_HLEN else NO_OPTIONS
    return TcpSegment(sport, dport, seq, ack, flags & 0x3F, window, options, data[hlen:])


def encode_options(options: TcpOptions) -> bytes:
    """Options in Linux's order, NOP-padded to a multiple of four bytes."""
    out = bytearray()
    if options.mss is not None:
        out += struct.pack("!BBH", TCPOPT_MSS, 4, options.mss)
    if options.sack_permitted and options.timestamp is not None:
        out += struct.pack("!BB", TCPOPT_SACK_PERM, 2)
        out += struct.pack("!BBII", TCPOPT_TIMESTAMP, 10, *options.timestamp)
    elif options.timestamp is not None:
        out += struct.pack(
            "!BBBBII", TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, 10, *options.timestamp
        )
    elif options.sack_permitted:
        out += struct.pack("!BBBB", TCPOPT_NOP, TCPOPT_NOP, TCPOPT_SACK_PERM, 2)
    if options.wscale is not None:
        out += struct.pack("!BBBB", TCPOPT_NOP, TCPOPT_WINDOW, 3, options.wscale)
    while len(out) % 4:
        out.append(TCPOPT_NOP)
    return bytes(out)


def build_tcp(
    src: IpAddress,
    dst: IpAddress,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: TcpOptions = NO_OPTIONS,
    payload: bytes | bytearray | memoryview = b"",
) -> bytes:
    """A checksummed TCP segment; ``window`` is the raw 16-bit field."""
    hdr = build_tcp_header_partial(
        src, dst, sport, dport, seq, ack, flags, window, options, len(payload)
    )
    return complete_partial(hdr, TCP_CSUM_OFFSET, payload) + payload


_TS_OPTS = struct.Struct("!BBBBII")  # NOP NOP (or SACK-permitted) and the timestamps
_pair_last: tuple[IpAddress, IpAddress, int] = (IPv4Address(0), IPv4Address(0), 0)

#: Offset of the checksum field in the TCP header.
TCP_CSUM_OFFSET = 16


def build_tcp_header_partial(
    src: IpAddress,
    dst: IpAddress,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: TcpOptions,
    payload_len: int,
) -> bytes:
    """A TCP header whose checksum field holds only the pseudo-header sum.

    This is the CHECKSUM_PARTIAL convention: whoever delivers the segment
    (a device with checksum offload, or :meth:`ferryd.stack.Stack.send_ip`)
    completes it over header and payload, so the payload is never summed
    here.
    """
    if options is NO_OPTIONS:
        opts = b""
    elif options.timestamp is not None and options.mss is options.wscale is None:
        # Every segment of a connection with timestamps (RFC 7323 §3): built
        # directly, as encode_options would, without its general case.
        if options.sack_permitted:
            opts = _TS_OPTS.pack(TCPOPT_SACK_PERM, 2, TCPOPT_TIMESTAMP, 10, *options.timestamp)
        else:
            opts = _TS_OPTS.pack(TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, 10, *options.timestamp)
    else:
        opts = encode_options(options)
    hlen = TCP_HLEN + len(opts)
    global _pair_last
    pair = _pair_last
    if pair[0] is not src or pair[1] is not dst:
        # A flow sends between the same address objects: their pseudo-header
        # part is summed once (ipaddress's int() runs in Python).
        pair = _pair_last = (src, dst, pseudo_header_sum(src, dst, IPPROTO_TCP, 0))
    partial = fold(pair[2] + hlen + payload_len)
    return (
        _TCP.pack(
            sport,
            dport,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            (hlen // 4) << 4,
            flags,
            window,
            partial,
            0,
        )
        + opts
    )
