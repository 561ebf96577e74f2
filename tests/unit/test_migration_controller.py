"""MigrationController: a whole migration between two controllers, in memory, without root.

Each controller drives its own in-memory MigrationHost
(tests/unit/migration_host.py); the stream between them is a socketpair,
as ferryctl's pipe or QEMU's device-state fd would be. Then the control
socket's commands (ferryd.migration_control) over the same controllers:
the migration layer's errors reach the client as ControlError.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
import trio

from ferryd import migration_control
from ferryd.control import ControlError
from ferryd.migration.controller import MigrationController
from ferryd.migration.errors import MigrationError
from ferryd.migration.history import Direction, Outcome
from ferryd.migration.repair_client import RepairUnavailable
from ferryd.migration.repair_source import RepairSource
from ferryd.migration.roles import Role
from ferryd.migration.sockstate import SocketStateError
from ferryd.migration.target import TargetMigration
from tests.unit.migration_host import MemoryHost
from tests.unit.test_flows_helpers import GUEST4, gateway_of, udp_from_guest

Handler = Callable[[dict[str, Any], list[int]], Awaitable[dict[str, Any]]]


@asynccontextmanager
async def controllers() -> AsyncIterator[
    tuple[MemoryHost, MigrationController, MemoryHost, MigrationController]
]:
    async with trio.open_nursery() as nursery:
        src_host, dst_host = MemoryHost(nursery), MemoryHost(nursery)
        src = MigrationController(
            src_host,
            RepairSource(None, None),
            incoming=False,
            linger=0.0,
            handed_over=src_host.exit,
            precopy_quiet=0.001,
        )
        dst = MigrationController(
            dst_host, RepairSource(None, None), incoming=True, linger=0.0, handed_over=dst_host.exit
        )
        await nursery.start(src.run)
        await nursery.start(dst.run)
        try:
            yield src_host, src, dst_host, dst
        finally:
            await src_host.aclose()
            await dst_host.aclose()
            nursery.cancel_scope.cancel()


async def test_a_whole_migration_in_memory() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        async with controllers() as (src_host, src, dst_host, dst):
            src_host.udp.from_guest(
                *udp_from_guest(GUEST4, gateway_of(4), 40001, port, b"hi"), trio.current_time()
            )
            reader, writer = socket.socketpair()
            await dst.migrate_in(reader.detach())
            assert dst.role is Role.MIGRATING_IN
            out = await src.migrate_out(writer.detach(), same_netns=False)
            assert out["flows"]["udp"] == 1
            restored = await dst.wait()
            assert restored["restored"]["udp"] == 1
            assert restored["stream_bytes"] == out["stream_bytes"]
            await src.commit()
            await dst.resume()
            assert (src.role, dst.role) == (Role.MIGRATED, Role.RUNNING)
            with trio.fail_after(5):
                await src_host.exited.wait()
            assert src_host.calls == ["stop", "hand_over(drain)", "exit"]
            assert dst_host.calls == ["take_over", "rebuild", "start"]
            assert len(dst_host.udp.table) == 1
            assert src.counters.out_completed == 1
            assert src.counters.last_connections == 0
            assert dst.counters.in_completed == 1
            # Each side's history: one completed migration, its flows and downtime.
            (out_record,) = src.history.records()
            (in_record,) = dst.history.records()
            assert (out_record.seq, out_record.direction, out_record.outcome) == (
                1,
                Direction.OUT,
                Outcome.COMPLETED,
            )
            assert (in_record.direction, in_record.outcome) == (Direction.IN, Outcome.COMPLETED)
            assert (
                out_record.flows
                == in_record.flows
                == {
                    "tcp": 0,
                    "udp": 1,
                    "icmp": 0,
                    "listeners": 0,
                }
            )
            assert out_record.downtime_ms is not None and out_record.downtime_ms > 0
            assert in_record.downtime_ms is not None and in_record.downtime_ms > 0
            assert out_record.error is None and in_record.error is None


async def test_failed_migrations_are_in_the_history() -> None:
    """A source whose target went away rolls back; a target aborted discards: both recorded."""
    async with controllers() as (_, src, _, dst):
        reader, writer = socket.socketpair()
        reader.close()
        with pytest.raises(MigrationError, match="rolled back, nothing lost"):
            await src.migrate_out(writer.detach(), same_netns=False)
        (record,) = src.history.records()
        assert (record.direction, record.outcome) == (Direction.OUT, Outcome.ROLLED_BACK)
        assert record.error is not None and "migration failed" in record.error
        assert record.flows == {"tcp": 0, "udp": 0, "icmp": 0, "listeners": 0}
        assert record.downtime_ms is not None and record.downtime_ms >= 0
        reader, writer = socket.socketpair()
        await dst.migrate_in(reader.detach())
        writer.close()  # the stream ends before its header: the restore fails
        with pytest.raises(MigrationError, match="restore failed"):
            await dst.wait()
        (record,) = dst.history.records()
        assert (record.direction, record.outcome) == (Direction.IN, Outcome.FAILED)
        assert record.downtime_ms is None and record.error is not None


class Commands:
    """Stands in for the control server: keeps what migration_control registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def register(self, cmd: str, handler: Handler) -> None:
        self.handlers[cmd] = handler

    async def __call__(self, cmd: str, fds: list[int] | None = None, **req: Any) -> dict[str, Any]:
        return await self.handlers[cmd](req, fds or [])


