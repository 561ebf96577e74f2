"""Restorer without root: TCP connections restored, resynchronised, discarded.

Without CAP_NET_ADMIN no socket ever enters repair mode, so the kernel's
side (ferryd.migration.ports.KernelRepair: sockstate) and the repair
helper are doubles that record what they were asked
(tests/unit/migration_host.py); everything else is
real: the flow tables, a loopback connection standing for the restored
socket, and the segments the guest is sent, checked byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from ipaddress import IPv4Address

import pytest
import trio
import trio.testing

from ferry_repair.protocol import RepairCommand as RepairMode
from ferryd.flows.portspec import ForwardError
from ferryd.flows.table import FlowKey
from ferryd.flows.tcp import socket_of
from ferryd.flows.tcp_conn import TcpConn
from ferryd.flows.tcp_host import SocketHost
from ferryd.migration import handover, restore
from ferryd.migration.errors import StreamRejected
from ferryd.migration.handover import HandoverStream
from ferryd.migration.records import (
    FlowRecord,
    IcmpFlowRecord,
    ListenerRecord,
    TcpFlowRecord,
    UdpFlowRecord,
)
from ferryd.migration.repair_client import RepairError
from ferryd.migration.restore import Restorer
from ferryd.migration.sockstate import PortInUse
from ferryd.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from ferryd.wire.tcp import ACK, RST, SYN
from testbed.wait import until
from tests.unit.migration_host import FakeKernel, FakeRepair, MemoryHost, kernel_state_of
from tests.unit.test_flows_helpers import GUEST4, gateway_of

LOOPBACK = gateway_of(4)  # the guest reaches the host's loopback through the gateway
SEQ_TO_GUEST = 1000
SEQ_FROM_GUEST = 5000


def _record(
    ours: socket.socket, *, handshake: bool = False, recv_queue: bytes = b""
) -> TcpFlowRecord:
    remote = ours.getpeername()
    kernel = kernel_state_of(ours, recv_queue=recv_queue, recv_seq=1 + len(recv_queue))
    return TcpFlowRecord(
        guest_addr=GUEST4, guest_port=50000, remote_addr=LOOPBACK, remote_port=remote[1],
        kernel=None if handshake else kernel, seq_to_guest=SEQ_TO_GUEST,
        seq_ack_from_guest=SEQ_TO_GUEST, seq_from_guest=SEQ_FROM_GUEST,
        seq_ack_to_guest=SEQ_FROM_GUEST,
        guest_window=65535, guest_wscale=7, our_wscale=7, guest_mss=1460, flags=0, state=4,
        handshake=handshake,
    )  # fmt: skip


async def _later_bytes_reach_the_guest(host: MemoryHost, peer: socket.socket) -> None:
    """Armed without a resync: what the peer sends after the resume reaches the guest,
    from where the source left off."""
    host.tcp.attach(host.nursery)  # what the data path's start() does (MemoryHost's not)
    peer.sendall(b"later")
    segments = host.tcp_guest.segments
    await until(lambda: any(s.payload for s in segments), what="the peer's bytes at the guest")
    data = [s for s in segments if s.payload]
    assert (data[0].seq, data[0].ack) == (SEQ_TO_GUEST, SEQ_FROM_GUEST)
    assert b"".join(s.payload for s in data) == b"later"


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
            yield host, Restorer(host, repair, kernel), kernel, repair
        finally:
            await host.aclose()
            nursery.cancel_scope.cancel()


async def test_restore_then_resume_resyncs_the_guest(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, peer = host_pair
    ours.setblocking(True)  # as a restored socket may come (the restorer makes it non-blocking)
    # The restored receive queue (the fake kernel restores nothing: the
    # loopback socket holds it).
    rec = _record(ours, recv_queue=b"hello")
    peer.sendall(b"hello")
    async with restoring([ours]) as (host, restorer, kernel, repair):
        await restorer.add(rec)
        assert repair.calls == []  # batched: nothing until the batch is full or the end
        await restorer.finish()
        fd = ours.fileno()
        assert repair.calls == [(RepairMode.ON, [fd])]
        assert kernel.calls == [f"new {fd}", f"restore {fd}"]
        assert host.tcp.table.get(_key(rec)) is not None
        assert restorer.counts["tcp"] == 1
        assert host.tcp_guest.segments == []  # nothing said to the guest before resume

        await restorer.resume()
        assert repair.calls[-1] == (RepairMode.OFF, [fd])
        # Finished, then given the SO_REUSEADDR that repair OFF took away.
        assert kernel.calls[-2:] == [f"finish {fd}", f"reuse {fd}"]
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


async def test_resume_leaves_a_connection_at_rest_to_the_data_path(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    """Idle when dumped (flowstate.at_rest): the guest holds our ACK and window already.

    resume() says nothing to the guest and finishes nothing, but the
    connection is armed: what the peer sends afterwards reaches the guest.
    """
    ours, peer = host_pair
    rec = _record(ours)
    async with restoring([ours]) as (host, restorer, kernel, repair):
        await restorer.add(rec)
        await restorer.finish()
        fd = ours.fileno()
        await restorer.resume()
        # Out of repair mode without the window probe: it says nothing to the peer either.
        assert repair.calls[-1] == (RepairMode.OFF_NO_WINDOW_PROBE, [fd])
        assert f"finish {fd}" not in kernel.calls
        assert host.tcp_guest.segments == []
        await _later_bytes_reach_the_guest(host, peer)


async def test_discard_closes_silently_and_forgets(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, _peer = host_pair
    rec = _record(ours)
    async with restoring([ours]) as (host, restorer, kernel, _repair):
        await restorer.add(rec)
        await restorer.finish()
        fd = ours.fileno()
        await restorer.discard()
        assert kernel.calls[-1] == f"close_silently {fd}"
        assert ours.fileno() < 0
        assert host.tcp.table.get(_key(rec)) is None
        assert host.calls == []  # never started
        assert host.tcp_guest.segments == []


async def test_a_connection_in_its_handshake_is_reset_at_resume(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, _peer = host_pair
    rec = _record(ours, handshake=True)
    async with restoring([]) as (host, restorer, kernel, repair):
        await restorer.add(rec)
        await restorer.finish()
        await restorer.resume()
        assert restorer.counts["reset"] == 1
        assert kernel.calls == [] and repair.calls == []
        (route,) = host.tcp_guest.routes
        assert route == (LOOPBACK, GUEST4, IPPROTO_TCP)
        (rst,) = host.tcp_guest.segments
        assert (rst.seq, rst.ack, rst.flags) == (SEQ_TO_GUEST, SEQ_FROM_GUEST, RST | ACK)


async def test_the_same_connection_twice_is_refused(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
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


class GatedRepair(FakeRepair):
    """The helper, answering each call only when the test lets it; call ``fail`` is refused."""

    def __init__(self, fail: int = 0) -> None:
        super().__init__()
        self.sent: list[tuple[RepairMode, list[int]]] = []
        self.answers = trio.Semaphore(0)
        self._fail = fail

    async def set_repair(
        self,
        socks: Sequence[socket.socket],
        mode: RepairMode,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.sent.append((mode, [s.fileno() for s in socks]))
        call = len(self.sent)
        await self.answers.acquire()
        if call == self._fail:
            raise RepairError(f"call {call} refused")
        await super().set_repair(socks, mode, progress=progress)


def _spread(rec: TcpFlowRecord, n: int) -> list[TcpFlowRecord]:
    """``n`` connections like ``rec``, each its own guest port."""
    return [dataclasses.replace(rec, guest_port=50000 + i) for i in range(n)]


async def test_a_batch_is_restored_while_the_next_ones_repair_on_is_under_way(
    host_pair: tuple[SocketHost[TcpConn], socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a nursery the helper's repair ON of a batch overlaps the restore of the one
    before and the stream's next records; the helper gets the batches in stream order,
    and no socket is restored before its own batch's repair ON was answered."""
    monkeypatch.setattr(restore, "BATCH", 2)
    ours, _peer = host_pair
    recs = _spread(_record(ours), 5)
    socks: list[SocketHost[TcpConn]] = [SocketHost() for _ in recs]
    fds = [s.fileno() for s in socks]
    repair = GatedRepair()
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        kernel = FakeKernel(list(socks))
        restorer = Restorer(host, repair, kernel, nursery=nursery)
        for rec in recs[:2]:
            await restorer.add(rec)  # the first batch: sent, not waited for
        await trio.testing.wait_all_tasks_blocked()
        assert repair.sent == [(RepairMode.ON, fds[:2])]
        assert not any(call.startswith("restore") for call in kernel.calls)
        await restorer.add(recs[2])
        async with trio.open_nursery() as adding:
            adding.start_soon(restorer.add, recs[3])  # the second batch: waits for the first
            await trio.testing.wait_all_tasks_blocked()
            assert repair.sent == [(RepairMode.ON, fds[:2])]  # the second queued behind it
            assert not any(call.startswith("restore") for call in kernel.calls)
            repair.answers.release()
        await trio.testing.wait_all_tasks_blocked()
        # The first batch restored; the helper has the second, unanswered, meanwhile.
        assert [c for c in kernel.calls if c.startswith("restore")] == [
            f"restore {fd}" for fd in fds[:2]
        ]
        assert repair.sent == [(RepairMode.ON, fds[:2]), (RepairMode.ON, fds[2:4])]
        assert repair.calls == [(RepairMode.ON, fds[:2])]
        await restorer.add(recs[4])
        async with trio.open_nursery() as finishing:
            finishing.start_soon(restorer.finish)
            for _ in range(2):
                repair.answers.release()
        assert [c for c in kernel.calls if c.startswith("restore")] == [
            f"restore {fd}" for fd in fds
        ]
        assert repair.calls == [(RepairMode.ON, fds[i : i + 2]) for i in (0, 2, 4)]
        assert restorer.counts["tcp"] == 5 and set(restorer.in_repair.values()) == set(socks)
        assert all(host.tcp.table.get(_key(rec)) is not None for rec in recs)
        await restorer.discard()
        assert all(s.fileno() < 0 for s in socks)
        await host.aclose()
        nursery.cancel_scope.cancel()


