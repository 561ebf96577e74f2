"""UDP flows against real sockets on loopback, with a recording guest."""

import dataclasses
import errno
import logging
import re
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
import trio

from ferryd.flows.common import peer_as_seen_by_guest
from ferryd.flows.portspec import ForwardError, PortForward
from ferryd.flows.table import FlowKey
from ferryd.flows.udp import UdpFlows
from ferryd.wire.icmp import parse_icmp_untrusted
from ferryd.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP, IpAddress
from ferryd.wire.udp import parse_udp_untrusted
from tests.unit.test_flows_helpers import (
    GUEST4,
    LINK,
    FakeGuest,
    destinations,
    gateway_of,
    guest_of,
    loopback_of,
    udp_from_guest,
)

SO_RCVBUFFORCE = 33  # root may exceed net.core.rmem_max
VERSIONS = pytest.mark.parametrize("version", [4, 6])


@asynccontextmanager
async def udp_flows(
    *, map_gateway: bool = True, limit: int = 4096
) -> AsyncIterator[tuple[UdpFlows, FakeGuest]]:
    guest = FakeGuest()
    async with trio.open_nursery() as nursery:
        flows = UdpFlows(
            guest, LINK, nursery, destinations=destinations(map_gateway=map_gateway), limit=limit
        )
        try:
            yield flows, guest
        finally:
            await flows.aclose()


