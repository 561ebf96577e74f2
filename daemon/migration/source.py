"""The source side of a migration: freeze, dump, stream; then commit or roll back.

Theory of operation (DESIGN.md, "Migration"; REFERENCE.md, TCP_REPAIR):

1. Stop the data path: the frontend's reader and every flow task are cancelled, so
   no frame from the guest and no socket event is handled any more.
2. Freeze each TCP socket's intake (a drop-all socket filter: a socket in
   repair mode would otherwise keep ACKing data that then exists nowhere)
   and switch repair ON for all of them, in batches of ≤ 253 through
   ferry-repair.
3. Stream: the header (the guest's link), the forwarding listeners, one
   record per flow, dumped as it is written (no staging area), a trailer.
   Steps 2 and 3 overlap: each connection is dumped as soon as the helper
   answered for its batch, and the stream is flushed every
   :data:`FLUSH_RECORDS` records, so the target restores meanwhile.
4. Keep the frozen sockets until told the outcome (the guest's frames
   were handed over at the freeze, so the target's frontend collects what the
   guest sends meanwhile). Commit: keep the sockets (silently dropping whatever still
   reaches them, so this host never resets a connection the target now
   owns) for ``--linger`` seconds, then exit. Abort, a failed write, or no
   word within :data:`OUTCOME_TIMEOUT`: thaw, repair OFF in batches, resume
   as if nothing happened.

A rollback needs the helper (repair OFF), and the helper may be gone: the
connection to it failed mid-freeze, or ferry-repair was restarted or is
down. The rollback reaches it anew (the repair client reconnects), and if
it still cannot, nothing is claimed: the frozen connections stay frozen
(their peers keep retransmitting into the drop-all filter, nothing is lost
yet) and held (TcpFlows.hold: the guest's segments for them are dropped,
and it resends them), while everything else of the guest is served again:
the data path starts before the thaw, since only the thaw needs the
helper. The role says ``rollback-pending``, ``status`` shows why, the
rollback is retried in the background (:data:`ROLLBACK_RETRY_MAX` apart at
most) and by every ``migrate-abort``. ``migrate-abort`` acts in every
source state short of the end: it stops a pre-copy or a freeze in
progress (which then rolls back), rolls back a frozen or committed source,
retries a pending rollback, and on a running source says there is nothing
to undo; it fails only when the rollback could not be completed, and says
why.

Pre-copy (``migrate-precopy``, before ``migrate-out``; not in the same
namespace). Restoring a socket costs the target far more than dumping it
costs the source, and a thousand idle connections do not change in the
second before a freeze. So while the guest still runs, the quiet
connections (established, nothing in flight either way for
:data:`~ferryd.migration.session.PRECOPY_QUIET`, a setting of the
controller) are dumped in batches: each batch is held (the data
path leaves those connections alone and drops the guest's segments for
them, which the guest retransmits), repair ON, dump, repair OFF without a
window probe and *armed* (ferry-repair's armed filter, repair_helper/
armed.py: a socket filter that drops everything once the helper sets one
map entry), released — a few milliseconds per batch. Only a connection
at rest in the kernel too (flowstate.at_rest: no byte in either socket
queue) is taken: one the data path merely has nothing to do for can still
hold sent and unsent bytes, which the target, keeping a pre-copied
connection as restored, would never send. The records go
ahead of the freeze, ended by a PrecopyEnd record, and the target restores
them while the guest still runs. At the freeze one FREEZE_ARMED stops
the intake of every armed socket at once (~1 ms for 1,000, against ~5 ms
to freeze them one by one), and a pre-copied connection whose socket
counted no segment in or out since its dump (sockstate.segment_counts)
and whose guest side did not move is neither dumped again nor put in
repair mode: it costs one getsockopt and no stream bytes. The others, and
every socket the helper could not arm (passt-repair, an older
ferry-repair), are frozen and put in repair mode one by one, as without
a pre-copy; those that moved are dumped in full and replace their
pre-copied record; pre-copied connections that ended meanwhile are
listed in one TcpGone record. The confirmed ones go into repair mode
soon after the commit (SourceMigration.repair_armed), so that they close
silently whenever this ferryd exits, and a rollback's repair OFF takes
their filter off like any other's.

QEMU (vhost-user, ferryd.migration_device_state) opens the stream only
once its guest is stopped, so there the pre-copy starts when QEMU's
migration does (LOG_ALL) and is kept here, encoded (:meth:`precopy`
without a stream), and the freeze starts when QEMU stops the VM
(:meth:`freeze_early`), a few milliseconds before it asks for the stream:
:meth:`migrate_out` then writes the kept pre-copy and dumps the rest.

Same network namespace as the target: the stream is a Unix socket and the
sockets themselves go with it (ferryd.migration.handover): nothing is put
in repair mode or dumped, and the source keeps its own reference to each
socket until its linger ends, so a rollback finds every flow where it was.
That is every TCP connection, every forward's listening sockets (with the
connections waiting in their accept queues, or the datagrams in their
receive queues), and every outbound UDP flow's and echo flow's socket.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ferryd import collector
from ferryd.flows.tcp import socket_of
from ferryd.flows.tcp_conn import State, TcpConn, TcpGuestState
from ferryd.migration.errors import MigrationAborted, MigrationError, MigrationFailed
from ferryd.migration.flowstate import at_rest, tcp_record
from ferryd.migration.handover import HandoverStream, is_socket
from ferryd.migration.history import Direction, Outcome
from ferryd.migration.ports import LINUX, KernelDump, RepairPort
from ferryd.migration.records import (
    FlowRecord,
    IcmpFlowRecord,
    ListenerRecord,
    StreamHeader,
    TcpFlowRecord,
    UdpFlowRecord,
)
from ferryd.migration.repair_client import RepairMode
from ferryd.migration.roles import ROLLBACK_ROLES, Event, Role
from ferryd.migration.session import Session
from ferryd.migration.sockstate import SocketStateError, may_hold_window
from ferryd.migration.stream import StreamEncoder
from ferryd.wire.ip import IPPROTO_TCP, IPPROTO_UDP

log = logging.getLogger("ferryd.migration")

Stream = trio.lowlevel.FdStream | HandoverStream
"""The stream a migration writes: a pipe, or in one namespace a socket that carries sockets."""

#: A frozen source that hears neither commit nor abort rolls back by itself.
OUTCOME_TIMEOUT = 120.0
#: From a pre-copy's start until the move ends, each TCP socket's receive and
#: send buffers are capped at this many bytes (MigratingTcp.bound_queues): what
#: a busy connection must carry across the freeze is then about twice this,
#: not the megabytes autotuning gives it. At the ~50 µs round trip of a local
#: peer it still lets a connection run at gigabytes per second meanwhile.
QUEUE_BOUND = 128 * 1024
#: Records are written to the stream in chunks of about this size.
CHUNK = 256 * 1024
#: ... or of this many TCP flow records, whichever comes first: the target
#: restores while the source still dumps (its batches are this size too,
#: restore.BATCH), so a thousand idle connections (~80 KB) must not wait
#: for one chunk at the end.
FLUSH_RECORDS = 64
#: Who wrote the stream (the header's software_version; logs only).
SOFTWARE_VERSION = f"ferry {importlib.metadata.version('ferry')}"
#: Connections held at once for a pre-copy dump (one ferry-repair message).
PRECOPY_BATCH = 128
#: After a commit, how long the connections frozen armed wait before the helper
#: puts them in repair mode (SourceMigration._linger): ferryctl commits the source
#: right before it resumes the target, and on one host's 2 CPUs the pass (~5 ms of
#: the helper's for 1,000) made the target's repair OFF and resume up to 5 ms slower.
ARMED_REPAIR_DELAY = 0.25
#: A rollback that could not reach the helper is tried again after this many
#: seconds, doubling up to :data:`ROLLBACK_RETRY_MAX`.
ROLLBACK_RETRY_FIRST = 0.25
ROLLBACK_RETRY_MAX = 5.0


def _no_flows() -> dict[str, int]:
    """A migration's flow counts, by kind (the history's flows moved; ferryctl's answer)."""
    return {"tcp": 0, "udp": 0, "icmp": 0, "listeners": 0, "reset": 0, "unchanged": 0}


