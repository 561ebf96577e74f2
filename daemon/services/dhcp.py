"""DHCPv4 server (RFC 2131, options RFC 2132) for the one guest on the link.

Theory of operation: there is one client and one address to give, so the
server keeps no lease table and no state at all. Every answer is a function
of the link configuration and the request:

======================  ==============================================
client sends            ferryd answers
======================  ==============================================
DHCPDISCOVER            DHCPOFFER of :attr:`Ip4Config.address`
DHCPREQUEST             DHCPACK, or DHCPNAK if the client asks for (or,
                        renewing, holds) another address (§4.3.2)
DHCPINFORM              DHCPACK without address or lease time (§4.3.5)
DHCPRELEASE/DECLINE     nothing: the address stays the guest's
anything else           nothing
======================  ==============================================

A DHCPREQUEST naming another server (option 54) is for that server and gets
no answer (§4.3.2 SELECTING). The states are told apart as §4.3.2 says:
server identifier present → SELECTING; requested address (option 50) without
server identifier → INIT-REBOOT; neither → RENEWING/REBINDING, address in
``ciaddr``.

Every reply carries (§4.3.1, RFC 2132): message type (53), server identifier
(54, the gateway address, as passt does: it is the address the guest sees
ferryd as), subnet mask (1), router (3), DNS servers (6, if configured),
interface MTU (26) and, except for DHCPINFORM, the lease time (51). The lease
is infinite (0xffffffff, RFC 2131 §3.3): the address never changes while the
guest lives, a live migration carries it along, and renewals would only add
traffic on a link that may be frozen mid-migration. Replies are padded to the
300-byte BOOTP minimum (RFC 1542 §3.3) that some old clients insist on.

Destinations (§4.1): a DHCPNAK, and any reply to a client that set the
broadcast flag, is broadcast (255.255.255.255, ff:ff:ff:ff:ff:ff); a client
with ``ciaddr`` set (renewing, DHCPINFORM) gets a unicast to ``ciaddr``;
otherwise the reply is unicast to ``chaddr`` and ``yiaddr``. There are no
relay agents on ferry's point-to-point link, so ``giaddr`` is only echoed.

Parsing is defensive: :func:`parse_dhcp_untrusted` accepts exactly the
RFC 2131 §2 layout, walks options with bounds checks, concatenates repeated
options (RFC 3396), follows option overload into ``file`` and ``sname``
(RFC 2132 §9.3), and raises :class:`MalformedPacket` for anything else.
"""

import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network

from ferryd.link import Ip4Config, LinkConfig
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ethernet import BROADCAST, ETH_P_IP, EthernetFrame, build_ethernet
from ferryd.wire.ip import IPPROTO_UDP, IpPacket, build_ip
from ferryd.wire.udp import UdpDatagram, build_udp

SERVER_PORT = 67
CLIENT_PORT = 68
BOOTREQUEST = 1
BOOTREPLY = 2
MAGIC_COOKIE = b"\x63\x82\x53\x63"
FLAG_BROADCAST = 0x8000
INFINITE_LEASE = 0xFFFFFFFF
MIN_BOOTP_SIZE = 300

OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_MTU = 26
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMETER_LIST = 55
OPT_END = 255


