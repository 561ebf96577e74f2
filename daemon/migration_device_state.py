"""QEMU drives the migration: vhost-user's device state over the migration controller.

The vhost-user frontend (ferryd.frontends.vhost_user) turns QEMU's
messages into calls of :class:`~ferryd.frontends.vhost_user.device_state.DeviceStateHandler`;
this adapter turns those into the migration controller's entry points, as
ferryd.migration_control does for ferryctl's requests. It sits above both,
so that neither knows the other.

Source (LOG_ALL while the guest runs; then QEMU stops the VM, then SAVE)::

    dirty_logging(on)  QEMU's migration starts: cap the queues, and pre-copy
                   the quiet connections, keeping the records here
                   (MigrationController.precopy(None)); off before a SAVE
                   (cancelled): drop it
    suspended()    the last ring stopped while logging: QEMU stopped the VM,
                   and SAVE follows after RAM's last pass; freeze already
                   (MigrationController.freeze_early: repair ON, pre-copied
                   connections confirmed, nothing dumped yet)
    save(fd)       freeze (unless frozen early) and stream into QEMU's pipe,
                   in the background (MigrationController.migrate_out;
                   closing the fd at the end is what lets QEMU read to EOF)
    check(SAVE)    True once the whole stream was written and the fd closed
    resumed()      QEMU restarted a ring after it (or after suspended()
                   with no SAVE): its migration failed (the target died, a
                   cancel): roll back (thaw, data path restarted) before any
                   frame flows
    disconnected() QEMU is gone: the target took over, commit (linger, exit)

Between a checked SAVE and its outcome the source keeps everything a
rollback needs (the repair helper's connection, its listeners, the frozen
sockets: migrate_out across namespaces closes none of them), and it has
no outcome watchdog (``outcome_timeout=None``): QEMU is the authority.
A watchdog rolling back behind QEMU's back would thaw the sockets of
connections that the target, running the guest, now owns; QEMU always
tells instead: it restarts the rings (resumed) or closes the connection
(disconnected, also when it dies: a source whose QEMU is gone has no guest
to roll back to). A postmigrate QEMU that never quits keeps this ferryd
frozen, which costs only the sockets it holds.

Target (QEMU's LOAD; the ferryd was started like any other, running)::

    load(fd)       take the stream in (MigrationController.load: the data
                   path is stopped, rebuilt from the stream's header)
    check(LOAD)    wait for the restore (MigrationController.wait): its verdict
    started()      the first ring start after a good LOAD: the VM runs here,
                   resume (the data path starts, frames flow)
    disconnected() before that: the VM will not run here; discard what was
                   restored (silently: sockets closed in repair mode), and
                   wait for another LOAD
    started()      a ring start with no checked LOAD on a target that gave
                   one up (failed, or discarded): a new QEMU boots a guest
                   here; back to running as started, forwards bound again
                   (MigrationController.reopen); a ferryd started
                   --incoming stays incoming

A check's verdict belongs to its transfer; an outcome (resumed,
started, disconnected) acts on the controller's role, so a transfer QEMU
should not have asked for (a second SAVE while frozen: refused) changes
nothing of the one in progress.

The frontend's calls that answer at once (save, load, disconnected) leave
their work to the controller's background tasks, run one after the other
in the order QEMU asked (a reconnecting QEMU's LOAD waits for the discard
of the last one's). Every MigrationError becomes a False verdict or a
logged refusal, one line each; none reaches the frontend.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ferryd.frontends.vhost_user.messages import TransferDirection
from ferryd.logthrottle import LogThrottle
from ferryd.migration.controller import MigrationController
from ferryd.migration.errors import MigrationError
from ferryd.migration.roles import ROLLBACK_ROLES, Role

log = logging.getLogger("ferryd.migration")

#: Roles a source freezes early from (QEMU stopped the VM: ``suspended``).
_PRE_FREEZE = (Role.RUNNING, Role.PRECOPYING, Role.PRECOPIED)

__all__ = ["DeviceStateMigration"]


@dataclass
class _Transfer:
    """One SET_DEVICE_STATE_FD: its direction and, once known, its outcome."""

    direction: TransferDirection
    taken: trio.Event = field(default_factory=trio.Event)
    """LOAD: set once the controller took the stream or refused it."""
    accepted: bool = False
    """LOAD: the controller took it (a refused one left the last migration as it was)."""
    done: trio.Event = field(default_factory=trio.Event)
    """SAVE: set once the stream was written, or the save failed (and rolled back)."""
    ok: bool = False
    """SAVE: the whole stream went out; LOAD: everything was restored (check's verdict)."""


class DeviceStateMigration:
    """ferryd.frontends.vhost_user.device_state.DeviceStateHandler over a MigrationController."""

    def __init__(self, controller: MigrationController) -> None:
        self.controller = controller
        self._transfer: _Transfer | None = None
        """The last SET_DEVICE_STATE_FD (what CHECK_DEVICE_STATE asks about)."""
        self._last: trio.Event | None = None
        """Set when the last background step ended (the next one waits for it)."""
        self._resumable = False
        """A LOAD was checked good: the first ring start resumes it."""
        self._outcome = trio.Lock()
        """One outcome at a time (every ring start calls started; only the first resumes)."""
        self._settling: trio.Event | None = None
        """Set when the outcome of the last disconnect (commit, discard) was settled."""
        self._throttle = LogThrottle(log)
        self._logging = False
        """QEMU's dirty logging is on: its migration of this VM is under way."""
        self._stopped = False
        """QEMU stopped the VM while migrating it, and has not started a ring since."""

    def dirty_logging(self, on: bool) -> None:
        """QEMU's migration of this VM starts (``on``: LOG_ALL) or was given up.

        A start begins a pre-copy kept here (SourceMigration.precopy): the quiet
        connections are dumped while the guest still runs, and SAVE then only
        checks that they did not move (QEMU's downtime was the dump of every
        connection). Given up before the SAVE, the pre-copy is dropped.
        """
        self.controller.bound_queues(on)
        self._logging = on
        with contextlib.suppress(MigrationError):  # starting or exiting: no migration
            self.controller.in_background(self._precopy if on else self._drop_precopy)

    def _migrating(self) -> bool:
        # (A method: read after an await, never narrowed by an earlier test.)
        return self._logging

    async def _precopy(self) -> None:
        if not self._migrating() or self.controller.role is not Role.RUNNING:
            return  # (given up already; or a target, or a migration in progress)
        try:
            result = await self.controller.precopy(None)
        except MigrationError as exc:
            self._warn("precopy", "pre-copy for QEMU's migration: %s", exc)
            return
        log.info(
            "QEMU's migration started: %d connections pre-copied in %.1f ms",
            result["precopied"],
            result["timings_ms"]["precopy"],
        )
        if not self._migrating():  # given up while it ran (its drop found nothing yet)
            await self._drop_precopy()

    def suspended(self) -> None:
        """QEMU stopped the VM to end its migration: freeze now, stream at SAVE.

        In order with the background steps: the SAVE's stream_out, asked
        for next, waits for the freeze it completes (MigrationController.migrate_out).
        """
        if not self._migrating() or self.controller.role not in _PRE_FREEZE:
            return
        self._stopped = True

        async def freeze_early() -> None:
            try:
                await self.controller.freeze_early(lambda: self._stopped)
            except MigrationError as exc:
                # Rolled back: the SAVE, if it comes, freezes from the start.
                self._warn("freeze", "early freeze for QEMU's SAVE: %s", exc)

        with contextlib.suppress(MigrationError):  # refused: logged; the SAVE freezes
            self._in_order(freeze_early)

    async def _drop_precopy(self) -> None:
        try:
            await self.controller.drop_kept_precopy()
        except MigrationError as exc:
            self._warn("precopy", "dropping the pre-copy: %s", exc)

    def _warn(self, kind: str, message: str, *args: object) -> None:
        # QEMU triggers these: rate-limited (ferryd.logthrottle).
        self._throttle.warning(kind, trio.current_time(), message, *args)

    def _in_order(self, work: Callable[[], Awaitable[None]], fd: int | None = None) -> None:
        """Run ``work`` after the background steps asked for before it.

        ``work`` handles its own MigrationError. If the controller cannot
        take it yet (still starting), ``fd`` is closed and ``work`` never runs.
        """
        before, done = self._last, trio.Event()
        self._last = done

        async def step() -> None:
            try:
                if before is not None:
                    await before.wait()
                await work()
            finally:
                done.set()

        try:
            self.controller.in_background(step)
        except MigrationError as exc:
            self._warn("refused", "QEMU's device state refused: %s", exc)
            if fd is not None:
                os.close(fd)
            done.set()
            raise

    # --- DeviceStateHandler -----------------------------------------------

    def save(self, fd: int) -> None:
        transfer = self._transfer = _Transfer(TransferDirection.SAVE)

        async def stream_out() -> None:
            try:
                await self.controller.migrate_out(fd, same_netns=False, outcome_timeout=None)
            except MigrationError as exc:
                self._warn("save", "QEMU's device-state save failed: %s", exc)
            else:
                transfer.ok = True
            finally:
                transfer.done.set()

        try:
            self._in_order(stream_out, fd)
        except MigrationError:
            transfer.done.set()

    def load(self, fd: int) -> None:
        transfer = self._transfer = _Transfer(TransferDirection.LOAD)

        async def take_in() -> None:
            try:
                await self.controller.load(fd)
            except MigrationError as exc:
                self._warn("load", "QEMU's device-state load refused: %s", exc)
            else:
                transfer.accepted = True
            finally:
                transfer.taken.set()

        try:
            self._in_order(take_in, fd)
        except MigrationError:
            transfer.taken.set()

    async def check(self, direction: TransferDirection) -> bool:
        transfer = self._transfer
        if transfer is None or transfer.direction is not direction:
            self._warn(
                "check",
                "CHECK_DEVICE_STATE (%s) without a transfer in that direction: failed",
                direction.name,
            )
            return False
        if direction is TransferDirection.SAVE:
            await transfer.done.wait()
        else:
            await transfer.taken.wait()
            if transfer.accepted:
                try:
                    await self.controller.wait()
                except MigrationError as exc:
                    self._warn("restore", "QEMU's device state: %s", exc)
                else:
                    transfer.ok = True
                    self._resumable = True
        return transfer.ok

    async def resumed(self) -> None:
        self._stopped = False
        async with self._outcome:
            # Decided by the role, not by the last transfer: a second SAVE
            # (refused: already frozen) must not hide the first one's outcome.
            if self.controller.role not in ROLLBACK_ROLES:
                return  # never frozen, or a failed save already rolled back
            # Whatever the save reached (one still streaming is stopped, and
            # rolls back): the source VM runs again, with every connection.
            try:
                outcome = await self.controller.abort()
            except MigrationError as exc:
                log.error("QEMU resumed the source VM; %s", exc)
                return
            log.info("QEMU resumed the source VM after its migration failed: %s", outcome["note"])

    async def started(self) -> None:
        self._stopped = False
        async with self._outcome:
            if self._settling is not None:
                # The last QEMU's outcome (a discard) comes first. Only that:
                # a save still streaming waits for QEMU, which waits for us.
                await self._settling.wait()
            if self.controller.role is Role.INCOMING and not self.controller.started_incoming:
                await self._reopen()
                return
            if not self._resumable or self.controller.role is not Role.RESTORED:
                return  # nothing checked to resume (a failed LOAD is already undone)
            self._resumable = False
            try:
                await self.controller.resume()
            except MigrationError as exc:
                log.error("QEMU started the VM here, but its connections could not resume: %s", exc)

    async def _reopen(self) -> None:
        """A ring starts without a checked LOAD on a target that gave one up: a new guest.

        Taken in order with the background steps, so that a LOAD QEMU sends
        next waits until the ferryd runs again.
        """
        done = trio.Event()

        async def reopen() -> None:
            try:
                await self.controller.reopen()
            except MigrationError as exc:
                self._warn("reopen", "QEMU started a new guest here, but: %s", exc)
            else:
                log.info("QEMU started a new guest here (no device state): running as started")
            finally:
                done.set()

        try:
            self._in_order(reopen)
        except MigrationError:
            return
        await done.wait()

    def disconnected(self) -> None:
        self._logging = self._stopped = False
        self._transfer = None
        self._resumable = False

        async def settle() -> None:
            # After every step asked for before (a save still streaming ends first).
            role = self.controller.role
            try:
                if role is Role.FROZEN:
                    # The target took over, and its VM runs (QEMU completed).
                    await self.controller.commit(target_running=True)
                elif role in (Role.PRECOPYING, Role.PRECOPIED):
                    await self.controller.drop_kept_precopy()  # no SAVE came
                elif role is Role.MIGRATING_OUT:
                    await self.controller.abort()  # frozen early, and no SAVE came
                elif role in (Role.MIGRATING_IN, Role.RESTORED):
                    await self.controller.abort()  # the VM will not run here: discard
            except MigrationError as exc:
                self._warn("outcome", "QEMU left (this ferryd was %s): %s", role, exc)

        with contextlib.suppress(MigrationError):  # logged; still starting: nothing to undo
            self._in_order(settle)
            self._settling = self._last
