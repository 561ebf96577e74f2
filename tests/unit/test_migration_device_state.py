"""DeviceStateMigration: QEMU's device-state calls over two real MigrationControllers.

No QEMU: the test plays the vhost-user frontend, calling the adapter as
the frontend does (save/load on SET_DEVICE_STATE_FD, check on
CHECK_DEVICE_STATE, resumed/started on ring starts, disconnected), and
plays QEMU's side of the pipe (a real os.pipe: reads it to EOF on a
source, writes a stream into it on a target). Each controller drives an
in-memory MigrationHost (tests/unit/migration_host.py); TCP connections
on the source are real loopback sockets under the kernel and helper
doubles (no root: nothing enters repair mode), the UDP flows and the
forwarding listeners are real sockets, restored for real on the target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, cast

import pytest
import trio
import trio.testing

from ferry_repair.protocol import RepairCommand as RepairMode
from ferryd.flows.portspec import PortForward
from ferryd.flows.tcp import socket_of
from ferryd.flows.tcp_conn import Endpoints, State, TcpConn, TcpGuestState
from ferryd.flows.tcp_host import SocketHost
from ferryd.frontends.vhost_user.messages import TransferDirection
from ferryd.migration import source as source_module
from ferryd.migration.controller import MigrationController
from ferryd.migration.errors import MigrationError
from ferryd.migration.history import Direction, Outcome
from ferryd.migration.records import TcpFlowRecord, UdpFlowRecord
from ferryd.migration.repair_client import RepairRefused
from ferryd.migration.repair_source import RepairSource
from ferryd.migration.roles import Role
from ferryd.migration.session import PRECOPY_QUIET
from ferryd.migration.source import OUTCOME_TIMEOUT, SourceMigration
from ferryd.migration.stream_events import FlowReceived, HeaderReceived, PrecopyEnded
from ferryd.migration_device_state import DeviceStateMigration
from tests.unit.migration_host import FakeKernel, FakeRepair, MemoryHost, decode_stream
from tests.unit.test_flows_helpers import GUEST4, gateway_of, udp_from_guest

SAVE, LOAD = TransferDirection.SAVE, TransferDirection.LOAD
ENDS = Endpoints(GUEST4, 40000, gateway_of(4), 80)
SAVED = TcpGuestState(
    State.ESTABLISHED, 0, 7000, 7000, 3000, 3000, 65535, 0, 0, 1460,
)  # fmt: skip


class Helper(FakeRepair):
    """The repair helper's double, as the controller's RepairSource (nothing to bind)."""

    async def setup(self) -> None:
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        pass


@dataclass
class Side:
    host: MemoryHost
    controller: MigrationController
    device: DeviceStateMigration


@dataclass
class Bed:
    src: Side
    dst: Side
    repair: Helper
    kernel: FakeKernel
    udp_peer: socket.socket
    """The remote end of the source's UDP flow."""


def role(side: Side) -> Role:
    """The role now (a call: mypy does not narrow it across awaits)."""
    return side.controller.role


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def bed(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Bed]:
    """A source with a UDP flow, and a target started like any other (running)."""
    kernel, repair = FakeKernel(), Helper()
    # The controller makes its SourceMigration with the real kernel: the double here.
    monkeypatch.setattr(SourceMigration.__init__, "__defaults__", (kernel,))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp_peer:
        udp_peer.bind(("127.0.0.1", 0))
        async with trio.open_nursery() as nursery:
            sides = []
            for host in (MemoryHost(nursery), MemoryHost(nursery)):
                controller = MigrationController(
                    host,
                    cast(RepairSource, repair),
                    incoming=False,
                    linger=0.0,
                    handed_over=host.exit,
                )
                await nursery.start(controller.run)
                sides.append(Side(host, controller, DeviceStateMigration(controller)))
            src, dst = sides
            now = trio.current_time()
            port = udp_peer.getsockname()[1]
            src.host.udp.from_guest(*udp_from_guest(GUEST4, gateway_of(4), 40001, port, b"hi"), now)
            assert udp_peer.recv(100) == b"hi"
            try:
                yield Bed(src, dst, repair, kernel, udp_peer)
            finally:
                for side in sides:
                    for conn in side.host.tcp.connections():
                        if socket_of(conn).fileno() >= 0:
                            side.host.tcp.forget(conn)
                            socket_of(conn).close()
                    await side.host.aclose()
                nursery.cancel_scope.cancel()


