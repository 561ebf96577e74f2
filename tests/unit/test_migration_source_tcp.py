"""SourceMigration's TCP path without root: freeze, dump, roll back, pre-copy.

The kernel's side (ferryd.migration.ports.KernelDump) and the repair helper
are doubles that record what they were asked, in order
(tests/unit/migration_host.py); the connection is real: a loopback TCP
pair adopted into real TCP flows, as a restore or an accept would. What
the stream carries is decoded and checked field by field, and so is what
the guest hears after a rollback.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from typing import Any

import pytest
import trio
import trio.testing

from ferry_repair.protocol import RepairCommand as RepairMode
from ferryd.flows.portspec import PortForward
from ferryd.flows.table import FlowKey
from ferryd.flows.tcp_conn import Endpoints, State, TcpConn, TcpGuestState
from ferryd.flows.tcp_host import SocketHost
from ferryd.migration import source as source_module
from ferryd.migration.errors import MigrationFailed
from ferryd.migration.handover import HandoverStream
from ferryd.migration.kernel_state import TcpKernelState
from ferryd.migration.ports import RepairPort
from ferryd.migration.records import (
    IcmpFlowRecord,
    ListenerRecord,
    TcpFlowRecord,
    UdpFlowRecord,
)
from ferryd.migration.repair_client import RepairUnavailable
from ferryd.migration.roles import Role
from ferryd.migration.source import SourceMigration
from ferryd.migration.stream import StreamDecoder
from ferryd.migration.stream_events import FlowReceived, PrecopyEnded, StreamEvent
from ferryd.wire.ip import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP
from testbed.wait import until
from tests.unit.migration_host import (
    FakeKernel,
    FakeRepair,
    MemoryHost,
    decode_stream,
    kernel_state_of,
    read_all,
    role_of,
    session,
)
from tests.unit.test_flows_helpers import GUEST4, gateway_of

ENDS = Endpoints(GUEST4, 40000, gateway_of(4), 80)
SEQ_TO_GUEST = 7000
SEQ_FROM_GUEST = 3000
#: Established, nothing in flight either way: quiet (pre-copyable) at once with a quiet time of 0.
SAVED = TcpGuestState(
    State.ESTABLISHED, 0, SEQ_TO_GUEST, SEQ_TO_GUEST, SEQ_FROM_GUEST, SEQ_FROM_GUEST,
    65535, 0, 0, 1460,
)  # fmt: skip


@asynccontextmanager
async def source(
    kernel: FakeKernel, repair: FakeRepair | None = None, linger: float = 0.0
) -> AsyncIterator[tuple[MemoryHost, SourceMigration, FakeRepair]]:
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        repair = repair or FakeRepair()
        mig = SourceMigration(
            session(host, nursery, Role.RUNNING, repair=repair, precopy_quiet=0.0, linger=linger),
            kernel,
        )
        try:
            yield host, mig, repair
        finally:
            for conn in host.tcp.connections():
                host.tcp.forget(conn)
            await host.aclose()
            nursery.cancel_scope.cancel()


def _adopt(host: MemoryHost, sock: SocketHost[TcpConn]) -> TcpConn:
    now = trio.current_time()
    return host.tcp.adopt(ENDS, sock, 4, SAVED, sock_timestamp=0, fin_received=False, now=now)


def _tcp_records(events: list[StreamEvent]) -> list[TcpFlowRecord]:
    return [
        e.flow for e in events if isinstance(e, FlowReceived) and isinstance(e.flow, TcpFlowRecord)
    ]


def _check_record(rec: TcpFlowRecord, dumped_from: socket.socket | TcpKernelState) -> None:
    if isinstance(dumped_from, socket.socket):
        dumped_from = kernel_state_of(dumped_from)
    assert rec.kernel == dumped_from
    assert (rec.guest_addr, rec.guest_port, rec.remote_addr, rec.remote_port) == (
        ENDS.guest_addr, ENDS.guest_port, ENDS.remote_addr, ENDS.remote_port,
    )  # fmt: skip
    assert (rec.seq_to_guest, rec.seq_ack_from_guest) == (SEQ_TO_GUEST, SEQ_TO_GUEST)
    assert (rec.seq_from_guest, rec.seq_ack_to_guest) == (SEQ_FROM_GUEST, SEQ_FROM_GUEST)
    assert not rec.handshake


async def test_freeze_dumps_the_connection_and_a_rollback_thaws_it(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, _peer = host_pair
    fd = ours.fileno()
    kernel = FakeKernel()
    reader, writer = socket.socketpair()
    with reader:
        async with source(kernel) as (host, mig, repair):
            conn = _adopt(host, ours)
            answer = await mig.migrate_out(writer.detach(), same_netns=False)
            assert role_of(mig) is Role.FROZEN
            assert answer["flows"]["tcp"] == 1
            # Repair ON (ferry-repair freezes the intake as it does), then the dump.
            assert repair.calls == [(RepairMode.ON, [fd])]
            assert kernel.calls == [f"dump {fd}"]
            (rec,) = _tcp_records(decode_stream(await read_all(reader)))
            _check_record(rec, ours)
            assert ours.fileno() == fd  # kept, frozen: the outcome is not known yet

            assert await mig.abort() == {"role": "running", "note": "rolled back, nothing lost"}
            assert role_of(mig) is Role.RUNNING
            # Repair OFF thaws the same socket, which may then be bound next to.
            assert repair.calls[1:] == [(RepairMode.OFF, [fd])]
            assert kernel.calls[1:] == [f"reuse {fd}"]
            assert host.calls == ["stop", "hand_over(drain)", "stop", "take_over", "start"]
            assert host.tcp.connections() == [conn] and not conn.closed
            assert mig.s.counters.out_rolled_back == 1


class _Unsent(FakeKernel):
    """Dumps the socket with 40 of its 100 queued bytes unsent (dump_tcp held its window)."""

    def dump_tcp(self, sock: socket.socket) -> TcpKernelState:
        self.calls.append(f"dump {sock.fileno()}")
        return kernel_state_of(sock, send_queue=b"x" * 100, unsent=40, snd_wnd=5000)


class _NotingOff(FakeRepair):
    """Notes, at each repair OFF, what the kernel had been asked so far."""

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__()
        self.kernel = kernel
        self.kernel_calls_at_off: list[list[str]] = []

    async def set_repair(
        self,
        socks: Sequence[socket.socket],
        mode: RepairMode,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if mode is not RepairMode.ON:
            self.kernel_calls_at_off.append(list(self.kernel.calls))
        await super().set_repair(socks, mode, progress=progress)


async def test_a_rollback_reopens_the_send_window_the_dump_held_before_repair_off(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, _peer = host_pair
    fd = ours.fileno()
    kernel = _Unsent()
    repair = _NotingOff(kernel)
    reader, writer = socket.socketpair()
    with reader:
        async with source(kernel, repair) as (host, mig, _):
            _adopt(host, ours)
            await mig.migrate_out(writer.detach(), same_netns=False)
            assert await mig.abort() == {"role": "running", "note": "rolled back, nothing lost"}
            assert repair.kernel_calls_at_off == [[f"dump {fd}", f"reopen {fd} 5000"]]
            assert mig.held_windows == {}


async def test_a_precopy_dump_not_kept_gets_its_send_window_back_before_repair_off(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, _peer = host_pair
    fd = ours.fileno()
    kernel = _Unsent()
    repair = _NotingOff(kernel)
    reader, writer = socket.socketpair()
    with reader, writer:
        async with source(kernel, repair) as (host, mig, _):
            _adopt(host, ours)
            assert (await mig.precopy(writer.detach()))["precopied"] == 0  # bytes queued
            assert repair.kernel_calls_at_off == [
                [f"segments {fd}", f"dump {fd}", f"reopen {fd} 5000"]
            ]


class _OneByOne(FakeRepair):
    """Answers repair ON one socket at a time, noting each answer in ``log``; the
    second answer only once the first socket was dumped (``log`` is the kernel's)."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def set_repair(
        self,
        socks: Sequence[socket.socket],
        mode: RepairMode,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if mode is not RepairMode.ON:
            await super().set_repair(socks, mode, progress=progress)
            return
        self.calls.append((mode, [s.fileno() for s in socks]))
        first = socks[0].fileno()
        for n, sock in enumerate(socks, 1):
            self.log.append(f"answered {sock.fileno()}")
            if progress is not None:
                progress(n)
            if n < len(socks):
                await until(lambda: f"dump {first}" in self.log, what="the first dump")
        await trio.lowlevel.checkpoint()


async def test_each_connection_is_dumped_once_its_batch_is_frozen() -> None:
    """The dump runs under repair ON: a connection is dumped as soon as the helper
    answered for it, while it works on the next batches (a source that dumped only
    after the last answer would wait here for ever)."""
    kernel = FakeKernel()
    repair = _OneByOne(kernel.calls)
    with socket.create_server(("127.0.0.1", 0)) as server:
        pairs: list[tuple[SocketHost[TcpConn], socket.socket]] = []
        for _ in range(2):
            client = socket.create_connection(server.getsockname())
            pairs.append((SocketHost.taking(client), server.accept()[0]))
    reader, writer = socket.socketpair()
    with reader, pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1]:
        async with source(kernel, repair) as (host, mig, _):
            now = trio.current_time()
            for i, (ours, _peer) in enumerate(pairs):
                ends = ENDS._replace(guest_port=ENDS.guest_port + i)
                host.tcp.adopt(ends, ours, 4, SAVED, sock_timestamp=0, fin_received=False, now=now)
            a, b = (ours.fileno() for ours, _ in pairs)
            answer = await mig.migrate_out(writer.detach(), same_netns=False)
            assert answer["flows"]["tcp"] == 2
            assert kernel.calls == [f"answered {a}", f"dump {a}", f"answered {b}", f"dump {b}"]
            assert len(_tcp_records(decode_stream(await read_all(reader)))) == 2
            assert (await mig.abort())["note"] == "rolled back, nothing lost"


