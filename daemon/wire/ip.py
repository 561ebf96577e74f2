"""IPv4 (RFC 791) and IPv6 (RFC 8200) headers.

Both families parse into one :class:`IpPacket`, so the layers above handle
addresses, the upper-layer protocol and its payload without caring which
family carried them. What the IP layer itself must check is checked here:

- IPv4: version, header length, total length against the frame (trailing
  Ethernet padding is cut off, RFC 894), header checksum. Options are
  skipped. Fragments are flagged, not reassembled: ferry's link MTU is what
  the guest was told, so a fragmenting guest is rare and its fragments are
  dropped by the stack.
- IPv6: version, payload length against the frame, and the extension header
  chain (RFC 8200 §4): Hop-by-Hop, Routing, Destination Options and
  Fragment headers are walked (at most :data:`MAX_EXTENSION_HEADERS`, so a
  hostile chain costs bounded work) to find the upper-layer protocol.
"""

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ferryd.wire.checksum import checksum, fold, raw_sum
from ferryd.wire.errors import MalformedPacket

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59

_HOPOPTS, _ROUTING, _FRAGMENT, _DSTOPTS, _AH = 0, 43, 44, 60, 51
MAX_EXTENSION_HEADERS = 8

IPV4_HLEN = 20
IPV6_HLEN = 40
IPV6_MIN_MTU = 1280  # RFC 8200 §5
_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")

IpAddress = IPv4Address | IPv6Address


# Not frozen: built for every frame, and a frozen dataclass's __init__ sets
# each field through object.__setattr__ in Python (three times slower).
# Nothing assigns to a parsed frame; eq=False keeps hashing by identity.
@dataclass(slots=True, eq=False)
class IpPacket:
    version: int
    src: IpAddress
    dst: IpAddress
    proto: int
    """Upper-layer protocol (for IPv6, after the extension headers)."""
    ttl: int
    """TTL (IPv4) or hop limit (IPv6)."""
    payload: memoryview
    fragment: bool = False


def parse_ipv4_untrusted(data: bytes | bytearray | memoryview) -> IpPacket:
    if len(data) < IPV4_HLEN:
        raise MalformedPacket(f"IPv4 packet of {len(data)} bytes is shorter than a header")
    vihl, _tos, total, _ident, frag, ttl, proto, _csum, src, dst = _V4.unpack_from(data)
    if vihl >> 4 != 4:
        raise MalformedPacket(f"IPv4 header has version {vihl >> 4}")
    ihl = (vihl & 0x0F) * 4
    if ihl < IPV4_HLEN or total < ihl or total > len(data):
        raise MalformedPacket(f"IPv4 lengths inconsistent (ihl {ihl}, total {total}, {len(data)})")
    view = memoryview(data)
    if checksum(view[:ihl]) != 0:
        raise MalformedPacket("IPv4 header checksum is wrong")
    return IpPacket(
        4,
        IPv4Address(src),
        IPv4Address(dst),
        proto,
        ttl,
        view[ihl:total],
        fragment=bool(frag & 0x3FFF),  # MF flag or a non-zero offset
    )


