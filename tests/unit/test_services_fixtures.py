"""Frames captured from real clients, replayed through the services.

The captures (fixtures/real_client_frames.txt) come from
tests/integration/test_services_real_clients.py: busybox udhcpc and arping,
ISC dhclient -6 and Linux's own router solicitation, DAD and neighbour
solicitation. Here they run without root or namespaces, and also seed the
hostile-input tests: real frames, mutated.
"""

import contextlib
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferryd.link import Ip4Config, Ip6Config, LinkConfig
from ferryd.services.arp import answer_arp
from ferryd.services.dhcp import DhcpType, answer_dhcp_untrusted, parse_dhcp_untrusted
from ferryd.services.dhcpv6 import answer_dhcpv6_untrusted, parse_dhcpv6_untrusted
from ferryd.services.ndp import NdpResponder
from ferryd.wire.arp import parse_arp_untrusted
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ethernet import ETH_P_ARP, ETH_P_IP, build_ethernet, parse_ethernet_untrusted
from ferryd.wire.icmp import build_icmp, parse_icmp_untrusted
from ferryd.wire.ip import (
    IPPROTO_ICMPV6,
    IPPROTO_UDP,
    build_ip,
    parse_ipv4_untrusted,
    parse_ipv6_untrusted,
)
from ferryd.wire.udp import build_udp, parse_udp_untrusted

FIXTURES = Path(__file__).parent / "fixtures" / "real_client_frames.txt"
FERRY_MAC = bytes.fromhex("9a55e0000001")
LINK = LinkConfig(
    mac=FERRY_MAC,
    mtu=9000,
    ipv4=Ip4Config(
        IPv4Address("10.77.0.5"), 24, IPv4Address("10.77.0.1"), (IPv4Address("10.77.0.53"),)
    ),
    ipv6=Ip6Config(
        IPv6Address("2001:db8:77::5"), 64, IPv6Address("fe80::1"), (IPv6Address("2001:db8:77::53"),)
    ),
)


def load() -> list[tuple[str, str, bool, bytes]]:
    rows = []
    for line in FIXTURES.read_text().splitlines():
        if line and not line.startswith("#"):
            name, service, answered, frame = line.split()
            rows.append((name, service, answered == "1", bytes.fromhex(frame)))
    return rows


CAPTURES = load()


def dispatch_untrusted(frame: bytes, ndp: NdpResponder, now: float) -> tuple[str, list[bytes]]:
    """The stack's routing of guest frames to the services."""
    eth = parse_ethernet_untrusted(frame)
    if eth.ethertype == ETH_P_ARP:
        answer = answer_arp(LINK, eth, parse_arp_untrusted(eth.payload))
        return "arp", [answer] if answer else []
    ip = (parse_ipv4_untrusted if eth.ethertype == ETH_P_IP else parse_ipv6_untrusted)(eth.payload)
    if ip.proto == IPPROTO_UDP:
        udp = parse_udp_untrusted(ip)
        if ip.version == 4 and udp.dport == 67:
            answer = answer_dhcp_untrusted(LINK, eth, ip, udp)
            return "dhcp", [answer] if answer else []
        if ip.version == 6 and udp.dport == 547:
            answer = answer_dhcpv6_untrusted(LINK, eth, ip, udp)
            return "dhcpv6", [answer] if answer else []
    if ip.proto == IPPROTO_ICMPV6:
        icmp = parse_icmp_untrusted(ip)
        if icmp.type in (133, 135):
            return ("rs" if icmp.type == 133 else "ns"), ndp.receive_untrusted(eth, ip, icmp, now)
    return "other", []


def test_fixtures_cover_every_service() -> None:
    assert {service for _n, service, _a, _f in CAPTURES} == {"arp", "dhcp", "dhcpv6", "rs", "ns"}


@pytest.mark.parametrize(("name", "service", "answered", "frame"), CAPTURES, ids=lambda v: v)
def test_real_frame_replayed(name: str, service: str, answered: bool, frame: bytes) -> None:
    ndp = NdpResponder(LINK, 0.0)
    kind, answers = dispatch_untrusted(frame, ndp, 100.0)
    assert kind == service
    assert bool(answers) == answered, name
    client_mac = frame[6:12]
    for answer in answers:
        eth = parse_ethernet_untrusted(answer)
        assert eth.src == FERRY_MAC
        assert eth.dst in (client_mac, b"\xff" * 6, b"\x33\x33\x00\x00\x00\x01")


