"""The ARP, DHCP, NDP and DHCPv6 responders, each reply parsed back field by field."""

import contextlib
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferryd.link import Ip4Config, Ip6Config, LinkConfig
from ferryd.services import dhcp, dhcpv6, ndp
from ferryd.services.arp import answer_arp
from ferryd.services.dhcp import DhcpType, answer_dhcp_untrusted, parse_dhcp_untrusted
from ferryd.services.dhcpv6 import Dhcpv6Type, answer_dhcpv6_untrusted, parse_dhcpv6_untrusted
from ferryd.services.ndp import NdpResponder
from ferryd.wire.arp import ARP_REPLY, ARP_REQUEST, ArpPacket, build_arp, parse_arp_untrusted
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ethernet import (
    BROADCAST,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    EthernetFrame,
    build_ethernet,
    parse_ethernet_untrusted,
)
from ferryd.wire.icmp import IcmpMessage, build_icmp, parse_icmp_untrusted
from ferryd.wire.ip import (
    IPPROTO_ICMPV6,
    IPPROTO_UDP,
    IpPacket,
    build_ip,
    parse_ipv4_untrusted,
    parse_ipv6_untrusted,
)
from ferryd.wire.udp import UdpDatagram, build_udp, parse_udp_untrusted

FERRY_MAC = bytes.fromhex("9a55e0000001")
GUEST_MAC = bytes.fromhex("525400123456")
GUEST4 = IPv4Address("10.77.0.5")
GW4 = IPv4Address("10.77.0.1")
DNS4 = (IPv4Address("10.77.0.53"), IPv4Address("1.1.1.1"))
GUEST6 = IPv6Address("2001:db8:77::5")
GW6 = IPv6Address("fe80::1")
DNS6 = (IPv6Address("2001:db8:77::53"),)
GUEST_LL = IPv6Address("fe80::5054:ff:fe12:3456")
LINK = LinkConfig(
    mac=FERRY_MAC,
    mtu=65520,
    ipv4=Ip4Config(GUEST4, 24, GW4, DNS4),
    ipv6=Ip6Config(GUEST6, 64, GW6, DNS6),
)
ZERO4 = IPv4Address(0)
BCAST4 = IPv4Address("255.255.255.255")
UNSPEC6 = IPv6Address(0)

fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- guest-side frame builders and parse-back helpers ------------------------------


def udp_frame(
    src_mac: bytes,
    dst_mac: bytes,
    src: IPv4Address | IPv6Address,
    dst: IPv4Address | IPv6Address,
    sport: int,
    dport: int,
    payload: bytes,
) -> bytes:
    ethertype = ETH_P_IP if isinstance(src, IPv4Address) else ETH_P_IPV6
    datagram = build_udp(src, dst, sport, dport, payload)
    return build_ethernet(dst_mac, src_mac, ethertype, build_ip(src, dst, IPPROTO_UDP, datagram))


def parse_udp_frame(frame: bytes) -> tuple[EthernetFrame, IpPacket, UdpDatagram]:
    eth = parse_ethernet_untrusted(frame)
    if eth.ethertype == ETH_P_IP:
        ip = parse_ipv4_untrusted(eth.payload)
    else:
        assert eth.ethertype == ETH_P_IPV6
        ip = parse_ipv6_untrusted(eth.payload)
    assert ip.proto == IPPROTO_UDP
    return eth, ip, parse_udp_untrusted(ip)


def icmp6_frame(
    src: IPv6Address,
    dst: IPv6Address,
    mtype: int,
    rest: bytes,
    body: bytes,
    dst_mac: bytes,
    hop_limit: int = 255,
    code: int = 0,
    src_mac: bytes = GUEST_MAC,
) -> bytes:
    msg = build_icmp(src, dst, mtype, code, rest, body)
    packet = build_ip(src, dst, IPPROTO_ICMPV6, msg, hop_limit)
    return build_ethernet(dst_mac, src_mac, ETH_P_IPV6, packet)


def parse_icmp6_frame(frame: bytes) -> tuple[EthernetFrame, IpPacket, IcmpMessage]:
    eth = parse_ethernet_untrusted(frame)
    assert eth.ethertype == ETH_P_IPV6
    ip = parse_ipv6_untrusted(eth.payload)
    assert ip.proto == IPPROTO_ICMPV6
    return eth, ip, parse_icmp_untrusted(ip)


# --- ARP ---------------------------------------------------------------------------


def arp_request(
    spa: IPv4Address, tpa: IPv4Address, op: int = ARP_REQUEST, src_mac: bytes = GUEST_MAC
) -> tuple[EthernetFrame, ArpPacket]:
    arp = ArpPacket(op, src_mac, spa, b"\0" * 6, tpa)
    frame = build_ethernet(BROADCAST, src_mac, ETH_P_ARP, build_arp(arp))
    eth = parse_ethernet_untrusted(frame)
    return eth, parse_arp_untrusted(eth.payload)