def _why(exc: BaseException) -> str:
    """A failure in words; trio's stream errors carry none."""
    if isinstance(exc, trio.BrokenResourceError):
        return "the stream's reader went away (the target stopped reading)"
    return str(exc) or type(exc).__name__


class _RepairOn:
    """Repair ON for ``conns`` in ``nursery``, through ``repair``, batch after batch;
    :meth:`reached` waits until a connection is frozen and in repair mode (its batch
    answered), so that each is dumped or checked while the helper works on the next."""

    def __init__(
        self, repair: RepairPort | None, conns: list[TcpConn], nursery: trio.Nursery
    ) -> None:
        self._conns = conns
        self._next = 0
        """conns[:_next] were reached (the callers go through them in order)."""
        self._ready = 0
        """conns[:_ready] are frozen and in repair mode."""
        self._more = trio.Event()
        self._failed: Exception | None = None
        if conns:
            assert repair is not None  # (reached by SourceMigration._freeze)
            nursery.start_soon(self._run, repair, [socket_of(c) for c in conns])

    def _progress(self, n: int) -> None:
        self._ready = n
        self._more.set()

    async def _run(self, repair: RepairPort, socks: list[socket.socket]) -> None:
        try:
            await repair.set_repair(socks, RepairMode.ON, progress=self._progress)
        except Exception as exc:  # raised by reached(), as a plain exception
            self._failed = exc
            self._more.set()

    async def reached(self, conn: TcpConn) -> None:
        """Until ``conn`` is frozen and in repair mode, if it is the next of ``conns``
        (others, e.g. still connecting, pass at once; no checkpoint if it is ready)."""
        index = self._next
        if index >= len(self._conns) or self._conns[index] is not conn:
            return
        self._next += 1
        while self._ready <= index:
            if self._failed is not None:
                raise self._failed
            self._more = trio.Event()
            await self._more.wait()