def test_real_udhcpc_exchange() -> None:
    by_name = {name: frame for name, _s, _a, frame in CAPTURES}
    expected = {"udhcpc-discover": DhcpType.OFFER, "udhcpc-request": DhcpType.ACK}
    for name, mtype in expected.items():
        (answer,) = dispatch_untrusted(by_name[name], NdpResponder(LINK, 0.0), 0.0)[1]
        ip = parse_ipv4_untrusted(parse_ethernet_untrusted(answer).payload)
        reply = parse_dhcp_untrusted(parse_udp_untrusted(ip).payload)
        assert reply.message_type == mtype
        assert reply.yiaddr == IPv4Address("10.77.0.5")


def test_real_dhclient6_exchange() -> None:
    by_name = {name: frame for name, _s, _a, frame in CAPTURES}
    for name, reply_type in (("dhclient6-solicit", 2), ("dhclient6-request", 7)):
        (answer,) = dispatch_untrusted(by_name[name], NdpResponder(LINK, 0.0), 0.0)[1]
        ip = parse_ipv6_untrusted(parse_ethernet_untrusted(answer).payload)
        assert parse_dhcpv6_untrusted(parse_udp_untrusted(ip).payload).msg_type == reply_type


def reframe(frame: bytes, payload: bytes) -> bytes:
    """``frame`` with its UDP or ICMPv6 payload replaced, every checksum recomputed."""
    eth = parse_ethernet_untrusted(frame)
    if eth.ethertype == ETH_P_ARP:
        return frame[:14] + payload
    ip = (parse_ipv4_untrusted if eth.ethertype == ETH_P_IP else parse_ipv6_untrusted)(eth.payload)
    if ip.proto == IPPROTO_UDP:
        udp = parse_udp_untrusted(ip)
        upper = build_udp(ip.src, ip.dst, udp.sport, udp.dport, payload)
    else:
        icmp = parse_icmp_untrusted(ip)
        upper = build_icmp(
            ip.src, ip.dst, icmp.type, icmp.code, payload[:4].ljust(4, b"\0"), payload[4:]
        )
    packet = build_ip(ip.src, ip.dst, ip.proto, upper, ip.ttl)
    return build_ethernet(eth.dst, eth.src, eth.ethertype, packet)


def service_payload(frame: bytes) -> bytes:
    """The bytes the service itself parses (ARP packet, UDP payload, ICMPv6 rest+body)."""
    eth = parse_ethernet_untrusted(frame)
    if eth.ethertype == ETH_P_ARP:
        return bytes(eth.payload)
    ip = (parse_ipv4_untrusted if eth.ethertype == ETH_P_IP else parse_ipv6_untrusted)(eth.payload)
    if ip.proto == IPPROTO_UDP:
        return bytes(parse_udp_untrusted(ip).payload)
    icmp = parse_icmp_untrusted(ip)
    return icmp.rest + bytes(icmp.body)


def test_reframe_keeps_meaning() -> None:
    """Rebuilt unmutated (only IPv4 flags may differ), a capture gets the same answer."""
    for _name, service, answered, frame in CAPTURES:
        rebuilt = reframe(frame, service_payload(frame))
        kind, answers = dispatch_untrusted(rebuilt, NdpResponder(LINK, 0.0), 100.0)
        assert (kind, bool(answers)) == (service, answered)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CAPTURES), st.data())
def test_mutated_real_frames_only_malformed(
    capture: tuple[str, str, bool, bytes], data: st.DataObject
) -> None:
    """Mutate what the service parses and fix the checksums, so the mutation reaches it."""
    payload = bytearray(service_payload(capture[3]))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(payload) - 1))
        payload[pos] = data.draw(st.integers(0, 255))
    payload = payload[: data.draw(st.integers(0, len(payload)))]
    payload += data.draw(st.binary(max_size=16))
    frame = reframe(capture[3], bytes(payload))
    with contextlib.suppress(MalformedPacket):
        dispatch_untrusted(frame, NdpResponder(LINK, 0.0), data.draw(st.floats(0, 1e4)))