class _HoldLast(FakeRepair):
    """Answers repair ON for all sockets but the last, and for that one only once
    ``released()`` says so."""

    def __init__(self, released: Callable[[], bool]) -> None:
        super().__init__()
        self.released = released

    async def set_repair(
        self,
        socks: Sequence[socket.socket],
        mode: RepairMode,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if mode is RepairMode.ON and progress is not None:
            progress(len(socks) - 1)
            await until(self.released, what="the target's batch")
        await super().set_repair(socks, mode, progress=progress)


async def test_a_batch_of_tcp_flows_reaches_the_target_as_soon_as_it_is_dumped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream is flushed every FLUSH_RECORDS TCP flows (the target's batch size,
    restore.BATCH), the header not counted: the target gets its first batch whole
    while the source still waits for the next connection's freeze (here, until the
    target has that batch)."""
    monkeypatch.setattr(source_module, "FLUSH_RECORDS", 2)
    kernel = FakeKernel()
    decoder = StreamDecoder()
    tcp_seen: list[TcpFlowRecord] = []
    repair = _HoldLast(lambda: len(tcp_seen) >= 2)
    reader, writer = socket.socketpair()
    reader.setblocking(False)

    async def read() -> None:
        tsock = trio.socket.from_stdlib_socket(reader)
        while chunk := await tsock.recv(65536):
            tcp_seen.extend(_tcp_records(decoder.feed_untrusted(chunk)))

    with socket.create_server(("127.0.0.1", 0)) as server:
        pairs: list[tuple[SocketHost[TcpConn], socket.socket]] = []
        for _ in range(3):
            client = socket.create_connection(server.getsockname())
            pairs.append((SocketHost.taking(client), server.accept()[0]))
    with reader, contextlib.ExitStack() as stack:
        for pair in pairs:
            stack.enter_context(pair[0])
            stack.enter_context(pair[1])
        async with source(kernel, repair) as (host, mig, _):
            now = trio.current_time()
            for i, (ours, _peer) in enumerate(pairs):
                ends = ENDS._replace(guest_port=ENDS.guest_port + i)
                host.tcp.adopt(ends, ours, 4, SAVED, sock_timestamp=0, fin_received=False, now=now)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                answer = await mig.migrate_out(writer.detach(), same_netns=False)
            assert answer["flows"]["tcp"] == 3 and len(tcp_seen) == 3
            assert (await mig.abort())["note"] == "rolled back, nothing lost"


async def _receive_handover(
    sock: socket.socket, protos: Sequence[int] | None
) -> tuple[bytes, list[socket.socket]]:
    """Everything a same-namespace migration wrote into ``sock``'s peer, and the sockets
    that came with it, as the target's HandoverStream takes them: of the protocols
    ``protos`` names, in order (None: every one TCP)."""
    stream = HandoverStream(sock.detach())
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    kinds = [IPPROTO_TCP] * stream.left() if protos is None else protos
    taken: list[socket.socket] = [
        stream.take() if proto == IPPROTO_TCP else stream.take_datagram(proto) for proto in kinds
    ]
    assert stream.left() == 0
    await stream.aclose()
    return bytes(data), taken


async def _migrate_in_one_namespace(
    mig: SourceMigration, protos: Sequence[int] | None = None
) -> tuple[dict[str, Any], bytes, list[socket.socket]]:
    """migrate_out(same_netns=True) into a socket pair: its answer, the stream, and the
    sockets that came with it (see _receive_handover)."""
    reader, writer = socket.socketpair()
    got: list[tuple[bytes, list[socket.socket]]] = []
    with reader:
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                got.append(await _receive_handover(reader, protos))

            nursery.start_soon(receive)
            answer = await mig.migrate_out(writer.detach(), same_netns=True)
    return answer, *got[0]


async def test_same_namespace_hands_the_socket_itself_over_and_a_rollback_keeps_it(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    """One host: nothing is frozen, dumped or repaired; the record carries the guest's
    side and the socket goes beside it (SCM_RIGHTS). A rollback carries on with the
    very same connection: the peer never lost its socket."""
    ours, peer = host_pair
    kernel = FakeKernel()
    async with source(kernel) as (host, mig, repair):
        conn = _adopt(host, ours)
        answer, data, handed = await _migrate_in_one_namespace(mig)
        assert answer["flows"]["tcp"] == 1
        assert kernel.calls == [] and repair.calls == []  # no helper, no dump
        (theirs,) = handed
        with theirs:
            (rec,) = _tcp_records(decode_stream(data))
            assert rec.handed_over and rec.kernel is None and not rec.handshake
            assert (rec.seq_to_guest, rec.seq_from_guest) == (SEQ_TO_GUEST, SEQ_FROM_GUEST)
            # The same socket: what the peer sends is in both, once.
            assert theirs.getpeername() == ours.getpeername()
            peer.sendall(b"still here")
            await until(lambda: _inq(theirs) == 10, what="the peer's bytes")
            assert _inq(ours) == 10
        # The target's reference is gone; ours stands, and the rollback keeps it.
        assert (await mig.abort())["note"] == "rolled back, nothing lost"
        assert role_of(mig) is Role.RUNNING
        assert host.tcp.connections() == [conn] and ours.fileno() >= 0
        assert repair.calls == [] and kernel.calls == []
        peer.settimeout(1)
        ours.sendall(b"and answering")
        assert peer.recv(64) == b"and answering"


async def test_same_namespace_source_lets_go_of_its_reference_only_when_the_linger_ends(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    """Committed, the source closes its copy of each handed-over socket without a
    word to the peer: the target's copy carries the connection on."""
    ours, peer = host_pair
    async with source(FakeKernel()) as (host, mig, _repair):
        _adopt(host, ours)
        _answer, _data, handed = await _migrate_in_one_namespace(mig)
        (theirs,) = handed
        with theirs:
            assert await mig.commit() == {"linger": 0.0}
            await until(lambda: ours.fileno() < 0, what="the linger's end")
            assert host.tcp.connections() == []
            peer.settimeout(1)
            theirs.sendall(b"from the target")
            assert peer.recv(64) == b"from the target"  # no FIN, no RST came first
            peer.sendall(b"to the target")
            assert theirs.recv(64) == b"to the target"


