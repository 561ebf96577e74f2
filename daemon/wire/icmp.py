"""ICMP (RFC 792) and ICMPv6 (RFC 4443) message framing.

Both share a layout: type, code, checksum, four type-specific bytes
(``rest``: identifier and sequence number for echo messages), then a body.
ICMPv6 includes the IPv6 pseudo-header in its checksum; ICMP does not.
"""

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from daemon.wire.checksum import checksum, pseudo_header_sum, verify
from daemon.wire.errors import MalformedPacket
from daemon.wire.ip import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPV6_HLEN,
    IpAddress,
    IpPacket,
    ipv4_header,
    ipv6_header,
)

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ADMIN_PROHIBITED = 13
"""Destination unreachable code "communication administratively prohibited"
(RFC 1812 §5.2.7.1, which added it to RFC 792's codes)."""
ICMP_ECHO_REQUEST = 8
ICMPV6_DEST_UNREACH = 1
ICMPV6_ADMIN_PROHIBITED = 1
"""Destination unreachable code "communication with destination
administratively prohibited" (RFC 4443 §3.1)."""
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ICMPV6_ROUTER_SOLICIT = 133
ICMPV6_ROUTER_ADVERT = 134
ICMPV6_NEIGHBOUR_SOLICIT = 135
ICMPV6_NEIGHBOUR_ADVERT = 136

ICMP_HLEN = 8
IPV6_MIN_MTU = 1280  # RFC 8200 §5
_ICMP = struct.Struct("!BBH4s")
_ECHO = struct.Struct("!HH")


@dataclass(frozen=True, slots=True, eq=False)
class IcmpMessage:
    type: int
    code: int
    rest: bytes
    body: memoryview

    @property
    def echo_id_seq(self) -> tuple[int, int]:
        """Identifier and sequence number of an echo request or reply."""
        ident, seq = _ECHO.unpack(self.rest)
        return ident, seq


def parse_icmp_untrusted(packet: IpPacket) -> IcmpMessage:
    """Parse ICMP or ICMPv6, by the packet's family, checking the checksum."""
    data = packet.payload
    if len(data) < ICMP_HLEN:
        raise MalformedPacket(f"ICMP message of {len(data)} bytes is too short")
    initial = 0
    if packet.version == 6:
        initial = pseudo_header_sum(packet.src, packet.dst, IPPROTO_ICMPV6, len(data))
    if not verify(data, initial):
        raise MalformedPacket("ICMP checksum is wrong")
    mtype, code, _csum, rest = _ICMP.unpack_from(data)
    return IcmpMessage(mtype, code, rest, data[ICMP_HLEN:])


def build_icmp(
    src: IpAddress,
    dst: IpAddress,
    mtype: int,
    code: int,
    rest: bytes,
    body: bytes | bytearray | memoryview = b"",
) -> bytes:
    """An ICMP (IPv4 addresses) or ICMPv6 (IPv6 addresses) message."""
    msg = bytearray(_ICMP.pack(mtype, code, 0, rest))
    msg += body
    initial = 0
    if not isinstance(src, IPv4Address):
        initial = pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(msg))
    struct.pack_into("!H", msg, 2, checksum(msg, initial))
    return bytes(msg)


def echo_rest(ident: int, seq: int) -> bytes:
    return _ECHO.pack(ident, seq)


def build_admin_prohibited(packet: IpPacket, src: IpAddress) -> tuple[int, bytes]:
    """(protocol, message): "administratively prohibited" for ``packet``, from ``src``.

    What a router's filter answers (RFC 1812 §5.2.7.1; RFC 4443 §3.1, code 1).
    The quote is ``packet``'s IP header, rebuilt without options or
    extension headers (receivers match an error to a socket by addresses,
    protocol and ports only), then the start of its payload: 8 bytes for
    ICMP (RFC 792), as much as keeps the error within the IPv6 minimum MTU
    for ICMPv6 (RFC 4443 §2.4 (c)).
    """
    payload = packet.payload
    if isinstance(packet.src, IPv4Address):
        assert isinstance(packet.dst, IPv4Address)
        hdr = ipv4_header(packet.src, packet.dst, packet.proto, len(payload), packet.ttl)
        quote = hdr + payload[:8]
        return IPPROTO_ICMP, build_icmp(
            src, packet.src, ICMP_DEST_UNREACH, ICMP_ADMIN_PROHIBITED, bytes(4), quote
        )
    assert isinstance(packet.dst, IPv6Address)
    room = IPV6_MIN_MTU - IPV6_HLEN - ICMP_HLEN - IPV6_HLEN
    hdr = ipv6_header(packet.src, packet.dst, packet.proto, len(payload), packet.ttl)
    quote = hdr + payload[:room]
    return IPPROTO_ICMPV6, build_icmp(
        src, packet.src, ICMPV6_DEST_UNREACH, ICMPV6_ADMIN_PROHIBITED, bytes(4), quote
    )