class DhcpType(IntEnum):
    """Option 53 values (RFC 2132 §9.6)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


# op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr sname file
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
_FIXED = _BOOTP.size + len(MAGIC_COOKIE)  # 240


@dataclass(frozen=True, slots=True)
class DhcpMessage:
    op: int
    htype: int
    hlen: int
    xid: int
    flags: int
    ciaddr: IPv4Address
    yiaddr: IPv4Address
    giaddr: IPv4Address
    chaddr: bytes
    """The first ``hlen`` bytes of the chaddr field."""
    options: dict[int, bytes]
    """Option code → value; repeated options concatenated (RFC 3396)."""

    @property
    def message_type(self) -> int | None:
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value is not None and len(value) == 1 else None

    def address_option(self, code: int) -> IPv4Address | None:
        value = self.options.get(code)
        return IPv4Address(value) if value is not None and len(value) == 4 else None


def _walk_options_untrusted(data: bytes, into: dict[int, bytearray]) -> None:
    # Repeated options are appended in place: concatenating bytes anew for
    # each of thousands of one-byte repeats would cost quadratic time.
    i, end = 0, len(data)
    while i < end:
        code = data[i]
        if code == OPT_END:
            return
        if code == OPT_PAD:
            i += 1
            continue
        if i + 2 > end:
            raise MalformedPacket(f"DHCP option {code} truncated")
        olen = data[i + 1]
        if i + 2 + olen > end:
            raise MalformedPacket(f"DHCP option {code} of length {olen} runs past the message")
        into.setdefault(code, bytearray()).extend(data[i + 2 : i + 2 + olen])
        i += 2 + olen
    # RFC 2131 §4.1 wants an END option; many clients pad instead: accept.


def parse_dhcp_untrusted(data: bytes | bytearray | memoryview) -> DhcpMessage:
    """Parse a BOOTP/DHCP message (the UDP payload)."""
    if len(data) < _FIXED:
        raise MalformedPacket(f"DHCP message of {len(data)} bytes is too short")
    raw = bytes(data)
    (
        op,
        htype,
        hlen,
        _hops,
        xid,
        _secs,
        flags,
        ciaddr,
        yiaddr,
        _siaddr,
        giaddr,
        chaddr,
        sname,
        file,
    ) = _BOOTP.unpack_from(raw)
    if raw[_BOOTP.size : _FIXED] != MAGIC_COOKIE:
        raise MalformedPacket("DHCP magic cookie missing (plain BOOTP is not served)")
    if hlen > len(chaddr):
        raise MalformedPacket(f"DHCP hardware address length {hlen} exceeds 16")
    walked: dict[int, bytearray] = {}
    _walk_options_untrusted(raw[_FIXED:], walked)
    overload = walked.pop(OPT_OVERLOAD, b"")
    if overload:
        # RFC 2132 §9.3: 1 = file holds options, 2 = sname, 3 = both (file first).
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise MalformedPacket(f"DHCP option overload value {overload.hex()} is invalid")
        if overload[0] & 1:
            _walk_options_untrusted(file, walked)
        if overload[0] & 2:
            _walk_options_untrusted(sname, walked)
    options = {code: bytes(value) for code, value in walked.items()}
    return DhcpMessage(
        op,
        htype,
        hlen,
        xid,
        flags,
        IPv4Address(ciaddr),
        IPv4Address(yiaddr),
        IPv4Address(giaddr),
        chaddr[:hlen],
        options,
    )


def _option(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def build_dhcp_reply(
    request: DhcpMessage,
    mtype: DhcpType,
    server: IPv4Address,
    yiaddr: IPv4Address,
    options: list[tuple[int, bytes]],
) -> bytes:
    """A BOOTREPLY for ``request`` (RFC 2131 §4.3.1 Table 3 field rules)."""
    ciaddr = request.ciaddr if mtype in (DhcpType.ACK,) else IPv4Address(0)
    fixed = _BOOTP.pack(
        BOOTREPLY,
        request.htype,
        request.hlen,
        0,
        request.xid,
        0,
        request.flags & FLAG_BROADCAST,
        ciaddr.packed,
        yiaddr.packed,
        b"\0" * 4,
        request.giaddr.packed,
        request.chaddr,
        b"",
        b"",
    )
    out = bytearray(fixed + MAGIC_COOKIE)
    out += _option(OPT_MESSAGE_TYPE, bytes((mtype,)))
    out += _option(OPT_SERVER_ID, server.packed)
    for code, value in options:
        out += _option(code, value)
    out.append(OPT_END)
    if len(out) < MIN_BOOTP_SIZE:
        out += bytes(MIN_BOOTP_SIZE - len(out))
    return bytes(out)


def _config_options(link: LinkConfig, ip4: Ip4Config, lease: bool) -> list[tuple[int, bytes]]:
    mask = IPv4Network(f"0.0.0.0/{ip4.prefixlen}").netmask
    options = [(OPT_SUBNET_MASK, mask.packed), (OPT_ROUTER, ip4.gateway.packed)]
    if ip4.dns:
        # At most 63 servers fit one option (RFC 2132 §2: 255 bytes).
        options.append((OPT_DNS, b"".join(a.packed for a in ip4.dns[:63])))
    if 68 <= link.mtu <= 0xFFFF:  # RFC 2132 §5.1: minimum 68
        options.append((OPT_MTU, struct.pack("!H", link.mtu)))
    if lease:
        options.append((OPT_LEASE_TIME, struct.pack("!I", INFINITE_LEASE)))
    return options


def _choose_reply(msg: DhcpMessage, ip4: Ip4Config) -> tuple[DhcpType, IPv4Address, bool] | None:
    """(reply type, yiaddr, include lease time) for ``msg``, or None for silence."""
    mtype = msg.message_type
    if mtype == DhcpType.DISCOVER:
        return DhcpType.OFFER, ip4.address, True
    if mtype == DhcpType.INFORM:
        return DhcpType.ACK, IPv4Address(0), False  # §4.3.5: no yiaddr, no lease
    if mtype != DhcpType.REQUEST:
        return None  # RELEASE, DECLINE (the address stays the guest's), server types
    server_id = msg.address_option(OPT_SERVER_ID)
    requested = msg.address_option(OPT_REQUESTED_IP)
    if OPT_SERVER_ID in msg.options:
        if server_id != ip4.gateway:
            return None  # SELECTING another server's offer
        wanted = requested
    elif OPT_REQUESTED_IP in msg.options:
        wanted = requested  # INIT-REBOOT
    else:
        wanted = msg.ciaddr  # RENEWING / REBINDING
    if wanted != ip4.address:
        return DhcpType.NAK, IPv4Address(0), False
    return DhcpType.ACK, ip4.address, True


def answer_dhcp_untrusted(
    link: LinkConfig, eth: EthernetFrame, ip: IpPacket, udp: UdpDatagram
) -> bytes | None:
    """The frame answering a DHCP message from the guest, or None.

    Called for IPv4 UDP to port 67. Raises only :class:`MalformedPacket`.
    """
    ip4 = link.ipv4
    if ip4 is None or ip.fragment:
        return None
    msg = parse_dhcp_untrusted(udp.payload)
    if msg.op != BOOTREQUEST or msg.htype != 1 or msg.hlen != 6:
        return None  # not an Ethernet client request
    choice = _choose_reply(msg, ip4)
    if choice is None:
        return None
    mtype, yiaddr, lease = choice
    options: list[tuple[int, bytes]] = []
    if mtype != DhcpType.NAK:
        options = _config_options(link, ip4, lease)
    payload = build_dhcp_reply(msg, mtype, ip4.gateway, yiaddr, options)

    # RFC 2131 §4.1, "If the 'giaddr' field ... is zero" paragraph.
    if mtype == DhcpType.NAK or (msg.ciaddr == IPv4Address(0) and msg.flags & FLAG_BROADCAST):
        dst_mac, dst_ip = BROADCAST, IPv4Address("255.255.255.255")
    elif msg.ciaddr != IPv4Address(0):
        dst_mac, dst_ip = msg.chaddr, msg.ciaddr
    else:
        dst_mac, dst_ip = msg.chaddr, yiaddr
    datagram = build_udp(ip4.gateway, dst_ip, SERVER_PORT, CLIENT_PORT, payload)
    return build_ethernet(
        dst_mac, link.mac, ETH_P_IP, build_ip(ip4.gateway, dst_ip, IPPROTO_UDP, datagram)
    )
