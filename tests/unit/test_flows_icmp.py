"""ICMP echo flows through ping sockets on loopback, with a recording guest."""

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
import trio

from ferryd.flows.icmp import IcmpFlows
from ferryd.wire.icmp import build_icmp, echo_rest, parse_icmp_untrusted
from ferryd.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IpAddress, build_ip
from tests.unit.test_flows_helpers import (
    GUEST4,
    LINK,
    FakeGuest,
    destinations,
    echo_from_guest,
    gateway_of,
    guest_of,
    loopback_of,
    parse_ip,
)

VERSIONS = pytest.mark.parametrize("version", [4, 6])


@asynccontextmanager
async def icmp_flows(
    *, map_gateway: bool = True, limit: int = 1024
) -> AsyncIterator[tuple[IcmpFlows, FakeGuest]]:
    guest = FakeGuest()
    async with trio.open_nursery() as nursery:
        flows = IcmpFlows(
            guest, LINK, nursery, destinations=destinations(map_gateway=map_gateway), limit=limit
        )
        try:
            yield flows, guest
        finally:
            await flows.aclose()


def reply_fields(version: int, pkt_index: int, guest: FakeGuest) -> tuple[int, int, bytes]:
    pkt = guest.packets[pkt_index]
    assert pkt.proto == (IPPROTO_ICMP if version == 4 else IPPROTO_ICMPV6)
    icmp = parse_icmp_untrusted(pkt)  # checks the checksum
    assert (icmp.type, icmp.code) == ((0 if version == 4 else 129), 0)
    ident, seq = icmp.echo_id_seq
    return ident, seq, bytes(icmp.body)


@VERSIONS
async def test_echo_to_the_host_answered_with_the_guests_id(version: int) -> None:
    lo, me, gw = loopback_of(version), guest_of(version), gateway_of(version)
    async with icmp_flows() as (flows, guest):
        flows.from_guest(*echo_from_guest(me, gw, 0x1234, 7, b"ping payload"), trio.current_time())
        (pkt,) = await guest.wait_for(1)
        assert (pkt.src, pkt.dst) == (gw, me)
        assert reply_fields(version, 0, guest) == (0x1234, 7, b"ping payload")
        (snap,) = flows.snapshot()
        assert snap["proto"] == ("icmp" if version == 4 else "icmpv6")
        assert (snap["guest_addr"], snap["guest_port"]) == (str(me), 0x1234)
        assert (snap["remote_addr"], snap["remote_port"]) == (str(gw), 0)
        assert snap["host_addr"] == str(lo)
        assert snap["state"] == "echo"
        assert snap["bytes_from_guest"] == snap["bytes_to_guest"] == 8 + 12


@VERSIONS
async def test_sequence_of_echoes_shares_a_flow(version: int) -> None:
    gw, me = gateway_of(version), guest_of(version)
    async with icmp_flows() as (flows, guest):
        for seq in range(1, 21):
            flows.from_guest(*echo_from_guest(me, gw, 99, seq, b"%d" % seq), trio.current_time())
        await guest.wait_for(20)
        got = sorted(reply_fields(version, i, guest) for i in range(20))
        assert got == sorted((99, seq, b"%d" % seq) for seq in range(1, 21))
        assert len(flows.table) == 1


async def test_two_guest_ids_are_two_flows() -> None:
    async with icmp_flows() as (flows, guest):
        flows.from_guest(*echo_from_guest(GUEST4, gateway_of(4), 1, 1, b"a"), trio.current_time())
        flows.from_guest(*echo_from_guest(GUEST4, gateway_of(4), 2, 1, b"b"), trio.current_time())
        await guest.wait_for(2)
        got = {reply_fields(4, i, guest) for i in range(2)}
        assert got == {(1, 1, b"a"), (2, 1, b"b")}
        assert len(flows.table) == 2


@VERSIONS
async def test_echo_to_gateway_answered_by_the_host(version: int) -> None:
    gw, me = gateway_of(version), guest_of(version)
    async with icmp_flows(map_gateway=True) as (flows, guest):
        flows.from_guest(*echo_from_guest(me, gw, 0xBEEF, 3, b"gw"), trio.current_time())
        (pkt,) = await guest.wait_for(1)
        assert (pkt.src, pkt.dst) == (gw, me)
        assert reply_fields(version, 0, guest) == (0xBEEF, 3, b"gw")


@pytest.mark.parametrize(
    "dst",
    [
        GUEST4,
        IPv4Address("224.0.0.1"),
        IPv4Address("255.255.255.255"),
        IPv4Address("10.0.2.255"),
        IPv6Address("2001:db8::15"),
        IPv6Address("ff02::1"),
    ],
)
async def test_bad_destinations_dropped(dst: IpAddress) -> None:
    async with icmp_flows() as (flows, guest):
        flows.from_guest(
            *echo_from_guest(guest_of(dst.version), dst, 1, 1, b"x"), trio.current_time()
        )
        assert len(flows.table) == 0
        assert flows.drops["bad destination"] == 1
        assert guest.packets == []


async def test_only_echo_requests_are_taken() -> None:
    async with icmp_flows() as (flows, _guest):
        raw = build_icmp(GUEST4, gateway_of(4), 0, 0, echo_rest(1, 1), b"reply")
        ip = parse_ip(build_ip(GUEST4, gateway_of(4), IPPROTO_ICMP, raw))
        flows.from_guest(ip, parse_icmp_untrusted(ip), trio.current_time())
        assert len(flows.table) == 0
        assert flows.drops["not an echo request"] == 1


async def test_idle_expiry_with_explicit_time() -> None:
    async with icmp_flows() as (flows, guest):
        flows.from_guest(*echo_from_guest(GUEST4, gateway_of(4), 5, 1, b"x"), trio.current_time())
        await guest.wait_for(1)
        (flow,) = flows.table
        last = flow.last_activity
        flows.expire(last + 59.0)
        assert len(flows.table) == 1
        flows.expire(last + 61.0)
        assert len(flows.table) == 0
        flows.from_guest(*echo_from_guest(GUEST4, gateway_of(4), 5, 2, b"y"), trio.current_time())
        await guest.wait_for(2)
        assert reply_fields(4, 1, guest) == (5, 2, b"y")


async def test_flow_limit() -> None:
    async with icmp_flows(limit=2) as (flows, guest):
        for ident in (1, 2, 3):
            flows.from_guest(
                *echo_from_guest(GUEST4, gateway_of(4), ident, 1, b"x"), trio.current_time()
            )
        assert len(flows.table) == 2
        assert flows.drops["flow limit"] == 1
        await guest.wait_for(2)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_ping_sockets_need_no_privilege() -> None:
    """What IcmpFlows opens works for an ordinary user (ping_group_range)."""
    code = (
        "import os, socket\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()\n"
        "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6).close()\n"
        "try:\n"
        "    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n"
        "except PermissionError:\n"
        "    print('raw refused')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "raw refused\n"


@pytest.mark.parametrize("dst", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0"])
async def test_echo_to_the_host_itself_is_refused(dst: str) -> None:
    target = ip_address(dst)
    me, gw = guest_of(target.version), gateway_of(target.version)
    async with icmp_flows() as (flows, guest):
        flows.from_guest(*echo_from_guest(me, target, 1, 1, b"x"), trio.current_time())
        (pkt,) = await guest.wait_for(1)
        assert (pkt.src, pkt.dst) == (gw, me)
        icmp = parse_icmp_untrusted(pkt)
        assert (icmp.type, icmp.code) == ((3, 13) if target.version == 4 else (1, 1))
        assert len(flows.table) == 0
        assert flows.drops["refused"] == 1
