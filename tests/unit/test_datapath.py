"""DataPath without root: start, the freeze, the handover, rebuild.

The frontend is an in-memory one (a fake is fine: DataPath only runs,
drains and hands over whatever implements ferryd.frontends.base.Frontend);
the stack behind it is the real one, so an ARP request from the guest is
answered, or not, by ferryd's own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ferryd.counters import Registry
from ferryd.datapath import DataPath
from ferryd.descriptors import DescriptorBudget
from ferryd.flows.portspec import PortForward
from ferryd.flows.tcp import PEEK_BUFFER
from ferryd.frontends.base import Frontend, FrontendCounters, OnBurstEnd, OnFrame
from ferryd.wire.arp import ARP_REPLY, ARP_REQUEST, ArpPacket, build_arp, parse_arp_untrusted
from ferryd.wire.ethernet import BROADCAST, ETH_P_ARP, build_ethernet, parse_ethernet_untrusted
from tests.unit.test_flows_helpers import GUEST4, GW4, LINK, destinations

GUEST_MAC = bytes.fromhex("525400123456")


def _arp_request() -> bytes:
    arp = ArpPacket(ARP_REQUEST, GUEST_MAC, GUEST4, b"\0" * 6, GW4)
    return build_ethernet(BROADCAST, GUEST_MAC, ETH_P_ARP, build_arp(arp))


class MemoryFrontend:
    """Frames queued in memory; ``attached`` stands for holding the guest's queue."""

    csum_offload = False

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self.sent: list[bytes] = []
        self.counters = FrontendCounters()
        self.attached = True
        self.readers = 0
        self._readable = trio.Event()

    def push(self, frame: bytes) -> None:
        """The guest sends a frame (it queues here, unread, until a reader takes it)."""
        if self.attached:
            self.queue.append(frame)
            self._readable.set()

    def send(self, frame: bytes) -> bool:
        self.sent.append(bytes(frame))
        self.counters.frames_out += 1
        return True

    def send_partial(
        self, parts: list[bytes | memoryview], csum_start: int, csum_offset: int
    ) -> bool:
        self.sent.append(b"".join(parts))
        self.counters.frames_out += 1
        return True

    def _deliver(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        while self.queue:
            self.counters.frames_in += 1
            on_frame(memoryview(self.queue.pop(0)), False)
        on_burst_end()

    async def run(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        self.readers += 1
        try:
            while True:
                self._deliver(on_frame, on_burst_end)
                self._readable = trio.Event()
                await self._readable.wait()
        finally:
            self.readers -= 1

    def drain(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        self._deliver(on_frame, on_burst_end)

    def hand_over(self) -> None:
        self.attached = False
        self.queue.clear()  # what a detached queue still held is dropped

    def take_over(self) -> None:
        self.attached = True

    def describe(self) -> dict[str, Any]:
        return {"kind": "memory"}

    def close(self) -> None:
        pass


def _arp_replies(frontend: MemoryFrontend) -> list[ArpPacket]:
    replies = []
    for frame in frontend.sent:
        eth = parse_ethernet_untrusted(frame)
        if eth.ethertype == ETH_P_ARP:
            replies.append(parse_arp_untrusted(eth.payload))
    return replies


@asynccontextmanager
async def data_path(
    *,
    tcp_forwards: Sequence[PortForward] = (),
    udp_forwards: Sequence[PortForward] = (),
) -> AsyncIterator[tuple[DataPath, MemoryFrontend]]:
    frontend = MemoryFrontend()
    conforms: Frontend = frontend  # the interface a new frontend implements
    dp = DataPath(
        conforms,
        LINK,
        destinations(),
        DescriptorBudget(100),
        10,
        trio.current_time(),
        Registry(),
        tcp_forwards=tcp_forwards,
        udp_forwards=udp_forwards,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(dp.run)
        try:
            yield dp, frontend
        finally:
            await dp.stop()
            nursery.cancel_scope.cancel()


async def test_frames_are_answered_only_while_started() -> None:
    async with data_path() as (dp, frontend):
        frontend.push(_arp_request())
        await trio.testing.wait_all_tasks_blocked()
        assert frontend.sent == []  # not started: the frame waits
        await dp.start()
        await trio.testing.wait_all_tasks_blocked()
        assert [a.op for a in _arp_replies(frontend)] == [ARP_REPLY]
        assert frontend.counters.frames_in == 1

        await dp.stop()  # the freeze
        assert frontend.readers == 0
        frontend.push(_arp_request())
        await trio.testing.wait_all_tasks_blocked()
        assert len(_arp_replies(frontend)) == 1  # nothing handled after stop()


async def test_hand_over_drains_what_was_queued_then_gives_the_guest_up() -> None:
    async with data_path() as (dp, frontend):
        await dp.start()
        await dp.stop()
        frontend.push(_arp_request())
        dp.hand_over(drain=True)
        assert len(_arp_replies(frontend)) == 1  # handled, not dropped
        assert not frontend.attached
        frontend.push(_arp_request())  # goes to the other ferryd now
        dp.take_over()
        await dp.start()  # a rollback
        await trio.testing.wait_all_tasks_blocked()
        assert frontend.readers == 1
        assert len(_arp_replies(frontend)) == 1


async def test_hand_over_without_drain_drops_the_queue() -> None:
    async with data_path() as (dp, frontend):
        frontend.push(_arp_request())
        dp.hand_over(drain=False)
        assert _arp_replies(frontend) == []
        assert not frontend.attached


async def test_rebuild_gives_a_fresh_stack_and_empty_tables() -> None:
    async with data_path() as (dp, _frontend):
        tcp, stack = dp.tcp, dp.stack
        dp.guest_mac = GUEST_MAC
        moved = dataclasses.replace(LINK, mtu=1400)
        dp.rebuild(moved, trio.current_time())
        assert dp.link == moved and dp.stack.link == moved
        assert dp.tcp is not tcp and dp.stack is not stack
        assert dp.stack.tcp is dp.tcp and dp.stack.udp is dp.udp and dp.stack.icmp is dp.icmp
        assert dp.stack.guest_mac is None
        assert len(dp.tcp.table) == len(dp.udp.table) == len(dp.icmp.table) == 0


async def test_rebuild_peeks_into_the_same_buffer() -> None:
    """A rebuild (a target's LOAD, which the guest waits for) zeroes no new MiB to peek
    into (flows/tcp.py, new_peek_buffer): it allocates far less than the buffer."""
    async with data_path() as (dp, _frontend):
        tracemalloc.start()
        try:
            dp.rebuild(LINK, trio.current_time())
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < PEEK_BUFFER // 4


def _open_epolls() -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd) == "anon_inode:[eventpoll]"
    return count


async def test_rebuild_closes_the_old_tables_reactor() -> None:
    """The replaced TCP table's epoll is closed, not left to the garbage collector."""
    async with data_path() as (dp, _frontend):
        await dp.start()  # the TCP reactor's epoll
        await dp.stop()
        old_tcp = dp.tcp  # kept alive: the garbage collector must not be what closes it
        before = _open_epolls()
        dp.rebuild(LINK, trio.current_time())
        assert _open_epolls() == before - 1
        assert dp.tcp is not old_tcp


async def test_rebuild_closes_the_old_tables_listeners() -> None:
    """A target started running bound its forwards; the stream's bind the same ports."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with data_path() as (dp, _frontend):
        await dp.tcp.add_forward(PortForward(IPv4Address("127.0.0.1"), port, 22))
        await dp.udp.add_forward(PortForward(IPv4Address("127.0.0.1"), port, 53))
        dp.rebuild(LINK, trio.current_time())
        await dp.tcp.add_forward(PortForward(IPv4Address("127.0.0.1"), port, 22))
        await dp.udp.add_forward(PortForward(IPv4Address("127.0.0.1"), port, 53))
        assert [f.host_port for f, _, _ in dp.tcp.listeners()] == [port]
        dp.tcp.close_listeners()
        dp.udp.close()


async def test_reset_is_the_data_path_as_started_forwards_bound_again() -> None:
    """A target that gave its migration up serves a new guest: its link, its forwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tcp_fwd = PortForward(IPv4Address("127.0.0.1"), port, 22)
    udp_fwd = PortForward(IPv4Address("127.0.0.1"), port, 53)
    async with data_path(tcp_forwards=[tcp_fwd], udp_forwards=[udp_fwd]) as (dp, _frontend):
        await dp.bind_forwards()
        dp.rebuild(dataclasses.replace(LINK, mtu=1400), trio.current_time())  # a stream's link
        assert dp.tcp.listeners() == [] and dp.udp.listeners() == []
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))  # the port is free: the rebuild closed it
        await dp.reset(trio.current_time())
        assert dp.link == LINK
        assert [f for f, _, _ in dp.tcp.listeners()] == [tcp_fwd]
        assert [f for f, _, _ in dp.udp.listeners()] == [udp_fwd]
        with socket.socket() as again, pytest.raises(OSError, match="in use"):
            again.bind(("127.0.0.1", port))
        dp.tcp.close_listeners()
        dp.udp.close()


async def test_reset_leaves_out_a_forward_whose_port_was_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tcp_fwd = PortForward(IPv4Address("127.0.0.1"), port, 22)
        async with data_path(tcp_forwards=[tcp_fwd]) as (dp, _frontend):
            await dp.reset(trio.current_time())  # logged, not raised
            assert dp.tcp.listeners() == [] and dp.link == LINK
