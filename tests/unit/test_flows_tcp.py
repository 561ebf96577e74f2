"""TcpFlows, the trio adapter around the TCP core, without root.

The remote is a real listener on 127.0.0.1 (reached through the gateway
address, ``--map-gw``); the guest is the reference TCP of
tests/unit/tcp_ref_guest.py behind an in-memory guest link. What is checked
is what the adapter owns: the flow table, opening and accepting host
sockets, the reactor (readiness, timers, re-arming), the deferred ACKs of a
burst, the RST for segments of no connection, holding a connection for a
pre-copy, and its counters. Every byte is compared at both ends.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from ferryd.flows import tcp
from ferryd.flows.portspec import PortForward
from ferryd.flows.table import FlowKey
from ferryd.flows.tcp import (
    BUSY_BURST,
    IDLE_SCAN_BATCH,
    IDLE_SCAN_INTERVAL,
    TcpCounters,
    TcpFlows,
    socket_of,
)
from ferryd.flows.tcp_conn import IDLE_TIMEOUT, INF, State, TcpConn
from ferryd.flows.tcp_seq import seq_add
from ferryd.wire.ip import IPPROTO_TCP, IpAddress, IpPacket
from ferryd.wire.tcp import ACK, NO_OPTIONS, RST, SYN, TcpSegment, parse_tcp_untrusted
from tests.unit.tcp_ref_guest import GState, RefGuest
from tests.unit.test_flows_helpers import GUEST4, GW4, LINK, destinations

GUEST_PORT = 40000
TIMEOUT = 20


class Link:
    """The guest link in memory: segments ferryd sends the guest, parsed, with a wake-up."""

    def __init__(self) -> None:
        self.segs: list[tuple[IpAddress, TcpSegment]] = []
        self.changed = trio.Event()

    def send_ip(
        self,
        src: IpAddress,
        dst: IpAddress,
        proto: int,
        l4: bytes,
        payload: bytes | memoryview = b"",
        csum_offset: int | None = None,
    ) -> bool:
        assert proto == IPPROTO_TCP and dst == GUEST4
        packet = IpPacket(4, src, dst, proto, 64, memoryview(bytes(l4) + bytes(payload)))
        self.segs.append((src, parse_tcp_untrusted(packet, verify_checksum=False)))
        self.changed.set()
        return True

    def guest_address(self, version: int) -> IpAddress | None:
        return GUEST4 if version == 4 else None

    def take(self) -> list[tuple[IpAddress, TcpSegment]]:
        segs, self.segs = self.segs, []
        self.changed = trio.Event()
        return segs


def from_guest(src_ip: IpAddress, dst_ip: IpAddress) -> IpPacket:
    return IpPacket(4, src_ip, dst_ip, IPPROTO_TCP, 64, memoryview(b""))


async def pump(
    flows: TcpFlows, link: Link, guest: RefGuest, peer_ip: IpAddress, done: Callable[[], bool]
) -> None:
    """Carry segments between the guest's TCP and TcpFlows until ``done()``."""
    ip = from_guest(GUEST4, peer_ip)
    with trio.fail_after(TIMEOUT):
        while not done():
            now = trio.current_time()
            for _src, seg in link.take():
                guest.receive(seg, now)
            guest.on_timer(now)
            guest.send(now)
            segs = guest.take()
            for seg in segs:
                flows.from_guest(ip, seg, now)
            if segs:
                flows.flush(now)  # the frontend's queue ran dry
                continue
            if done():
                break
            with trio.move_on_at(guest.timer):
                await link.changed.wait()


@asynccontextmanager
async def tcp_flows() -> AsyncIterator[tuple[TcpFlows, Link]]:
    link = Link()
    async with trio.open_nursery() as nursery:
        flows = TcpFlows(link, LINK, nursery, destinations=destinations())
        flows.attach(nursery)
        try:
            yield flows, link
        finally:
            flows.close(trio.current_time())
            nursery.cancel_scope.cancel()


async def peer_exchange(sock: trio.socket.SocketType, down: bytes, got: bytearray) -> None:
    """The host's peer: sends ``down`` then its FIN, and reads until the guest's FIN."""

    async def send() -> None:
        view = memoryview(down)
        while view:
            n = await sock.send(view[: 1 << 16])
            view = view[n:]
        sock.shutdown(socket.SHUT_WR)

    async def receive() -> None:
        while data := await sock.recv(1 << 16):
            got.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)


