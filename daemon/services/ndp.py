"""NDP responder (RFC 4861): router advertisements and neighbour advertisements.

Theory of operation. ferryd is the guest's only neighbour: its router and,
because the guest is given the host's own prefix (REFERENCE.md "Guest link
conventions"), every on-link peer too. So, as passt does:

Router advertisements (§6.2) are multicast to all nodes (ff02::1,
33:33:00:00:00:01) from :attr:`Ip6Config.gateway`, a link-local address
(§6.1.2: hosts drop RAs from any other source), with hop limit 255:

- at start (the first :meth:`NdpResponder.handle_timer` call) and then every
  :data:`RA_INTERVAL` seconds (§6.2.4; a fixed interval, since a sans-IO core
  draws no random numbers and there is a single listener);
- in answer to a router solicitation (§6.2.6), at once unless an RA went to
  all nodes less than :data:`MIN_DELAY_BETWEEN_RAS` seconds ago, in which case
  it is sent as soon as that delay is over (the timer). Answering by
  multicast means the guest's MAC is never needed.

Each RA says: current hop limit 64, flags M=1 and O=1 (so a DHCPv6 client
also asks ferryd's DHCPv6 server for the exact address and DNS servers the
guest is meant to have), router lifetime :data:`ROUTER_LIFETIME`, and
carries the options source link-layer address (§4.6.1), MTU (§4.6.4, when
the link MTU is a valid IPv6 MTU), prefix information (§4.6.2: the prefix of
:attr:`Ip6Config.address`, L=1, A=1 only for a /64 since SLAAC needs 64-bit
interface identifiers, valid :data:`PREFIX_VALID_LIFETIME` and preferred
:data:`PREFIX_PREFERRED_LIFETIME`) and, if DNS servers are configured,
RDNSS (RFC 8106 §5.1) with lifetime :data:`RDNSS_LIFETIME`. Every lifetime
is finite and many times the RA interval, so the guest forgets ferryd's
router only if ferryd stops for good.

Neighbour advertisements (§7.2.4): every valid neighbour solicitation is
answered with ferryd's MAC in a target link-layer address option, flags
R=1, S=1, O=1, from the target address to the solicitation's source, except
a solicitation whose source is the unspecified address (a DAD probe, §7.2.3:
staying silent lets the guest's duplicate address detection succeed) and one
for the guest's own address.

Validation: §6.1.1 for router solicitations and §7.1.1 for neighbour
solicitations (hop limit 255, code 0, minimum length, no zero-length option,
target not multicast, no source link-layer option from ::, a DAD probe sent
to a solicited-node group); an invalid message raises
:class:`MalformedPacket`. The ICMPv6 checksum was checked by the wire parser.
"""

import struct
from ipaddress import IPv6Address, IPv6Network

from ferryd.link import Ip6Config, LinkConfig
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ethernet import ETH_P_IPV6, EthernetFrame, build_ethernet, is_multicast
from ferryd.wire.icmp import (
    ICMPV6_NEIGHBOUR_ADVERT,
    ICMPV6_NEIGHBOUR_SOLICIT,
    ICMPV6_ROUTER_ADVERT,
    ICMPV6_ROUTER_SOLICIT,
    IcmpMessage,
    build_icmp,
)
from ferryd.wire.ip import IPPROTO_ICMPV6, IPV6_MIN_MTU, IpPacket, build_ip

RA_INTERVAL = 60.0
MIN_DELAY_BETWEEN_RAS = 3.0  # RFC 4861 §10
ROUTER_LIFETIME = 1800  # §6.2.1 default (3 × MaxRtrAdvInterval of 600 s); ≤ 9000
PREFIX_VALID_LIFETIME = 86400
PREFIX_PREFERRED_LIFETIME = 14400
RDNSS_LIFETIME = 1800  # RFC 8106 §5.1: at least 3 × the RA interval
CUR_HOP_LIMIT = 64
NDP_HOP_LIMIT = 255

OPT_SOURCE_LLADDR = 1
OPT_TARGET_LLADDR = 2
OPT_PREFIX_INFO = 3
OPT_MTU = 5
OPT_RDNSS = 25