@pytest.mark.parametrize("target", [GW4, IPv4Address("10.77.0.99"), IPv4Address("192.0.2.1")])
def test_arp_request_answered_with_ferry_mac(target: IPv4Address) -> None:
    eth, arp = arp_request(GUEST4, target)
    reply = answer_arp(LINK, eth, arp)
    assert reply is not None
    r_eth = parse_ethernet_untrusted(reply)
    assert (r_eth.dst, r_eth.src, r_eth.ethertype) == (GUEST_MAC, FERRY_MAC, ETH_P_ARP)
    r_arp = parse_arp_untrusted(r_eth.payload)
    assert r_arp == ArpPacket(ARP_REPLY, FERRY_MAC, target, GUEST_MAC, GUEST4)


def test_arp_probe_for_other_address_answered() -> None:
    """RFC 5227 probe (sender 0.0.0.0) for an address ferryd stands for: it is taken."""
    eth, arp = arp_request(ZERO4, GW4)
    reply = answer_arp(LINK, eth, arp)
    assert reply is not None
    r_arp = parse_arp_untrusted(parse_ethernet_untrusted(reply).payload)
    assert (r_arp.spa, r_arp.tpa, r_arp.tha) == (GW4, ZERO4, GUEST_MAC)


@pytest.mark.parametrize(
    ("spa", "tpa", "op"),
    [
        (ZERO4, GUEST4, ARP_REQUEST),  # DAD probe for the guest's own address
        (GUEST4, GUEST4, ARP_REQUEST),  # gratuitous announcement
        (GW4, GW4, ARP_REQUEST),  # someone else's announcement
        (IPv4Address("10.77.0.9"), GUEST4, ARP_REQUEST),  # the guest's own address
        (GUEST4, GW4, ARP_REPLY),  # not a request
        (GUEST4, GW4, 3),  # RARP
        (GUEST4, ZERO4, ARP_REQUEST),
    ],
)
def test_arp_not_answered(spa: IPv4Address, tpa: IPv4Address, op: int) -> None:
    eth, arp = arp_request(spa, tpa, op)
    assert answer_arp(LINK, eth, arp) is None


def test_arp_without_ipv4_not_answered() -> None:
    eth, arp = arp_request(GUEST4, GW4)
    assert answer_arp(LinkConfig(FERRY_MAC), eth, arp) is None


# --- DHCPv4 ------------------------------------------------------------------------


def dhcp_payload(
    mtype: int | None,
    xid: int = 0x12345678,
    flags: int = 0,
    ciaddr: IPv4Address = ZERO4,
    options: tuple[tuple[int, bytes], ...] = (),
    chaddr: bytes = GUEST_MAC,
    htype: int = 1,
    hlen: int = 6,
    op: int = 1,
    sname: bytes = b"",
    file: bytes = b"",
) -> bytes:
    fixed = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        op,
        htype,
        hlen,
        0,
        xid,
        3,
        flags,
        ciaddr.packed,
        bytes(4),
        bytes(4),
        bytes(4),
        chaddr,
        sname,
        file,
    )
    out = bytearray(fixed + dhcp.MAGIC_COOKIE)
    if mtype is not None:
        out += bytes((53, 1, mtype))
    for code, value in options:
        out += bytes((code, len(value))) + value
    out += b"\xff"
    return bytes(out)


def dhcp_frame(
    payload: bytes, src: IPv4Address = ZERO4, dst: IPv4Address = BCAST4, dst_mac: bytes = BROADCAST
) -> tuple[EthernetFrame, IpPacket, UdpDatagram]:
    return parse_udp_frame(udp_frame(GUEST_MAC, dst_mac, src, dst, 68, 67, payload))


def dhcp_exchange(
    payload: bytes, **kw: object
) -> tuple[EthernetFrame, IpPacket, UdpDatagram, dhcp.DhcpMessage] | None:
    reply = answer_dhcp_untrusted(LINK, *dhcp_frame(payload, **kw))  # type: ignore[arg-type]
    if reply is None:
        return None
    eth, ip, udp = parse_udp_frame(reply)
    assert (eth.src, ip.src, udp.sport, udp.dport) == (FERRY_MAC, GW4, 67, 68)
    assert len(udp.payload) >= dhcp.MIN_BOOTP_SIZE
    return eth, ip, udp, parse_dhcp_untrusted(udp.payload)