async def read_to_eof(fd: int) -> bytes:
    """QEMU's side of a SAVE: everything written into the pipe, until its writer closed it."""
    data = bytearray()
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(65536):
            data += chunk
    return bytes(data)


async def write_and_close(fd: int, data: bytes) -> None:
    """QEMU's side of a LOAD: the stream into the pipe, then EOF."""
    async with trio.lowlevel.FdStream(fd) as stream:
        # ferryd may stop reading (a refusal, a hostile stream): checked next.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)


async def save(side: Side) -> tuple[bytes, bool]:
    """SET_DEVICE_STATE_FD SAVE, QEMU reading to EOF, then CHECK_DEVICE_STATE."""
    reader, writer = os.pipe()
    side.device.save(writer)
    with trio.fail_after(10):
        data = await read_to_eof(reader)
        return data, await side.device.check(SAVE)


async def load(side: Side, data: bytes) -> tuple[bool, bool]:
    """SET_DEVICE_STATE_FD LOAD, QEMU writing ``data`` then EOF, then CHECK_DEVICE_STATE.

    Answers the verdict, and whether any descriptor of the pipe is still
    open afterwards (QEMU's end is closed by then: only ferryd's could be).
    """
    reader, writer = os.pipe()
    pipe = f"pipe:[{os.fstat(reader).st_ino}]"
    side.device.load(reader)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_and_close, writer, data)
            ok = await side.device.check(LOAD)
    await trio.testing.wait_all_tasks_blocked()
    return ok, pipe in _open_files()


def _open_files() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
    return out