RA_FLAG_MANAGED = 0x80
RA_FLAG_OTHER = 0x40
PREFIX_FLAG_ONLINK = 0x80
PREFIX_FLAG_AUTONOMOUS = 0x40
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000


def multicast_mac(group: IPv6Address) -> bytes:
    """The Ethernet group address of an IPv6 multicast group (RFC 2464 §7)."""
    return b"\x33\x33" + group.packed[12:]


ALL_NODES = IPv6Address("ff02::1")
ALL_NODES_MAC = multicast_mac(ALL_NODES)
_UNSPECIFIED = IPv6Address(0)
_SOLICITED_NODE = IPv6Network("ff02::1:ff00:0/104")


def parse_ndp_options_untrusted(data: bytes | memoryview) -> list[tuple[int, bytes]]:
    """(type, value) of each NDP option (§4.6); a zero length is invalid."""
    options = []
    i, end = 0, len(data)
    while i < end:
        if i + 2 > end:
            raise MalformedPacket("NDP option truncated")
        otype, olen = data[i], data[i + 1] * 8
        if olen == 0:
            raise MalformedPacket(f"NDP option {otype} has length zero")
        if i + olen > end:
            raise MalformedPacket(f"NDP option {otype} runs past the message")
        options.append((otype, bytes(data[i + 2 : i + olen])))
        i += olen
    return options


def _source_lladdr(options: list[tuple[int, bytes]]) -> bytes | None:
    for otype, value in options:
        if otype == OPT_SOURCE_LLADDR and len(value) >= 6:
            return value[:6]
    return None


def lladdr_option(otype: int, mac: bytes) -> bytes:
    return bytes((otype, 1)) + mac


def build_router_advert(link: LinkConfig, ip6: Ip6Config) -> bytes:
    """The ICMPv6 router advertisement (§4.2) ferryd sends, without IP header."""
    rest = struct.pack("!BBH", CUR_HOP_LIMIT, RA_FLAG_MANAGED | RA_FLAG_OTHER, ROUTER_LIFETIME)
    body = bytearray(struct.pack("!II", 0, 0))  # reachable time, retrans timer: unspecified
    body += lladdr_option(OPT_SOURCE_LLADDR, link.mac)
    if link.mtu >= IPV6_MIN_MTU:
        body += struct.pack("!BBHI", OPT_MTU, 1, 0, min(link.mtu, 0xFFFFFFFF))
    prefix = IPv6Network(f"{ip6.address}/{ip6.prefixlen}", strict=False)
    flags = PREFIX_FLAG_ONLINK | (PREFIX_FLAG_AUTONOMOUS if ip6.prefixlen == 64 else 0)
    body += struct.pack(
        "!BBBBIII16s",
        OPT_PREFIX_INFO,
        4,
        ip6.prefixlen,
        flags,
        PREFIX_VALID_LIFETIME,
        PREFIX_PREFERRED_LIFETIME,
        0,
        prefix.network_address.packed,
    )
    if ip6.dns:
        servers = ip6.dns[:127]  # the length field counts 8-byte units up to 255
        body += struct.pack("!BBHI", OPT_RDNSS, 1 + 2 * len(servers), 0, RDNSS_LIFETIME)
        body += b"".join(a.packed for a in servers)
    icmp = build_icmp(ip6.gateway, ALL_NODES, ICMPV6_ROUTER_ADVERT, 0, rest, body)
    packet = build_ip(ip6.gateway, ALL_NODES, IPPROTO_ICMPV6, icmp, NDP_HOP_LIMIT)
    return build_ethernet(ALL_NODES_MAC, link.mac, ETH_P_IPV6, packet)


def _check_common_untrusted(ip: IpPacket, icmp: IcmpMessage, min_len: int) -> None:
    """§6.1.1 / §7.1.1 checks shared by router and neighbour solicitations."""
    if ip.ttl != NDP_HOP_LIMIT:
        raise MalformedPacket(f"NDP message with hop limit {ip.ttl}, not 255")
    if icmp.code != 0:
        raise MalformedPacket(f"NDP message with code {icmp.code}")
    if 8 + len(icmp.body) < min_len:
        raise MalformedPacket(f"NDP message of {8 + len(icmp.body)} bytes is too short")