async def test_control_commands_translate_migration_errors() -> None:
    async with controllers() as (_, src, _, dst):
        source, target = Commands(), Commands()
        migration_control.register(cast(Any, source), src)
        migration_control.register(cast(Any, target), dst)
        with pytest.raises(ControlError, match="no migration in progress here"):
            await target("migrate-wait")
        no_target_here = r"no migration in progress here \(this ferryd is running\)"
        with pytest.raises(ControlError, match=no_target_here):
            await source("migrate-resume")
        with pytest.raises(ControlError, match=r"^migrate-out without a stream needs a pre-copy"):
            await source("migrate-out")
        one, two = socket.socketpair()
        with one, two, pytest.raises(ControlError, match=r"one file descriptor .* or none, not 2"):
            await source("migrate-out", [one.fileno(), two.fileno()])
        reader, writer = socket.socketpair()
        with pytest.raises(ControlError, match="cannot take a migration: this ferryd is running"):
            await source("migrate-in", [reader.detach()])
        with writer, pytest.raises(BrokenPipeError):
            writer.send(b"x")  # the refused stream was closed
        assert await source("migrate-abort") == {
            "role": "running",
            "note": "no migration in progress: nothing to undo",
        }


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RepairUnavailable("no repair helper connected"), r"^no repair helper connected$"),
        (
            SocketStateError("10.0.2.15:40001", "finish restore", "EINVAL"),
            r"^resume failed: 10\.0\.2\.15:40001: finish restore: EINVAL$",
        ),
    ],
)
async def test_a_failed_resume_reaches_the_client_as_the_migrations_error(
    error: Exception, message: str
) -> None:
    """Not as "internal error (a ferryd bug)": the helper or the kernel failed, and says so."""
    async with controllers() as (_, src, _, dst):
        target = Commands()
        migration_control.register(cast(Any, target), dst)
        reader, writer = socket.socketpair()
        await target("migrate-in", [reader.detach()])
        await src.migrate_out(writer.detach(), same_netns=False)
        await target("migrate-wait")
        assert isinstance(dst.migration, TargetMigration)
        restorer = dst.migration.restorer
        assert restorer is not None

        async def failing_resume() -> float:
            await trio.lowlevel.checkpoint()
            raise error

        restorer.resume = failing_resume  # type: ignore[method-assign]
        with pytest.raises(ControlError, match=message):
            await target("migrate-resume")
        assert dst.role is Role.RESTORED  # nothing resumed: an abort can still discard
        await src.abort()
