"""DHCPv6 server (RFC 8415) handing the guest its one address and DNS servers.

Theory of operation: like the DHCPv4 server, stateless in code and stateful
in effect. The guest always gets :attr:`Ip6Config.address`; nothing needs
remembering, so each reply is a function of the configuration and request.
ferryd's router advertisements set M and O (see ``ndp``), which makes the
guest's DHCPv6 client ask.

=====================  ==================================================
client sends           ferryd answers (§18.3)
=====================  ==================================================
Solicit                Advertise with preference 255 (§18.2.1: the client
                       takes it at once); Reply if the client sent Rapid
                       Commit (§18.3.1, with Rapid Commit echoed)
Request, Renew,        Reply with the address in the first IA_NA; other
Rebind                 addresses the client lists get lifetimes 0 (§18.3.4)
Confirm                Reply, status Success if every listed address is
                       the guest's, else NotOnLink; no Reply if it lists
                       none (§18.3.3)
Information-request    Reply with the DNS servers only
Release, Decline       Reply with status Success (§18.3.7, §18.3.8)
=====================  ==================================================

Only the first IA_NA is answered, with the address (there is one); further
IA_NAs are left out of the reply, as IA_TA and IA_PD (not served) are, and a
Solicit/Request with no IA_NA at all gets a top-level NoAddrsAvail
(§18.3.9). Every reply is bounded whatever the request holds: one IA_NA
answered, at most :data:`MAX_STALE_ADDRESSES` of the client's other
addresses released in it, a client identifier of at most
:data:`MAX_DUID_LEN` bytes (§11.1) echoed. (Answering every IA_NA of a
Solicit carrying thousands of them once made a reply larger than an IP
packet, and the exception stopped ferryd: issue 9.)

Lifetimes are infinite (0xffffffff, §7.7), T1 and T2 too: the address
never changes while the guest lives, and a live migration carries it along,
so renewals would only add traffic. The DNS recursive name server option
(23, RFC 3646) is included when DNS servers are configured.

The server DUID is a DUID-LL (§11.4) built from ferryd's MAC. Messages that
§16 says to discard are ignored: a Solicit, Confirm or Rebind carrying a
server identifier, a Request, Renew, Release or Decline without ours, an
Information-request with somebody else's, any message but
Information-request without a client identifier, relay messages.

Replies go from the gateway link-local address to the client's source
address, UDP 547 → 546, Ethernet to the client's source MAC, echoing the
transaction id and the client identifier.
"""

import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv6Address

from ferryd.link import Ip6Config, LinkConfig
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ethernet import ETH_P_IPV6, EthernetFrame, build_ethernet, is_multicast
from ferryd.wire.ip import IPPROTO_UDP, IpPacket, build_ip
from ferryd.wire.udp import UdpDatagram, build_udp

SERVER_PORT = 547
CLIENT_PORT = 546
INFINITY = 0xFFFFFFFF
MAX_PREFERENCE = 255

OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IAADDR = 5
OPT_PREFERENCE = 7
OPT_STATUS_CODE = 13
OPT_RAPID_COMMIT = 14
OPT_DNS_SERVERS = 23

STATUS_SUCCESS = 0
STATUS_NO_ADDRS_AVAIL = 2
STATUS_NOT_ON_LINK = 4

#: The longest DUID (§11.1: "up to 128 octets", plus its 2-byte type).
MAX_DUID_LEN = 130
#: Addresses of the answered IA_NA, besides the guest's, given lifetimes 0.
MAX_STALE_ADDRESSES = 8

_DUID_LL = 3
_HTYPE_ETHERNET = 1
_OPT = struct.Struct("!HH")
_IA_NA = struct.Struct("!III")
_IAADDR = struct.Struct("!16sII")


class Dhcpv6Type(IntEnum):
    """Message types (RFC 8415 §7.3)."""

    SOLICIT = 1
    ADVERTISE = 2
    REQUEST = 3
    CONFIRM = 4
    RENEW = 5
    REBIND = 6
    REPLY = 7
    RELEASE = 8
    DECLINE = 9
    RECONFIGURE = 10
    INFORMATION_REQUEST = 11
    RELAY_FORW = 12
    RELAY_REPL = 13