def answer_neighbour_solicit_untrusted(
    link: LinkConfig, eth: EthernetFrame, ip: IpPacket, icmp: IcmpMessage
) -> bytes | None:
    """The neighbour advertisement answering a solicitation, or None."""
    ip6 = link.ipv6
    if ip6 is None or ip.fragment:
        return None
    _check_common_untrusted(ip, icmp, 24)
    target = IPv6Address(bytes(icmp.body[:16]))
    if target.is_multicast:
        raise MalformedPacket("neighbour solicitation for a multicast target")
    options = parse_ndp_options_untrusted(icmp.body[16:])
    sllao = _source_lladdr(options)
    if not isinstance(ip.src, IPv6Address) or not isinstance(ip.dst, IPv6Address):
        return None
    if ip.src == _UNSPECIFIED:
        if ip.dst not in _SOLICITED_NODE:
            raise MalformedPacket("DAD probe not sent to a solicited-node group")
        if sllao is not None:
            raise MalformedPacket("DAD probe with a source link-layer address option")
        return None  # §7.2.3: a DAD probe must find the address free
    if target == ip6.address:
        return None  # the guest's own address
    dst_mac = sllao if sllao is not None else eth.src
    if is_multicast(dst_mac):
        return None
    rest = struct.pack("!I", NA_FLAG_ROUTER | NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE)
    body = target.packed + lladdr_option(OPT_TARGET_LLADDR, link.mac)
    na = build_icmp(target, ip.src, ICMPV6_NEIGHBOUR_ADVERT, 0, rest, body)
    packet = build_ip(target, ip.src, IPPROTO_ICMPV6, na, NDP_HOP_LIMIT)
    return build_ethernet(dst_mac, link.mac, ETH_P_IPV6, packet)


def check_router_solicit_untrusted(ip: IpPacket, icmp: IcmpMessage) -> None:
    """Validate a router solicitation (§6.1.1)."""
    _check_common_untrusted(ip, icmp, 8)
    options = parse_ndp_options_untrusted(icmp.body)
    if ip.src == _UNSPECIFIED and any(t == OPT_SOURCE_LLADDR for t, _ in options):
        raise MalformedPacket("router solicitation from :: with a source link-layer option")


class NdpResponder:
    """Router and neighbour advertisements for one guest link (sans-IO).

    The owner calls :meth:`receive_untrusted` for ICMPv6 router and neighbour
    solicitations from the guest, and :meth:`handle_timer` once the time
    :meth:`next_timer` gives has come; both return frames to send.
    """

    def __init__(self, link: LinkConfig, now: float) -> None:
        self._link = link
        self._ra = build_router_advert(link, link.ipv6) if link.ipv6 is not None else None
        self._next_periodic: float | None = now if self._ra is not None else None
        self._solicited_due: float | None = None
        self._last_multicast_ra = float("-inf")

    def receive_untrusted(
        self, eth: EthernetFrame, ip: IpPacket, icmp: IcmpMessage, now: float
    ) -> list[bytes]:
        """Frames answering one ICMPv6 message; raises only MalformedPacket."""
        if self._ra is None or ip.version != 6:
            return []
        if icmp.type == ICMPV6_NEIGHBOUR_SOLICIT:
            answer = answer_neighbour_solicit_untrusted(self._link, eth, ip, icmp)
            return [answer] if answer is not None else []
        if icmp.type != ICMPV6_ROUTER_SOLICIT or ip.fragment:
            return []
        check_router_solicit_untrusted(ip, icmp)
        earliest = self._last_multicast_ra + MIN_DELAY_BETWEEN_RAS
        if now >= earliest:
            return self._send_ra(now)
        # §6.2.6: multicast RAs are rate limited; answer when allowed.
        if self._solicited_due is None:
            self._solicited_due = earliest
        return []

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` wants to run next (None: never)."""
        due = [t for t in (self._next_periodic, self._solicited_due) if t is not None]
        return min(due) if due else None

    def handle_timer(self, now: float) -> list[bytes]:
        due = self.next_timer()
        if due is None or now < due:
            return []
        return self._send_ra(now)

    def _send_ra(self, now: float) -> list[bytes]:
        assert self._ra is not None
        self._last_multicast_ra = now
        self._solicited_due = None
        self._next_periodic = now + RA_INTERVAL
        return [self._ra]