def check_config_options(msg: dhcp.DhcpMessage, lease: bool = True) -> None:
    assert msg.options[dhcp.OPT_SERVER_ID] == GW4.packed
    assert msg.options[dhcp.OPT_SUBNET_MASK] == IPv4Address("255.255.255.0").packed
    assert msg.options[dhcp.OPT_ROUTER] == GW4.packed
    assert msg.options[dhcp.OPT_DNS] == b"".join(a.packed for a in DNS4)
    assert msg.options[dhcp.OPT_MTU] == struct.pack("!H", 65520)
    if lease:
        assert msg.options[dhcp.OPT_LEASE_TIME] == b"\xff\xff\xff\xff"
    else:
        assert dhcp.OPT_LEASE_TIME not in msg.options


def test_dhcp_discover_gets_unicast_offer() -> None:
    got = dhcp_exchange(dhcp_payload(DhcpType.DISCOVER))
    assert got is not None
    eth, ip, _udp, msg = got
    assert (eth.dst, ip.dst) == (GUEST_MAC, GUEST4)
    assert msg.op == dhcp.BOOTREPLY and msg.xid == 0x12345678 and msg.chaddr == GUEST_MAC
    assert msg.message_type == DhcpType.OFFER
    assert (msg.yiaddr, msg.ciaddr, msg.giaddr) == (GUEST4, ZERO4, ZERO4)
    check_config_options(msg)


def test_dhcp_broadcast_flag_honoured() -> None:
    got = dhcp_exchange(dhcp_payload(DhcpType.DISCOVER, flags=dhcp.FLAG_BROADCAST))
    assert got is not None
    eth, ip, _udp, msg = got
    assert (eth.dst, ip.dst) == (BROADCAST, BCAST4)
    assert msg.flags == dhcp.FLAG_BROADCAST


def test_dhcp_request_selecting_acked() -> None:
    opts = ((dhcp.OPT_SERVER_ID, GW4.packed), (dhcp.OPT_REQUESTED_IP, GUEST4.packed))
    got = dhcp_exchange(dhcp_payload(DhcpType.REQUEST, options=opts))
    assert got is not None
    _eth, ip, _udp, msg = got
    assert msg.message_type == DhcpType.ACK and msg.yiaddr == GUEST4 and ip.dst == GUEST4
    check_config_options(msg)


@pytest.mark.parametrize(
    "opts",
    [
        ((dhcp.OPT_SERVER_ID, GW4.packed), (dhcp.OPT_REQUESTED_IP, b"\x0a\x4d\x00\x06")),
        ((dhcp.OPT_REQUESTED_IP, b"\x0a\x4d\x00\x06"),),  # INIT-REBOOT, wrong address
        ((dhcp.OPT_SERVER_ID, GW4.packed),),  # SELECTING without a requested address
    ],
)
def test_dhcp_request_for_other_address_nakked(opts: tuple[tuple[int, bytes], ...]) -> None:
    got = dhcp_exchange(dhcp_payload(DhcpType.REQUEST, options=opts))
    assert got is not None
    eth, ip, _udp, msg = got
    assert msg.message_type == DhcpType.NAK
    assert (eth.dst, ip.dst, msg.yiaddr) == (BROADCAST, BCAST4, ZERO4)
    assert set(msg.options) == {dhcp.OPT_MESSAGE_TYPE, dhcp.OPT_SERVER_ID}


def test_dhcp_init_reboot_and_renew_acked() -> None:
    got = dhcp_exchange(dhcp_payload(DhcpType.REQUEST, options=((50, GUEST4.packed),)))
    assert got is not None and got[3].message_type == DhcpType.ACK
    renew = dhcp_payload(DhcpType.REQUEST, ciaddr=GUEST4)
    got = dhcp_exchange(renew, src=GUEST4, dst=GW4, dst_mac=FERRY_MAC)
    assert got is not None
    eth, ip, _udp, msg = got
    assert msg.message_type == DhcpType.ACK and msg.ciaddr == GUEST4 and msg.yiaddr == GUEST4
    assert (eth.dst, ip.dst) == (GUEST_MAC, GUEST4)
    renew_other = dhcp_payload(DhcpType.REQUEST, ciaddr=IPv4Address("10.77.0.6"))
    got = dhcp_exchange(renew_other)
    assert got is not None and got[3].message_type == DhcpType.NAK


def test_dhcp_request_for_other_server_ignored() -> None:
    opts = ((dhcp.OPT_SERVER_ID, b"\x0a\x4d\x00\x02"), (dhcp.OPT_REQUESTED_IP, GUEST4.packed))
    assert dhcp_exchange(dhcp_payload(DhcpType.REQUEST, options=opts)) is None


