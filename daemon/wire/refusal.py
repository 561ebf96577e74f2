"""ICMP "administratively prohibited" for a guest packet ferryd refuses to carry.

A router that will not forward a packet says so (RFC 1812 §5.2.7.1: ICMP
destination unreachable, code 13, communication administratively
prohibited; RFC 4443 §3.1: ICMPv6 destination unreachable, code 1), so the
guest's application gets an error at once (Linux reports both as
EHOSTUNREACH / EACCES on the socket) instead of waiting for a timeout.

The quote is the refused packet as the guest sent it: its IP header
(rebuilt from the parsed fields, since the stack keeps no copy) and the
start of its payload, 8 bytes for IPv4 (RFC 792) and as much as keeps the
error within the IPv6 minimum MTU (RFC 4443 §2.4 (c)). Linux matches an
error to a socket by the quoted addresses, protocol and ports only.
"""

from ipaddress import IPv4Address, IPv6Address

from daemon.wire.icmp import ICMP_DEST_UNREACH, ICMPV6_DEST_UNREACH, build_icmp
from daemon.wire.ip import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPV6_HLEN,
    IpPacket,
    ipv4_header,
    ipv6_header,
)

ICMP_ADMIN_PROHIBITED = 13
ICMPV6_ADMIN_PROHIBITED = 1
_IPV6_MIN_MTU = 1280


def admin_prohibited(ip: IpPacket) -> tuple[int, bytes]:
    """(protocol, ICMP message) refusing ``ip``; send it from ``ip.dst`` to ``ip.src``."""
    src, dst = ip.src, ip.dst
    length = len(ip.payload)
    if isinstance(src, IPv4Address):
        assert isinstance(dst, IPv4Address)
        quote = ipv4_header(src, dst, ip.proto, length, ip.ttl) + ip.payload[:8]
        msg = build_icmp(dst, src, ICMP_DEST_UNREACH, ICMP_ADMIN_PROHIBITED, bytes(4), quote)
        return IPPROTO_ICMP, msg
    assert isinstance(src, IPv6Address) and isinstance(dst, IPv6Address)
    room = _IPV6_MIN_MTU - IPV6_HLEN - 8  # what the error's own headers leave for the quote
    quote = ipv6_header(src, dst, ip.proto, length, ip.ttl) + ip.payload[: room - IPV6_HLEN]
    msg = build_icmp(dst, src, ICMPV6_DEST_UNREACH, ICMPV6_ADMIN_PROHIBITED, bytes(4), quote)
    return IPPROTO_ICMPV6, msg
