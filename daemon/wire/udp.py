"""UDP (RFC 768) with the pseudo-header checksum of either IP family.

A zero checksum means "none" over IPv4 and is accepted; over IPv6 it is
invalid (RFC 8200 §8.1) and refused. A computed checksum of zero is sent as
0xFFFF (RFC 768).
"""

import struct
from dataclasses import dataclass

from ferryd.wire.checksum import checksum, pseudo_header_sum, verify
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ip import IPPROTO_UDP, IpAddress, IpPacket

UDP_HLEN = 8
_UDP = struct.Struct("!HHHH")


# Not frozen: built for every frame, and a frozen dataclass's __init__ sets
# each field through object.__setattr__ in Python (three times slower).
# Nothing assigns to a parsed frame; eq=False keeps hashing by identity.
@dataclass(slots=True, eq=False)
class UdpDatagram:
    sport: int
    dport: int
    payload: memoryview


def parse_udp_untrusted(packet: IpPacket, verify_checksum: bool = True) -> UdpDatagram:
    data = packet.payload
    if len(data) < UDP_HLEN:
        raise MalformedPacket(f"UDP datagram of {len(data)} bytes is shorter than a header")
    sport, dport, length, csum = _UDP.unpack_from(data)
    if length < UDP_HLEN or length > len(data):
        raise MalformedPacket(f"UDP length {length} does not fit the {len(data)}-byte packet")
    data = data[:length]
    if not verify_checksum:
        pass
    elif csum == 0:
        if packet.version == 6:
            raise MalformedPacket("UDP over IPv6 without a checksum")
    elif not verify(data, pseudo_header_sum(packet.src, packet.dst, IPPROTO_UDP, length)):
        raise MalformedPacket("UDP checksum is wrong")
    return UdpDatagram(sport, dport, data[UDP_HLEN:])


def build_udp(
    src: IpAddress, dst: IpAddress, sport: int, dport: int, payload: bytes | bytearray | memoryview
) -> bytes:
    """The UDP header and payload, checksummed for the given addresses."""
    length = UDP_HLEN + len(payload)
    hdr = _UDP.pack(sport, dport, length, 0)
    csum = checksum(hdr + payload, pseudo_header_sum(src, dst, IPPROTO_UDP, length)) or 0xFFFF
    return _UDP.pack(sport, dport, length, csum) + payload
