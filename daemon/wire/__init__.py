"""Wire formats: parse and build Ethernet, ARP, IPv4, IPv6, ICMP, ICMPv6, UDP, TCP.

Everything here is pure (no I/O, no clock). Parsers of guest input are named
``*_untrusted`` and let exactly one exception escape: :class:`MalformedPacket`.
Builders trust their arguments (they come from ferryd itself) and compute
every length and checksum, so a frame ferryd sends is always well formed.
"""

from ferryd.wire.errors import MalformedPacket

__all__ = ["MalformedPacket"]
