"""ICMP (RFC 792) and ICMPv6 (RFC 4443) message framing.

Both share a layout: type, code, checksum, four type-specific bytes
(``rest``: identifier and sequence number for echo messages), then a body.
ICMPv6 includes the IPv6 pseudo-header in its checksum; ICMP does not.
"""

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from ferryd.wire.checksum import checksum, pseudo_header_sum, verify
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ip import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPV6_HLEN,
    IPV6_MIN_MTU,
    IpAddress,
    IpPacket,
    ip_header,
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
#: Destination unreachable codes as (ICMP, ICMPv6): port unreachable (RFC 792;
#: RFC 4443 §3.1, code 4) and administratively prohibited (RFC 1812 §5.2.7.1;
#: RFC 4443 §3.1, code 1).
PORT_UNREACHABLE = (3, 4)
ADMIN_PROHIBITED = (ICMP_ADMIN_PROHIBITED, ICMPV6_ADMIN_PROHIBITED)
_ICMP = struct.Struct("!BBH4s")
_ECHO = struct.Struct("!HH")


# Not frozen: built for every frame, and a frozen dataclass's __init__ sets
# each field through object.__setattr__ in Python (three times slower).
# Nothing assigns to a parsed frame; eq=False keeps hashing by identity.
@dataclass(slots=True, eq=False)
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


def build_dest_unreach(
    sender: IpAddress,
    src: IpAddress,
    dst: IpAddress,
    proto: int,
    length: int,
    l4: bytes | memoryview,
    codes: tuple[int, int],
    ttl: int = 64,
) -> tuple[int, bytes]:
    """(protocol, message): destination unreachable from ``sender`` about a
    packet ``src`` → ``dst`` (``proto``, ``length`` bytes after its IP header,
    starting with ``l4``), with ``codes`` (ICMP, ICMPv6).

    The quote is the packet's IP header, rebuilt without options or extension
    headers (receivers match an error to a socket by addresses, protocol and
    ports only), then the start of ``l4``: 8 bytes for ICMP (RFC 792), as much
    as keeps the error within the IPv6 minimum MTU for ICMPv6 (RFC 4443 §2.4 (c)).
    """
    if isinstance(src, IPv4Address):
        quote = ip_header(src, dst, proto, length, ttl) + l4[:8]
        return IPPROTO_ICMP, build_icmp(sender, src, ICMP_DEST_UNREACH, codes[0], bytes(4), quote)
    room = IPV6_MIN_MTU - IPV6_HLEN - ICMP_HLEN - IPV6_HLEN
    quote = ip_header(src, dst, proto, length, ttl) + l4[:room]
    return IPPROTO_ICMPV6, build_icmp(sender, src, ICMPV6_DEST_UNREACH, codes[1], bytes(4), quote)


def build_admin_prohibited(packet: IpPacket, sender: IpAddress) -> tuple[int, bytes]:
    """(protocol, message): what a router's filter answers to ``packet``."""
    payload = packet.payload
    return build_dest_unreach(
        sender,
        packet.src,
        packet.dst,
        packet.proto,
        len(payload),
        payload,
        ADMIN_PROHIBITED,
        packet.ttl,
    )
