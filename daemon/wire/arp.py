"""ARP for IPv4 over Ethernet (RFC 826).

Only the Ethernet/IPv4 form (htype 1, ptype 0x0800, hlen 6, plen 4) is
accepted: anything else on ferry's link is a guest error.
"""

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from ferryd.wire.errors import MalformedPacket

ARP_REQUEST = 1
ARP_REPLY = 2
_ARP = struct.Struct("!HHBBH6s4s6s4s")


@dataclass(frozen=True, slots=True)
class ArpPacket:
    op: int
    sha: bytes
    spa: IPv4Address
    tha: bytes
    tpa: IPv4Address


def parse_arp_untrusted(data: bytes | bytearray | memoryview) -> ArpPacket:
    if len(data) < _ARP.size:
        raise MalformedPacket(f"ARP packet of {len(data)} bytes is too short")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data)
    if (htype, ptype, hlen, plen) != (1, 0x0800, 6, 4):
        raise MalformedPacket("ARP packet is not Ethernet/IPv4")
    return ArpPacket(op, sha, IPv4Address(spa), tha, IPv4Address(tpa))


def build_arp(packet: ArpPacket) -> bytes:
    return _ARP.pack(
        1, 0x0800, 6, 4, packet.op, packet.sha, packet.spa.packed, packet.tha, packet.tpa.packed
    )