def _no_flows(flows: TcpFlows) -> bool:
    return len(flows.table) == 0


async def _loopback_listener() -> tuple[trio.socket.SocketType, int]:
    """A listening socket on 127.0.0.1 (the peer's side; the test closes it) and its port."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener, listener.getsockname()[1]


async def test_outbound_connection_carries_both_directions() -> None:
    up, down = random.Random(1).randbytes(600_000), random.Random(2).randbytes(900_000)
    listener, port = await _loopback_listener()
    got = bytearray()
    async with tcp_flows() as (flows, link):
        guest = RefGuest(7, up, ports=(GUEST_PORT, port))
        syn = guest.connect(trio.current_time())
        flows.from_guest(from_guest(GUEST4, GW4), syn, trio.current_time())
        flows.flush(trio.current_time())
        peer, _ = await listener.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer_exchange, peer, down, got)
            await pump(flows, link, guest, GW4, lambda: guest.fin_received and _no_flows(flows))
        assert bytes(got) == up
        assert bytes(guest.received) == down
        assert guest.state is GState.ESTABLISHED  # closed by FINs, not reset
        peer.close()
    listener.close()


async def test_inbound_forward_opens_towards_the_guest() -> None:
    up, down = random.Random(3).randbytes(300_000), random.Random(4).randbytes(200_000)
    got = bytearray()
    async with tcp_flows() as (flows, link):
        await flows.add_forward(PortForward(None, 0, 8080))
        ((_fwd, _addr, port),) = [lst for lst in flows.listeners() if lst[1].version == 4]
        peer = trio.socket.socket()
        await peer.connect(("127.0.0.1", port))
        with trio.fail_after(TIMEOUT):
            while not link.segs:
                await link.changed.wait()
        src, syn = link.segs[0]
        assert syn.flags == SYN and syn.dport == 8080
        guest = RefGuest(99, up, ports=(8080, syn.sport))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer_exchange, peer, down, got)
            await pump(flows, link, guest, src, lambda: guest.fin_received and _no_flows(flows))
        assert bytes(got) == up
        assert bytes(guest.received) == down
        peer.close()


async def test_segment_of_no_connection_gets_a_rst_and_is_counted() -> None:
    async with tcp_flows() as (flows, link):
        seg = TcpSegment(GUEST_PORT, 9, 1000, 5555, ACK, 100, NO_OPTIONS, memoryview(b"x"))
        flows.from_guest(from_guest(GUEST4, GW4), seg, trio.current_time())
        ((_src, rst),) = link.take()
        assert rst.flags == RST and rst.seq == 5555  # RFC 9293 §3.10.7.1: seq from the ACK
        assert flows.counters == TcpCounters(resets_sent=1, held_drops=0)
        # A RST is never answered.
        seg = TcpSegment(GUEST_PORT, 9, 1000, 0, RST, 0, NO_OPTIONS, memoryview(b""))
        flows.from_guest(from_guest(GUEST4, GW4), seg, trio.current_time())
        assert not link.take()
        assert flows.counters == TcpCounters(resets_sent=1, held_drops=0)


async def _established(
    flows: TcpFlows, link: Link, listener: trio.socket.SocketType, guest: RefGuest
) -> tuple[TcpConn, trio.socket.SocketType]:
    flows.from_guest(from_guest(GUEST4, GW4), guest.connect(trio.current_time()), 0.0)
    flows.flush(trio.current_time())
    peer, _ = await listener.accept()
    await pump(flows, link, guest, GW4, lambda: guest.state is GState.ESTABLISHED)
    (flow,) = flows.table
    return flow.handle, peer


async def test_held_connection_drops_guest_segments_and_resets_at_release() -> None:
    listener, port = await _loopback_listener()
    async with tcp_flows() as (flows, link):
        guest = RefGuest(11, b"", ports=(GUEST_PORT, port), close=False)
        conn, peer = await _established(flows, link, listener, guest)
        assert conn.state is State.ESTABLISHED
        flows.hold([conn])
        guest.data = b"held back"  # the guest's application writes
        guest.send(trio.current_time())
        (data,) = guest.take()
        flows.from_guest(from_guest(GUEST4, GW4), data, trio.current_time())
        flows.flush(trio.current_time())
        assert flows.counters == TcpCounters(resets_sent=0, held_drops=1, flows=1, opened=1)
        assert not link.take()  # not acknowledged: the guest sends it again
        rst = TcpSegment(GUEST_PORT, port, guest.snd_nxt, 0, RST, 0, NO_OPTIONS, memoryview(b""))
        flows.from_guest(from_guest(GUEST4, GW4), rst, trio.current_time())
        assert flows.counters == TcpCounters(resets_sent=0, held_drops=2, flows=1, opened=1)
        assert len(flows.table) == 1  # carried out at release()
        flows.release([conn], trio.current_time())
        assert _no_flows(flows)
        assert (flows.counters.flows, flows.counters.opened, flows.counters.closed) == (0, 1, 1)
        # Aborted (SO_LINGER {1, 0}): the peer sees a reset, not the held bytes.
        with trio.fail_after(TIMEOUT), pytest.raises(ConnectionResetError):
            await peer.recv(100)
        assert socket_of(conn).fileno() < 0
        peer.close()
    listener.close()


async def test_an_idle_connection_is_reset_by_the_idle_scan_not_a_timer() -> None:
    listener, port = await _loopback_listener()
    async with tcp_flows() as (flows, link):
        guest = RefGuest(13, b"", ports=(GUEST_PORT, port), close=False)
        conn, peer = await _established(flows, link, listener, guest)
        assert conn.deadline() == INF  # no timer of its own while idle
        limit = conn.flow.last_activity + IDLE_TIMEOUT
        link.take()
        flows.expire(limit - 1.0)  # scans: not yet idle for long enough
        flows.expire(limit)  # within the scan interval: no scan
        assert len(flows.table) == 1 and not link.take()
        flows.expire(limit - 1.0 + IDLE_SCAN_INTERVAL)
        assert _no_flows(flows)
        assert [seg.flags & RST for _src, seg in link.take()] == [RST]
        with trio.fail_after(TIMEOUT), pytest.raises(ConnectionResetError):
            await peer.recv(100)
        peer.close()
    listener.close()


def test_the_idle_scan_looks_at_a_batch_of_connections_a_call() -> None:
    flows = TcpFlows(Link(), LINK, None, destinations=destinations())
    looked: list[float] = []

    class Idle:
        def idle_expired(self, now: float) -> bool:
            looked.append(now)
            return False

    for port in range(IDLE_SCAN_BATCH + 10):
        key = FlowKey(IPPROTO_TCP, GUEST4, port, GW4, 80)
        flows.table.add(key, Idle(), 0.0, state="established")  # type: ignore[arg-type]
    flows.expire(1.0)
    assert len(looked) == IDLE_SCAN_BATCH
    flows.expire(2.0)
    assert len(looked) == IDLE_SCAN_BATCH + 10
    flows.expire(3.0)  # the next scan waits for its interval
    assert len(looked) == IDLE_SCAN_BATCH + 10
    flows.expire(1.0 + IDLE_SCAN_INTERVAL)
    assert len(looked) == 2 * IDLE_SCAN_BATCH + 10


async def test_connect_refused_resets_the_guest() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connect() is refused
        async with tcp_flows() as (flows, link):
            guest = RefGuest(5, b"", ports=(GUEST_PORT, port))
            flows.from_guest(from_guest(GUEST4, GW4), guest.connect(0.0), trio.current_time())
            flows.flush(trio.current_time())
            key = FlowKey(IPPROTO_TCP, GUEST4, GUEST_PORT, GW4, port)
            assert key in flows.table
            await pump(flows, link, guest, GW4, lambda: guest.state is GState.RESET)
            assert _no_flows(flows)


async def test_a_burst_of_guest_segments_gets_one_ack_at_its_end() -> None:
    listener, port = await _loopback_listener()
    async with tcp_flows() as (flows, link):
        guest = RefGuest(21, b"", ports=(GUEST_PORT, port), close=False, mss=1000)
        _conn, peer = await _established(flows, link, listener, guest)
        guest.data = bytes(3000)
        guest.send(trio.current_time())
        burst = guest.take()
        assert len(burst) == 3
        for seg in burst:
            flows.from_guest(from_guest(GUEST4, GW4), seg, trio.current_time())
        assert not link.take()  # nothing yet: the burst is not over
        flows.flush(trio.current_time())  # the frontend's queue ran dry
        ((_src, ack),) = link.take()
        assert ack.flags == ACK and ack.ack == guest.snd_nxt  # all three, at once
        with trio.fail_after(TIMEOUT):
            got = b""
            while len(got) < 3000:
                got += await peer.recv(4000)
        assert got == bytes(3000)
        peer.close()
    listener.close()


async def test_the_flow_list_shows_the_host_sockets_own_address() -> None:
    # Not kept per flow: asked of the socket when listed, and what the peer sees.
    listener, port = await _loopback_listener()
    async with tcp_flows() as (flows, link):
        guest = RefGuest(17, b"", ports=(GUEST_PORT, port), close=False)
        conn, peer = await _established(flows, link, listener, guest)
        seen_by_peer = peer.getpeername()
        (entry,) = flows.snapshot()
        assert (entry["host_addr"], entry["host_port"]) == (seen_by_peer[0], seen_by_peer[1])
        assert entry["state"] == "established" and entry["guest_port"] == GUEST_PORT
        assert conn.state is State.ESTABLISHED
        peer.close()
    listener.close()


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view[: 1 << 16]) :]


async def test_while_the_guest_uploads_its_bursts_bound_what_the_pushes_send(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy burst of the guest's frames (BUSY_BURST payload bytes or more) gives
    the pushes a credit of its payload and PUSH_QUANTUM: until the guest's next
    burst they send no more than that, however much the socket holds and however
    many reactor rounds pass; a burst that is not busy lifts the bound, and every
    byte still arrives once, in order. (A smaller quantum, so that the credit
    stays below what the socket's receive queue holds unacknowledged.)"""
    monkeypatch.setattr(tcp, "PUSH_QUANTUM", 1 << 15)
    up, down = random.Random(5).randbytes(70_000), random.Random(6).randbytes(1_000_000)
    listener, port = await _loopback_listener()
    got = bytearray()
    async with tcp_flows() as (flows, link):
        guest = RefGuest(25, b"", ports=(GUEST_PORT, port), close=False)
        conn, peer = await _established(flows, link, listener, guest)
        # Buffers that let the guest upload 70 KB in one window, and hold more
        # than the credit for the guest.
        host = socket_of(conn)
        host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        guest.data = b"."
        acked = seq_add(guest.snd_una, 1)
        await pump(flows, link, guest, GW4, lambda: guest.snd_una == acked)
        assert guest.snd_wnd >= len(up)
        guest.data = b"." + up  # (what it sent before, then the upload)
        guest.send(trio.current_time())
        burst = guest.take()
        assert sum(len(s.payload) for s in burst) == len(up) >= BUSY_BURST
        for seg in burst:
            flows.from_guest(from_guest(GUEST4, GW4), seg, trio.current_time())
        flows.flush(trio.current_time())
        credit = len(up) + tcp.PUSH_QUANTUM
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_all, peer, down)
            with trio.fail_after(TIMEOUT):
                while conn.data_flight < credit:
                    await link.changed.wait()
                    for _src, seg in link.take():
                        guest.receive(seg, trio.current_time())
            # Until nothing runs: the peer blocked on a full socket, the reactor
            # waiting on its epoll, the connection not among what it waits for.
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            for _src, seg in link.take():
                guest.receive(seg, trio.current_time())
            assert conn.data_flight == credit  # spent to the byte, not a segment more
            assert conn.push_due and not conn.reading()  # waits for the next burst
            # The guest's ACKs alone are not a busy burst: the download goes on.
            await pump(flows, link, guest, GW4, lambda: len(guest.received) == len(down))
        assert bytes(guest.received) == down
        with trio.fail_after(TIMEOUT):
            while len(got) < len(up) + 1:
                got.extend(await peer.recv(1 << 16))
        assert bytes(got) == b"." + up
        peer.close()
    listener.close()
