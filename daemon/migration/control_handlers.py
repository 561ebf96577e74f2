"""The migration commands of the control socket (see daemon/ctl.py ``migrate``).

Source: ``migrate-out`` (with the stream's write end), ``migrate-commit``,
``migrate-abort``. Target: ``migrate-in`` (with the read end),
``migrate-wait``, ``migrate-resume``, ``migrate-abort``. ferryctl drives
them in that order; the shape is vhost-user's SET_DEVICE_STATE_FD then
CHECK_DEVICE_STATE (DESIGN.md).

With pre-copy (ferryd.migration.source): ``migrate-in`` with
``precopy: true``, then the source's ``migrate-precopy`` (with the write
end; the guest keeps running), the target's ``migrate-wait-precopy``
(restored ahead; takes the guest's tap queue), then ``migrate-out``
without a descriptor (the freeze, on the same stream), and on as above.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ferryd.control import ControlError, ControlServer
from ferryd.migration.restore import RepairSource
from ferryd.migration.source import SourceMigration
from ferryd.migration.target import TargetMigration

if TYPE_CHECKING:
    from ferryd.main import Daemon


def _one_fd(cmd: str, fds: list[int]) -> int:
    if len(fds) != 1:
        raise ControlError(
            f"{cmd!r} takes exactly one file descriptor (the stream), not {len(fds)}"
        )
    return fds.pop()


async def setup(daemon: Daemon) -> None:
    repair = RepairSource(daemon.opts.repair_socket, daemon.opts.repair_listen)
    await repair.setup()
    daemon.repair_source = repair


def register(control: ControlServer, daemon: Daemon) -> None:
    async def migrate_precopy(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        fd = _one_fd("migrate-precopy", fds)
        migration = SourceMigration(daemon, daemon.repair_source)
        if daemon.role == "running":
            daemon.migration = migration
        return await migration.precopy(fd)

    async def migrate_out(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        same_netns = bool(req.get("same_netns", False))
        if not fds and daemon.role == "precopied":
            source: SourceMigration = current(SourceMigration)
            return await source.migrate_out(None, same_netns)
        fd = _one_fd("migrate-out", fds)
        migration = SourceMigration(daemon, daemon.repair_source)
        if daemon.role == "running":
            daemon.migration = migration
        return await migration.migrate_out(fd, same_netns)

    async def migrate_in(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        fd = _one_fd("migrate-in", fds)
        migration = TargetMigration(daemon, daemon.repair_source)
        result = await migration.migrate_in(fd, bool(req.get("precopy", False)))  # owns fd
        daemon.migration = migration
        return result

    async def migrate_wait_precopy(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        result: dict[str, Any] = await current(TargetMigration).wait_precopy()
        return result

    def current(kind: type) -> Any:
        if not isinstance(daemon.migration, kind):
            raise ControlError(f"no migration in progress here (this ferryd is {daemon.role})")
        return daemon.migration

    async def migrate_wait(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        result: dict[str, Any] = await current(TargetMigration).wait()
        return result

    async def migrate_resume(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        result: dict[str, Any] = await current(TargetMigration).resume()
        return result

    async def migrate_commit(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        result: dict[str, Any] = await current(SourceMigration).commit()
        return result

    async def migrate_abort(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        # Acts in every state (SourceMigration.abort); an error only when the
        # undoing could not be completed. Nothing to undo is an answer, not an
        # error: ferryctl must be able to tell "already running" from "stuck".
        if daemon.migration is None:
            return {"role": daemon.role, "note": "no migration in progress: nothing to undo"}
        result: dict[str, Any] = await daemon.migration.abort()
        return result

    for name, handler in (
        ("migrate-precopy", migrate_precopy),
        ("migrate-out", migrate_out),
        ("migrate-in", migrate_in),
        ("migrate-wait-precopy", migrate_wait_precopy),
        ("migrate-wait", migrate_wait),
        ("migrate-resume", migrate_resume),
        ("migrate-commit", migrate_commit),
        ("migrate-abort", migrate_abort),
    ):
        control.register(name, handler)