class SourceMigration:
    def __init__(self, session: Session, kernel: KernelDump = LINUX) -> None:
        self.s = session
        self.kernel = kernel
        self.roles = session.roles
        self.host = session.host
        self.repair_source = session.repair
        self.repair: RepairPort | None = None
        self.same_netns = False
        self.conns: list[TcpConn] = []
        self.frozen: list[TcpConn] = []
        self.armed: set[TcpConn] = set()
        """Pre-copied connections whose sockets left repair mode armed (ferry-repair's
        armed filter, repair_helper/armed.py), over the helper connection that still
        holds them: one FREEZE_ARMED stops the intake of all of them."""
        self.armed_frozen: list[TcpConn] = []
        """Connections the freeze confirmed with their intake stopped that way: frozen,
        but not in repair mode (put there after the commit, to be closed silently,
        or thawed by repair OFF in a rollback)."""
        self.held_windows: dict[TcpConn, int] = {}
        """Frozen connections whose dump may have held the send window (sockstate,
        "Nothing new after the dump"): the window to give back if they thaw here."""
        self.timings: dict[str, float] = {}
        self._watchdog: trio.CancelScope | None = None
        self.stream: Stream | None = None
        self.enc = StreamEncoder()
        self.precopied: dict[TcpConn, tuple[int, tuple[int, int], TcpGuestState]] = {}
        """Pre-copied connections: record index, segment counts and guest side at the dump
        (a connection whose socket and guest side did not move since is not dumped again)."""
        self.precopy_timings: dict[str, float] = {}
        self.kept: bytes | None = None
        """A pre-copy kept here (no stream yet: QEMU's, see :meth:`precopy`): the bytes
        that go first on the stream the freeze is given; None otherwise."""
        self.keeping = False
        """This migration's pre-copy is (or was) kept here: started without a stream."""
        self.early: tuple[bytes, dict[str, int]] | None = None
        """After :meth:`freeze_early`, until the stream comes: what goes first on it
        (a kept pre-copy) and the flows confirmed so far, by kind."""
        self._cut = False
        """Set by :meth:`cut_precopy`: the pre-copy in progress ends after its batch."""
        self._work: trio.CancelScope | None = None
        """The pre-copy or freeze in progress (migrate-abort cancels it)."""
        self._work_done = trio.Event()
        self._work_done.set()
        self._rollback_lock = trio.Lock()
        self._retrying = False
        self.handed: list[TcpConn] = []
        """Same namespace: connections whose sockets went to the target as well (closed
        here when the linger ends; a rollback carries on with them)."""
        self.rollback_error: str | None = None
        """Why the last rollback attempt could not complete; None once one did."""
        self._serving = False
        """A rollback attempt started the data path again; only the frozen TCP
        connections (held) wait for the helper's thaw."""
        self.rollback_attempts = 0
        self._linger_scope: trio.CancelScope | None = None
        self.t_freeze: float | None = None
        """When the guest's network stopped here (monotonic; None before the freeze)."""
        self.streamed: dict[str, int] = {}
        """The flows streamed at the freeze, by kind (the history's flows moved)."""
        self.failure: str | None = None
        """Why this migration is being undone (the history's error)."""

    def status(self) -> dict[str, Any]:
        """This migration in ``ferryctl status``: a pending rollback is visible there."""
        return {
            "side": "source",
            "rollback_error": self.rollback_error,
            "rollback_attempts": self.rollback_attempts,
            "helper_reconnects": 0 if self.repair is None else self.repair.reconnects,
        }

    async def precopy(self, fd: int | None) -> dict[str, Any]:
        """Start the stream while the guest runs: header and the quiet TCP connections.

        With ``fd`` None there is no stream yet: QEMU opens one only once the
        guest stopped (SET_DEVICE_STATE_FD), yet tells when its migration
        starts (LOG_ALL, ferryd.migration_device_state). The pre-copy is then
        kept here, encoded (:attr:`kept`, ~80 bytes a connection), and goes
        first on the stream the freeze is given: what QEMU counts as downtime
        is then the freeze's check of each pre-copied connection, not its dump.
        """
        d, kernel = self.host, self.kernel
        stream = None if fd is None else trio.lowlevel.FdStream(fd)  # owns fd from here on
        try:
            self.roles.step(Event.PRECOPY, "cannot pre-copy: this ferryd is {role}")
        except BaseException:
            if stream is not None:
                await stream.aclose()
            raise
        self.stream = stream
        self.keeping = stream is None
        t0 = time.monotonic()
        held: list[TcpConn] = []
        self._work_done = trio.Event()
        # Busy connections' queues drain to QUEUE_BOUND while the quiet ones
        # are dumped; undone by a dropped pre-copy or a rollback.
        d.tcp.bound_queues(QUEUE_BOUND)
        try:
            with trio.CancelScope() as work:
                self._work = work
                out = bytearray(self.enc.header(self._header(precopy=True)))
                now = trio.current_time()
                wait = self.s.precopy_quiet
                quiet = [c for c in d.tcp.connections() if c.settled(now, wait)]
                if quiet:
                    repair = self.repair = await self.repair_source.get()
                elif self.keeping and d.tcp.count():
                    self.s.nursery.start_soon(self._reach_helper)
                for start in range(0, len(quiet), PRECOPY_BATCH):
                    if self._cut:
                        break  # the freeze is waiting: what was dumped goes ahead
                    batch = [c for c in quiet[start : start + PRECOPY_BATCH] if not c.closed]
                    if not batch:
                        continue
                    held = batch
                    d.tcp.hold(batch)
                    socks = [socket_of(c) for c in batch]
                    await repair.set_repair(socks, RepairMode.ON)
                    try:
                        for conn in batch:
                            try:
                                segs = kernel.segment_counts(socket_of(conn))
                                dumped = kernel.dump_tcp(socket_of(conn))
                                if may_hold_window(dumped):
                                    # Unsent bytes: not at rest, so not kept (below).
                                    # Its window back first, whatever happens next.
                                    kernel.reopen_send_window(socket_of(conn), dumped.snd_wnd)
                            except (SocketStateError, OSError) as exc:
                                log.info(
                                    "pre-copy: %s: %s; left for the freeze", conn.describe(), exc
                                )
                                continue
                            record = tcp_record(conn, dumped)
                            if not at_rest(record):
                                # Bytes queued in the kernel (a busy connection that
                                # merely paused): the target keeps a pre-copied one
                                # as restored, without its unsent tail or a resync
                                # (restore.py), so only a connection at rest may go.
                                continue
                            out += self.enc.flow(record)
                            self.precopied[conn] = (
                                self.enc.flow_count - 1,
                                segs,
                                conn.guest_state(),
                            )
                    finally:
                        # (Cancelled by migrate-abort, this raises again and
                        # leaves the batch held: the handler below undoes it.)
                        await self._release(repair, batch, socks)
                        kernel.reuse_after_repair_off(socks)
                        d.tcp.release(batch, trio.current_time())
                        held = []
                    if stream is not None and len(out) >= CHUNK:
                        await stream.send_all(bytes(out))
                        out.clear()
                out += self.enc.precopy_end()
                if stream is not None:
                    await stream.send_all(bytes(out))
                else:
                    self.kept = bytes(out)
            if work.cancelled_caught:
                raise MigrationAborted("aborted by migrate-abort")
        except Exception as exc:  # as migrate_out: any failure undoes the pre-copy
            log.warning("pre-copy failed: %s", _why(exc))
            self.s.counters.out_failed += 1
            self._record(Outcome.FAILED, error=f"pre-copy failed: {_why(exc)}")
            with trio.CancelScope(shield=True):
                if held:
                    await self._unhold(held)
                await self._drop_precopy()
            raise MigrationFailed(f"pre-copy failed ({_why(exc)}); nothing changed here") from exc
        finally:
            self._work = None
            self._work_done.set()
        self.roles.step(Event.PRECOPIED)
        if stream is not None:
            # (A kept pre-copy has no watchdog: QEMU tells when its migration
            # ends, by LOG_ALL off or by disconnecting.)
            self.s.nursery.start_soon(self._outcome_watchdog)
        self.precopy_timings = {"precopy": (time.monotonic() - t0) * 1e3}
        log.info("migration: pre-copied %d TCP connections", len(self.precopied))
        return {
            "precopied": len(self.precopied),
            "stream_bytes": self.enc.bytes_written,
            "timings_ms": self.precopy_timings,
        }

    async def _reach_helper(self) -> None:
        """Connect to the repair helper ahead of QEMU's freeze, with no connection quiet
        enough to pre-copy (those would have reached it).

        The freeze comes with the VM stopped and needs the helper; the connect
        and the helper's accept took 0.15-0.5 ms of it (one busy connection, 2
        loaded CPUs). In the background, as the target's (TargetMigration): a
        failure is left for the freeze to meet and report.
        """
        with contextlib.suppress(MigrationError):
            await self.repair_source.get()

    async def cut_precopy(self) -> None:
        """Until the pre-copy in progress, if any, has ended: after the batch it is dumping.

        For a freeze that cannot wait (QEMU's SAVE: the guest is stopped);
        the connections not reached yet are dumped by the freeze.
        """
        self._cut = True
        await self._work_done.wait()

    async def _release(
        self, repair: RepairPort, batch: list[TcpConn], socks: list[socket.socket]
    ) -> None:
        """A pre-copy batch leaves repair mode, armed where the helper can (so that
        the freeze stops them all in one call, repair_helper/armed.py), else bare."""
        if repair.can_arm:
            try:
                await repair.set_repair(socks, RepairMode.ARM)
            except MigrationError as exc:
                # An older ferry-repair (an unknown command), or its map is
                # full. Either way it dropped the connection, and with it what
                # it had armed for us (those pass everything now).
                log.warning(
                    "pre-copy: the repair helper would not arm sockets (%s): the freeze"
                    " will put each in repair mode",
                    _why(exc),
                )
                repair.can_arm = False
                self.armed.clear()
            else:
                self.armed.update(batch)
                return
        await repair.set_repair(socks, RepairMode.OFF_NO_WINDOW_PROBE)

    async def _disarm(self) -> None:
        """The helper forgets what it armed for us; best effort (a connection gone
        has done it, or left them frozen, which repair OFF undoes)."""
        armed, self.armed = self.armed, set()
        if armed and self.repair is not None:
            with contextlib.suppress(MigrationError):
                await self.repair.disarm()

    def _confirm_stopped(self, stopped: set[TcpConn], counts: dict[str, int]) -> list[TcpConn]:
        """Confirm each connection in ``stopped`` (:meth:`_confirmed`: counted in
        ``counts``, kept in :attr:`armed_frozen`); the others, to freeze one by one."""
        rest: list[TcpConn] = []
        for conn in self.conns:
            if conn in stopped and self._confirmed(conn):
                self.armed_frozen.append(conn)
            else:
                rest.append(conn)
        counts["tcp"] += len(self.armed_frozen)
        counts["unchanged"] += len(self.armed_frozen)
        return rest

    async def _freeze_armed(self) -> set[TcpConn]:
        """FREEZE_ARMED: the armed connections whose intake it stopped (all or none)."""
        try:
            repair = self.repair = await self.repair_source.get()
            await repair.freeze_armed(len(self.armed))
        except MigrationError as exc:
            # The helper dropped the connection, which released them: each
            # goes through repair mode instead, as without arming.
            log.warning("freeze: armed sockets not stopped at once (%s): one by one", _why(exc))
            self.armed.clear()
            return set()
        return self.armed

    async def _unhold(self, held: list[TcpConn]) -> None:
        """A pre-copy batch failed half-way: repair OFF again (fresh helper), release."""
        d = self.host
        try:
            repair = await self.repair_source.get()
            await repair.set_repair([socket_of(c) for c in held], RepairMode.OFF_NO_WINDOW_PROBE)
            self.kernel.reuse_after_repair_off([socket_of(c) for c in held])
        except Exception as exc:  # nothing better to do than say so
            log.error("pre-copy: cannot take %d sockets out of repair mode: %s", len(held), exc)
        d.tcp.release(held, trio.current_time())

    async def _drop_precopy(self) -> None:
        self.host.tcp.bound_queues(None)
        await self._disarm()
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None
        self.kept = None
        self.precopied.clear()
        self.roles.step(Event.PRECOPY_DROPPED)

    def _header(self, *, precopy: bool) -> StreamHeader:
        d = self.host
        link = d.link
        return StreamHeader(
            ferry_mac=link.mac,
            mtu=link.mtu,
            ipv4=link.ipv4,
            ipv6=link.ipv6,
            guest_mac=d.guest_mac,
            flow_count_hint=d.tcp.count() + d.udp.count() + d.icmp.count(),
            software_version=SOFTWARE_VERSION,
            frozen_at_ns=None if precopy else time.time_ns(),
            precopy=precopy,
            handover=not precopy and self.same_netns,
        )

    async def migrate_out(
        self, fd: int | None, same_netns: bool, outcome_timeout: float | None = OUTCOME_TIMEOUT
    ) -> dict[str, Any]:
        """Freeze and stream: on ``fd``, or on the pre-copy's stream if ``fd`` is None.

        After a pre-copy kept here (:attr:`kept`), ``fd`` is its stream.

        Streamed, the source waits for commit or abort, and rolls back by
        itself after ``outcome_timeout`` seconds without either (ferryctl's
        coordinator may die). None: no such watchdog, for a driver that
        always tells (QEMU: ferryd.migration_device_state).
        """
        roles = self.roles
        stream: Stream
        if fd is not None and self.early is not None:
            return await self._stream_frozen(fd, same_netns, outcome_timeout, *self.early)
        kept = self.kept if fd is not None else None
        if fd is not None and kept is not None:
            stream = self.stream = trio.lowlevel.FdStream(fd)  # owns fd from here on
            self.kept = None
            if same_netns:
                await self._drop_precopy()
                raise MigrationFailed("no pre-copy in the target's network namespace")
            roles.step(Event.FREEZE_PRECOPIED)  # (kept only while precopied; no watchdog)
        elif fd is not None:
            handover = same_netns and is_socket(fd)
            # (owns fd from here on)
            stream = self.stream = HandoverStream(fd) if handover else trio.lowlevel.FdStream(fd)
            try:
                if same_netns and not handover:
                    raise MigrationFailed(
                        "migrate-out into the same network namespace needs the stream on a"
                        " Unix socket (the sockets go with it); nothing changed"
                    )
                roles.step(Event.FREEZE, "cannot migrate out: this ferryd is {role}")
            except BaseException:
                await stream.aclose()
                raise
        else:
            refusal = "migrate-out without a stream needs a pre-copy first (this ferryd is {role})"
            roles.check(Event.FREEZE_PRECOPIED, refusal)
            if self.stream is None:
                raise MigrationFailed(refusal.format(role=roles.role))
            stream = self.stream
            if same_netns:
                await self._drop_precopy()
                raise MigrationFailed("no pre-copy in the target's network namespace")
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            roles.step(Event.FREEZE_PRECOPIED)
        self.same_netns = same_netns
        t_freeze = self.t_freeze = time.monotonic()
        counts = _no_flows()
        self._work_done = trio.Event()
        try:
            # (no collection in the downtime: ferryd.collector)
            with collector.paused(), trio.CancelScope() as work:
                self._work = work
                repairable, t_stopped = await self._freeze(counts)
                t_repaired = time.monotonic()
                # Repair ON runs under the dump (_stream).
                written = await self._stream(stream, counts, repairable, kept or b"")
                t_dumped = time.monotonic()
            if work.cancelled_caught:
                raise MigrationAborted("aborted by migrate-abort")
        except Exception as exc:
            self.s.counters.out_failed += 1
            raise await self._undo("migration failed", exc, stream) from exc
        finally:
            self._work = None
            self._work_done.set()
        self.timings = {
            "stop": (t_stopped - t_freeze) * 1e3,
            "freeze_repair_on": (t_repaired - t_stopped) * 1e3,
            "dump_stream": (t_dumped - t_repaired) * 1e3,
        }
        return self._streamed(counts, written, outcome_timeout, t_dumped)

    def _streamed(
        self,
        counts: dict[str, int],
        written: int,
        outcome_timeout: float | None,
        t_dumped: float,
    ) -> dict[str, Any]:
        """The stream is written: wait for the outcome (see migrate_out); the answer."""
        assert self.t_freeze is not None
        t_freeze = self.t_freeze
        self.roles.step(Event.STREAMED)
        if outcome_timeout is not None:
            self.s.nursery.start_soon(self._outcome_watchdog, outcome_timeout)
        self.s.counters.last_downtime_ms = (t_dumped - t_freeze) * 1e3
        self.s.counters.last_connections = counts["tcp"]
        self.streamed = counts
        log.info(
            "migration: streamed %s in %d bytes, %.1f ms"
            " (stop %.1f, repair on %.1f, dump and stream %.1f)",
            counts,
            written,
            (t_dumped - t_freeze) * 1e3,
            self.timings["stop"],
            self.timings["freeze_repair_on"],
            self.timings["dump_stream"],
        )
        return {
            "flows": counts,
            "stream_bytes": written,
            "t_freeze": t_freeze,
            "timings_ms": {**self.precopy_timings, **self.timings},
        }

    async def _undo(self, what: str, exc: Exception, stream: Stream | None) -> MigrationFailed:
        """A freeze failed (``what``, because of ``exc``): close the stream, roll back.

        Answers the error to raise: what happened, rolled back or not.
        """
        log.warning("%s: %s; rolling back", what, _why(exc))
        self.failure = f"{what}: {_why(exc)}"
        await trio.lowlevel.checkpoint()
        with trio.CancelScope(shield=True):
            if stream is not None:
                await stream.aclose()
            rolled_back = await self.rollback()
        return MigrationFailed(self.rollback_outcome(f"{what} ({_why(exc)})", rolled_back))

    def _confirmed(self, conn: TcpConn) -> bool:
        """Whether ``conn`` (frozen) is pre-copied and did not move since: the target has it
        already, exactly so. Either way it leaves :attr:`precopied` (what is left there
        at the end closed meanwhile: TcpGone); if not, its dump replaces the pre-copy."""
        pre = self.precopied.pop(conn, None)
        return (
            pre is not None
            and pre[2] == conn.guest_state()
            and pre[1] == self.kernel.segment_counts(socket_of(conn))
        )

    async def _freeze(self, counts: dict[str, int]) -> tuple[list[TcpConn], float]:
        """Stop the data path and hand the guest over; the TCP connections to put in
        repair mode (counted as frozen, the helper reached) and when the data path stopped.

        Armed connections (:attr:`armed`) are stopped first, all at once, and
        each that did not move since its pre-copy is confirmed (counted in
        ``counts``) and stays out of repair mode; the others are put in it.

        What the guest already queued for us is handled now: handing over
        drops it. From the handover on the guest's frames go to the target
        (taken over at its migrate-in or wait-precopy), which holds them
        until it resumes: nothing the guest sends during the downtime is lost.
        """
        d = self.host
        stopped: set[TcpConn] = set()

        async def freeze_armed() -> None:
            nonlocal stopped
            stopped = await self._freeze_armed()

        async with trio.open_nursery() as nursery:
            # The helper stops the armed ones while the data path stops here:
            # what the data path still does to one of them (the guest's queued
            # frames, below) moves its counts or its guest side, and it is
            # then dumped like any other.
            if self.armed:
                nursery.start_soon(freeze_armed)
            await d.stop()
            d.hand_over(drain=True)
        t_stopped = time.monotonic()
        self.conns = [c for c in d.tcp.connections() if not c.closed]
        if self.same_netns:
            return [], t_stopped  # the sockets go as they are: nothing to freeze
        if stopped:
            self.conns = self._confirm_stopped(stopped, counts)
        repairable = [c for c in self.conns if c.state is not State.CONNECTING]
        if repairable:
            self.repair = await self.repair_source.get()
            self.frozen.extend(repairable)
        return repairable, t_stopped

    async def freeze_early(self) -> None:
        """Freeze before the stream exists: QEMU stopped the VM to end its migration.

        QEMU suspends the device (every ring stopped) as it stops the VM,
        then sends RAM's last pass and the other devices, and only then asks
        for the stream (SAVE): a few milliseconds ferryd would otherwise
        wait through. So the freeze starts here: the data path stops, every
        TCP socket is frozen and put in repair mode, and each pre-copied
        connection that did not move (as in :meth:`_write_records`) is
        confirmed. No dump is made yet (no payload is read out of a kernel
        queue before there is a stream to write it to): :meth:`migrate_out`,
        given the stream, writes the kept pre-copy and dumps the rest. QEMU
        restarting the VM instead (its migration failed or was cancelled
        before SAVE) means an abort: a rollback, as after a SAVE.
        """
        roles = self.roles
        kept = self.kept or b""
        if self.kept is not None:
            roles.step(Event.FREEZE_PRECOPIED)  # (kept only while precopied; no watchdog)
            self.kept = None
        else:
            roles.step(Event.FREEZE, "cannot freeze: this ferryd is {role}")
        self.t_freeze = time.monotonic()
        counts = _no_flows()
        self._work_done = trio.Event()
        try:
            with collector.paused(), trio.CancelScope() as work:
                self._work = work
                repairable, t_stopped = await self._freeze(counts)
                rest = []
                async with trio.open_nursery() as nursery:
                    # Each batch is checked while the helper works on the next.
                    frozen = _RepairOn(self.repair, repairable, nursery)
                    for conn in self.conns:
                        await frozen.reached(conn)
                        if self._confirmed(conn):
                            counts["tcp"] += 1
                            counts["unchanged"] += 1
                        else:
                            rest.append(conn)
                self.conns = rest
                t_repaired = time.monotonic()
            if work.cancelled_caught:
                raise MigrationAborted("aborted: QEMU resumed the VM")
        except Exception as exc:
            raise await self._undo("early freeze failed", exc, None) from exc
        finally:
            self._work = None
            self._work_done.set()
        self.early = (kept, counts)
        self.timings = {
            "stop": (t_stopped - self.t_freeze) * 1e3,
            "freeze_repair_on": (t_repaired - t_stopped) * 1e3,
        }

    async def _stream_frozen(
        self,
        fd: int,
        same_netns: bool,
        outcome_timeout: float | None,
        kept: bytes,
        counts: dict[str, int],
    ) -> dict[str, Any]:
        """:meth:`migrate_out` after :meth:`freeze_early`: only the stream is left to write."""
        stream = self.stream = trio.lowlevel.FdStream(fd)  # owns fd from here on
        self.early = None
        self.same_netns = same_netns  # (QEMU's: never the same namespace)
        t_saved = time.monotonic()
        self._work_done = trio.Event()
        try:
            with collector.paused(), trio.CancelScope() as work:
                self._work = work
                written = await self._stream(stream, counts, [], kept)
            if work.cancelled_caught:
                raise MigrationAborted("aborted by migrate-abort")
        except Exception as exc:
            self.s.counters.out_failed += 1
            raise await self._undo("migration failed", exc, stream) from exc
        finally:
            self._work = None
            self._work_done.set()
        t_dumped = time.monotonic()
        self.timings["dump_stream"] = (t_dumped - t_saved) * 1e3
        return self._streamed(counts, written, outcome_timeout, t_dumped)

    async def _stream(
        self,
        stream: Stream,
        counts: dict[str, int],
        repairable: list[TcpConn],
        kept: bytes,
    ) -> int:
        """Freeze ``repairable`` and put them in repair mode, and stream every record
        after ``kept`` (a pre-copy kept here: sent at once, so the target restores it
        while the pre-copied connections are checked here).

        ferry-repair freezes each socket's intake (a drop-all filter) as it
        turns repair on (repair_helper/repair.py), batch after batch; each
        connection is dumped as soon as its batch is answered, so the dump
        runs while the helper works on the next batches, and the stream
        (flushed every FLUSH_RECORDS) reaches the target meanwhile.
        """
        error: Exception | None = None
        written = 0
        async with trio.open_nursery() as nursery:
            frozen = _RepairOn(self.repair, repairable, nursery)
            try:
                if kept:
                    await stream.send_all(kept)
                written = await self._write_records(stream, counts, frozen.reached)
            except Exception as exc:  # raised bare below, not in an exception group
                error = exc
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return written

    async def _write_records(
        self,
        stream: Stream,
        counts: dict[str, int],
        frozen: Callable[[TcpConn], Awaitable[None]],
    ) -> int:
        d, kernel = self.host, self.kernel
        enc = self.enc
        out = bytearray()
        fds: list[int] = []  # same namespace: the sockets the records in ``out`` hand over

        async def flush() -> None:
            if out:
                if isinstance(stream, HandoverStream):
                    await stream.send_all(bytes(out), fds)
                else:
                    await stream.send_all(bytes(out))
                out.clear()
                fds.clear()

        unflushed = 0

        async def emit(data: bytes, record: FlowRecord | None = None) -> None:
            nonlocal unflushed
            out.extend(data)
            # Only TCP flows count: the target restores them in batches of
            # FLUSH_RECORDS (restore.BATCH), so each flush completes one there;
            # counting the header too, every batch waited for the next flush.
            unflushed += type(record) is TcpFlowRecord
            # One sendmsg() carries at most SCM_MAX_FD (253) descriptors
            # (include/net/scm.h; more is EINVAL): a chunk holds at most
            # FLUSH_RECORDS, plus the one or two of the record just added.
            if len(out) >= CHUNK or unflushed >= FLUSH_RECORDS or len(fds) >= FLUSH_RECORDS:
                unflushed = 0
                await flush()

        if enc.bytes_written == 0:  # else the pre-copy wrote it
            await emit(enc.header(self._header(precopy=False)))
        listeners = [(IPPROTO_TCP, f) for f, _, _ in d.tcp.listeners()]
        listeners += [(IPPROTO_UDP, f) for f, _, _ in d.udp.listeners()]
        seen: set[tuple[int, int]] = set()
        for proto, fwd in listeners:
            if (proto, fwd.host_port) in seen:  # one record per forward, not per family
                continue
            seen.add((proto, fwd.host_port))
            # Same namespace: a forward's listening sockets go too, what waits
            # in them (a TCP accept queue, UDP datagrams) with them.
            flows = d.tcp if proto == IPPROTO_TCP else d.udp
            handed = flows.listening_sockets(fwd) if self.same_netns else []
            fds.extend(sock.fileno() for sock in handed)
            rec = ListenerRecord(proto, fwd.bind, fwd.host_port, fwd.guest_port, len(handed))
            await emit(enc.flow(rec), rec)
            counts["listeners"] += 1
        for conn in self.conns:
            await frozen(conn)
            if self._confirmed(conn):
                counts["tcp"] += 1
                counts["unchanged"] += 1
                continue
            if self.same_netns:
                rec_tcp = tcp_record(conn, None, handed_over=True)
                if rec_tcp.handed_over:
                    fds.append(socket_of(conn).fileno())
                    self.handed.append(conn)
            else:
                dumped = (
                    None if conn.state is State.CONNECTING else kernel.dump_tcp(socket_of(conn))
                )
                if dumped is not None and may_hold_window(dumped):
                    self.held_windows[conn] = dumped.snd_wnd
                rec_tcp = tcp_record(conn, dumped)
            await emit(enc.flow(rec_tcp), rec_tcp)
            counts["tcp" if not rec_tcp.handshake else "reset"] += 1
        if precopied := self.precopied:  # pre-copied, and closed since
            await emit(enc.tcp_gone(sorted(index for index, _, _ in precopied.values())))
            precopied.clear()
        now = trio.current_time()
        for udp in d.udp.entries(now):
            key = udp.key
            sock = d.udp.flow_socket(key) if self.same_netns else None
            if sock is not None:
                fds.append(sock.fileno())
            rec_udp = UdpFlowRecord(
                guest_addr=key.guest_addr,
                guest_port=key.guest_port,
                remote_addr=key.remote_addr,
                remote_port=key.remote_port,
                idle=udp.idle,
                listener_port=udp.listener_port,
                host_port=udp.host_port,
                handed_over=sock is not None,
            )
            await emit(enc.flow(rec_udp), rec_udp)
            counts["udp"] += 1
        for echo in d.icmp.entries(now):
            key = echo.key
            sock = d.icmp.flow_socket(key) if self.same_netns else None
            if sock is not None:
                fds.append(sock.fileno())
            rec_icmp = IcmpFlowRecord(
                key.guest_addr, key.guest_port, key.remote_addr, echo.idle, sock is not None
            )
            await emit(enc.flow(rec_icmp), rec_icmp)
            counts["icmp"] += 1
        await emit(enc.trailer())
        await flush()
        await stream.aclose()
        return enc.bytes_written  # all of it sent: flushed above

    async def _outcome_watchdog(self, patience: float = OUTCOME_TIMEOUT) -> None:
        # Act only after leaving the scope: rollback() cancels self._watchdog,
        # which inside it would cancel the rollback itself.
        with trio.CancelScope() as scope:
            self._watchdog = scope
            await trio.sleep(patience)
        if self._watchdog is scope:
            self._watchdog = None
        if scope.cancelled_caught:
            return
        if self.roles.role is Role.PRECOPIED:
            log.warning("migration: no migrate-out in %.0f s: pre-copy dropped", patience)
            await self._drop_precopy()
        elif self.roles.role is Role.FROZEN:
            log.warning("migration: no commit or abort in %.0f s: rolling back", patience)
            self.failure = f"no commit or abort in {patience:.0f} s"
            await self.rollback()

    async def commit(self, *, target_running: bool = False) -> dict[str, Any]:
        """The target took over (``target_running``: and runs already, QEMU's case;
        ferryctl commits before it resumes the target): linger, then exit."""
        self.roles.step(Event.COMMIT, "nothing to commit: this ferryd is {role}")
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.s.counters.out_completed += 1
        self._record(
            Outcome.COMPLETED, downtime_ms=self.s.counters.last_downtime_ms, flows=self.streamed
        )
        self._linger_scope = trio.CancelScope()
        self.s.nursery.start_soon(self._linger, self._linger_scope, not target_running)
        log.info("migration committed: guest handed over; lingering %.0f s", self.s.linger)
        return {"linger": self.s.linger}

    async def _linger(self, scope: trio.CancelScope, resume_follows: bool) -> None:
        with scope:
            # Soon: from then on every frozen socket closes silently, whenever
            # this ferryd exits (a SIGTERM before that calls repair_armed too).
            # Not at once if the target's resume follows the commit: the
            # helper's pass would slow it down on a shared CPU.
            delay = min(ARMED_REPAIR_DELAY, self.s.linger) if resume_follows else 0.0
            await trio.sleep(delay)
            await self.repair_armed()
            await trio.sleep(self.s.linger - delay)
        if scope.cancelled_caught:
            return  # rolled back after the commit: this ferryd keeps the guest
        for conn in self.frozen:
            if socket_of(conn).fileno() >= 0:
                self.host.tcp.forget(conn)
                self.kernel.close_silently(socket_of(conn))
        for conn in self.handed:
            # Only this ferryd's reference goes: the target holds the socket
            # (no SO_LINGER, no shutdown, nothing the peer would see).
            self.host.tcp.forget(conn)
            socket_of(conn).close()
        if self.same_netns:
            self.host.tcp.close_listeners()  # (handed over too: the same, a reference)
        log.info("linger time over: exiting")
        self.s.handed_over()

    async def repair_armed(self) -> None:
        """Put the connections frozen armed in repair mode, so that they close silently.

        Closed otherwise (ferryd exiting), each would send its peer a FIN
        from here, or hold its 4-tuple here in FIN_WAIT, while the connection
        goes on elsewhere. So this keeps trying (the linger does not start)
        until the helper has done it; ferryd's shutdown calls it too.
        """
        live = [c for c in self.armed_frozen if socket_of(c).fileno() >= 0]
        delay = ROLLBACK_RETRY_FIRST
        while live:
            try:
                repair = self.repair = await self.repair_source.get()
                await repair.set_repair([socket_of(c) for c in live], RepairMode.ON)
                break
            except MigrationError as exc:
                log.error(
                    "cannot put %d migrated connections in repair mode to close them silently"
                    " (%s); ferryd stays until it can, trying again in %.1f s",
                    len(live),
                    _why(exc),
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, ROLLBACK_RETRY_MAX)
        self.frozen.extend(self.armed_frozen)
        self.armed_frozen.clear()
        await self._disarm()

    async def abort(self) -> dict[str, Any]:
        """Undo whatever this migration did on this side; see the module docstring.

        Answers with the role reached; raises MigrationFailed only if the
        rollback could not be completed (the error says why and what
        happens next).
        """
        roles = self.roles
        stopped = self._work is not None
        if self._work is not None:
            # A pre-copy or a freeze in progress: stop it; it undoes itself
            # (a freeze rolls back) before its own request answers.
            self._work.cancel()
        await self._work_done.wait()
        if roles.role is Role.PRECOPIED:
            if self._watchdog is not None:
                self._watchdog.cancel()
            await self._drop_precopy()
            return {"role": str(roles.role), "note": "pre-copy dropped"}
        if roles.role in ROLLBACK_ROLES:
            # (migrate-abort, or QEMU running the source VM again)
            self.failure = self.failure or "aborted"
            if not await self.rollback():
                raise MigrationFailed(self.rollback_outcome("migrate-abort", False))
            return {"role": str(roles.role), "note": "rolled back, nothing lost"}
        if stopped:
            return {
                "role": str(roles.role),
                "note": "stopped the migration in progress; nothing lost",
            }
        return {"role": str(roles.role), "note": "no migration in progress: nothing to undo"}

    def rollback_outcome(self, what: str, rolled_back: bool) -> str:
        """What a failed migration or an abort tells ferryctl: exactly what happened."""
        if rolled_back:
            return f"{what}; rolled back, nothing lost"
        return (
            f"{what}; rollback incomplete: {self.rollback_error}. The guest's TCP connections"
            f" stay frozen here (role {self.roles.role}); ferryd keeps retrying every"
            f" {ROLLBACK_RETRY_MAX:g} s at most, and migrate-abort retries at once"
        )

    async def rollback(self) -> bool:
        """Put everything back as it was before the freeze and resume; True if done.

        False when it could not be completed (the role is then
        ``rollback-pending``, :attr:`rollback_error` says why, and a
        background task tries again). Safe to call again at any point: each
        step is repeated only until it succeeded once.
        """
        roles = self.roles
        async with self._rollback_lock:
            if roles.role not in ROLLBACK_ROLES:
                return roles.role is Role.RUNNING  # someone else (a retry, an abort) finished it
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self._linger_scope is not None:
                self._linger_scope.cancel()
            self.early = None  # (frozen early, no stream came: nothing left to write)
            self.rollback_attempts += 1
            try:
                await self._rollback_steps()
            except Exception as exc:
                first = roles.role is not Role.ROLLBACK_PENDING
                roles.step(Event.ROLLBACK_FAILED)
                self.rollback_error = str(exc)
                if first:
                    log.error(
                        "migration rollback incomplete: %s; the guest's TCP connections stay"
                        " frozen until it succeeds (retrying)",
                        exc,
                    )
                if first:
                    why = f"{self.failure}; " if self.failure else ""
                    self._record(Outcome.ROLLBACK_PENDING, error=f"{why}rollback incomplete: {exc}")
                self._retry_in_background()
                return False
            self.rollback_error = None
            self.s.counters.out_rolled_back += 1
            self._record(Outcome.ROLLED_BACK, error=self.failure)
            log.info("migration rolled back: running again with every connection")
            return True

    def _record(
        self,
        outcome: Outcome,
        *,
        downtime_ms: float | None = None,
        flows: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None:
        """This migration's end in the history; a rollback's downtime runs from the freeze."""
        if downtime_ms is None and outcome is not Outcome.FAILED and self.t_freeze is not None:
            downtime_ms = (time.monotonic() - self.t_freeze) * 1e3
        self.s.history.add(
            Direction.OUT,
            outcome,
            finished_at=time.time(),
            downtime_ms=downtime_ms,
            flows=flows,
            error=error,
        )

    def _retry_in_background(self) -> None:
        if self._retrying:
            return
        self._retrying = True
        self.s.nursery.start_soon(self._retry_rollback)

    async def _retry_rollback(self) -> None:
        delay = ROLLBACK_RETRY_FIRST
        try:
            while self.roles.role is Role.ROLLBACK_PENDING:
                await trio.sleep(delay)
                delay = min(delay * 2, ROLLBACK_RETRY_MAX)
                await self.rollback()
        finally:
            self._retrying = False

    async def _rollback_steps(self) -> None:
        """The data path first, every flow but the frozen TCP connections served again
        (they are held, TcpFlows.hold); then those thawed through the helper and
        released. An attempt that cannot reach the helper leaves the guest served
        but for those (``rollback-pending``), and the next one only thaws."""
        d = self.host
        if not self._serving:
            await d.stop()  # a freeze cancelled half-way: let it end first
            d.tcp.bound_queues(None)  # (a pre-copy's cap)
            d.take_over()
            # Same namespace: every socket handed over is still in the tables,
            # untouched (the target's references close with its discard).
            self.handed.clear()
            # In repair mode a send fails and a peek reads nothing: until the
            # thaw they are left alone, their guest segments dropped (resent).
            # Frozen armed ones the same (repair OFF takes their filter off).
            self.frozen.extend(self.armed_frozen)
            self.armed_frozen.clear()
            d.tcp.hold([c for c in self.frozen if socket_of(c).fileno() >= 0])
            await d.start()
            self._serving = True
        if self.frozen:
            live = [c for c in self.frozen if socket_of(c).fileno() >= 0]
            if live:
                for conn in live:
                    if (snd_wnd := self.held_windows.pop(conn, None)) is not None:
                        self.kernel.reopen_send_window(socket_of(conn), snd_wnd)
                repair = self.repair = await self.repair_source.get()
                await repair.set_repair([socket_of(c) for c in live], RepairMode.OFF)  # and thaws
                # (Repair OFF cleared their SO_REUSEADDR: back, as on a target.)
                self.kernel.reuse_after_repair_off([socket_of(c) for c in live])
            d.tcp.release(self.frozen, trio.current_time())
            self.frozen.clear()
            self.held_windows.clear()
        await self._disarm()
        self._serving = False
        self.roles.step(Event.ROLLED_BACK)
