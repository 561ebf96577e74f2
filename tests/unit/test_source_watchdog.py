"""SourceMigration's outcome watchdog: a frozen source that hears nothing rolls back.

Driven without root or a helper: a stand-in daemon with no frozen TCP
connection (so the rollback needs no ferry-repair), under trio's
autojump clock (pytest-trio's ``autojump_clock``) so OUTCOME_TIMEOUT passes at once.
"""

from __future__ import annotations

from typing import Any, cast

import trio
import trio.testing

from ferryd.migration.source import OUTCOME_TIMEOUT, SourceMigration


class FakeTap:
    def __init__(self) -> None:
        self.attached = 0

    def attach_queue(self) -> None:
        self.attached += 1


class FakeDaemon:
    def __init__(self, outer: trio.Nursery) -> None:
        self.role = "frozen"
        self.outer = outer
        self.tap = FakeTap()
        self.data_path_started = 0

    async def stop_data_path(self) -> None:
        await trio.lowlevel.checkpoint()

    async def start_data_path(self) -> None:
        await trio.lowlevel.checkpoint()
        self.data_path_started += 1


def _migration(d: FakeDaemon) -> SourceMigration:
    return SourceMigration(cast(Any, d), cast(Any, None))


async def test_frozen_source_rolls_back_after_outcome_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        d = FakeDaemon(nursery)
        mig = _migration(d)
        nursery.start_soon(mig._outcome_watchdog)
        await trio.sleep(OUTCOME_TIMEOUT + 1)
        assert d.role == "running"
        assert d.tap.attached == 1
        assert d.data_path_started == 1
        assert mig._watchdog is None


async def test_precopied_source_drops_precopy_after_outcome_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        d = FakeDaemon(nursery)
        d.role = "precopied"
        mig = _migration(d)
        nursery.start_soon(mig._outcome_watchdog)
        await trio.sleep(OUTCOME_TIMEOUT + 1)
        assert d.role == "running"


async def test_cancelled_watchdog_does_nothing(autojump_clock: trio.testing.MockClock) -> None:
    """A commit (or abort) cancels the watchdog: it neither rolls back nor drops."""
    async with trio.open_nursery() as nursery:
        d = FakeDaemon(nursery)
        mig = _migration(d)
        nursery.start_soon(mig._outcome_watchdog)
        await trio.sleep(1)
        assert mig._watchdog is not None
        mig._watchdog.cancel()
        await trio.sleep(OUTCOME_TIMEOUT + 1)
        assert d.role == "frozen"
        assert d.tap.attached == 0