def _adopt_tcp(host: MemoryHost, ends: Endpoints = ENDS) -> tuple[socket.socket, socket.socket]:
    """A real loopback TCP connection, adopted into the host's TCP flows as ``ends``."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        ours: SocketHost[TcpConn] = SocketHost.taking(server.accept()[0])
    ours.setblocking(False)
    now = trio.current_time()
    host.tcp.adopt(ends, ours, 4, SAVED, sock_timestamp=0, fin_received=False, now=now)
    return ours, peer


def _port_is_free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
            return False
        return True


# --- source -----------------------------------------------------------------


async def test_save_then_qemu_leaves_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    async with bed(monkeypatch) as b:
        src = b.src
        data, ok = await save(src)
        assert ok
        assert role(src) is Role.FROZEN
        flows = [e.flow for e in decode_stream(data) if isinstance(e, FlowReceived)]
        assert [type(f) for f in flows] == [UdpFlowRecord]
        src.device.disconnected()  # QEMU quit: the target took over
        with trio.fail_after(5):
            await src.host.exited.wait()
        assert role(src) is Role.MIGRATED
        assert src.host.calls == ["stop", "hand_over(drain)", "exit"]
        counters = src.controller.counters
        assert (counters.out_completed, counters.out_rolled_back, counters.out_failed) == (1, 0, 0)
        (record,) = src.controller.history.records()
        assert (record.direction, record.outcome) == (Direction.OUT, Outcome.COMPLETED)
        assert record.flows["udp"] == 1


async def test_save_then_qemu_resumes_rolls_back_with_every_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with bed(monkeypatch) as b:
        src = b.src
        ours, peer = _adopt_tcp(src.host)
        with peer:
            conns = src.host.tcp.connections()
            _, ok = await save(src)
            assert ok and role(src) is Role.FROZEN
            assert b.repair.calls == [(RepairMode.ON, [ours.fileno()])]
            # The migration failed after ferryd's part: QEMU restarts the rings.
            await src.device.resumed()
            assert role(src) is Role.RUNNING
            assert src.host.calls == ["stop", "hand_over(drain)", "stop", "take_over", "start"]
            assert b.repair.calls[1:] == [(RepairMode.OFF, [ours.fileno()])]
            assert src.host.tcp.connections() == conns  # the same connection, its socket open
            assert ours.fileno() >= 0
            peer.sendall(b"still here")
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(ours)
            assert ours.recv(100) == b"still here"
            assert src.host.udp.count() == 1
            counters = src.controller.counters
            assert (counters.out_rolled_back, counters.out_completed) == (1, 0)
            (record,) = src.controller.history.records()
            assert (record.outcome, record.error) == (Outcome.ROLLED_BACK, "aborted")
            # QEMU quitting later changes nothing: the outcome is known.
            src.device.disconnected()
            await trio.testing.wait_all_tasks_blocked()
            assert role(src) is Role.RUNNING and not src.host.exited.is_set()


async def test_a_frozen_source_waits_for_qemu_not_for_a_watchdog(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """QEMU is the authority: no rollback behind its back, however long it takes."""
    async with bed(monkeypatch) as b:
        _, ok = await save(b.src)
        assert ok
        await trio.sleep(OUTCOME_TIMEOUT * 3)
        assert role(b.src) is Role.FROZEN
        await b.src.device.resumed()
        assert role(b.src) is Role.RUNNING


async def test_save_into_a_pipe_nobody_reads_fails_and_rolls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with bed(monkeypatch) as b:
        src = b.src
        reader, writer = os.pipe()
        os.close(reader)  # QEMU gave up on the transfer
        src.device.save(writer)
        assert not await src.device.check(SAVE)
        assert role(src) is Role.RUNNING
        assert src.host.calls == ["stop", "hand_over(drain)", "stop", "take_over", "start"]
        counters = src.controller.counters
        assert (counters.out_failed, counters.out_rolled_back) == (1, 1)
        # QEMU resuming or leaving afterwards: nothing more to undo.
        await src.device.resumed()
        src.device.disconnected()
        await trio.testing.wait_all_tasks_blocked()
        assert role(src) is Role.RUNNING and counters.out_rolled_back == 1


async def test_a_second_save_while_frozen_is_refused_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with bed(monkeypatch) as b:
        src = b.src
        ours, peer = _adopt_tcp(src.host)
        with peer:
            _, ok = await save(src)
            assert ok
            data, ok = await save(src)  # QEMU should not; refused, its fd closed
            assert not ok and data == b""
            assert role(src) is Role.FROZEN and src.controller.counters.out_failed == 0
            await src.device.resumed()  # the first save's outcome still follows QEMU
            assert role(src) is Role.RUNNING
            assert b.repair.calls == [
                (RepairMode.ON, [ours.fileno()]),
                (RepairMode.OFF, [ours.fileno()]),
            ]


async def test_check_without_a_transfer_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    async with bed(monkeypatch) as b:
        assert not await b.src.device.check(SAVE)
        assert not await b.dst.device.check(LOAD)
        _, ok = await save(b.src)
        assert ok
        assert not await b.src.device.check(LOAD)  # not the direction of the transfer
        assert role(b.src) is Role.FROZEN
        assert b.dst.host.calls == [] and role(b.dst) is Role.RUNNING


# --- source: QEMU's migration starts (LOG_ALL), a pre-copy kept here -------


def _ends(port: int) -> Endpoints:
    return Endpoints(GUEST4, port, gateway_of(4), 80)


def _tcp_ports(events: Sequence[object]) -> list[int]:
    """The guest ports of the TCP records in a decoded stream, in order."""
    return [
        e.flow.guest_port
        for e in events
        if isinstance(e, FlowReceived) and isinstance(e.flow, TcpFlowRecord)
    ]


async def test_qemus_migration_start_precopies_and_save_sends_only_what_moved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LOG_ALL: the quiet connections are dumped while the guest runs; SAVE
    dumps again only the one whose socket moved since (QEMU's downtime)."""
    async with bed(monkeypatch) as b:
        src = b.src
        pairs = [_adopt_tcp(src.host, _ends(port)) for port in (40010, 40011)]
        (still, _), (moved, _) = pairs
        await trio.sleep(PRECOPY_QUIET * 1.5)  # both quiet long enough
        src.device.dirty_logging(True)  # QEMU's migration of the VM starts
        await trio.testing.wait_all_tasks_blocked()
        assert role(src) is Role.PRECOPIED
        fds = [still.fileno(), moved.fileno()]
        assert b.repair.calls == [(RepairMode.ON, fds), (RepairMode.OFF_NO_WINDOW_PROBE, fds)]
        assert src.host.calls == []  # the data path was not stopped
        # The guest still runs: one connection's socket moves meanwhile.
        monkeypatch.setattr(
            b.kernel, "segment_counts", lambda sock: (2, 2) if sock is moved else (1, 1)
        )
        b.kernel.calls.clear()
        data, ok = await save(src)
        assert ok and role(src) is Role.FROZEN
        events = decode_stream(data)
        header = events[0]
        assert isinstance(header, HeaderReceived) and header.header.precopy
        end = next(i for i, e in enumerate(events) if isinstance(e, PrecopyEnded))
        assert _tcp_ports(events[:end]) == [40010, 40011]  # the pre-copy, first
        assert _tcp_ports(events[end:]) == [40011]  # then only what moved
        assert [c for c in b.kernel.calls if c.startswith("dump")] == [f"dump {moved.fileno()}"]
        assert b.repair.calls[2:] == [(RepairMode.ON, fds)]  # the freeze: all of them
        migration = src.controller.migration
        assert isinstance(migration, SourceMigration)
        assert migration.streamed["tcp"] == 2 and migration.streamed["unchanged"] == 1
        # A late failure still rolls back with every connection.
        await src.device.resumed()
        assert role(src) is Role.RUNNING
        assert b.repair.calls[3:] == [(RepairMode.OFF, fds)]
        await _echoes(pairs)


