"""SourceMigration's outcome watchdog: a frozen source that hears nothing rolls back.

Driven without root or a helper: an in-memory host with no frozen TCP
connection (so the rollback needs no ferry-repair), under trio's
autojump clock (pytest-trio's ``autojump_clock``) so OUTCOME_TIMEOUT passes at once.
"""

from __future__ import annotations

import trio
import trio.testing

from ferryd.migration.roles import Role
from ferryd.migration.source import OUTCOME_TIMEOUT, SourceMigration
from tests.unit.migration_host import MemoryHost, session


async def test_frozen_source_rolls_back_after_outcome_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        mig = SourceMigration(session(host, nursery, Role.FROZEN))
        nursery.start_soon(mig._outcome_watchdog)
        await trio.sleep(OUTCOME_TIMEOUT + 1)
        assert mig.roles.role is Role.RUNNING
        assert host.calls == ["stop", "take_over", "start"]
        assert mig.s.counters.out_rolled_back == 1
        assert mig._watchdog is None
        await host.aclose()
        nursery.cancel_scope.cancel()


async def test_precopied_source_drops_precopy_after_outcome_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        mig = SourceMigration(session(host, nursery, Role.PRECOPIED))
        nursery.start_soon(mig._outcome_watchdog)
        await trio.sleep(OUTCOME_TIMEOUT + 1)
        assert mig.roles.role is Role.RUNNING
        assert host.calls == []  # a pre-copy never stopped the data path
        await host.aclose()
        nursery.cancel_scope.cancel()


async def test_cancelled_watchdog_does_nothing(autojump_clock: trio.testing.MockClock) -> None:
    """A commit (or abort) cancels the watchdog: it neither rolls back nor drops."""
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        mig = SourceMigration(session(host, nursery, Role.FROZEN))
        nursery.start_soon(mig._outcome_watchdog)
        await trio.sleep(1)
        assert mig._watchdog is not None
        mig._watchdog.cancel()
        await trio.sleep(OUTCOME_TIMEOUT + 1)
        assert mig.roles.role is Role.FROZEN
        assert host.calls == []
        await host.aclose()
        nursery.cancel_scope.cancel()