def test_dhcp_inform_acked_without_address_or_lease() -> None:
    got = dhcp_exchange(dhcp_payload(DhcpType.INFORM, ciaddr=GUEST4), src=GUEST4)
    assert got is not None
    eth, ip, _udp, msg = got
    assert msg.message_type == DhcpType.ACK and msg.yiaddr == ZERO4 and msg.ciaddr == GUEST4
    assert (eth.dst, ip.dst) == (GUEST_MAC, GUEST4)
    check_config_options(msg, lease=False)


@pytest.mark.parametrize(
    "mtype",
    [
        DhcpType.RELEASE,
        DhcpType.DECLINE,
        DhcpType.OFFER,
        DhcpType.ACK,
        DhcpType.NAK,
        0,
        9,
        200,
        None,
    ],
)
def test_dhcp_silent(mtype: int | None) -> None:
    assert dhcp_exchange(dhcp_payload(mtype, ciaddr=GUEST4)) is None


@pytest.mark.parametrize(("op", "htype", "hlen"), [(2, 1, 6), (1, 6, 6), (1, 1, 16)])
def test_dhcp_non_ethernet_or_reply_ignored(op: int, htype: int, hlen: int) -> None:
    payload = dhcp_payload(DhcpType.DISCOVER, op=op, htype=htype, hlen=hlen)
    assert dhcp_exchange(payload) is None


def test_dhcp_without_ipv4_silent() -> None:
    frame = dhcp_frame(dhcp_payload(DhcpType.DISCOVER))
    assert answer_dhcp_untrusted(LinkConfig(FERRY_MAC), *frame) is None


def test_dhcp_option_overload_and_concatenation() -> None:
    """Options in ``file`` (RFC 2132 §9.3) and split options (RFC 3396) are found."""
    file = bytes((53, 1, DhcpType.DISCOVER, 12, 2)) + b"ab" + b"\xff"
    payload = dhcp_payload(None, options=((52, b"\x01"), (12, b"ho"), (12, b"st")), file=file)
    msg = parse_dhcp_untrusted(payload)
    assert msg.message_type == DhcpType.DISCOVER
    assert msg.options[12] == b"hostab"
    got = dhcp_exchange(payload)
    assert got is not None and got[3].message_type == DhcpType.OFFER


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        dhcp_payload(DhcpType.DISCOVER)[:239],
        dhcp_payload(DhcpType.DISCOVER)[:236] + b"\0\0\0\0\x35\x01\x01\xff",  # no cookie
        dhcp_payload(DhcpType.DISCOVER)[:240] + b"\x35",  # option truncated
        dhcp_payload(DhcpType.DISCOVER)[:240] + b"\x35\x05\x01",  # option past the end
        dhcp_payload(DhcpType.DISCOVER, hlen=17),
        dhcp_payload(DhcpType.DISCOVER, options=((52, b"\x04"),)),
        dhcp_payload(DhcpType.DISCOVER, options=((52, b"\x01"),), file=bytes(126) + b"\x35\x09"),
    ],
)
def test_dhcp_malformed(payload: bytes) -> None:
    with pytest.raises(MalformedPacket):
        answer_dhcp_untrusted(LINK, *dhcp_frame(payload))


def test_dhcp_without_end_option_accepted() -> None:
    payload = dhcp_payload(DhcpType.DISCOVER)[:-1]
    assert dhcp_exchange(payload) is not None


@fuzz
@given(st.binary(max_size=600))
def test_dhcp_random_input_only_malformed(data: bytes) -> None:
    for payload in (data, dhcp_payload(DhcpType.DISCOVER)[:240] + data):
        with contextlib.suppress(MalformedPacket):
            answer_dhcp_untrusted(LINK, *dhcp_frame(payload))


@fuzz
@given(st.data())
def test_dhcp_mutated_input_only_malformed(data: st.DataObject) -> None:
    base = bytearray(
        dhcp_payload(
            data.draw(st.sampled_from([1, 3, 8])),
            ciaddr=GUEST4,
            options=((50, GUEST4.packed), (54, GW4.packed), (55, b"\x01\x03\x06\x1a")),
        )
    )
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(base) - 1))
        base[pos] = data.draw(st.integers(0, 255))
    base = base[: data.draw(st.integers(0, len(base)))]
    with contextlib.suppress(MalformedPacket):
        answer_dhcp_untrusted(LINK, *dhcp_frame(bytes(base)))


# --- NDP ---------------------------------------------------------------------------


def solicited_node(addr: IPv6Address) -> IPv6Address:
    return IPv6Address(IPv6Address("ff02::1:ff00:0").packed[:13] + addr.packed[13:])


