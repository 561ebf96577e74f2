"""The target side of a migration: decode and restore while the stream arrives.

``migrate-in`` hands this ferryd the read end of the stream; restoring runs
in the background (records are applied as they are decoded, see
ferryd.migration.restore) and ``migrate-wait`` reports the outcome. The
header is checked before anything is touched (StreamDecoder refuses an
incompatible version first), and so is every record against this
ferryd's own destination rules (ferryd.migration.admission); a truncated
or corrupt stream, a record those rules refuse, or a socket that cannot be
restored (an address this host cannot bind, ...), discards
everything restored so far — silently (sockets already out of repair mode
are put back into it first) — and the daemon waits for a stream again.

The guest's frames are taken over (MigrationHost.take_over: the frontend
takes the guest's queue, whatever moves it) at ``migrate-in``, or, when the
stream starts with a pre-copy, by ``migrate-wait-precopy`` once the
pre-copied connections are restored,
right before the source freezes: taken early, a share of the guest's
frames would arrive here while the source still runs, and wait until
resume. ``migrate-resume`` then turns repair
off for what is still in repair mode and starts the data path, every
connection armed before it answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import trio

from ferryd import collector
from ferryd.link import LinkConfig
from ferryd.migration.admission import Admission
from ferryd.migration.errors import MigrationAborted, MigrationError, MigrationFailed
from ferryd.migration.handover import HandoverStream, is_socket
from ferryd.migration.history import Direction, Outcome
from ferryd.migration.restore import Restorer
from ferryd.migration.roles import Event, Role
from ferryd.migration.session import Session
from ferryd.migration.sockstate import SocketStateError
from ferryd.migration.stream import StreamDecoder
from ferryd.migration.stream_events import (
    FlowReceived,
    HeaderReceived,
    PrecopyEnded,
    RecordSkipped,
    TcpFlowsGone,
)

log = logging.getLogger("ferryd.migration")

READ_SIZE = 1 << 20


class TargetMigration:
    def __init__(self, session: Session) -> None:
        self.s = session
        self.d = session.host
        self.repair = session.repair
        self.done = trio.Event()
        self.result: dict[str, Any] = {}
        self.error: str | None = None
        self.restorer: Restorer | None = None
        self._scope: trio.CancelScope | None = None
        self.precopy_settled = trio.Event()
        """Set when the pre-copy is restored, or when the restore ended without it."""
        self.precopy_ms: float | None = None
        """How long the pre-copy took to restore; None until it was."""
        self.t_first: float | None = None
        """When the first bytes after the freeze arrived (the downtime's part here)."""
        self._pause: collector.Pause | None = None
        """The collector's pause from the restore's start to the resume (or the discard)."""
        self._settling = trio.Lock()
        """Held by resume and abort: control requests are served concurrently, and
        the coordinator sends migrate-abort when a resume takes too long; an abort
        must not discard what a resume is starting (it waits, then finds the
        target running), nor a resume start what an abort is discarding."""

    async def migrate_in(self, fd: int, precopy: bool = False) -> dict[str, Any]:
        """Read and restore the stream on ``fd`` in the background.

        With ``precopy`` the stream starts with a pre-copy, read while the
        source's guest still runs: the guest's frames are then taken over only
        by :meth:`wait_precopy`, just before the source freezes (taken early,
        a share of them would sit here until resume).
        """
        d = self.d
        try:
            self.s.roles.step(Event.MIGRATE_IN, "cannot take a migration: this ferryd is {role}")
        except BaseException:
            os.close(fd)
            raise
        if not precopy:
            # Take the guest's frames from now on, without reading them until
            # resume: the source hands its own over when it freezes, and
            # what the guest sends during the downtime waits here, not lost.
            d.take_over()
        self.s.nursery.start_soon(self._restore, fd, precopy)
        await trio.lowlevel.checkpoint()
        return {}

    async def load(self, fd: int) -> dict[str, Any]:
        """QEMU's device-state LOAD: :meth:`migrate_in`, on a ferryd that may be running.

        QEMU sends LOAD only to an incoming VM whose guest never ran, and a
        target ferryd is started like any other: running, its data path
        started and its forwards bound. That data path serves nothing yet,
        so it is stopped here, and the stream's header rebuilds it
        (MigrationHost.rebuild closes the old tables' listeners: the
        stream's own bind the same ports). A ferryd with flows refuses:
        its guest ran, and the stream would replace what it serves.
        """
        d, roles = self.d, self.s.roles
        refusal = "cannot load QEMU's device state: this ferryd is {role}"
        try:
            roles.check(Event.LOAD, refusal)
            flows = d.tcp.count() + d.udp.count() + d.icmp.count()
            if flows:
                raise MigrationFailed(
                    f"cannot load QEMU's device state: this ferryd serves {flows} flows"
                    " (its guest ran here; QEMU loads only into a VM that never ran)"
                )
            roles.step(Event.LOAD, refusal)  # (no checkpoint since the count)
        except BaseException:
            os.close(fd)
            raise
        await d.stop()
        d.take_over()
        # (QEMU's guest is stopped already: a pre-copy the stream starts with
        # is restored in the downtime too, with the collector paused.)
        self.s.nursery.start_soon(self._restore, fd, False)
        await trio.lowlevel.checkpoint()
        return {}

    async def _reach_helper(self) -> None:
        """Connect to the repair helper while the stream's first records arrive.

        The restore asks for it at its first batch of TCP connections; reached
        here, the connect and the helper's accept (a process of its own, ~1 ms
        on a busy host) are off that batch's path, which the whole restore
        waits behind. A failure is left for the restore to meet and report.
        """
        with contextlib.suppress(MigrationError):
            await self.repair.get()

    async def _restore(self, fd: int, precopy: bool) -> None:
        """Read and restore the stream on ``fd``; ``precopy``: it starts with a pre-copy
        read while the source's guest still runs (the downtime starts after it)."""
        d = self.d
        self.s.nursery.start_soon(self._reach_helper)
        # A socket: source and target share a namespace, and the sockets come with
        # the stream (ferryd.migration.handover). A pipe otherwise.
        handover = HandoverStream(fd) if is_socket(fd) else None
        stream = handover or trio.lowlevel.FdStream(fd)
        restorer = self.restorer = Restorer(d, self.repair, nursery=self.s.nursery)
        decoder = StreamDecoder()
        admission = Admission()
        t0 = time.monotonic()
        t_first: float | None = None
        try:
            if not precopy:
                self._pause_collector()
            with trio.CancelScope() as self._scope:
                while True:
                    data = await stream.receive_some(READ_SIZE)
                    if t_first is None:
                        t_first = time.monotonic()
                    if not data:
                        decoder.eof()
                        break
                    for event in decoder.feed_untrusted(data):
                        if isinstance(event, HeaderReceived):
                            h = event.header
                            d.rebuild(
                                LinkConfig(mac=h.ferry_mac, mtu=h.mtu, ipv4=h.ipv4, ipv6=h.ipv6),
                                trio.current_time(),
                            )
                            restorer = self.restorer = Restorer(
                                d, self.repair, nursery=self.s.nursery, handover=handover
                            )
                            restorer.in_precopy = h.precopy
                            d.guest_mac = h.guest_mac
                        elif isinstance(event, FlowReceived):
                            # This ferryd's destination rules, before the record
                            # touches anything (migration/admission.py).
                            admission.check(d.policy, event.flow)
                            await restorer.add(event.flow, event.index)
                        elif isinstance(event, PrecopyEnded):
                            await restorer.precopy_end()
                            self.precopy_ms = (time.monotonic() - t0) * 1e3
                            self._pause_collector()  # what follows is the downtime's
                            self.precopy_settled.set()
                            t_first = None  # the downtime's part starts with what follows
                        elif isinstance(event, TcpFlowsGone):
                            restorer.gone(event.indexes)
                        elif isinstance(event, RecordSkipped):
                            log.info(
                                "migration: skipped a record of unknown kind %d", event.field_number
                            )
                await restorer.finish()
            if self._scope.cancelled_caught:
                raise MigrationAborted("migration aborted")
        except Exception as exc:
            self._collect_again()
            log.warning("migration in failed: %s; discarding what was restored", exc)
            with trio.CancelScope(shield=True):
                await restorer.discard()
            d.hand_over(drain=False)
            d.rebuild(d.link, trio.current_time())
            self.s.roles.step(Event.RESTORE_FAILED)
            self.s.counters.in_failed += 1
            self.error = f"restore failed: {exc}"
            self._record(Outcome.FAILED, error=self.error)
        else:
            self.s.roles.step(Event.RESTORED)
            self.t_first = t_first
            restore_ms = (time.monotonic() - (t_first or t0)) * 1e3
            self.result = {
                "restored": {**restorer.counts, "replaced": restorer.replaced},
                "stream_bytes": decoder.bytes_consumed,
                "timings_ms": {
                    "restore": restore_ms,
                    "repair_on_passes": restorer.repair_passes,
                },
            }
            log.info(
                "migration: restored %s from %d bytes in %.1f ms",
                restorer.counts,
                decoder.bytes_consumed,
                restore_ms,
            )
            if restorer.bind_retries:
                log.info(
                    "migration: %d binds waited for a port held for a moment",
                    restorer.bind_retries,
                )
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self.precopy_settled.set()
            self.done.set()

    async def wait_precopy(self) -> dict[str, Any]:
        """Until the pre-copy is restored; then take the guest's frames over (see migrate_in)."""
        await self.precopy_settled.wait()
        if self.error is not None or self.precopy_ms is None:
            raise MigrationFailed(self.error or "the stream ended before its pre-copy did")
        self.d.take_over()
        restorer = self.restorer
        assert restorer is not None
        return {"precopied": len(restorer.standing), "timings_ms": {"precopy": self.precopy_ms}}

    async def wait(self) -> dict[str, Any]:
        await self.done.wait()
        if self.error is not None:
            raise MigrationFailed(self.error)
        return self.result

    async def resume(self) -> dict[str, Any]:
        async with self._settling:
            try:
                return await self._resume()
            finally:
                self._collect_again()  # (failed: an abort follows, nothing to hurry)

    def _pause_collector(self) -> None:
        """No collection from here to the resume: the target's part of the downtime.

        What the restore builds would set the collector off a dozen times
        for 1,000 connections, and a collection ending the pause walks all
        of it (ferryd.collector): so the pause lasts until the resume, or
        until the restore fails or is discarded, not just the restore.
        """
        if self._pause is None:
            self._pause = collector.Pause()

    def _collect_again(self) -> None:
        """End the restore's pause of the collector, if one is on."""
        if self._pause is not None:
            self._pause.end()
            self._pause = None

    async def _resume(self) -> dict[str, Any]:
        roles = self.s.roles
        refusal = "nothing to resume: this ferryd is {role}"
        roles.check(Event.RESUME, refusal)
        if self.restorer is None:
            raise MigrationFailed(refusal.format(role=roles.role))
        t0 = time.monotonic()
        try:
            t_off = await self.restorer.resume()
        except SocketStateError as exc:
            # A socket the kernel refused to finish restoring: the migration's
            # failure to report, not a ferryd bug (RepairError already is one).
            raise MigrationFailed(f"resume failed: {exc}") from exc
        roles.step(Event.RESUME)
        t_resumed = time.monotonic()
        counters = self.s.counters
        counters.in_completed += 1
        counters.last_connections = self.restorer.counts["tcp"]
        counters.last_downtime_ms = (t_resumed - (self.t_first or t0)) * 1e3
        self._record(
            Outcome.COMPLETED,
            downtime_ms=counters.last_downtime_ms,
            flows=self.restorer.counts,
        )
        log.info("migration: resumed in %.1f ms", (t_resumed - t0) * 1e3)
        return {
            "t_resumed": t_resumed,
            "timings_ms": {"repair_off": t_off, "resume": (t_resumed - t0) * 1e3},
        }

    def _record(
        self,
        outcome: Outcome,
        *,
        downtime_ms: float | None = None,
        flows: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None:
        self.s.history.add(
            Direction.IN,
            outcome,
            finished_at=time.time(),
            downtime_ms=downtime_ms,
            flows=flows,
            error=error,
        )

    async def abort(self) -> dict[str, Any]:
        async with self._settling:
            return await self._abort()

    async def _abort(self) -> dict[str, Any]:
        d, roles = self.d, self.s.roles
        if roles.role is Role.MIGRATING_IN and self._scope is not None:
            self._scope.cancel()
            await self.done.wait()
        elif roles.role is Role.RESTORED and self.restorer is not None:
            await self.restorer.discard()
            d.hand_over(drain=False)  # restored: wait_precopy or migrate_in took it over
            d.rebuild(d.link, trio.current_time())
            roles.step(Event.DISCARD)
            self._collect_again()
            self.s.counters.in_failed += 1
            self._record(Outcome.FAILED, error="aborted after the restore: discarded")
        return {"role": str(roles.role)}