async def test_same_namespace_needs_a_socket_for_the_stream() -> None:
    """A pipe cannot carry sockets: refused before anything is frozen."""
    rfd, wfd = os.pipe()
    with os.fdopen(rfd, "rb"):
        async with source(FakeKernel()) as (_host, mig, repair):
            with pytest.raises(MigrationFailed, match="Unix socket"):
                await mig.migrate_out(wfd, same_netns=True)
            assert role_of(mig) is Role.RUNNING and repair.calls == []


def _inq(sock: socket.socket) -> int:
    """Bytes in the receive queue (SIOCINQ: a peek would move the shared SO_PEEK_OFF)."""
    count: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    return count


@pytest.mark.parametrize("moved", [False, True])
async def test_a_precopied_connection_is_dumped_again_only_if_it_moved(
    host_pair: tuple[SocketHost[TcpConn], socket.socket], moved: bool
) -> None:
    ours, _peer = host_pair
    fd = ours.fileno()
    kernel = FakeKernel()
    reader, writer = socket.socketpair()
    with reader:
        async with source(kernel) as (host, mig, repair):
            _adopt(host, ours)
            assert (await mig.precopy(writer.detach()))["precopied"] == 1
            assert role_of(mig) is Role.PRECOPIED
            # Held in repair mode for the dump, then out of it without a window probe.
            assert repair.calls == [
                (RepairMode.ON, [fd]),
                (RepairMode.OFF_NO_WINDOW_PROBE, [fd]),
            ]
            assert kernel.calls == [f"segments {fd}", f"dump {fd}", f"reuse {fd}"]
            if moved:
                kernel.segments = (2, 1)  # a segment came in since the dump
            answer = await mig.migrate_out(None, same_netns=False)
            assert answer["flows"]["tcp"] == 1
            assert answer["flows"]["unchanged"] == (0 if moved else 1)
            dumped_again = [f"dump {fd}"] if moved else []
            assert kernel.calls[3:] == [f"segments {fd}", *dumped_again]
            events = decode_stream(await read_all(reader))
            assert sum(isinstance(e, PrecopyEnded) for e in events) == 1
            records = _tcp_records(events)
            assert len(records) == (2 if moved else 1)
            for rec in records:
                _check_record(rec, ours)