def ns_frame(
    target: IPv6Address,
    src: IPv6Address = GUEST_LL,
    sllao: bool = True,
    hop_limit: int = 255,
    code: int = 0,
) -> bytes:
    body = target.packed
    if sllao:
        body += bytes((1, 1)) + GUEST_MAC
    dst = solicited_node(target)
    mac = ndp.multicast_mac(dst)
    return icmp6_frame(src, dst, 135, bytes(4), body, mac, hop_limit, code)


def rs_frame(
    src: IPv6Address = GUEST_LL, sllao: bool = True, hop_limit: int = 255, code: int = 0
) -> bytes:
    body = bytes((1, 1)) + GUEST_MAC if sllao else b""
    mac = b"\x33\x33\x00\x00\x00\x02"
    return icmp6_frame(src, IPv6Address("ff02::2"), 133, bytes(4), body, mac, hop_limit, code)


def feed(responder: NdpResponder, frame: bytes, now: float) -> list[bytes]:
    return responder.receive_untrusted(*parse_icmp6_frame(frame), now)


def parse_options(body: bytes | memoryview) -> dict[int, bytes]:
    return dict(ndp.parse_ndp_options_untrusted(body))


def check_ra(frame: bytes, link: LinkConfig = LINK) -> dict[int, bytes]:
    eth, ip, icmp = parse_icmp6_frame(frame)
    assert (eth.dst, eth.src) == (ndp.ALL_NODES_MAC, FERRY_MAC)
    assert (ip.src, ip.dst, ip.ttl) == (GW6, ndp.ALL_NODES, 255)
    assert (icmp.type, icmp.code) == (134, 0)
    hop, flags, lifetime = struct.unpack("!BBH", icmp.rest)
    assert (hop, flags, lifetime) == (64, 0xC0, 1800)  # M and O
    assert struct.unpack_from("!II", icmp.body) == (0, 0)
    options = parse_options(icmp.body[8:])
    assert options[1] == FERRY_MAC
    return options


def test_ra_contents() -> None:
    options = check_ra(NdpResponder(LINK, 0.0).handle_timer(0.0)[0])
    assert struct.unpack("!HI", options[5]) == (0, 65520)
    plen, pflags, valid, preferred, _r, prefix = struct.unpack("!BBIII16s", options[3])
    assert (plen, pflags, valid, preferred) == (64, 0xC0, 86400, 14400)
    assert IPv6Address(prefix) == IPv6Address("2001:db8:77::")
    assert options[25] == struct.pack("!HI", 0, 1800) + DNS6[0].packed


def test_ra_non_64_prefix_not_autonomous_and_no_rdnss() -> None:
    link = LinkConfig(FERRY_MAC, 1500, ipv6=Ip6Config(IPv6Address("2001:db8:1:2::7"), 56, GW6))
    options = check_ra(NdpResponder(link, 0.0).handle_timer(0.0)[0], link)
    plen, pflags, *_rest, prefix = struct.unpack("!BBIII16s", options[3])
    assert (plen, pflags, IPv6Address(prefix)) == (56, 0x80, IPv6Address("2001:db8:1::"))
    assert 25 not in options
    assert struct.unpack("!HI", options[5]) == (0, 1500)


def test_ra_timers_with_explicit_time() -> None:
    r = NdpResponder(LINK, 100.0)
    assert r.next_timer() == 100.0
    assert r.handle_timer(99.9) == []
    assert len(r.handle_timer(100.0)) == 1
    assert r.next_timer() == 160.0
    assert r.handle_timer(150.0) == []
    # A solicitation right after an RA is delayed to the rate limit (RFC 4861 §6.2.6).
    assert feed(r, rs_frame(), 101.0) == []
    assert r.next_timer() == 103.0
    assert feed(r, rs_frame(), 102.0) == []  # still one pending answer
    assert r.next_timer() == 103.0
    assert len(r.handle_timer(103.0)) == 1
    assert r.next_timer() == 163.0
    assert r.handle_timer(103.5) == []
    # Long after: answered at once, and the periodic schedule restarts from it.
    answer = feed(r, rs_frame(src=UNSPEC6, sllao=False), 130.0)
    assert len(answer) == 1
    check_ra(answer[0])
    assert r.next_timer() == 190.0
    assert len(r.handle_timer(200.0)) == 1  # a late timer still sends
    assert r.next_timer() == 260.0


def test_no_ipv6_no_ra() -> None:
    r = NdpResponder(LinkConfig(FERRY_MAC), 0.0)
    assert r.next_timer() is None
    assert r.handle_timer(1000.0) == []
    assert feed(r, rs_frame(), 1.0) == []
    assert feed(r, ns_frame(GW6), 1.0) == []


