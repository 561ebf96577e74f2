"""The source side of a migration: freeze, dump, stream; then commit or roll back.

Theory of operation (DESIGN.md, "Migration"; REFERENCE.md, TCP_REPAIR):

1. Stop the data path: the tap reader and every flow task are cancelled, so
   no frame from the guest and no socket event is handled any more.
2. Freeze each TCP socket's intake (a drop-all socket filter: a socket in
   repair mode would otherwise keep ACKing data that then exists nowhere)
   and switch repair ON for all of them, in batches of ≤ 253 through
   ferry-repair.
3. Stream: the header (the guest's link), the forwarding listeners, one
   record per flow, dumped as it is written (no staging area), a trailer.
4. Keep the frozen sockets until told the outcome (the guest's tap queue
   was detached at the freeze, so the target's queue collects what the
   guest sends meanwhile). Commit: keep the sockets (silently dropping whatever still
   reaches them, so this host never resets a connection the target now
   owns) for ``--linger`` seconds, then exit. Abort, a failed write, or no
   word within :data:`OUTCOME_TIMEOUT`: thaw, repair OFF in batches, resume
   as if nothing happened.

Pre-copy (``migrate-precopy``, before ``migrate-out``; not in the same
namespace). Restoring a socket costs the target far more than dumping it
costs the source, and a thousand idle connections do not change in the
second before a freeze. So while the guest still runs, the quiet
connections (established, nothing in flight either way for
:data:`PRECOPY_QUIET`) are dumped in batches: each batch is held (the data
path leaves those connections alone and drops the guest's segments for
them, which the guest retransmits), repair ON, dump, repair OFF without a
window probe, released — a few milliseconds per batch. The records go
ahead of the freeze, ended by a PrecopyEnd record, and the target restores
them while the guest still runs. At the freeze every socket is frozen and
put in repair mode as before, but a pre-copied connection whose socket
counted no segment in or out since its dump (sockstate.segment_counts)
and whose guest side did not move is not dumped again: it costs one
getsockopt and no stream bytes. The others are dumped in full and replace
their pre-copied record; pre-copied connections that ended meanwhile are
listed in one TcpGone record.

Same network namespace as the target (REFERENCE.md, "Same host"): the
target cannot connect a 4-tuple while this socket exists, so each socket is
closed silently (repair mode: no FIN, no RST) right after its record left,
and every port the target must bind is released. A rollback then restores
this ferryd from the records it streamed, exactly as a target would.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from daemon.control import ControlError
from daemon.flows.tcp_conn import CLOSING, State, TcpConn
from daemon.migration import restore
from daemon.migration.flowstate import tcp_record
from daemon.migration.records import (
    FlowRecord,
    IcmpFlowRecord,
    ListenerRecord,
    StreamHeader,
    TcpFlowRecord,
    UdpFlowRecord,
)
from daemon.migration.repair_client import RepairClient, RepairError, RepairMode
from daemon.migration.sockstate import (
    SocketStateError,
    close_silently,
    dump_tcp,
    segment_counts,
)
from daemon.migration.stream import StreamEncoder
from daemon.wire.ip import IPPROTO_TCP, IPPROTO_UDP

if TYPE_CHECKING:
    from daemon.main import Daemon

log = logging.getLogger("ferryd.migration")

#: A frozen source that hears neither commit nor abort rolls back by itself.
OUTCOME_TIMEOUT = 120.0
#: Records are written to the stream in chunks of about this size.
CHUNK = 256 * 1024
SOFTWARE_VERSION = "ferry 0.1.0"
#: A connection is pre-copied only if nothing moved on it for this long.
PRECOPY_QUIET = 0.05
#: Connections held at once for a pre-copy dump (one ferry-repair message).
PRECOPY_BATCH = 128

#: What must not have changed on a pre-copied connection's guest side.
_GuestMark = tuple[int, int, int, int, int, int, State]


def _guest_mark(conn: TcpConn) -> _GuestMark:
    return (
        conn.seq_to_guest,
        conn.seq_ack_from_guest,
        conn.seq_from_guest,
        conn.seq_ack_to_guest,
        conn.guest_wnd,
        int(conn.flags),
        conn.state,
    )


def _precopy_candidate(conn: TcpConn, now: float) -> bool:
    return (
        conn.state is State.ESTABLISHED
        and not conn.flags & CLOSING
        and not conn.flight
        and not conn.ack_due
        and conn.restore_tail is None
        and not conn.want_writable
        and now - conn.last_progress >= PRECOPY_QUIET
    )


class SourceMigration:
    def __init__(self, daemon: Daemon, repair: restore.RepairSource) -> None:
        self.daemon = daemon
        self.repair_source = repair
        self.repair: RepairClient | None = None
        self.same_netns = False
        self.conns: list[TcpConn] = []
        self.frozen: list[TcpConn] = []
        self.records: list[FlowRecord] = []
        """Same-namespace only: what was streamed, for a rollback."""
        self.timings: dict[str, float] = {}
        self._watchdog: trio.CancelScope | None = None
        self.listeners_closed = False
        self.sockets_closed = False
        self.stream: trio.lowlevel.FdStream | None = None
        self.enc = StreamEncoder()
        self.written = 0
        self.precopied: dict[TcpConn, tuple[int, tuple[int, int], _GuestMark]] = {}
        """Pre-copied connections: record index, segment counts and guest mark at the dump."""
        self.precopy_timings: dict[str, float] = {}

    async def precopy(self, fd: int) -> dict[str, Any]:
        """Start the stream while the guest runs: header and the quiet TCP connections."""
        d = self.daemon
        stream = trio.lowlevel.FdStream(fd)  # owns fd from here on
        if d.role != "running":
            await stream.aclose()
            raise ControlError(f"cannot pre-copy: this ferryd is {d.role}")
        d.role = "precopying"
        self.stream = stream
        t0 = time.monotonic()
        held: list[TcpConn] = []
        try:
            out = bytearray(self.enc.header(self._header(precopy=True)))
            now = trio.current_time()
            quiet = [f.handle for f in d.tcp.table if _precopy_candidate(f.handle, now)]
            if quiet:
                repair = self.repair = await self.repair_source.get()
            for start in range(0, len(quiet), PRECOPY_BATCH):
                batch = [c for c in quiet[start : start + PRECOPY_BATCH] if not c.closed]
                if not batch:
                    continue
                held = batch
                d.tcp.hold(batch)
                socks = [c.sock for c in batch]
                await repair.set_repair(socks, RepairMode.ON)
                try:
                    for conn in batch:
                        try:
                            segs = segment_counts(conn.sock)
                            kernel = dump_tcp(conn.sock)
                        except (SocketStateError, OSError) as exc:
                            log.info("pre-copy: %s: %s; left for the freeze", conn.describe(), exc)
                            continue
                        out += self.enc.flow(tcp_record(conn, kernel))
                        self.precopied[conn] = (self.enc.flow_count - 1, segs, _guest_mark(conn))
                finally:
                    await repair.set_repair(socks, RepairMode.OFF_NO_WINDOW_PROBE)
                    d.tcp.release(batch, trio.current_time())
                    held = []
                if len(out) >= CHUNK:
                    await stream.send_all(bytes(out))
                    self.written += len(out)
                    out.clear()
            out += self.enc.precopy_end()
            await stream.send_all(bytes(out))
            self.written += len(out)
        except (RepairError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.warning("pre-copy failed: %s", exc)
            with trio.CancelScope(shield=True):
                if held:
                    await self._unhold(held)
                await self._drop_precopy()
            raise ControlError(f"pre-copy failed ({exc}); nothing changed here") from exc
        d.role = "precopied"
        assert d.outer is not None
        d.outer.start_soon(self._outcome_watchdog)
        self.precopy_timings = {"precopy": (time.monotonic() - t0) * 1e3}
        log.info("migration: pre-copied %d TCP connections", len(self.precopied))
        return {
            "precopied": len(self.precopied),
            "stream_bytes": self.written,
            "timings_ms": self.precopy_timings,
        }

    async def _unhold(self, held: list[TcpConn]) -> None:
        """A pre-copy batch failed half-way: repair OFF again (fresh helper), release."""
        d = self.daemon
        try:
            repair = await self.repair_source.get()
            await repair.set_repair([c.sock for c in held], RepairMode.OFF_NO_WINDOW_PROBE)
        except Exception as exc:  # nothing better to do than say so
            log.error("pre-copy: cannot take %d sockets out of repair mode: %s", len(held), exc)
        d.tcp.release(held, trio.current_time())

    async def _drop_precopy(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None
        self.precopied.clear()
        self.daemon.role = "running"

    def _header(self, *, precopy: bool) -> StreamHeader:
        d = self.daemon
        link = d.link
        return StreamHeader(
            ferry_mac=link.mac,
            mtu=link.mtu,
            ipv4=link.ipv4,
            ipv6=link.ipv6,
            guest_mac=d.stack.guest_mac,
            flow_count_hint=len(d.tcp.table) + len(d.udp.table) + len(d.icmp.table),
            software_version=SOFTWARE_VERSION,
            frozen_at_ns=None if precopy else time.time_ns(),
            precopy=precopy,
        )

    async def migrate_out(self, fd: int | None, same_netns: bool) -> dict[str, Any]:
        """Freeze and stream: on ``fd``, or on the pre-copy's stream if ``fd`` is None."""
        d = self.daemon
        if fd is not None:
            stream = self.stream = trio.lowlevel.FdStream(fd)  # owns fd from here on
            if d.role != "running":
                await stream.aclose()
                raise ControlError(f"cannot migrate out: this ferryd is {d.role}")
        else:
            if d.role != "precopied" or self.stream is None:
                raise ControlError(
                    f"migrate-out without a stream needs a pre-copy first (this ferryd is {d.role})"
                )
            stream = self.stream
            if same_netns:
                await self._drop_precopy()
                raise ControlError("no pre-copy in the target's network namespace")
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
        d.role = "migrating"
        self.same_netns = same_netns
        t_freeze = time.monotonic()
        counts = {"tcp": 0, "udp": 0, "icmp": 0, "listeners": 0, "reset": 0, "unchanged": 0}
        await d.stop_data_path()
        # What the guest already queued for us is handled now: detaching drops
        # it (TapFrontend.drain). From the detach on the guest's frames go to
        # the target's queue (attached at its migrate-in or wait-precopy),
        # which holds them until it resumes: nothing the guest sends during
        # the downtime is lost (tun steers every flow to the remaining queue
        # once ours is detached).
        stack, now = d.stack, trio.current_time()
        d.tap.drain(lambda frame, trusted: stack.receive_frame(frame, now, trusted), stack.flush)
        d.tap.detach_queue()
        t_stopped = time.monotonic()
        self.conns = [f.handle for f in d.tcp.table if not f.handle.closed]
        try:
            repairable = [c for c in self.conns if c.state is not State.CONNECTING]
            if repairable:
                self.repair = await self.repair_source.get()
                # ferry-repair freezes each socket's intake (a drop-all
                # filter) as it turns repair on: see repair_helper/repair.py.
                self.frozen.extend(repairable)
                await self.repair.set_repair([c.sock for c in repairable], RepairMode.ON)
            t_repaired = time.monotonic()
            written = await self._stream(stream, counts)
            t_dumped = time.monotonic()
        except Exception as exc:
            log.warning("migration failed: %s; rolling back", exc)
            await trio.lowlevel.checkpoint()
            with trio.CancelScope(shield=True):
                await stream.aclose()
                await self.rollback()
            raise ControlError(f"migration failed ({exc}); rolled back, nothing lost") from exc
        d.role = "frozen"
        assert d.outer is not None
        d.outer.start_soon(self._outcome_watchdog)
        self.timings = {
            "stop": (t_stopped - t_freeze) * 1e3,
            "freeze_repair_on": (t_repaired - t_stopped) * 1e3,
            "dump_stream": (t_dumped - t_repaired) * 1e3,
        }
        log.info("migration: streamed %s in %d bytes", counts, written)
        return {
            "flows": counts,
            "stream_bytes": written,
            "t_freeze": t_freeze,
            "timings_ms": {**self.precopy_timings, **self.timings},
        }

    async def _stream(self, stream: trio.lowlevel.FdStream, counts: dict[str, int]) -> int:
        d = self.daemon
        enc = self.enc
        out = bytearray()
        to_close: list[TcpConn] = []
        written = self.written

        async def flush() -> None:
            nonlocal written
            # Same namespace: free each 4-tuple before the target can read its
            # record (its connect() fails while this socket exists).
            for conn in to_close:
                d.tcp.forget(conn)  # out of the reactor's epoll before the fd goes
                close_silently(conn.sock)
            to_close.clear()
            if out:
                await stream.send_all(bytes(out))
                written += len(out)
                out.clear()

        async def emit(data: bytes, record: FlowRecord | None = None) -> None:
            out.extend(data)
            if record is not None and self.same_netns:
                self.records.append(record)
            if len(out) >= CHUNK:
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
            rec = ListenerRecord(proto, fwd.bind, fwd.host_port, fwd.guest_port)
            await emit(enc.flow(rec), rec)
            counts["listeners"] += 1
        if self.same_netns:
            d.tcp.close_listeners()
            self.listeners_closed = True
        precopied = self.precopied
        for conn in self.conns:
            pre = precopied.pop(conn, None)
            if (
                pre is not None
                and pre[2] == _guest_mark(conn)
                and pre[1] == segment_counts(conn.sock)
            ):
                counts["tcp"] += 1  # the target has it already, exactly so
                counts["unchanged"] += 1
                continue
            kernel = None if conn.state is State.CONNECTING else dump_tcp(conn.sock)
            rec_tcp: TcpFlowRecord = tcp_record(conn, kernel)
            await emit(enc.flow(rec_tcp), rec_tcp)
            counts["tcp" if not rec_tcp.handshake else "reset"] += 1
            if self.same_netns and kernel is not None:
                to_close.append(conn)
        if precopied:  # pre-copied, and closed since
            await emit(enc.tcp_gone(sorted(index for index, _, _ in precopied.values())))
            precopied.clear()
        now = trio.current_time()
        for flow in d.udp.table:
            handle: Any = flow.handle
            listener = getattr(handle, "listener", None)
            key = flow.key
            rec_udp = UdpFlowRecord(
                guest_addr=key.guest_addr,
                guest_port=key.guest_port,
                remote_addr=key.remote_addr,
                remote_port=key.remote_port,
                idle=max(0.0, now - flow.last_activity),
                listener_port=None if listener is None else listener.local_port,
                host_port=None if listener is not None else flow.host_port,
            )
            await emit(enc.flow(rec_udp), rec_udp)
            counts["udp"] += 1
        for echo in d.icmp.table:
            key = echo.key
            rec_icmp = IcmpFlowRecord(
                key.guest_addr, key.guest_port, key.remote_addr, max(0.0, now - echo.last_activity)
            )
            await emit(enc.flow(rec_icmp), rec_icmp)
            counts["icmp"] += 1
        if self.same_netns:
            d.udp.close_sockets_for_handover()
            d.icmp.close_sockets_for_handover()
            self.sockets_closed = True
        await emit(enc.trailer())
        await flush()
        await stream.aclose()
        return written

    async def _outcome_watchdog(self) -> None:
        with trio.CancelScope() as scope:
            self._watchdog = scope
            await trio.sleep(OUTCOME_TIMEOUT)
            if self.daemon.role == "precopied":
                log.warning(
                    "migration: no migrate-out in %.0f s: pre-copy dropped", OUTCOME_TIMEOUT
                )
                await self._drop_precopy()
            elif self.daemon.role == "frozen":
                log.warning(
                    "migration: no commit or abort in %.0f s: rolling back", OUTCOME_TIMEOUT
                )
                await self.rollback()

    async def commit(self) -> dict[str, Any]:
        d = self.daemon
        if d.role != "frozen":
            raise ControlError(f"nothing to commit: this ferryd is {d.role}")
        if self._watchdog is not None:
            self._watchdog.cancel()
        d.role = "migrated"
        assert d.outer is not None
        d.outer.start_soon(self._linger)
        log.info("migration committed: guest handed over; lingering %.0f s", d.opts.linger)
        return {"linger": d.opts.linger}

    async def _linger(self) -> None:
        await trio.sleep(self.daemon.opts.linger)
        for conn in self.frozen:
            if conn.sock.fileno() >= 0:
                self.daemon.tcp.forget(conn)
                close_silently(conn.sock)
        log.info("linger time over: exiting")
        self.daemon.exit_requested.set()

    async def abort(self) -> dict[str, Any]:
        d = self.daemon
        if d.role == "precopied":
            if self._watchdog is not None:
                self._watchdog.cancel()
            await self._drop_precopy()
            return {"role": d.role}
        if d.role not in ("frozen", "migrated"):
            raise ControlError(f"nothing to abort: this ferryd is {d.role}")
        await self.rollback()
        return {"role": d.role}

    async def rollback(self) -> None:
        """Put everything back as it was before the freeze and resume."""
        d = self.daemon
        if self._watchdog is not None:
            self._watchdog.cancel()
        live = [c for c in self.frozen if c.sock.fileno() >= 0]
        handed_over = [c for c in self.frozen if c.sock.fileno() < 0]
        repair = self.repair
        if live or handed_over:
            repair = repair or await self.repair_source.get()
        if live:
            assert repair is not None
            await repair.set_repair([c.sock for c in live], RepairMode.OFF)  # and thaws
        self.frozen.clear()
        d.role = "running"
        d.tap.attach_queue()
        if self.same_netns and self.records:
            # Same namespace: what was handed over is restored here from the
            # records, exactly as the target would have.
            restorer = restore.Restorer(d, repair)
            closed = {c.ends for c in handed_over}
            for conn in handed_over:
                d.tcp.table.remove(conn.flow.key)
            for rec in self.records:
                if isinstance(rec, TcpFlowRecord):
                    if rec.kernel is not None and restore.ends_of(rec) in closed:
                        await restorer.add(rec)
                elif isinstance(rec, ListenerRecord):
                    tcp = rec.proto == IPPROTO_TCP
                    if (tcp and self.listeners_closed) or (not tcp and self.sockets_closed):
                        await restorer.add(rec)
                elif self.sockets_closed:
                    await restorer.add(rec)
            await restorer.finish()
            await restorer.resume()
        else:
            await d.start_data_path()
        log.info("migration rolled back: running again with every connection")