@pytest.mark.parametrize("how", ["log-all-off", "qemu-left"])
async def test_a_migration_given_up_before_save_drops_the_precopy(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    async with bed(monkeypatch) as b:
        src = b.src
        ours, peer = _adopt_tcp(src.host)
        with peer:
            await trio.sleep(PRECOPY_QUIET * 1.5)
            src.device.dirty_logging(True)
            await trio.testing.wait_all_tasks_blocked()
            assert role(src) is Role.PRECOPIED
            if how == "log-all-off":
                src.device.dirty_logging(False)  # QEMU cancelled its migration
            else:
                src.device.disconnected()  # QEMU died mid-migration
            await trio.testing.wait_all_tasks_blocked()
            assert role(src) is Role.RUNNING
            assert src.host.calls == []  # the guest was served all along
            # The next migration starts from scratch: a plain freeze, every connection dumped.
            b.kernel.calls.clear()
            data, ok = await save(src)
            assert ok
            events = decode_stream(data)
            header = events[0]
            assert isinstance(header, HeaderReceived) and not header.header.precopy
            assert _tcp_ports(events) == [ENDS.guest_port]
            assert b.kernel.calls == [f"dump {ours.fileno()}"]


async def test_a_save_during_the_precopy_cuts_it_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest is stopped: the SAVE waits for the batch being dumped, not for the rest."""
    monkeypatch.setattr(source_module, "PRECOPY_BATCH", 1)
    async with bed(monkeypatch) as b:
        src = b.src
        pairs = [_adopt_tcp(src.host, _ends(port)) for port in (40020, 40021, 40022)]
        set_repair = b.repair.set_repair
        first_batch = trio.Event()

        async def slow_helper(socks: Any, mode: RepairMode, **kw: Any) -> None:
            await trio.sleep(0.05)
            await set_repair(socks, mode, **kw)
            first_batch.set()

        monkeypatch.setattr(b.repair, "set_repair", slow_helper)
        await trio.sleep(PRECOPY_QUIET * 1.5)
        src.device.dirty_logging(True)
        with trio.fail_after(5):
            await first_batch.wait()  # the first batch is in repair mode
        data, ok = await save(src)
        assert ok and role(src) is Role.FROZEN
        events = decode_stream(data)
        end = next(i for i, e in enumerate(events) if isinstance(e, PrecopyEnded))
        assert _tcp_ports(events[:end]) == [40020]  # the batch it was dumping
        assert _tcp_ports(events[end:]) == [40021, 40022]  # the rest, by the freeze
        migration = src.controller.migration
        assert isinstance(migration, SourceMigration)
        assert migration.streamed["tcp"] == 3 and migration.streamed["unchanged"] == 1
        for _, peer in pairs:
            peer.close()


# --- source: QEMU stops the VM to end its migration (freeze before SAVE) ----


async def _precopied_pairs(b: Bed, *ports: int) -> list[tuple[socket.socket, socket.socket]]:
    """Quiet connections, pre-copied at LOG_ALL (QEMU's migration started)."""
    pairs = [_adopt_tcp(b.src.host, _ends(port)) for port in ports]
    await trio.sleep(PRECOPY_QUIET * 1.5)
    b.src.device.dirty_logging(True)
    await trio.testing.wait_all_tasks_blocked()
    assert role(b.src) is Role.PRECOPIED
    return pairs


async def _echoes(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    """Each connection still carries bytes (its socket thawed), then its peer closes."""
    for ours, peer in pairs:
        peer.sendall(b"still here")
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(ours)
        assert ours.recv(100) == b"still here"
        peer.close()


async def test_the_vm_stopped_while_migrating_is_frozen_before_save(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SAVE comes only after RAM's last pass: by then every socket is frozen and
    the pre-copied ones confirmed; SAVE dumps only what moved, and no payload
    was read out of a kernel queue before there was a stream for it."""
    async with bed(monkeypatch) as b:
        src = b.src
        pairs = await _precopied_pairs(b, 40030, 40031)
        (still, _), (moved, _) = pairs
        monkeypatch.setattr(
            b.kernel, "segment_counts", lambda sock: (2, 2) if sock is moved else (1, 1)
        )
        b.kernel.calls.clear()
        src.device.suspended()  # the last ring stopped, LOG_ALL on
        await trio.testing.wait_all_tasks_blocked()
        assert role(src) is Role.MIGRATING_OUT
        assert src.host.calls == ["stop", "hand_over(drain)"]
        fds = [still.fileno(), moved.fileno()]
        assert b.repair.calls[-1] == (RepairMode.ON, fds)
        assert not any(c.startswith("dump") for c in b.kernel.calls)
        data, ok = await save(src)
        assert ok and role(src) is Role.FROZEN
        events = decode_stream(data)
        end = next(i for i, e in enumerate(events) if isinstance(e, PrecopyEnded))
        assert _tcp_ports(events[:end]) == [40030, 40031]
        assert _tcp_ports(events[end:]) == [40031]
        assert [c for c in b.kernel.calls if c.startswith("dump")] == [f"dump {moved.fileno()}"]
        assert b.repair.calls[2:] == [(RepairMode.ON, fds)]  # frozen once
        migration = src.controller.migration
        assert isinstance(migration, SourceMigration)
        assert migration.streamed["tcp"] == 2 and migration.streamed["unchanged"] == 1
        src.device.disconnected()  # the target took over
        with trio.fail_after(5):
            await src.host.exited.wait()
        for _, peer in pairs:
            peer.close()


@pytest.mark.parametrize("how", ["vm-resumed", "qemu-left"])
async def test_an_early_freeze_without_save_rolls_back(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """QEMU restarts the VM (its migration failed before SAVE), or dies: thawed."""
    async with bed(monkeypatch) as b:
        src = b.src
        pairs = await _precopied_pairs(b, 40040, 40041)
        fds = [ours.fileno() for ours, _ in pairs]
        src.device.suspended()
        await trio.testing.wait_all_tasks_blocked()
        assert role(src) is Role.MIGRATING_OUT
        if how == "vm-resumed":
            await src.device.resumed()  # before the ring's own start: frames wait for it
        else:
            src.device.disconnected()
            await trio.testing.wait_all_tasks_blocked()
        assert role(src) is Role.RUNNING
        assert b.repair.calls[-1] == (RepairMode.OFF, fds)
        assert src.host.calls[-2:] == ["take_over", "start"]
        await _echoes(pairs)
        # The next migration's SAVE freezes from scratch.
        _, ok = await save(src)
        assert ok and role(src) is Role.FROZEN


async def test_a_vm_resumed_while_the_early_freeze_runs_is_thawed_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with bed(monkeypatch) as b:
        src = b.src
        pairs = await _precopied_pairs(b, 40050)
        set_repair = b.repair.set_repair
        freezing = trio.Event()

        async def slow_helper(socks: Any, mode: RepairMode, **kw: Any) -> None:
            if mode is RepairMode.ON:
                freezing.set()
                await trio.sleep(0.2)
            await set_repair(socks, mode, **kw)

        monkeypatch.setattr(b.repair, "set_repair", slow_helper)
        src.device.suspended()
        with trio.fail_after(5):
            await freezing.wait()
        await src.device.resumed()  # QEMU runs the VM again meanwhile
        assert role(src) is Role.RUNNING
        fd = pairs[0][0].fileno()
        assert b.repair.calls[-1] == (RepairMode.OFF, [fd])  # thawed, whatever was reached
        await _echoes(pairs)


async def test_a_helper_refusing_the_early_freeze_rolls_back_and_save_freezes_anew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The early freeze checks each batch while the helper works on the next: a
    refused batch ends it, every socket is thawed, and the SAVE starts over."""
    async with bed(monkeypatch) as b:
        src = b.src
        pairs = await _precopied_pairs(b, 40060, 40061)
        fds = [ours.fileno() for ours, _ in pairs]
        set_repair = b.repair.set_repair
        refused: list[Any] = []

        async def refusing_once(socks: Any, mode: RepairMode, **kw: Any) -> None:
            if mode is RepairMode.ON and not refused:
                refused.append(socks)
                raise RepairRefused("refused", batch=0, batches=1, sockets=range(len(socks)))
            await set_repair(socks, mode, **kw)

        monkeypatch.setattr(b.repair, "set_repair", refusing_once)
        src.device.suspended()
        await trio.testing.wait_all_tasks_blocked()
        assert refused and role(src) is Role.RUNNING
        assert b.repair.calls[-1] == (RepairMode.OFF, fds)
        await _echoes(pairs)
        data, ok = await save(src)
        assert ok and role(src) is Role.FROZEN
        assert _tcp_ports(decode_stream(data)) == [40060, 40061]
        assert b.repair.calls[-1] == (RepairMode.ON, fds)


async def test_a_vm_stopped_while_not_migrating_is_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without LOG_ALL a stop is a paused VM (the session says nothing then; and
    were it told, the adapter freezes only a migrating VM)."""
    async with bed(monkeypatch) as b:
        src = b.src
        _, peer = _adopt_tcp(src.host)
        with peer:
            src.device.suspended()
            await trio.testing.wait_all_tasks_blocked()
            assert role(src) is Role.RUNNING
            assert b.repair.calls == [] and src.host.calls == []


# --- target -----------------------------------------------------------------


async def _stream_with_forwards(b: Bed) -> tuple[bytes, int, int]:
    """A source's stream (its UDP flow, a TCP and a UDP forward), the source then gone."""
    tcp_port, udp_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    await b.src.host.tcp.add_forward(PortForward(None, tcp_port, 22))
    await b.src.host.udp.add_forward(PortForward(None, udp_port, 53))
    data, ok = await save(b.src)
    assert ok
    b.src.device.disconnected()
    with trio.fail_after(5):
        await b.src.host.exited.wait()
    await b.src.host.aclose()  # the source ferryd exited: its ports are free
    return data, tcp_port, udp_port


async def _bind_forwards_at_start(host: MemoryHost, tcp_port: int, udp_port: int) -> None:
    """What a target started with the source's command line binds before any LOAD."""
    await host.tcp.add_forward(PortForward(IPv4Address("0.0.0.0"), tcp_port, 22))
    await host.udp.add_forward(PortForward(IPv4Address("0.0.0.0"), udp_port, 53))
    assert not _port_is_free(tcp_port, socket.SOCK_STREAM)


async def test_load_check_started_runs_the_guest_here(monkeypatch: pytest.MonkeyPatch) -> None:
    async with bed(monkeypatch) as b:
        data, tcp_port, udp_port = await _stream_with_forwards(b)
        dst = b.dst
        await _bind_forwards_at_start(dst.host, tcp_port, udp_port)
        ok, pipe_open = await load(dst, data)
        assert ok and not pipe_open  # restored, and the pipe's end closed
        assert role(dst) is Role.RESTORED
        assert dst.host.calls == ["stop", "take_over", "rebuild"]
        # The forwards bound at start gave way to the stream's (same ports, once each).
        assert {(f.host_port, f.guest_port) for f, _, _ in dst.host.tcp.listeners()} == {
            (tcp_port, 22)
        }
        assert {(f.host_port, f.guest_port) for f, _, _ in dst.host.udp.listeners()} == {
            (udp_port, 53)
        }
        assert dst.host.udp.count() == 1
        await dst.device.started()  # QEMU starts the VM: the first ring
        await dst.device.started()  # the second ring: nothing more
        assert role(dst) is Role.RUNNING
        assert dst.host.calls == ["stop", "take_over", "rebuild", "start"]
        counters = dst.controller.counters
        assert (counters.in_completed, counters.in_failed) == (1, 0)
        (record,) = dst.controller.history.records()
        assert (record.direction, record.outcome, record.flows["udp"]) == (
            Direction.IN,
            Outcome.COMPLETED,
            1,
        )
        dst.device.disconnected()  # running: QEMU leaving later undoes nothing
        await trio.testing.wait_all_tasks_blocked()
        assert role(dst) is Role.RUNNING and dst.host.udp.count() == 1


@pytest.mark.parametrize("keep", [0, 1, 30, -40, -1])
async def test_a_truncated_stream_fails_the_check_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, keep: int
) -> None:
    async with bed(monkeypatch) as b:
        data, tcp_port, udp_port = await _stream_with_forwards(b)
        dst = b.dst
        await _bind_forwards_at_start(dst.host, tcp_port, udp_port)
        ok, pipe_open = await load(dst, data[:keep])
        assert not ok and not pipe_open
        assert role(dst) is Role.INCOMING
        assert (dst.host.tcp.count(), dst.host.udp.count(), dst.host.icmp.count()) == (0, 0, 0)
        assert dst.host.tcp.listeners() == [] and dst.host.udp.listeners() == []
        assert _port_is_free(tcp_port, socket.SOCK_STREAM)
        assert _port_is_free(udp_port, socket.SOCK_DGRAM)
        assert dst.controller.counters.in_failed == 1
        # The next LOAD, whole, works (a ring started instead: the next tests).
        ok, _ = await load(dst, data)
        assert ok and role(dst) is Role.RESTORED


async def test_a_hostile_stream_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    async with bed(monkeypatch) as b:
        ok, pipe_open = await load(b.dst, b"\xff" * 100_000)
        assert not ok and not pipe_open
        assert role(b.dst) is Role.INCOMING
        assert b.dst.host.udp.count() == 0


async def test_qemu_leaving_before_the_vm_ran_discards_then_a_second_load_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with bed(monkeypatch) as b:
        data, tcp_port, udp_port = await _stream_with_forwards(b)
        dst = b.dst
        ok, _ = await load(dst, data)
        assert ok and role(dst) is Role.RESTORED
        assert not _port_is_free(tcp_port, socket.SOCK_STREAM)
        dst.device.disconnected()  # the target QEMU died before its VM ran
        await trio.testing.wait_all_tasks_blocked()
        assert role(dst) is Role.INCOMING
        assert dst.host.udp.count() == 0 and dst.host.tcp.listeners() == []
        assert _port_is_free(tcp_port, socket.SOCK_STREAM)
        assert _port_is_free(udp_port, socket.SOCK_DGRAM)
        assert dst.controller.counters.in_failed == 1
        # A new QEMU connects and loads again: a fresh session, the same ferryd.
        ok, _ = await load(dst, data)
        assert ok and role(dst) is Role.RESTORED
        await dst.device.started()
        assert role(dst) is Role.RUNNING
        assert dst.controller.counters.in_completed == 1
        assert not _port_is_free(tcp_port, socket.SOCK_STREAM)


async def test_a_ferryd_whose_guest_ran_refuses_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its flows would be replaced by the stream's: refused, nothing touched, the fd closed."""
    async with bed(monkeypatch) as b:
        data, _, _ = await _stream_with_forwards(b)
        dst = b.dst
        port = b.udp_peer.getsockname()[1]
        now = trio.current_time()
        dst.host.udp.from_guest(*udp_from_guest(GUEST4, gateway_of(4), 40002, port, b"me"), now)
        ok, pipe_open = await load(dst, data)
        assert not ok and not pipe_open
        assert role(dst) is Role.RUNNING
        assert dst.host.calls == [] and dst.host.udp.count() == 1
        dst.device.disconnected()
        await dst.device.started()
        await trio.testing.wait_all_tasks_blocked()
        assert role(dst) is Role.RUNNING and dst.host.calls == []
        assert dst.controller.counters.in_failed == 0


async def test_a_device_state_before_the_controller_runs_is_refused() -> None:
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        controller = MigrationController(
            host, RepairSource(None, None), incoming=False, linger=0.0, handed_over=host.exit
        )
        device = DeviceStateMigration(controller)
        reader, writer = os.pipe()
        device.load(reader)
        assert not await device.check(LOAD)
        with pytest.raises(BrokenPipeError):
            os.write(writer, b"x")
        os.close(writer)
        device.disconnected()
        assert controller.role is Role.RUNNING and host.calls == []
        await host.aclose()


async def test_a_load_right_after_a_disconnect_waits_for_the_discard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reconnecting QEMU's LOAD may come before the last one's discard ran: taken in order."""
    async with bed(monkeypatch) as b:
        data, _, _ = await _stream_with_forwards(b)
        dst = b.dst
        ok, _ = await load(dst, data)
        assert ok and role(dst) is Role.RESTORED
        dst.device.disconnected()
        ok, _ = await load(dst, data)  # no wait in between
        assert ok and role(dst) is Role.RESTORED
        assert dst.controller.counters.in_failed == 1  # the first one discarded
        await dst.device.started()
        assert role(dst) is Role.RUNNING and dst.host.udp.count() == 1


@pytest.mark.parametrize("given_up", ["failed", "discarded"])
async def test_a_new_guest_after_a_given_up_load_gets_the_ferryd_as_started(
    monkeypatch: pytest.MonkeyPatch, given_up: str
) -> None:
    """The target QEMU died; a new one boots its guest here (no LOAD): running, forwards bound."""
    async with bed(monkeypatch) as b:
        data, tcp_port, udp_port = await _stream_with_forwards(b)
        dst = b.dst
        dst.host.forwards = [
            ("tcp", PortForward(IPv4Address("0.0.0.0"), tcp_port, 22)),
            ("udp", PortForward(IPv4Address("0.0.0.0"), udp_port, 53)),
        ]
        await _bind_forwards_at_start(dst.host, tcp_port, udp_port)
        ok, _ = await load(dst, data[:-40] if given_up == "failed" else data)
        assert ok is (given_up == "discarded")
        dst.device.disconnected()  # the target QEMU died
        await dst.device.started()  # a new QEMU's first ring, no wait in between
        assert role(dst) is Role.RUNNING
        assert dst.host.calls[-3:] == ["reset", "take_over", "start"]
        assert dst.host.running and dst.host.holds_guest
        assert (dst.host.tcp.count(), dst.host.udp.count()) == (0, 0)  # nothing of the stream
        assert {(f.host_port, f.guest_port) for f, _, _ in dst.host.tcp.listeners()} == {
            (tcp_port, 22)
        }
        assert {(f.host_port, f.guest_port) for f, _, _ in dst.host.udp.listeners()} == {
            (udp_port, 53)
        }
        assert not _port_is_free(tcp_port, socket.SOCK_STREAM)
        assert not _port_is_free(udp_port, socket.SOCK_DGRAM)
        counters = dst.controller.counters
        assert (counters.in_failed, counters.in_completed) == (1, 0)
        await dst.device.started()  # the second ring: nothing more
        assert dst.host.calls.count("reset") == 1 and role(dst) is Role.RUNNING


async def test_a_ferryd_started_incoming_stays_incoming_on_a_ring_start() -> None:
    """Waiting for a stream is how it started: a ring start without LOAD changes nothing."""
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        controller = MigrationController(
            host, RepairSource(None, None), incoming=True, linger=0.0, handed_over=host.exit
        )
        await nursery.start(controller.run)
        device = DeviceStateMigration(controller)
        await device.started()
        assert controller.role is Role.INCOMING and host.calls == []
        await host.aclose()
        nursery.cancel_scope.cancel()


async def test_qemu_leaving_while_ferryd_exits_is_refused_quietly() -> None:
    """SIGTERM cancels the controller first; QEMU's connection closing after asks nothing of it."""
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        controller = MigrationController(
            host, RepairSource(None, None), incoming=False, linger=0.0, handed_over=host.exit
        )
        async with trio.open_nursery() as daemon:
            await daemon.start(controller.run)
            daemon.cancel_scope.cancel()  # SIGTERM
        device = DeviceStateMigration(controller)
        device.disconnected()  # no RuntimeError from a closed nursery
        with pytest.raises(MigrationError, match="exiting"):
            controller.in_background(trio.lowlevel.checkpoint)
        assert controller.role is Role.RUNNING and host.calls == []
        await host.aclose()