class _Arming(FakeRepair):
    """A helper that takes ferry-repair's armed commands; ``refuse_arm``: an older one."""

    def __init__(self, refuse_arm: bool = False) -> None:
        super().__init__()
        self.can_arm = True
        self.refuse_arm = refuse_arm

    async def set_repair(
        self,
        socks: Sequence[socket.socket],
        mode: RepairMode,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if mode is RepairMode.ARM and self.refuse_arm:
            self.calls.append((mode, [s.fileno() for s in socks]))
            raise RepairUnavailable("unknown command 2")
        await super().set_repair(socks, mode, progress=progress)


@pytest.mark.parametrize("moved", [False, True])
@pytest.mark.parametrize(
    ("outcome", "target_running"), [("rollback", False), ("commit", False), ("commit", True)]
)
async def test_an_armed_connection_is_frozen_by_one_call_and_stays_out_of_repair_mode(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
    moved: bool,
    outcome: str,
    target_running: bool,
    mock_clock: trio.testing.MockClock,
) -> None:
    ours, _peer = host_pair
    fd = ours.fileno()
    kernel = FakeKernel()
    reader, writer = socket.socketpair()
    with reader:
        async with source(kernel, _Arming(), linger=30.0) as (host, mig, repair):
            _adopt(host, ours)
            assert (await mig.precopy(writer.detach()))["precopied"] == 1
            # Held in repair mode for the dump, then out of it armed.
            assert repair.calls == [(RepairMode.ON, [fd]), (RepairMode.ARM, [fd])]
            if moved:
                kernel.segments = (2, 1)  # a segment came in since the dump
            answer = await mig.migrate_out(None, same_netns=False)
            assert answer["flows"]["unchanged"] == (0 if moved else 1)
            # One FREEZE_ARMED for all; only a connection that moved goes into
            # repair mode, to be dumped again.
            again = [(RepairMode.ON, [fd])] if moved else []
            assert repair.calls[2:] == [(RepairMode.FREEZE_ARMED, [1]), *again]
            assert kernel.calls[3:] == [f"segments {fd}", *([f"dump {fd}"] if moved else [])]
            assert len(_tcp_records(decode_stream(await read_all(reader)))) == (2 if moved else 1)
            del repair.calls[:]
            if outcome == "rollback":
                assert (await mig.abort())["note"] == "rolled back, nothing lost"
                # Repair OFF takes the filter off whichever way it was frozen.
                assert repair.calls == [(RepairMode.OFF, [fd]), (RepairMode.DISARM, [])]
                assert not conn_closed(host)
            else:
                await mig.commit(target_running=target_running)
                # Before the linger (at once if the target runs already, as with
                # QEMU): each frozen socket in repair mode, so that it closes
                # silently whenever ferryd exits.
                await trio.testing.wait_all_tasks_blocked()
                if not target_running:
                    assert repair.calls == []  # the target's resume goes first
                    mock_clock.jump(source_module.ARMED_REPAIR_DELAY)
                    await trio.testing.wait_all_tasks_blocked()
                frozen_armed = [] if moved else [(RepairMode.ON, [fd])]
                assert repair.calls == [*frozen_armed, (RepairMode.DISARM, [])]
                assert mig.frozen and not mig.armed_frozen


async def test_a_helper_that_will_not_arm_gets_the_bare_release_and_the_freeze_one_by_one(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, _peer = host_pair
    fd = ours.fileno()
    reader, writer = socket.socketpair()
    with reader:
        async with source(FakeKernel(), _Arming(refuse_arm=True)) as (host, mig, repair):
            _adopt(host, ours)
            assert (await mig.precopy(writer.detach()))["precopied"] == 1
            assert repair.calls == [
                (RepairMode.ON, [fd]),
                (RepairMode.ARM, [fd]),
                (RepairMode.OFF_NO_WINDOW_PROBE, [fd]),
            ]
            assert not repair.can_arm
            answer = await mig.migrate_out(None, same_netns=False)
            assert answer["flows"]["unchanged"] == 1
            assert repair.calls[3:] == [(RepairMode.ON, [fd])]


def conn_closed(host: MemoryHost) -> bool:
    return not host.tcp.connections() or any(c.closed for c in host.tcp.connections())


class _Counting(FakeRepair):
    """Counts get(); ``reachable`` False: get() raises RepairUnavailable, as with no helper."""

    def __init__(self, reachable: bool = True) -> None:
        super().__init__()
        self.gets = 0
        self.reachable = reachable

    async def get(self) -> RepairPort:
        self.gets += 1
        await trio.lowlevel.checkpoint()
        if not self.reachable:
            raise RepairUnavailable("no helper here")
        return self


@pytest.mark.parametrize("reachable", [True, False])
async def test_qemus_precopy_reaches_the_helper_with_nothing_quiet_to_copy(
    host_pair: tuple[SocketHost[TcpConn], socket.socket], reachable: bool
) -> None:
    """The freeze that follows QEMU's pre-copy comes with the VM stopped: the helper is
    reached while the guest runs, even when no connection is quiet enough to pre-copy
    (which would have reached it); one that cannot be reached fails nothing yet."""
    ours, _peer = host_pair
    repair = _Counting(reachable)
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        # Nothing is quiet for an hour: no connection is pre-copied.
        mig = SourceMigration(
            session(host, nursery, Role.RUNNING, repair=repair, precopy_quiet=3600.0),
            FakeKernel(),
        )
        conn = _adopt(host, ours)
        answer = await mig.precopy(None)
        assert answer["precopied"] == 0
        await until(lambda: repair.gets == 1, what="the helper reached")
        assert role_of(mig) is Role.PRECOPIED and repair.calls == []
        assert await mig.abort() == {"role": "running", "note": "pre-copy dropped"}
        host.tcp.forget(conn)
        await host.aclose()
        nursery.cancel_scope.cancel()


async def test_same_namespace_hands_a_forwards_listening_socket_over_and_keeps_it(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    """A TCP forward's listener goes beside its record, the connection waiting in its
    accept queue with it; the source keeps listening through a rollback."""
    ours, _peer = host_pair
    async with source(FakeKernel()) as (host, mig, _repair):
        _adopt(host, ours)
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]  # a free port (forwards name theirs)
        await host.tcp.add_forward(PortForward(IPv4Address("127.0.0.1"), port, 8080))
        (listening,) = host.tcp.listening_sockets(host.tcp.listeners()[0][0])
        _answer, data, handed = await _migrate_in_one_namespace(mig)
        (lst,) = [e.flow for e in decode_stream(data) if isinstance(e, FlowReceived)][:1]
        assert lst == ListenerRecord(IPPROTO_TCP, IPv4Address("127.0.0.1"), port, 8080, 1)
        theirs, conn_sock = handed  # the listener's, then the connection's
        with theirs, conn_sock, socket.create_connection(("127.0.0.1", port)) as waiting:
            assert theirs.getsockname()[1] == port
            # Waiting in the (shared) accept queue: the target's to take.
            accepted, _ = theirs.accept()
            accepted.close()
            assert waiting.getpeername()[1] == port
        assert (await mig.abort())["note"] == "rolled back, nothing lost"
        assert host.tcp.listening_sockets(host.tcp.listeners()[0][0]) == [listening]
        assert listening.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


async def test_same_namespace_hands_the_datagram_sockets_over_and_a_rollback_keeps_them() -> None:
    """A UDP forward's listener, an outbound UDP flow's socket and an echo flow's ping
    socket go beside their records, in stream order, the very same sockets; nothing is
    closed here, and a rollback carries on with every one."""
    async with source(FakeKernel()) as (host, mig, _repair):
        now = trio.current_time()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # a free port (forwards name theirs)
        await host.udp.add_forward(PortForward(IPv4Address("127.0.0.1"), port, 53))
        udp_key = FlowKey(IPPROTO_UDP, GUEST4, 40000, gateway_of(4), 9)
        host.udp.restore_outbound(udp_key, None, None, now)  # to the host's loopback
        echo_key = FlowKey(IPPROTO_ICMP, GUEST4, 7, gateway_of(4), 0)
        host.icmp.restore(echo_key, now)
        (listening,) = host.udp.listening_sockets(host.udp.listeners()[0][0])
        ours = [listening, host.udp.flow_socket(udp_key), host.icmp.flow_socket(echo_key)]
        answer, data, handed = await _migrate_in_one_namespace(
            mig, [IPPROTO_UDP, IPPROTO_UDP, IPPROTO_ICMP]
        )
        assert (answer["flows"]["udp"], answer["flows"]["icmp"]) == (1, 1)
        lst, udp, echo = [e.flow for e in decode_stream(data) if isinstance(e, FlowReceived)]
        assert lst == ListenerRecord(IPPROTO_UDP, IPv4Address("127.0.0.1"), port, 53, 1)
        assert isinstance(udp, UdpFlowRecord) and isinstance(echo, IcmpFlowRecord)
        assert ours[1] is not None
        host_port = ours[1].getsockname()[1]
        assert udp == UdpFlowRecord(
            GUEST4, 40000, gateway_of(4), 9, udp.idle, host_port=host_port, handed_over=True
        )
        assert echo == IcmpFlowRecord(GUEST4, 7, gateway_of(4), echo.idle, handed_over=True)
        for mine, theirs in zip(ours, handed, strict=True):
            assert mine is not None
            with theirs:  # the same socket (one inode), not a twin bound next to it
                assert os.fstat(theirs.fileno()).st_ino == os.fstat(mine.fileno()).st_ino
        assert (await mig.abort())["note"] == "rolled back, nothing lost"
        assert host.udp.listening_sockets(host.udp.listeners()[0][0]) == [listening]
        assert host.udp.flow_socket(udp_key) is ours[1]
        assert host.icmp.flow_socket(echo_key) is ours[2]
        assert all(sock is not None and sock.fileno() >= 0 for sock in ours)


async def test_a_rollback_that_cannot_reach_the_helper_serves_the_guest_meanwhile(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    """The helper gone at the rollback: the data path serves the guest again at once,
    the frozen connection held (rollback-pending: nothing of its socket is read, its
    guest segments are dropped) until an attempt reaches the helper, which then only
    thaws and releases it."""
    ours, peer = host_pair
    fd = ours.fileno()
    repair = _Counting()
    reader, writer = socket.socketpair()
    with reader:
        async with source(FakeKernel(), repair) as (host, mig, _repair):
            conn = _adopt(host, ours)
            await mig.migrate_out(writer.detach(), same_netns=False)
            repair.reachable = False
            assert not await mig.rollback()
            assert role_of(mig) is Role.ROLLBACK_PENDING
            assert host.calls[-2:] == ["take_over", "start"] and host.running
            host.tcp.attach(host.nursery)  # what the data path's start() does
            peer.sendall(b"after the thaw")
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the reactor had its turn
            assert host.tcp_guest.segments == []  # held: its socket is left alone
            repair.reachable = True
            assert await mig.rollback()
            assert role_of(mig) is Role.RUNNING
            assert repair.calls[-1] == (RepairMode.OFF, [fd])
            assert host.calls.count("start") == 1  # the data path ran on throughout
            segments = host.tcp_guest.segments
            await until(lambda: any(s.payload for s in segments), what="the peer's bytes")
            assert b"".join(s.payload for s in segments) == b"after the thaw"
            assert not conn.closed


async def test_same_namespace_hands_hundreds_of_datagram_sockets_over() -> None:
    """A chunk carries at most FLUSH_RECORDS descriptors, whatever kind of record
    they come with: one sendmsg() takes no more than SCM_MAX_FD (253)."""
    async with source(FakeKernel()) as (host, mig, _repair):
        now = trio.current_time()
        for guest_port in range(40000, 40300):
            key = FlowKey(IPPROTO_UDP, GUEST4, guest_port, gateway_of(4), 9)
            host.udp.restore_outbound(key, None, None, now)
        assert host.udp.count() == 300
        answer, _data, handed = await _migrate_in_one_namespace(mig, [IPPROTO_UDP] * 300)
        assert answer["flows"]["udp"] == 300 and len(handed) == 300
        for sock in handed:
            sock.close()