def parse_ipv6_untrusted(data: bytes | bytearray | memoryview) -> IpPacket:
    if len(data) < IPV6_HLEN:
        raise MalformedPacket(f"IPv6 packet of {len(data)} bytes is shorter than a header")
    vtcfl, plen, nxt, hlim, src, dst = _V6.unpack_from(data)
    if vtcfl >> 28 != 6:
        raise MalformedPacket(f"IPv6 header has version {vtcfl >> 28}")
    end = IPV6_HLEN + plen
    if end > len(data):
        raise MalformedPacket(f"IPv6 payload length {plen} exceeds the frame")
    view = memoryview(data)[:end]
    off = IPV6_HLEN
    fragment = False
    # One pass more than the limit: a chain of exactly MAX_EXTENSION_HEADERS
    # headers ends on that last pass with the upper-layer protocol.
    for _ in range(MAX_EXTENSION_HEADERS + 1):
        if nxt not in (_HOPOPTS, _ROUTING, _FRAGMENT, _DSTOPTS, _AH):
            break
        if off + 8 > end:
            raise MalformedPacket("IPv6 extension header truncated")
        if nxt == _FRAGMENT:
            fragment = True
            hlen = 8
        elif nxt == _AH:
            hlen = (view[off + 1] + 2) * 4  # RFC 4302 §2.2: in 4-octet units, minus 2
        else:
            hlen = (view[off + 1] + 1) * 8  # RFC 8200 §4.3: in 8-octet units, minus 1
        nxt = view[off]
        off += hlen
        if off > end:
            raise MalformedPacket("IPv6 extension header runs past the packet")
    else:
        raise MalformedPacket("IPv6 extension header chain is too long")
    return IpPacket(6, IPv6Address(src), IPv6Address(dst), nxt, hlim, view[off:end], fragment)


class _V4Template:
    """What an IPv4 header between two addresses keeps from one packet to the next.

    The header of every segment a flow sends differs only in its length, and
    the checksum is a sum of 16-bit words (RFC 1071): the sum of the other
    words is kept, the length added, and ``fold`` (this module's checksum
    arithmetic, ferryd.wire.checksum) finishes it. The addresses are compared
    by identity: a flow sends from and to the same address objects, so the
    check costs nothing, and a different flow simply builds its own.
    """

    __slots__ = ("addrs", "dst", "proto", "src", "sum", "ttl")

    def __init__(self, src: IPv4Address, dst: IPv4Address, proto: int, ttl: int) -> None:
        self.src, self.dst, self.proto, self.ttl = src, dst, proto, ttl
        self.addrs = src.packed + dst.packed
        self.sum = raw_sum(_V4.pack(0x45, 0, 0, 0, 0x4000, ttl, proto, 0, src.packed, dst.packed))


_v4_last = _V4Template(IPv4Address(0), IPv4Address(0), 0, 0)
_V4_HEAD = struct.Struct("!BBHHHBBH8s")


def ipv4_header(
    src: IPv4Address, dst: IPv4Address, proto: int, payload_len: int, ttl: int = 64, ident: int = 0
) -> bytes:
    """A 20-byte IPv4 header with DF set and its checksum."""
    global _v4_last
    t = _v4_last
    if t.src is not src or t.dst is not dst or t.proto != proto or t.ttl != ttl:
        t = _v4_last = _V4Template(src, dst, proto, ttl)
    total = IPV4_HLEN + payload_len
    # Every field sits on a 16-bit boundary: adding it to the raw sum adds
    # its word (0x10000 ≡ 1 mod 0xFFFF, ferryd.wire.checksum).
    csum = ~fold(t.sum + total + ident) & 0xFFFF
    return _V4_HEAD.pack(0x45, 0, total, ident, 0x4000, ttl, proto, csum, t.addrs)


def ipv6_header(
    src: IPv6Address, dst: IPv6Address, proto: int, payload_len: int, hop_limit: int = 64
) -> bytes:
    return _V6.pack(6 << 28, payload_len, proto, hop_limit, src.packed, dst.packed)


def ip_header(src: IpAddress, dst: IpAddress, proto: int, payload_len: int, ttl: int = 64) -> bytes:
    """The header of whichever family ``src`` belongs to (``dst`` must match)."""
    if isinstance(src, IPv4Address):
        assert isinstance(dst, IPv4Address)
        return ipv4_header(src, dst, proto, payload_len, ttl)
    assert isinstance(dst, IPv6Address)
    return ipv6_header(src, dst, proto, payload_len, ttl)


def build_ip(
    src: IpAddress,
    dst: IpAddress,
    proto: int,
    payload: bytes | bytearray | memoryview,
    ttl: int = 64,
) -> bytes:
    return ip_header(src, dst, proto, len(payload), ttl) + payload
