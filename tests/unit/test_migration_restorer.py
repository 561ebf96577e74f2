"""Restorer without root: TCP connections restored, resynchronised, discarded.

Without CAP_NET_ADMIN no socket ever enters repair mode, so the kernel's
side (ferryd.migration.restore.KernelRepair: sockstate) and the repair
helper are doubles that record what they were asked; everything else is
real: the flow tables, a loopback connection standing for the restored
socket, and the segments the guest is sent, checked byte for byte.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_address
from typing import Any, cast

import pytest
import trio

from ferry_repair.protocol import RepairCommand as RepairMode
from ferryd.flows.table import FlowKey
from ferryd.migration.errors import StreamRejected
from ferryd.migration.kernel_state import TcpKernelState
from ferryd.migration.records import TcpFlowRecord
from ferryd.migration.restore import Restorer
from ferryd.wire.ip import IPPROTO_TCP
from ferryd.wire.tcp import ACK, RST
from tests.unit.migration_host import MemoryHost
from tests.unit.test_flows_helpers import GUEST4, gateway_of

LOOPBACK = gateway_of(4)  # the guest reaches the host's loopback through the gateway
SEQ_TO_GUEST = 1000
SEQ_FROM_GUEST = 5000


class FakeKernel:
    """KernelRepair: hands out the given sockets, records the rest."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        self.calls: list[str] = []

    def new_socket_for(self, state: TcpKernelState) -> socket.socket:
        self.calls.append("new")
        return self.socks.pop(0)

    def restore_in_repair(self, sock: socket.socket, state: TcpKernelState) -> None:
        self.calls.append("restore")

    def finish_restore(self, sock: socket.socket, state: TcpKernelState) -> int:
        self.calls.append("finish")
        return state.unsent

    def close_silently(self, sock: socket.socket) -> None:
        self.calls.append("close_silently")
        sock.close()

    def reuse_after_repair_off(self, socks: list[socket.socket]) -> None:
        self.calls.append("reuse")


class FakeRepair:
    """The repair helper's client: records each batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[RepairMode, int]] = []

    async def set_repair(self, socks: list[socket.socket], mode: RepairMode) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((mode, len(socks)))


def _record(ours: socket.socket, *, handshake: bool = False) -> TcpFlowRecord:
    local, remote = ours.getsockname(), ours.getpeername()
    kernel = TcpKernelState(
        local_addr=ip_address(local[0]), local_port=local[1],
        remote_addr=ip_address(remote[0]),
        remote_port=remote[1], tcp_state=1, mss=1460, snd_wscale=7, rcv_wscale=7, options=7,
        timestamp=1, snd_wl1=1, snd_wnd=65535, max_window=65535, rcv_wnd=65535, rcv_wup=1,
        send_seq=1, recv_seq=1,
    )  # fmt: skip
    return TcpFlowRecord(
        guest_addr=GUEST4, guest_port=50000, remote_addr=LOOPBACK, remote_port=remote[1],
        kernel=None if handshake else kernel, seq_to_guest=SEQ_TO_GUEST,
        seq_ack_from_guest=SEQ_TO_GUEST, seq_from_guest=SEQ_FROM_GUEST,
        seq_ack_to_guest=SEQ_FROM_GUEST, seq_init_from_guest=SEQ_FROM_GUEST - 1,
        guest_window=65535, guest_wscale=7, our_wscale=7, guest_mss=1460, flags=0, state=4,
        handshake=handshake,
    )  # fmt: skip


def _key(rec: TcpFlowRecord) -> FlowKey:
    return FlowKey(IPPROTO_TCP, rec.guest_addr, rec.guest_port, rec.remote_addr, rec.remote_port)


@asynccontextmanager
async def restoring(
    socks: list[socket.socket],
) -> AsyncIterator[tuple[MemoryHost, Restorer, FakeKernel, FakeRepair]]:
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        kernel, repair = FakeKernel(socks), FakeRepair()
        try:
            yield host, Restorer(host, cast(Any, repair), kernel), kernel, repair
        finally:
            await host.aclose()
            nursery.cancel_scope.cancel()


async def test_restore_then_resume_resyncs_the_guest(
    host_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = host_pair
    ours.setblocking(True)  # as a restored socket comes (the restorer makes it non-blocking)
    rec = _record(ours)
    peer.sendall(b"hello")  # waiting in the restored receive queue
    async with restoring([ours]) as (host, restorer, kernel, repair):
        await restorer.add(rec)
        assert repair.calls == []  # batched: nothing until the batch is full or the end
        await restorer.finish()
        assert repair.calls == [(RepairMode.ON, 1)]
        assert kernel.calls == ["new", "restore"]
        assert host.tcp.table.get(_key(rec)) is not None
        assert restorer.counts["tcp"] == 1
        assert host.tcp_guest.segments == []  # nothing said to the guest before resume

        await restorer.resume()
        assert repair.calls[-1] == (RepairMode.OFF, 1)
        assert kernel.calls[-1] == "finish"
        assert host.calls == ["start"]
        segments = host.tcp_guest.segments
        # First a bare ACK with a fresh window, from where the source left off.
        assert segments[0].payload == b""
        assert (segments[0].seq, segments[0].ack, segments[0].flags & ACK) == (
            SEQ_TO_GUEST,
            SEQ_FROM_GUEST,
            ACK,
        )
        data = [s for s in segments if s.payload]
        assert data and data[0].seq == SEQ_TO_GUEST
        assert b"".join(s.payload for s in data) == b"hello"


async def test_discard_closes_silently_and_forgets(
    host_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _peer = host_pair
    rec = _record(ours)
    async with restoring([ours]) as (host, restorer, kernel, _repair):
        await restorer.add(rec)
        await restorer.finish()
        await restorer.discard()
        assert kernel.calls[-1] == "close_silently"
        assert ours.fileno() < 0
        assert host.tcp.table.get(_key(rec)) is None
        assert host.calls == []  # never started
        assert host.tcp_guest.segments == []


async def test_a_connection_in_its_handshake_is_reset_at_resume(
    host_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _peer = host_pair
    rec = _record(ours, handshake=True)
    async with restoring([]) as (host, restorer, kernel, repair):
        await restorer.add(rec)
        await restorer.finish()
        await restorer.resume()
        assert restorer.counts["reset"] == 1
        assert kernel.calls == [] and repair.calls == []
        ((src, dst, proto, l4),) = host.sent
        assert (src, dst, proto) == (LOOPBACK, GUEST4, IPPROTO_TCP)
        assert l4[13] == RST | ACK


async def test_the_same_connection_twice_is_refused(
    host_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _peer = host_pair
    rec = _record(ours)
    with socket.socket() as spare:
        async with restoring([ours, spare]) as (_host, restorer, _, _):
            await restorer.add(rec)
            await restorer.finish()
            with pytest.raises(StreamRejected, match="twice"):
                await restorer.add(dataclasses.replace(rec))
            await restorer.discard()
