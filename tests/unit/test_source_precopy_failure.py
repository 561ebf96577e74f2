"""A pre-copy that fails for any reason undoes itself: the source runs on.

Driven without root: an in-memory host with one quiet connection (so the
pre-copy asks for the repair helper) and no helper configured, which
RepairSource.get() reports as RepairUnavailable.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from ferryd.migration.errors import MigrationFailed
from ferryd.migration.roles import Role
from ferryd.migration.source import SourceMigration
from tests.unit.migration_host import MemoryHost, session

QUIET = 0.05


def _quiet_conn() -> SimpleNamespace:
    """A connection quiet for long enough (TcpConn.settled) to be pre-copied."""

    def settled(now: float, quiet: float) -> bool:
        assert quiet == QUIET
        return True

    return SimpleNamespace(settled=settled, closed=False)


async def test_precopy_without_a_helper_fails_and_runs_on() -> None:
    read_end, write_end = os.pipe()
    try:
        async with trio.open_nursery() as nursery:
            host = MemoryHost(nursery)
            host.tcp = cast(Any, SimpleNamespace(table=[SimpleNamespace(handle=_quiet_conn())]))
            mig = SourceMigration(session(host, nursery, Role.RUNNING, precopy_quiet=QUIET))
            with pytest.raises(MigrationFailed, match=r"pre-copy failed .*repair helper"):
                await mig.precopy(write_end)
            assert mig.roles.role is Role.RUNNING
            assert mig.stream is None
            assert mig.s.counters.out_failed == 1
            # Nothing pre-copied, so nothing for migrate-abort to undo.
            assert (await mig.abort())["note"] == "no migration in progress: nothing to undo"
            nursery.cancel_scope.cancel()
    finally:
        os.close(read_end)