@pytest.mark.parametrize("target", [GW6, IPv6Address("2001:db8:77::99"), IPv6Address("fe80::77")])
@pytest.mark.parametrize("sllao", [True, False])
def test_ns_answered(target: IPv6Address, sllao: bool) -> None:
    answers = feed(NdpResponder(LINK, 0.0), ns_frame(target, sllao=sllao), 1.0)
    assert len(answers) == 1
    eth, ip, icmp = parse_icmp6_frame(answers[0])
    assert (eth.dst, eth.src) == (GUEST_MAC, FERRY_MAC)
    assert (ip.src, ip.dst, ip.ttl) == (target, GUEST_LL, 255)
    assert (icmp.type, icmp.code) == (136, 0)
    assert icmp.rest == b"\xe0\0\0\0"  # R, S, O
    assert IPv6Address(bytes(icmp.body[:16])) == target
    assert parse_options(icmp.body[16:]) == {2: FERRY_MAC}


def test_ns_unicast_from_global_answered() -> None:
    frame = icmp6_frame(GUEST6, GW6, 135, bytes(4), GW6.packed, FERRY_MAC)
    answers = feed(NdpResponder(LINK, 0.0), frame, 1.0)
    assert len(answers) == 1
    _eth, ip, _icmp = parse_icmp6_frame(answers[0])
    assert (ip.src, ip.dst) == (GW6, GUEST6)


@pytest.mark.parametrize("target", [GUEST6, GW6, GUEST_LL])
def test_ns_dad_probe_not_answered(target: IPv6Address) -> None:
    assert feed(NdpResponder(LINK, 0.0), ns_frame(target, src=UNSPEC6, sllao=False), 1.0) == []


def test_ns_for_guest_address_not_answered() -> None:
    assert feed(NdpResponder(LINK, 0.0), ns_frame(GUEST6), 1.0) == []


@pytest.mark.parametrize(
    "frame",
    [
        ns_frame(GW6, hop_limit=64),
        ns_frame(GW6, code=1),
        ns_frame(IPv6Address("ff02::1")),
        ns_frame(GW6, src=UNSPEC6, sllao=True),
        icmp6_frame(UNSPEC6, GW6, 135, bytes(4), GW6.packed, FERRY_MAC),  # DAD not to a group
        icmp6_frame(GUEST_LL, GW6, 135, bytes(4), GW6.packed[:8], FERRY_MAC),  # short
        icmp6_frame(GUEST_LL, GW6, 135, bytes(4), GW6.packed + b"\x01\x00" + bytes(6), FERRY_MAC),
        icmp6_frame(GUEST_LL, GW6, 135, bytes(4), GW6.packed + b"\x01\x02" + bytes(6), FERRY_MAC),
        icmp6_frame(GUEST_LL, GW6, 135, bytes(4), GW6.packed + b"\x01", FERRY_MAC),
        rs_frame(hop_limit=1),
        rs_frame(code=3),
        rs_frame(src=UNSPEC6, sllao=True),
        icmp6_frame(GUEST_LL, IPv6Address("ff02::2"), 133, bytes(4), b"\x01\x00", FERRY_MAC),
    ],
)
def test_ndp_invalid(frame: bytes) -> None:
    with pytest.raises(MalformedPacket):
        feed(NdpResponder(LINK, 0.0), frame, 1.0)


def test_ndp_other_types_ignored() -> None:
    r = NdpResponder(LINK, 0.0)
    frame = icmp6_frame(GUEST_LL, GW6, 136, bytes(4), GW6.packed, FERRY_MAC)
    assert feed(r, frame, 1.0) == []


@fuzz
@given(st.data())
def test_ndp_hostile_input_only_malformed(data: st.DataObject) -> None:
    mtype = data.draw(st.sampled_from([133, 135]))
    src = data.draw(st.sampled_from([GUEST_LL, UNSPEC6, GUEST6, IPv6Address("ff02::1")]))
    dst = data.draw(st.sampled_from([GW6, IPv6Address("ff02::2"), solicited_node(GW6)]))
    body = data.draw(
        st.one_of(
            st.binary(max_size=80),
            st.builds(
                lambda t, o: t + o, st.binary(min_size=16, max_size=16), st.binary(max_size=40)
            ),
        )
    )
    frame = icmp6_frame(
        src,
        dst,
        mtype,
        data.draw(st.binary(min_size=4, max_size=4)),
        body,
        data.draw(st.sampled_from([FERRY_MAC, BROADCAST])),
        hop_limit=data.draw(st.sampled_from([255, 254, 0])),
        code=data.draw(st.sampled_from([0, 0, 1])),
    )
    with contextlib.suppress(MalformedPacket):
        feed(NdpResponder(LINK, 0.0), frame, data.draw(st.floats(0, 1e6)))


# --- DHCPv6 ------------------------------------------------------------------------

