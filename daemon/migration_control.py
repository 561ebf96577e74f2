"""The migration commands of the control socket (ferryd.coordinator drives them).

Source: ``migrate-out`` (with the stream's write end), ``migrate-commit``,
``migrate-abort``. Target: ``migrate-in`` (with the read end),
``migrate-wait``, ``migrate-resume``, ``migrate-abort``. ferryctl drives
them in that order; the shape is vhost-user's SET_DEVICE_STATE_FD then
CHECK_DEVICE_STATE (DESIGN.md).

With pre-copy (ferryd.migration.source): ``migrate-in`` with
``precopy: true``, then the source's ``migrate-precopy`` (with the write
end; the guest keeps running), the target's ``migrate-wait-precopy``
(restored ahead; takes the guest's frames over), then ``migrate-out``
without a descriptor (the freeze, on the same stream), and on as above.

This module only translates: a request and its descriptors into a call of
the migration controller (ferryd.migration.controller), the migration
layer's errors into the control socket's ControlError. It sits above both,
so that neither knows the other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ferryd.control import ControlError, ControlServer
from ferryd.migration.controller import MigrationController
from ferryd.migration.errors import MigrationError

_Handler = Callable[[dict[str, Any], list[int]], Awaitable[dict[str, Any]]]


def _one_fd(cmd: str, fds: list[int]) -> int:
    if len(fds) != 1:
        raise ControlError(
            f"{cmd!r} takes exactly one file descriptor (the stream), not {len(fds)}"
        )
    return fds.pop()


def _one_fd_or_none(cmd: str, fds: list[int]) -> int | None:
    if len(fds) > 1:
        raise ControlError(
            f"{cmd!r} takes one file descriptor (the stream) or none, not {len(fds)}"
        )
    return fds.pop() if fds else None


def _translated(handler: _Handler) -> _Handler:
    async def handle(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        try:
            return await handler(req, fds)
        except MigrationError as exc:
            raise ControlError(str(exc)) from exc

    return handle


def register(control: ControlServer, migration: MigrationController) -> None:
    async def migrate_precopy(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return await migration.precopy(_one_fd("migrate-precopy", fds))

    async def migrate_out(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        # Without a descriptor: on the pre-copy's stream, if there was one
        # (the controller decides, by its role).
        same_netns = bool(req.get("same_netns", False))
        return await migration.migrate_out(_one_fd_or_none("migrate-out", fds), same_netns)

    async def migrate_in(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        fd = _one_fd("migrate-in", fds)
        return await migration.migrate_in(fd, bool(req.get("precopy", False)))  # owns fd

    async def migrate_wait_precopy(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return await migration.wait_precopy()

    async def migrate_wait(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return await migration.wait()

    async def migrate_resume(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return await migration.resume()

    async def migrate_commit(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return await migration.commit()

    async def migrate_abort(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        # Acts in every state; an error only when the undoing could not be completed.
        return await migration.abort()

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
        control.register(name, _translated(handler))