async def test_a_refused_batch_in_flight_fails_the_restore_and_discard_leaves_nothing(
    host_pair: tuple[SocketHost[TcpConn], socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper refuses the second batch while the first is restored: the restore
    raises the helper's error, the third batch is never sent, and discard() closes every
    socket (the restored ones silently). A discard while a batch's repair ON is still
    under way waits for its answer, then closes its sockets too."""
    monkeypatch.setattr(restore, "BATCH", 2)
    ours, _peer = host_pair
    recs = _spread(_record(ours), 6)
    socks: list[SocketHost[TcpConn]] = [SocketHost() for _ in recs]
    fds = [s.fileno() for s in socks]
    repair = GatedRepair(fail=2)
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        kernel = FakeKernel(list(socks))
        restorer = Restorer(host, repair, kernel, nursery=nursery)
        repair.answers.release()
        repair.answers.release()  # the first batch answered, the second refused
        with pytest.raises(RepairError, match="call 2 refused"):
            for rec in recs:
                await restorer.add(rec)
            await restorer.finish()
        await restorer.discard()
        assert repair.sent == [(RepairMode.ON, fds[:2]), (RepairMode.ON, fds[2:4])]
        assert all(s.fileno() < 0 for s in socks)
        assert [c for c in kernel.calls if c.startswith("close_silently")] == [
            f"close_silently {fd}" for fd in fds[:2]
        ]
        assert not any(host.tcp.table.get(_key(rec)) for rec in recs)

        socks = [SocketHost() for _ in range(2)]
        restorer = Restorer(host, repair, FakeKernel(list(socks)), nursery=nursery)
        for rec in recs[:2]:
            await restorer.add(rec)  # sent, unanswered
        async with trio.open_nursery() as discarding:
            discarding.start_soon(restorer.discard)
            await trio.testing.wait_all_tasks_blocked()
            assert all(s.fileno() >= 0 for s in socks)  # not while the helper holds them
            repair.answers.release()
        assert all(s.fileno() < 0 for s in socks)
        await host.aclose()
        nursery.cancel_scope.cancel()


async def test_a_port_held_for_a_moment_is_bound_once_it_is_shared_again(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    # A sibling ferryd's connection on the same local port, between its repair
    # OFF and its SO_REUSEADDR: the bind is tried again a moment later.
    ours, _peer = host_pair
    rec = _record(ours)
    async with restoring([ours]) as (_host, restorer, kernel, _repair):
        kernel.port_in_use = 3
        await restorer.add(rec)
        await restorer.finish()
        fd = ours.fileno()
        assert kernel.calls == [*["bind EADDRINUSE"] * 3, f"new {fd}", f"restore {fd}"]
        assert restorer.bind_retries == 3 and restorer.counts["tcp"] == 1


async def test_a_port_that_stays_held_fails_the_restore_after_the_patience(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(restore, "BIND_PATIENCE", 0.02)
    ours, _peer = host_pair
    rec = _record(ours)
    async with restoring([ours]) as (_host, restorer, kernel, _repair):
        kernel.port_in_use = 1_000_000
        start = trio.current_time()
        with pytest.raises(PortInUse):
            await restorer.add(rec)
        assert trio.current_time() - start >= 0.02
        assert restorer.pending == [] and kernel.socks == [ours]  # nothing restored
        await restorer.discard()


async def test_a_failure_to_give_address_reuse_back_leaves_the_resume_done(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours, _peer = host_pair
    rec = _record(ours)

    def refuse(socks: list[socket.socket]) -> None:
        raise OSError(12, "Cannot allocate memory")

    async with restoring([ours]) as (host, restorer, kernel, repair):
        monkeypatch.setattr(kernel, "reuse_after_repair_off", refuse)
        await restorer.add(rec)
        await restorer.finish()
        await restorer.resume()  # logged, not raised
        assert repair.calls[-1][0] in (RepairMode.OFF, RepairMode.OFF_NO_WINDOW_PROBE)
        assert host.calls == ["start"] and host.tcp.table.get(_key(rec)) is not None


# -- a handover stream: the sockets come beside the records (one namespace)


def _handed(ours: socket.socket) -> TcpFlowRecord:
    return dataclasses.replace(_record(ours), kernel=None, handed_over=True)


@asynccontextmanager
async def handover_with(
    socks: Sequence[socket.socket],
) -> AsyncIterator[HandoverStream]:
    """A target's end of a handover stream that brought ``socks`` (duplicated)."""
    near, far = socket.socketpair()
    with far:
        stream = HandoverStream(near.detach())
        socket.send_fds(far, [b"x"], [s.fileno() for s in socks])
        assert await stream.receive_some(16) == b"x"
        try:
            yield stream
        finally:
            await stream.aclose()


async def test_a_handed_over_socket_is_adopted_as_it_is_and_resumed(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    """Nothing to restore or repair; at resume the guest is resynchronised from where
    the source left off, and what waited in the (shared) socket reaches it."""
    ours, peer = host_pair
    peer.sendall(b"queued")
    async with handover_with([ours]) as stream, restoring([]) as (host, _r, kernel, repair):
        restorer = Restorer(host, repair, kernel, handover=stream)
        await restorer.add(_handed(ours))
        await restorer.finish()
        assert kernel.calls == [] and repair.calls == []
        (conn,) = host.tcp.connections()
        assert conn.host.fileno() != ours.fileno()  # its own reference to the same socket
        assert restorer.counts["tcp"] == 1
        await restorer.resume()
        assert kernel.calls == [] and repair.calls == []
        segments = host.tcp_guest.segments
        assert (segments[0].seq, segments[0].ack) == (SEQ_TO_GUEST, SEQ_FROM_GUEST)
        assert b"".join(s.payload for s in segments if s.payload) == b"queued"
        host.tcp.forget(conn)
        socket_of(conn).close()


async def test_discarding_a_handed_over_socket_closes_only_this_reference(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, peer = host_pair
    async with handover_with([ours]) as stream, restoring([]) as (host, _r, kernel, repair):
        restorer = Restorer(host, repair, kernel, handover=stream)
        await restorer.add(_handed(ours))
        (conn,) = host.tcp.connections()
        theirs = conn.host
        await restorer.discard()
        assert host.tcp.connections() == [] and theirs.fileno() < 0
        assert kernel.calls == []  # no close_silently: it is not in repair mode
        peer.settimeout(1)
        ours.sendall(b"the source's still")  # no FIN, no RST reached the peer
        assert peer.recv(64) == b"the source's still"


async def test_a_handed_over_record_without_its_socket_is_refused(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, _peer = host_pair
    async with handover_with([]) as stream, restoring([]) as (host, _r, kernel, repair):
        restorer = Restorer(host, repair, kernel, handover=stream)
        with pytest.raises(StreamRejected, match="no socket came"):
            await restorer.add(_handed(ours))
    async with restoring([]) as (host, restorer, _kernel, _repair):  # a pipe: none can
        with pytest.raises(StreamRejected, match="carries no sockets"):
            await restorer.add(_handed(ours))
        assert host.tcp.connections() == []


async def test_sockets_no_record_named_fail_the_stream(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, _peer = host_pair
    async with handover_with([ours]) as stream, restoring([]) as (host, _r, kernel, repair):
        restorer = Restorer(host, repair, kernel, handover=stream)
        with pytest.raises(StreamRejected, match="1 sockets came with the stream"):
            await restorer.finish()


@pytest.mark.parametrize("kind", ["udp", "unix", "pipe"])
async def test_a_descriptor_that_is_not_a_tcp_socket_is_refused(
    host_pair: tuple[SocketHost[TcpConn], socket.socket], kind: str
) -> None:
    ours, _peer = host_pair
    with contextlib.ExitStack() as stack:
        if kind == "udp":
            other: object = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        elif kind == "unix":
            other, end = socket.socketpair()
            stack.enter_context(other)
            stack.enter_context(end)
        else:
            rfd, wfd = os.pipe()
            stack.callback(os.close, rfd)
            stack.callback(os.close, wfd)
            other = _Fd(rfd)
        handed = handover_with([other])  # type: ignore[list-item]
        async with handed as stream, restoring([]) as (host, _r, kernel, repair):
            restorer = Restorer(host, repair, kernel, handover=stream)
            with pytest.raises(StreamRejected, match=r"not a (TCP )?socket"):
                await restorer.add(_handed(ours))
            assert host.tcp.connections() == []


class _Fd:
    """A bare descriptor, for handover_with()."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


async def test_a_handed_over_socket_at_rest_is_armed_without_a_resync(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    """Idle on both sides (flowstate.at_rest, the socket's half read live): resume says
    nothing to the guest, and what the peer sends afterwards still reaches it."""
    ours, peer = host_pair
    async with handover_with([ours]) as stream, restoring([]) as (host, _r, kernel, repair):
        restorer = Restorer(host, repair, kernel, handover=stream)
        await restorer.add(_handed(ours))
        await restorer.finish()
        await restorer.resume()
        assert host.tcp_guest.segments == []
        await _later_bytes_reach_the_guest(host, peer)
        (conn,) = host.tcp.connections()
        host.tcp.forget(conn)
        socket_of(conn).close()


async def test_a_handed_over_listener_is_adopted_with_its_waiting_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        rec = ListenerRecord(IPPROTO_TCP, None, port, 8080, 1)
        with socket.create_connection(("127.0.0.1", port)) as waiting:
            async with (
                handover_with([server]) as stream,
                restoring([]) as (host, _r, kernel, repair),
            ):
                restorer = Restorer(host, repair, kernel, handover=stream)
                await restorer.add(rec)
                await restorer.finish()
                ((fwd, addr, got),) = host.tcp.listeners()
                assert (fwd.host_port, fwd.guest_port, str(addr), got) == (
                    port, 8080, "127.0.0.1", port,
                )  # fmt: skip
                assert restorer.counts["listeners"] == 1 and kernel.calls == []
                # The connection that waited in the accept queue reaches the guest.
                segments = host.tcp_guest.segments
                await until(lambda: bool(segments), what="the waiting connection's SYN")
                assert segments[0].flags & SYN
                (conn,) = host.tcp.connections()
                assert (conn.ends.guest_port, conn.ends.remote_port) == (
                    8080, waiting.getsockname()[1],
                )  # fmt: skip
                for conn in host.tcp.connections():
                    host.tcp.forget(conn)
                    socket_of(conn).close()
                host.tcp.close_listeners()


async def test_a_handed_over_listener_that_does_not_listen_is_refused(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, _peer = host_pair
    rec = ListenerRecord(IPPROTO_TCP, None, ours.getsockname()[1], 8080, 1)
    async with handover_with([ours]) as stream, restoring([]) as (host, _r, kernel, repair):
        restorer = Restorer(host, repair, kernel, handover=stream)
        await restorer.add(rec)
        with pytest.raises(ForwardError, match="not listening"):
            await restorer.finish()
        await restorer.discard()
        assert host.tcp.listeners() == [] and restorer.handed == {}


async def test_sockets_lost_on_the_way_in_fail_the_stream(
    host_pair: tuple[SocketHost[TcpConn], socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A control message cut short (MSG_CTRUNC: the kernel closed the descriptors that
    did not fit) is refused, never read as fewer sockets."""
    ours, peer = host_pair
    monkeypatch.setattr(handover, "_ANCILLARY_SPACE", socket.CMSG_LEN(4))  # room for one
    near, far = socket.socketpair()
    with far:
        stream = HandoverStream(near.detach())
        socket.send_fds(far, [b"x"], [ours.fileno(), peer.fileno()])
        with pytest.raises(StreamRejected, match="lost on the way in"):
            await stream.receive_some(16)
        await stream.aclose()


# -- datagram sockets handed over (stream version 4)


@contextlib.contextmanager
def _datagram_flows() -> Iterator[tuple[list[socket.socket], list[FlowRecord], socket.socket]]:
    """A UDP forward's listener on 127.0.0.1, an outbound UDP flow's socket connected to
    a peer there, and an echo flow's ping socket toward it, as a source holds them,
    each with its record (handed over); and the peer."""
    with contextlib.ExitStack() as stack:
        peer = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        peer.bind(("127.0.0.1", 0))
        listening = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        listening.bind(("127.0.0.1", 0))
        outbound = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        outbound.connect(peer.getsockname())
        ping = stack.enter_context(
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        )
        ping.connect(("127.0.0.1", 0))
        records: list[FlowRecord] = [
            ListenerRecord(
                IPPROTO_UDP, IPv4Address("127.0.0.1"), listening.getsockname()[1], 53, 1
            ),
            UdpFlowRecord(
                GUEST4, 40000, LOOPBACK, peer.getsockname()[1], 0.0,
                host_port=outbound.getsockname()[1], handed_over=True,
            ),
            IcmpFlowRecord(GUEST4, 7, LOOPBACK, 0.0, handed_over=True),
        ]  # fmt: skip
        yield [listening, outbound, ping], records, peer


async def test_handed_over_datagram_sockets_are_adopted_with_what_waits_in_them() -> None:
    """No port is bound anew: the target reads the source's own sockets, and what
    arrived while neither daemon read them reaches the guest after the resume."""
    with _datagram_flows() as (socks, records, peer):
        listening, outbound, ping = socks
        peer.sendto(b"answer", outbound.getsockname())  # for the outbound flow
        peer.sendto(b"inbound", listening.getsockname())  # to the forwarded port
        ping.send(b"\x08\x00\x00\x00\x00\x07\x00\x01ping")  # its reply waits
        async with handover_with(socks) as stream, restoring([]) as (host, _r, kernel, repair):
            restorer = Restorer(host, repair, kernel, handover=stream)
            for rec in records:
                await restorer.add(rec)
            await restorer.finish()
            assert restorer.handed == {} and kernel.calls == [] and repair.calls == []
            assert restorer.counts == {
                "tcp": 0, "udp": 1, "icmp": 1, "listeners": 1, "reset": 0
            }  # fmt: skip
            ((fwd, addr, port),) = host.udp.listeners()
            assert (fwd.guest_port, str(addr), port) == (53, "127.0.0.1", socks[0].getsockname()[1])
            await restorer.resume()  # (MemoryHost's datagram flows read all along)
            packets = await host.guest.wait_for(3)
            payloads = sorted(bytes(p.payload[8:]) for p in packets)
            assert payloads == [b"answer", b"inbound", b"ping"]
            assert {p.dst for p in packets} == {GUEST4}
        # The target's references closed; the source's sockets stand.
        assert all(sock.fileno() >= 0 for sock in socks)


async def test_a_handed_over_datagram_socket_connected_elsewhere_is_refused() -> None:
    """This ferryd's own route for the flow must be the socket's peer; the stream fails,
    and a discard closes only this ferryd's reference."""
    with _datagram_flows() as (socks, records, peer):
        _listening, outbound, _ping = socks
        wrong = dataclasses.replace(records[1], remote_port=peer.getsockname()[1] + 1)
        async with (
            handover_with([outbound]) as stream,
            restoring([]) as (host, _r, kernel, repair),
        ):
            restorer = Restorer(host, repair, kernel, handover=stream)
            await restorer.add(wrong)
            with pytest.raises(StreamRejected, match=r"is connected to 127\.0\.0\.1 port"):
                await restorer.finish()
            await restorer.discard()
            assert host.udp.count() == 0 and restorer.handed == {}
        outbound.send(b"still the source's")
        assert peer.recv(64) == b"still the source's"


@pytest.mark.parametrize("which", [0, 1, 2])
async def test_a_socket_of_the_wrong_kind_for_a_datagram_record_is_refused(
    host_pair: tuple[SocketHost[TcpConn], socket.socket], which: int
) -> None:
    ours, _peer = host_pair  # a TCP socket where a UDP or ping socket is due
    with _datagram_flows() as (_socks, records, _udp_peer):
        async with handover_with([ours]) as stream, restoring([]) as (host, _r, kernel, repair):
            restorer = Restorer(host, repair, kernel, handover=stream)
            with pytest.raises(StreamRejected, match=r"is not a (UDP|ping \(ICMP\)) socket"):
                await restorer.add(records[which])
            assert restorer.handed == {} and stream.left() == 0


@pytest.mark.parametrize(
    ("unfit", "error"),
    [("connected", "is connected: not a listener"), ("another port", "is bound to 127.0.0.1")],
)
async def test_a_handed_over_udp_listener_that_does_not_fit_is_refused(
    unfit: str, error: str
) -> None:
    """A UDP socket handed over for a forward must be unconnected and on the forward's
    port; else the restore fails, and a discard closes this ferryd's reference only."""
    with _datagram_flows() as (socks, records, peer):
        listening = socks[0]
        rec = records[0]
        assert isinstance(rec, ListenerRecord)
        if unfit == "connected":
            listening.connect(peer.getsockname())
        else:
            rec = dataclasses.replace(rec, host_port=peer.getsockname()[1])
        async with (
            handover_with([listening]) as stream,
            restoring([]) as (host, _r, kernel, repair),
        ):
            restorer = Restorer(host, repair, kernel, handover=stream)
            await restorer.add(rec)
            with pytest.raises(ForwardError, match=re.escape(error)):
                await restorer.finish()
            await restorer.discard()
            assert host.udp.listeners() == [] and restorer.handed == {}
        assert listening.fileno() >= 0  # the source's stands