CLIENT_DUID = bytes.fromhex("000100012c7f6e4a525400123456")
SERVER_DUID = bytes.fromhex("00030001") + FERRY_MAC
ALL_DHCP = IPv6Address("ff02::1:2")


def v6opt(code: int, value: bytes = b"") -> bytes:
    return struct.pack("!HH", code, len(value)) + value


def ia_na(iaid: int = 7, *addresses: IPv6Address) -> bytes:
    subs = b"".join(v6opt(5, a.packed + bytes(8)) for a in addresses)
    return v6opt(3, struct.pack("!III", iaid, 0, 0) + subs)


def v6msg(mtype: int, *options: bytes, xid: int = 0xABCDEF) -> bytes:
    return bytes((mtype,)) + xid.to_bytes(3, "big") + b"".join(options)


def v6_exchange(
    payload: bytes, src: IPv6Address = GUEST_LL
) -> tuple[dhcpv6.Dhcpv6Message, dict[int, bytes]] | None:
    frame = udp_frame(GUEST_MAC, b"\x33\x33\x00\x01\x00\x02", src, ALL_DHCP, 546, 547, payload)
    reply = answer_dhcpv6_untrusted(LINK, *parse_udp_frame(frame))
    if reply is None:
        return None
    eth, ip, udp = parse_udp_frame(reply)
    assert (eth.dst, eth.src, ip.src, ip.dst) == (GUEST_MAC, FERRY_MAC, GW6, src)
    assert (udp.sport, udp.dport) == (547, 546)
    msg = parse_dhcpv6_untrusted(udp.payload)
    assert msg.xid == 0xABCDEF
    options = dict(msg.options)
    assert options[dhcpv6.OPT_SERVERID] == SERVER_DUID
    assert options[dhcpv6.OPT_CLIENTID] == CLIENT_DUID
    return msg, options


def assigned(ia_value: bytes) -> tuple[int, list[tuple[IPv6Address, int, int]]]:
    iaid, t1, t2 = struct.unpack_from("!III", ia_value)
    assert (t1, t2) == (0xFFFFFFFF, 0xFFFFFFFF)
    addrs = []
    for code, sub in dhcpv6.parse_dhcpv6_options_untrusted(ia_value[12:]):
        assert code == dhcpv6.OPT_IAADDR
        addr, pref, valid = struct.unpack("!16sII", sub)
        addrs.append((IPv6Address(addr), pref, valid))
    return iaid, addrs


CID = v6opt(1, CLIENT_DUID)
SID = v6opt(2, SERVER_DUID)
OTHER_SID = v6opt(2, bytes.fromhex("00030001") + bytes(6))
DNS_OPT = DNS6[0].packed


def test_dhcpv6_solicit_advertise() -> None:
    got = v6_exchange(v6msg(1, CID, ia_na(7), v6opt(6, b"\x00\x17"), v6opt(8, b"\0\0")))
    assert got is not None
    msg, options = got
    assert msg.msg_type == Dhcpv6Type.ADVERTISE
    assert assigned(options[dhcpv6.OPT_IA_NA]) == (7, [(GUEST6, 0xFFFFFFFF, 0xFFFFFFFF)])
    assert options[dhcpv6.OPT_DNS_SERVERS] == DNS_OPT
    assert options[dhcpv6.OPT_PREFERENCE] == b"\xff"
    assert dhcpv6.OPT_RAPID_COMMIT not in options


def test_dhcpv6_solicit_rapid_commit_reply() -> None:
    got = v6_exchange(v6msg(1, CID, v6opt(14), ia_na(9)))
    assert got is not None
    msg, options = got
    assert msg.msg_type == Dhcpv6Type.REPLY
    assert options[dhcpv6.OPT_RAPID_COMMIT] == b""
    assert assigned(options[dhcpv6.OPT_IA_NA])[1][0][0] == GUEST6


@pytest.mark.parametrize("mtype", [3, 5])
def test_dhcpv6_request_renew_reply(mtype: int) -> None:
    stale = IPv6Address("2001:db8:77::99")
    got = v6_exchange(v6msg(mtype, CID, SID, ia_na(7, GUEST6, stale)))
    assert got is not None
    msg, options = got
    assert msg.msg_type == Dhcpv6Type.REPLY
    assert assigned(options[dhcpv6.OPT_IA_NA]) == (
        7,
        [(GUEST6, 0xFFFFFFFF, 0xFFFFFFFF), (stale, 0, 0)],
    )


def test_dhcpv6_rebind_reply_answers_only_the_first_ia() -> None:
    got = v6_exchange(v6msg(6, CID, ia_na(1, GUEST6), ia_na(2)))
    assert got is not None
    msg, _options = got
    ias = [v for c, v in msg.options if c == dhcpv6.OPT_IA_NA]
    assert len(ias) == 1
    assert assigned(ias[0]) == (1, [(GUEST6, 0xFFFFFFFF, 0xFFFFFFFF)])


