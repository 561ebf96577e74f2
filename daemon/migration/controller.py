"""The migration controller: one ferryd's migrations, whoever drives them.

Theory of operation. A ferryd is a migration's source or its target (or
neither, yet); its :class:`~ferryd.migration.roles.Role` changes only
through the table in ferryd.migration.roles. The controller holds the role,
the migration in progress (a :class:`~ferryd.migration.source.SourceMigration`
or a :class:`~ferryd.migration.target.TargetMigration`), the repair helper's
source and the outcome counters; it drives the data path only through
ferryd.migration.host.MigrationHost.

Its entry points take the stream as a file descriptor, readable on a
target and writable on a source, and nothing else of a request: ferryctl's
pipe hand-over (ferryd.migration_control turns the control socket's
``migrate-*`` requests into these calls) and QEMU's device-state fd
(vhost-user's SET_DEVICE_STATE_FD, then CHECK_DEVICE_STATE: :meth:`wait`)
drive the same controller. The order ferryctl uses:

- source: [:meth:`precopy` (fd) →] :meth:`migrate_out` (fd, or None after a
  pre-copy: same stream) → :meth:`commit`; or :meth:`abort` at any point;
- target: :meth:`migrate_in` (fd) [→ :meth:`wait_precopy`] → :meth:`wait`
  → :meth:`resume`; or :meth:`abort`. QEMU's LOAD uses :meth:`load`
  instead of :meth:`migrate_in` (its target is started running), and
  :meth:`reopen` puts such a target back to running when, its LOAD given
  up, a new QEMU boots a guest on it.

Failures are :class:`~ferryd.migration.errors.MigrationError`; the answers
are plain dicts (timings, counts) that the caller may show or ignore.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from ferryd.migration.errors import MigrationError, NoMigration
from ferryd.migration.history import MigrationHistory
from ferryd.migration.host import MigrationHost
from ferryd.migration.repair_source import RepairSource
from ferryd.migration.roles import Event, Role, RoleMachine
from ferryd.migration.session import PRECOPY_QUIET, MigrationCounters, Session
from ferryd.migration.source import OUTCOME_TIMEOUT, QUEUE_BOUND, SourceMigration
from ferryd.migration.target import TargetMigration

__all__ = ["MigrationController", "MigrationCounters"]

_Side = TypeVar("_Side", SourceMigration, TargetMigration)


class MigrationController:
    def __init__(
        self,
        host: MigrationHost,
        repair: RepairSource,
        *,
        incoming: bool,
        linger: float,
        handed_over: Callable[[], None],
        precopy_quiet: float = PRECOPY_QUIET,
    ) -> None:
        self.host = host
        self.repair = repair
        self.roles = RoleMachine(Role.INCOMING if incoming else Role.RUNNING)
        self.started_incoming = incoming
        """Started with --incoming: waiting for a stream is how it started (see reopen)."""
        self.counters = MigrationCounters()
        self.history = MigrationHistory()
        """The last migrations' ends, in or out (``ferryctl history``, metrics)."""
        self.migration: SourceMigration | TargetMigration | None = None
        """The migration in progress (or the last one), if any."""
        self._linger = linger
        self._handed_over = handed_over
        self._precopy_quiet = precopy_quiet
        self._session: Session | None = None
        self._stopped = False

    @property
    def role(self) -> Role:
        return self.roles.role

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Get ready (bind --repair-listen: before privileges are dropped) and host
        the migrations' background tasks until cancelled; then release
        --repair-listen's socket."""
        try:
            await self.repair.setup()
            async with trio.open_nursery() as nursery:
                self._session = Session(
                    host=self.host,
                    roles=self.roles,
                    repair=self.repair,
                    nursery=nursery,
                    counters=self.counters,
                    linger=self._linger,
                    handed_over=self._handed_over,
                    precopy_quiet=self._precopy_quiet,
                    history=self.history,
                )
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    # Whatever asks for a migration from now on (a QEMU
                    # disconnecting as ferryd exits) is refused: the nursery,
                    # once its tasks are cancelled, takes no more, and other
                    # tasks run before this one leaves it.
                    self._stopped = True
        finally:
            self._stopped = True
            self._session = None
            self.repair.close()  # --repair-listen's socket file goes with us

    def _ready(self, fd: int | None = None) -> Session:
        """The session; if not started yet, refuse (closing ``fd``, which the caller gave us)."""
        if self._session is None or self._stopped:
            if fd is not None:
                os.close(fd)
            if self._stopped:
                raise MigrationError("this ferryd is exiting: no migration any more")
            raise MigrationError("this ferryd is still starting: no migration yet")
        return self._session

    def _current(self, kind: type[_Side]) -> _Side:
        if not isinstance(self.migration, kind):
            raise NoMigration(f"no migration in progress here (this ferryd is {self.role})")
        return self.migration

    def status(self) -> dict[str, Any] | None:
        """A source's pending rollback and why (SourceMigration.status), else None."""
        if isinstance(self.migration, SourceMigration):
            return self.migration.status()
        return None

    # --- source -------------------------------------------------------------

    async def precopy(self, fd: int | None) -> dict[str, Any]:
        """Write the header and the quiet connections to ``fd`` (owned from here on),
        or, ``fd`` None, keep them here for the stream of the freeze (QEMU's SAVE:
        SourceMigration.precopy)."""
        migration = SourceMigration(self._ready(fd))
        if self.roles.allows(Event.PRECOPY):
            self.migration = migration  # else refused below, the last one kept
        return await migration.precopy(fd)

    async def drop_kept_precopy(self) -> None:
        """QEMU gave its migration up before the freeze: drop a pre-copy kept here, if any."""
        current = self.migration
        if (
            isinstance(current, SourceMigration)
            and current.keeping
            and self.role in (Role.PRECOPYING, Role.PRECOPIED)
        ):
            await current.abort()

    async def migrate_out(
        self, fd: int | None, same_netns: bool, outcome_timeout: float | None = OUTCOME_TIMEOUT
    ) -> dict[str, Any]:
        """Freeze and stream to ``fd``, or, after a pre-copy, on its stream (``fd`` None).

        Which of the two a request means is decided here, by the role: a
        caller passes the descriptor it was given, if any.
        ``outcome_timeout``: see SourceMigration.migrate_out.
        """
        if fd is None and self.roles.allows(Event.FREEZE_PRECOPIED):
            current = self._current(SourceMigration)
            return await current.migrate_out(None, same_netns, outcome_timeout)
        last = self.migration
        if fd is not None and isinstance(last, SourceMigration) and last.early is not None:
            return await last.migrate_out(fd, same_netns, outcome_timeout)
        if fd is not None and isinstance(last, SourceMigration) and last.keeping:
            # A pre-copy kept here goes first on fd; one still dumping ends
            # after its batch (the guest is stopped: no waiting for the rest).
            await last.cut_precopy()
            if self.roles.allows(Event.FREEZE_PRECOPIED):  # else it failed: a plain freeze
                return await last.migrate_out(fd, same_netns, outcome_timeout)
        migration = SourceMigration(self._ready(fd))
        if fd is not None and self.roles.allows(Event.FREEZE):
            self.migration = migration  # else refused below, the last one kept
        return await migration.migrate_out(fd, same_netns, outcome_timeout)

    async def freeze_early(self, still_stopped: Callable[[], bool]) -> None:
        """Freeze ahead of the stream (SourceMigration.freeze_early): QEMU stopped the VM
        to end its migration, and its SAVE will call :meth:`migrate_out`.

        ``still_stopped`` says whether the VM is still stopped: asked once a
        pre-copy still dumping has ended, right before freezing (QEMU may have
        resumed it meanwhile, and the freeze must not catch a running guest).
        """
        last = self.migration
        if isinstance(last, SourceMigration) and last.keeping:
            await last.cut_precopy()
            if self.roles.allows(Event.FREEZE_PRECOPIED) and last.kept is not None:
                if still_stopped():
                    await last.freeze_early()
                return
        migration = SourceMigration(self._ready())
        if still_stopped() and self.roles.allows(Event.FREEZE):
            self.migration = migration
            await migration.freeze_early()

    async def commit(self, *, target_running: bool = False) -> dict[str, Any]:
        return await self._current(SourceMigration).commit(target_running=target_running)

    async def before_exit(self) -> None:
        """A source whose frozen sockets are not all in repair mode (armed ones,
        SourceMigration.repair_armed) puts them there, so that exiting closes
        them silently. Nothing to do otherwise."""
        if isinstance(self.migration, SourceMigration) and self.migration.armed_frozen:
            await self.migration.repair_armed()

    # --- target -------------------------------------------------------------

    async def migrate_in(self, fd: int, precopy: bool = False) -> dict[str, Any]:
        """Read and restore the stream on ``fd`` (owned from here on) in the background."""
        migration = TargetMigration(self._ready(fd))
        result = await migration.migrate_in(fd, precopy)
        self.migration = migration
        return result

    async def load(self, fd: int) -> dict[str, Any]:
        """QEMU's LOAD: :meth:`migrate_in`, also from running (TargetMigration.load)."""
        migration = TargetMigration(self._ready(fd))
        result = await migration.load(fd)
        self.migration = migration
        return result

    async def wait_precopy(self) -> dict[str, Any]:
        return await self._current(TargetMigration).wait_precopy()

    async def wait(self) -> dict[str, Any]:
        return await self._current(TargetMigration).wait()

    async def resume(self) -> dict[str, Any]:
        return await self._current(TargetMigration).resume()

    async def reopen(self) -> dict[str, Any]:
        """Serve a new guest, as this ferryd started: after its LOAD was given up.

        A ferryd made a target by QEMU's LOAD (started running) whose
        restore failed or was discarded is left incoming, its data path
        stopped and rebuilt for the stream's link, its forwards closed. A
        new QEMU that boots its guest here instead (no LOAD) needs the
        ferryd it started as (MigrationHost.reset): running, forwards bound.
        A ferryd started with --incoming refuses: it waits for a stream.
        """
        self._ready()
        if self.started_incoming:
            raise MigrationError("this ferryd was started --incoming: it waits for a migration")
        self.roles.step(Event.REOPEN, "cannot serve a new guest: this ferryd is {role}")
        await self.host.reset(trio.current_time())
        self.host.take_over()
        await self.host.start()
        return {"role": str(self.role)}

    # --- either side ----------------------------------------------------------

    def bound_queues(self, on: bool) -> None:
        """A migration is coming (``on``; QEMU's LOG_ALL) or was given up: cap every TCP
        socket's kernel queues at QUEUE_BOUND, or give them back their usual buffers.

        Only while this ferryd runs its guest: a freeze, a rollback and a
        target's restore set their sockets' buffers themselves.
        """
        if self.role is Role.RUNNING:
            self.host.tcp.bound_queues(QUEUE_BOUND if on else None)

    def in_background(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` with the migrations' background tasks.

        For a driver whose requests answer at once while the migration goes
        on (QEMU's SET_DEVICE_STATE_FD: ferryd.migration_device_state).
        ``work`` must not raise; MigrationError if this ferryd is still starting or
        already exiting (:meth:`_ready`).
        """
        self._ready().nursery.start_soon(work)

    async def abort(self) -> dict[str, Any]:
        """Undo whatever the migration did here, in every state (SourceMigration.abort).

        Nothing to undo is an answer, not an error: ferryctl must be able to
        tell "already running" from "stuck".
        """
        if self.migration is None:
            return {"role": str(self.role), "note": "no migration in progress: nothing to undo"}
        return await self.migration.abort()