@dataclass(frozen=True, slots=True)
class IaNa:
    """An IA_NA option (§21.4) as the client sent it."""

    iaid: int
    t1: int
    t2: int
    addresses: tuple[IPv6Address, ...]


@dataclass(frozen=True, slots=True)
class Dhcpv6Message:
    msg_type: int
    xid: int
    options: tuple[tuple[int, bytes], ...]
    """(code, value) in message order; options may repeat (IA_NA)."""

    def first(self, code: int) -> bytes | None:
        for c, value in self.options:
            if c == code:
                return value
        return None

    def has(self, code: int) -> bool:
        return any(c == code for c, _ in self.options)


def parse_dhcpv6_options_untrusted(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """The option list of a message or of an encapsulating option (§21.1)."""
    options = []
    i, end = 0, len(data)
    while i < end:
        if i + _OPT.size > end:
            raise MalformedPacket("DHCPv6 option header truncated")
        code, olen = _OPT.unpack_from(data, i)
        i += _OPT.size
        if i + olen > end:
            raise MalformedPacket(f"DHCPv6 option {code} of length {olen} runs past its container")
        options.append((code, data[i : i + olen]))
        i += olen
    return tuple(options)


def parse_dhcpv6_untrusted(data: bytes | bytearray | memoryview) -> Dhcpv6Message:
    """Parse a client/server message (§8); relay messages are refused."""
    raw = bytes(data)
    if len(raw) < 4:
        raise MalformedPacket(f"DHCPv6 message of {len(raw)} bytes is too short")
    if raw[0] in (Dhcpv6Type.RELAY_FORW, Dhcpv6Type.RELAY_REPL):
        raise MalformedPacket("DHCPv6 relay message on a link without relays")
    xid = int.from_bytes(raw[1:4], "big")
    return Dhcpv6Message(raw[0], xid, parse_dhcpv6_options_untrusted(raw[4:]))


def parse_ia_na_untrusted(value: bytes) -> IaNa:
    if len(value) < _IA_NA.size:
        raise MalformedPacket(f"DHCPv6 IA_NA of {len(value)} bytes is too short")
    iaid, t1, t2 = _IA_NA.unpack_from(value)
    addresses = []
    for code, sub in parse_dhcpv6_options_untrusted(value[_IA_NA.size :]):
        if code == OPT_IAADDR:
            if len(sub) < _IAADDR.size:
                raise MalformedPacket(f"DHCPv6 IAADDR of {len(sub)} bytes is too short")
            addresses.append(IPv6Address(sub[:16]))
    return IaNa(iaid, t1, t2, tuple(addresses))


def duid_ll(mac: bytes) -> bytes:
    """DUID-LL (§11.4): type 3, hardware type 1 (Ethernet), the MAC."""
    return struct.pack("!HH", _DUID_LL, _HTYPE_ETHERNET) + mac


def option(code: int, value: bytes) -> bytes:
    return _OPT.pack(code, len(value)) + value


def status_option(status: int, message: str = "") -> bytes:
    return option(OPT_STATUS_CODE, struct.pack("!H", status) + message.encode())


def _ia_na_option(ia: IaNa, ip6: Ip6Config) -> bytes:
    body = bytearray(_IA_NA.pack(ia.iaid, INFINITY, INFINITY))
    body += option(OPT_IAADDR, _IAADDR.pack(ip6.address.packed, INFINITY, INFINITY))
    stale = [a for a in dict.fromkeys(ia.addresses) if a != ip6.address]
    for address in stale[:MAX_STALE_ADDRESSES]:  # §18.3.4: tell the client to stop using it
        body += option(OPT_IAADDR, _IAADDR.pack(address.packed, 0, 0))
    return option(OPT_IA_NA, bytes(body))


def _acceptable_untrusted(msg: Dhcpv6Message, server_duid: bytes) -> bool:
    """Whether §16 lets the server answer ``msg`` at all."""
    client_id = msg.first(OPT_CLIENTID)
    if client_id is not None and not 3 <= len(client_id) <= MAX_DUID_LEN:
        raise MalformedPacket(f"DHCPv6 client identifier of {len(client_id)} bytes (§11.1)")
    server_id = msg.first(OPT_SERVERID)
    mtype = msg.msg_type
    if mtype == Dhcpv6Type.INFORMATION_REQUEST:
        return server_id is None or server_id == server_duid
    if not msg.has(OPT_CLIENTID):
        return False
    if mtype in (Dhcpv6Type.SOLICIT, Dhcpv6Type.CONFIRM, Dhcpv6Type.REBIND):
        return server_id is None
    if mtype in (Dhcpv6Type.REQUEST, Dhcpv6Type.RENEW, Dhcpv6Type.RELEASE, Dhcpv6Type.DECLINE):
        return server_id == server_duid
    return False  # server messages, unknown types


def _reply_body_untrusted(msg: Dhcpv6Message, link: LinkConfig, ip6: Ip6Config) -> bytes | None:
    """The options of the answer (after the common ids), or None for silence."""
    mtype = msg.msg_type
    body = bytearray()
    if mtype in (Dhcpv6Type.RELEASE, Dhcpv6Type.DECLINE):
        return status_option(STATUS_SUCCESS)
    ias = [parse_ia_na_untrusted(v) for c, v in msg.options if c == OPT_IA_NA]
    if mtype == Dhcpv6Type.CONFIRM:
        listed = [a for ia in ias for a in ia.addresses]
        if not listed:
            return None  # §18.3.3
        on_link = all(a == ip6.address for a in listed)
        return status_option(STATUS_SUCCESS if on_link else STATUS_NOT_ON_LINK)
    if mtype != Dhcpv6Type.INFORMATION_REQUEST:
        if not ias and mtype in (Dhcpv6Type.SOLICIT, Dhcpv6Type.REQUEST):
            body += status_option(STATUS_NO_ADDRS_AVAIL, "only IA_NA is served")
        if ias:
            body += _ia_na_option(ias[0], ip6)
        if mtype == Dhcpv6Type.SOLICIT:
            body += option(OPT_PREFERENCE, bytes((MAX_PREFERENCE,)))
    if ip6.dns:
        body += option(OPT_DNS_SERVERS, b"".join(a.packed for a in ip6.dns))
    return bytes(body)


def answer_dhcpv6_untrusted(
    link: LinkConfig, eth: EthernetFrame, ip: IpPacket, udp: UdpDatagram
) -> bytes | None:
    """The frame answering a DHCPv6 message from the guest, or None.

    Called for IPv6 UDP to port 547. Raises only :class:`MalformedPacket`.
    """
    ip6 = link.ipv6
    if ip6 is None or ip.fragment or not isinstance(ip.src, IPv6Address):
        return None
    if ip.src.is_unspecified or ip.src.is_multicast or is_multicast(eth.src):
        return None  # nowhere to send a reply
    if len(udp.payload) and udp.payload[0] in (Dhcpv6Type.RELAY_FORW, Dhcpv6Type.RELAY_REPL):
        return None  # no relays on ferry's link
    msg = parse_dhcpv6_untrusted(udp.payload)
    server_duid = duid_ll(link.mac)
    if not _acceptable_untrusted(msg, server_duid):
        return None
    body = _reply_body_untrusted(msg, link, ip6)
    if body is None:
        return None
    rapid = msg.msg_type == Dhcpv6Type.SOLICIT and msg.has(OPT_RAPID_COMMIT)
    if msg.msg_type == Dhcpv6Type.SOLICIT and not rapid:
        reply_type = Dhcpv6Type.ADVERTISE
    else:
        reply_type = Dhcpv6Type.REPLY
    out = bytearray(bytes((reply_type,)) + msg.xid.to_bytes(3, "big"))
    out += option(OPT_SERVERID, server_duid)
    client_id = msg.first(OPT_CLIENTID)
    if client_id is not None:
        out += option(OPT_CLIENTID, client_id)
    if rapid:
        out += option(OPT_RAPID_COMMIT, b"")
    out += body
    datagram = build_udp(ip6.gateway, ip.src, SERVER_PORT, CLIENT_PORT, out)
    packet = build_ip(ip6.gateway, ip.src, IPPROTO_UDP, datagram)
    return build_ethernet(eth.src, link.mac, ETH_P_IPV6, packet)