async def server(version: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(
        socket.AF_INET if version == 4 else socket.AF_INET6, socket.SOCK_DGRAM
    )
    await sock.bind((str(loopback_of(version)), 0))
    return sock


def port_of(sock: trio.socket.SocketType) -> int:
    port: int = sock.getsockname()[1]
    return port


async def echo(sock: trio.socket.SocketType, count: int) -> list[bytes]:
    """Answer ``count`` datagrams with their own payload; return them."""
    got = []
    for _ in range(count):
        data, addr = await sock.recvfrom(65536)
        got.append(data)
        await sock.sendto(data, addr)
    return got


def free_port_both_families() -> int:
    """A UDP port free on 0.0.0.0 and :: at the time of the call."""
    for _ in range(100):
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s6.bind(("::", 0))
            port: int = s6.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4:
                try:
                    s4.bind(("0.0.0.0", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no free port")


# ---------------------------------------------------------------------------
# outbound


@VERSIONS
async def test_datagram_to_loopback_server_and_reply(version: int) -> None:
    srv = await server(version)
    lo, me, gw = loopback_of(version), guest_of(version), gateway_of(version)
    async with udp_flows() as (flows, guest):
        flows.from_guest(
            *udp_from_guest(me, gw, 40000, port_of(srv), b"hello"), trio.current_time()
        )
        with trio.fail_after(10):
            data, addr = await srv.recvfrom(100)
        assert data == b"hello"
        await srv.sendto(b"world!", addr)
        (pkt,) = await guest.wait_for(1)
        assert (pkt.src, pkt.dst, pkt.proto) == (gw, me, IPPROTO_UDP)
        udp = parse_udp_untrusted(pkt)  # checks the checksum
        assert (udp.sport, udp.dport, bytes(udp.payload)) == (port_of(srv), 40000, b"world!")
        (snap,) = flows.snapshot()
        assert snap["proto"] == "udp"
        assert snap["guest_addr"] == str(me)
        assert snap["guest_port"] == 40000
        assert snap["remote_addr"] == str(gw)
        assert snap["remote_port"] == port_of(srv)
        assert snap["host_addr"] == str(lo)
        assert snap["host_port"] == addr[1]
        assert snap["state"] == "outbound"
        assert snap["bytes_from_guest"] == 5
        assert snap["bytes_to_guest"] == 6
    srv.close()


async def test_one_socket_per_guest_four_tuple() -> None:
    srv = await server(4)
    async with udp_flows() as (flows, _guest):
        for sport in (1000, 1000, 1001):
            flows.from_guest(
                *udp_from_guest(GUEST4, gateway_of(4), sport, port_of(srv), b"x"),
                trio.current_time(),
            )
        sources = set()
        with trio.fail_after(10):
            for _ in range(3):
                _data, addr = await srv.recvfrom(100)
                sources.add(addr)
        assert len(sources) == 2
        assert len(flows.table) == 2
    srv.close()


async def test_thousand_datagrams_all_accounted_for() -> None:
    srv = await server(4)
    srv.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    payloads = [b"datagram %d " % i + bytes([i % 256]) * (i % 300) for i in range(1000)]
    async with udp_flows() as (flows, guest), trio.open_nursery() as nursery:
        nursery.start_soon(echo, srv, 1000)
        for i, payload in enumerate(payloads):
            flows.from_guest(
                *udp_from_guest(GUEST4, gateway_of(4), 5555, port_of(srv), payload),
                trio.current_time(),
            )
            if i % 50 == 49:
                await trio.lowlevel.checkpoint()
        packets = await guest.wait_for(1000)
        assert flows.drops.total() == 0
        replies = [bytes(parse_udp_untrusted(p).payload) for p in packets]
        assert sorted(replies) == sorted(payloads)
        (snap,) = flows.snapshot()
        total = sum(map(len, payloads))
        assert snap["bytes_from_guest"] == snap["bytes_to_guest"] == total
    srv.close()


@VERSIONS
async def test_gateway_is_mapped_to_the_host(version: int) -> None:
    srv = await server(version)
    gw, me = gateway_of(version), guest_of(version)
    async with udp_flows(map_gateway=True) as (flows, guest):
        flows.from_guest(
            *udp_from_guest(me, gw, 4242, port_of(srv), b"to the gateway"), trio.current_time()
        )
        with trio.fail_after(10):
            data, addr = await srv.recvfrom(100)
        assert data == b"to the gateway"
        await srv.sendto(b"from the host", addr)
        (pkt,) = await guest.wait_for(1)
        udp = parse_udp_untrusted(pkt)
        assert (pkt.src, pkt.dst) == (gw, me)
        assert (udp.sport, udp.dport, bytes(udp.payload)) == (port_of(srv), 4242, b"from the host")
    srv.close()


async def test_gateway_not_mapped_when_disabled() -> None:
    async with udp_flows(map_gateway=False) as (flows, _guest):
        flows.from_guest(*udp_from_guest(GUEST4, gateway_of(4), 4242, 9, b"x"), trio.current_time())
        for flow in flows.table:
            assert flow.host_addr != loopback_of(4)


@pytest.mark.parametrize(
    "dst",
    [
        IPv4Address("224.0.0.251"),
        IPv4Address("255.255.255.255"),
        IPv4Address("10.0.2.255"),
        IPv6Address("ff02::fb"),
    ],
)
async def test_group_destinations_dropped(dst: IpAddress) -> None:
    src = GUEST4 if dst.version == 4 else guest_of(6)
    async with udp_flows() as (flows, _guest):
        flows.from_guest(*udp_from_guest(src, dst, 5353, 5353, b"query"), trio.current_time())
        assert len(flows.table) == 0
        assert flows.drops["multicast"] == 1


@VERSIONS
async def test_closed_port_gives_the_guest_port_unreachable(version: int) -> None:
    lo, me, gw = loopback_of(version), guest_of(version), gateway_of(version)
    with socket.socket(socket.AF_INET if version == 4 else socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind((str(lo), 0))
        closed: int = s.getsockname()[1]
    async with udp_flows() as (flows, guest):
        flows.from_guest(
            *udp_from_guest(me, gw, 33333, closed, b"anyone there?"), trio.current_time()
        )
        (pkt,) = await guest.wait_for(1)
        assert (pkt.src, pkt.dst) == (gw, me)
        icmp = parse_icmp_untrusted(pkt)  # checks the checksum
        quote = bytes(icmp.body)
        if version == 4:
            assert pkt.proto == IPPROTO_ICMP
            assert (icmp.type, icmp.code) == (3, 3)
            assert quote[0] == 0x45 and quote[9] == IPPROTO_UDP
            assert struct.unpack_from("!H", quote, 2)[0] == 20 + 8 + 13
            assert (ip_address(quote[12:16]), ip_address(quote[16:20])) == (me, gw)
            udp = quote[20:28]
        else:
            assert pkt.proto == IPPROTO_ICMPV6
            assert (icmp.type, icmp.code) == (1, 4)
            assert quote[0] >> 4 == 6 and quote[6] == IPPROTO_UDP
            assert struct.unpack_from("!H", quote, 4)[0] == 8 + 13
            assert (ip_address(quote[8:24]), ip_address(quote[24:40])) == (me, gw)
            udp = quote[40:48]
        sport, dport, length, _csum = struct.unpack("!HHHH", udp)
        assert (sport, dport, length) == (33333, closed, 8 + 13)
        # The flow survives the error and keeps working.
        assert len(flows.table) == 1
        flows.from_guest(*udp_from_guest(me, gw, 33333, closed, b"again"), trio.current_time())
        await guest.wait_for(2)
        assert flows.drops["port unreachable"] >= 2


async def test_unreachable_destination_is_counted_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A link-local destination without a scope cannot be connected to.
    async with udp_flows() as (flows, _guest):
        with caplog.at_level(logging.WARNING):
            flows.from_guest(
                *udp_from_guest(guest_of(6), IPv6Address("fe80::99"), 1, 2, b"x"),
                trio.current_time(),
            )
        assert len(flows.table) == 0
        assert flows.drops["connect"] == 1
        assert "cannot reach" in caplog.text


# ---------------------------------------------------------------------------
# housekeeping


async def test_idle_expiry_with_explicit_time() -> None:
    srv = await server(4)
    async with udp_flows() as (flows, _guest):
        flows.from_guest(
            *udp_from_guest(GUEST4, gateway_of(4), 1234, port_of(srv), b"x"), trio.current_time()
        )
        (flow,) = flows.table
        start = flow.last_activity
        flows.expire(start + 179.0)
        assert len(flows.table) == 1
        flows.expire(start + 181.0)
        assert len(flows.table) == 0
        assert flows.snapshot() == []
        # A new datagram opens a new flow.
        flows.from_guest(
            *udp_from_guest(GUEST4, gateway_of(4), 1234, port_of(srv), b"y"), trio.current_time()
        )
        assert len(flows.table) == 1
        with trio.fail_after(10):
            assert (await srv.recvfrom(10))[0] == b"x"
            assert (await srv.recvfrom(10))[0] == b"y"
    srv.close()


async def test_flow_limit(caplog: pytest.LogCaptureFixture) -> None:
    srv = await server(4)
    async with udp_flows(limit=3) as (flows, _guest):
        with caplog.at_level(logging.WARNING):
            for sport in range(1, 6):
                flows.from_guest(
                    *udp_from_guest(GUEST4, gateway_of(4), sport, port_of(srv), b"x"),
                    trio.current_time(),
                )
        assert len(flows.table) == 3
        assert flows.drops["flow limit"] == 2
        assert "flow table is full (3 flows)" in caplog.text
        # Existing flows still work.
        flows.from_guest(
            *udp_from_guest(GUEST4, gateway_of(4), 1, port_of(srv), b"x"), trio.current_time()
        )
        assert flows.drops["flow limit"] == 2
    srv.close()


async def test_aclose_closes_everything() -> None:
    srv = await server(4)
    async with udp_flows() as (flows, _guest):
        flows.from_guest(
            *udp_from_guest(GUEST4, gateway_of(4), 1, port_of(srv), b"x"), trio.current_time()
        )
        await flows.add_forward(PortForward(loopback_of(4), 0, 7))
        await flows.aclose()
        assert len(flows.table) == 0
        assert flows.listeners() == []
        flows.from_guest(
            *udp_from_guest(GUEST4, gateway_of(4), 2, port_of(srv), b"x"), trio.current_time()
        )
        assert len(flows.table) == 0
    srv.close()


# ---------------------------------------------------------------------------
# inbound forwarding


@VERSIONS
async def test_forward_from_peer_to_guest_and_back(version: int) -> None:
    lo, me, gw = loopback_of(version), guest_of(version), gateway_of(version)
    peer = await server(version)
    async with udp_flows() as (flows, guest):
        await flows.add_forward(PortForward(lo, 0, 5000))
        ((_fwd, addr, port),) = flows.listeners()
        assert addr == lo and port != 0
        await peer.sendto(b"request", (str(lo), port))
        (pkt,) = await guest.wait_for(1)
        udp = parse_udp_untrusted(pkt)
        # The peer is the host itself: the guest sees it as the gateway.
        assert (pkt.src, pkt.dst) == (gw, me)
        assert (udp.sport, udp.dport, bytes(udp.payload)) == (port_of(peer), 5000, b"request")
        (snap,) = flows.snapshot()
        assert snap["state"] == "inbound"
        assert (snap["host_addr"], snap["host_port"]) == (str(lo), port)

        flows.from_guest(
            *udp_from_guest(me, gw, 5000, port_of(peer), b"response"), trio.current_time()
        )
        with trio.fail_after(10):
            data, src = await peer.recvfrom(100)
        assert data == b"response"
        assert src[1] == port  # the reply comes from the port the peer sent to
        assert len(flows.table) == 1
        (snap,) = flows.snapshot()
        assert (snap["bytes_to_guest"], snap["bytes_from_guest"]) == (7, 8)
    peer.close()


async def test_forward_on_all_addresses_listens_on_both_families() -> None:
    port = free_port_both_families()
    async with udp_flows() as (flows, guest):
        await flows.add_forward(PortForward(None, port, 53))
        assert sorted(str(a) for _f, a, _p in flows.listeners()) == ["0.0.0.0", "::"]
        for count, version in enumerate((4, 6), 1):
            peer = await server(version)
            await peer.sendto(b"v%d" % version, (str(loopback_of(version)), port))
            pkt = (await guest.wait_for(count))[-1]
            assert (pkt.src, pkt.dst) == (gateway_of(version), guest_of(version))
            assert bytes(parse_udp_untrusted(pkt).payload) == b"v%d" % version
            peer.close()


def test_peers_on_the_host_are_shown_as_the_gateway() -> None:
    for version in (4, 6):
        me, gw = guest_of(version), gateway_of(version)
        assert peer_as_seen_by_guest(LINK, loopback_of(version), me) == gw
        assert peer_as_seen_by_guest(LINK, me, me) == gw  # the host's own address
    assert peer_as_seen_by_guest(LINK, IPv4Address("127.0.0.2"), GUEST4) == gateway_of(4)
    remote = IPv4Address("198.51.100.7")
    assert peer_as_seen_by_guest(LINK, remote, GUEST4) == remote
    no_v6 = dataclasses.replace(LINK, ipv6=None)
    assert peer_as_seen_by_guest(no_v6, loopback_of(6), guest_of(6)) is None


async def test_forward_on_a_busy_port_names_the_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        async with udp_flows() as (flows, _guest):
            with pytest.raises(ForwardError, match=f"127.0.0.1:{port}") as info:
                await flows.add_forward(PortForward(loopback_of(4), port, 53))
            assert isinstance(info.value.__cause__, OSError)
            assert info.value.__cause__.errno == errno.EADDRINUSE
            assert flows.listeners() == []


async def test_forward_on_a_foreign_address_fails() -> None:
    async with udp_flows() as (flows, _guest):
        with pytest.raises(ForwardError, match=re.escape("192.0.2.77:9999")):
            await flows.add_forward(PortForward(IPv4Address("192.0.2.77"), 9999, 53))


@pytest.mark.parametrize(
    "dst", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::", "10.0.2.15"]
)
async def test_datagrams_to_the_host_itself_are_refused(dst: str) -> None:
    """Answered as a router's filter would (ICMP type 3 code 13 / ICMPv6 type 1 code 1),
    with no socket opened: the host's loopback and its own addresses are not for the guest."""
    target = ip_address(dst)
    me, gw = guest_of(target.version), gateway_of(target.version)
    async with udp_flows() as (flows, guest):
        flows.from_guest(
            *udp_from_guest(me, target, 5000, 6379, b"FLUSHALL\r\n"), trio.current_time()
        )
        (pkt,) = await guest.wait_for(1)
        assert (pkt.src, pkt.dst) == (gw, me)
        icmp = parse_icmp_untrusted(pkt)
        assert (icmp.type, icmp.code) == ((3, 13) if target.version == 4 else (1, 1))
        assert len(flows.table) == 0
        assert flows.drops["refused"] == 1


async def test_an_adopted_socket_without_room_drops_its_flow() -> None:
    """A migration's socket handed over when the table is full: the flow is dropped
    and this reference closed (as a restore that cannot open it), nothing raised."""
    async with udp_flows(limit=1) as (flows, _guest):
        peer = await server(4)
        mine = []
        for guest_port in (40000, 40001):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(("127.0.0.1", port_of(peer)))
            key = FlowKey(IPPROTO_UDP, GUEST4, guest_port, gateway_of(4), port_of(peer))
            flows.adopt_outbound(key, sock, trio.current_time())
            mine.append(sock)
        assert flows.count() == 1
        assert mine[0].fileno() >= 0 and mine[1].fileno() < 0
        peer.close()