def test_dhcpv6_information_request() -> None:
    got = v6_exchange(v6msg(11, CID, v6opt(6, b"\x00\x17")))
    assert got is not None
    msg, options = got
    assert msg.msg_type == Dhcpv6Type.REPLY
    assert set(options) == {1, 2, 23}


@pytest.mark.parametrize(("addr", "status"), [(GUEST6, 0), (IPv6Address("2001:db8:1::5"), 4)])
def test_dhcpv6_confirm(addr: IPv6Address, status: int) -> None:
    got = v6_exchange(v6msg(4, CID, ia_na(7, addr)))
    assert got is not None
    assert got[1][dhcpv6.OPT_STATUS_CODE] == struct.pack("!H", status)


@pytest.mark.parametrize("mtype", [8, 9])
def test_dhcpv6_release_decline_success(mtype: int) -> None:
    got = v6_exchange(v6msg(mtype, CID, SID, ia_na(7, GUEST6)))
    assert got is not None
    assert got[1][dhcpv6.OPT_STATUS_CODE] == b"\x00\x00"


def test_dhcpv6_solicit_without_ia_na() -> None:
    got = v6_exchange(v6msg(1, CID))
    assert got is not None
    assert got[1][dhcpv6.OPT_STATUS_CODE][:2] == b"\x00\x02"


@pytest.mark.parametrize(
    "payload",
    [
        v6msg(1, CID, SID, ia_na()),  # Solicit with a server id
        v6msg(3, CID, OTHER_SID, ia_na()),  # Request for another server
        v6msg(3, CID, ia_na()),  # Request without server id
        v6msg(5, CID, OTHER_SID, ia_na()),
        v6msg(6, CID, SID, ia_na()),  # Rebind with a server id
        v6msg(11, OTHER_SID),  # Information-request for another server
        v6msg(1, ia_na()),  # no client id
        v6msg(4, CID, ia_na(7)),  # Confirm listing no address
        v6msg(2, CID, SID),  # server message types
        v6msg(7, CID, SID),
        v6msg(10, CID, SID),
        v6msg(99, CID),
        bytes((12, 0)) + bytes(32),  # Relay-forward
    ],
)
def test_dhcpv6_silent(payload: bytes) -> None:
    assert v6_exchange(payload) is None


def test_dhcpv6_silent_without_ipv6_or_from_unspecified() -> None:
    frame = udp_frame(GUEST_MAC, FERRY_MAC, GUEST_LL, ALL_DHCP, 546, 547, v6msg(1, CID, ia_na()))
    assert answer_dhcpv6_untrusted(LinkConfig(FERRY_MAC), *parse_udp_frame(frame)) is None
    assert v6_exchange(v6msg(1, CID, ia_na()), src=UNSPEC6) is None


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01\x00\x00",
        v6msg(1, CID)[:-1],
        v6msg(1, CID, b"\x00"),
        v6msg(1, CID, v6opt(3, b"\0" * 11)),
        v6msg(1, CID, v6opt(3, bytes(12) + v6opt(5, bytes(23)))),
        v6msg(1, CID, v6opt(3, bytes(12) + b"\x00\x05\x00\x30")),
    ],
)
def test_dhcpv6_malformed(payload: bytes) -> None:
    frame = udp_frame(GUEST_MAC, FERRY_MAC, GUEST_LL, ALL_DHCP, 546, 547, payload)
    with pytest.raises(MalformedPacket):
        answer_dhcpv6_untrusted(LINK, *parse_udp_frame(frame))


@fuzz
@given(st.data())
def test_dhcpv6_hostile_input_only_malformed(data: st.DataObject) -> None:
    pieces = [CID, SID, OTHER_SID, ia_na(1, GUEST6), ia_na(2), v6opt(14), v6opt(6, b"\0\x17")]
    chosen = data.draw(st.lists(st.sampled_from(pieces), max_size=5))
    payload = bytearray(v6msg(data.draw(st.integers(0, 255)), *chosen))
    for _ in range(data.draw(st.integers(0, 6))):
        pos = data.draw(st.integers(0, len(payload) - 1))
        payload[pos] = data.draw(st.integers(0, 255))
    payload = payload[: data.draw(st.integers(0, len(payload)))] + data.draw(st.binary(max_size=20))
    frame = udp_frame(GUEST_MAC, FERRY_MAC, GUEST_LL, ALL_DHCP, 546, 547, bytes(payload))
    with contextlib.suppress(MalformedPacket):
        answer_dhcpv6_untrusted(LINK, *parse_udp_frame(frame))
