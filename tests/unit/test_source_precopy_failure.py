"""A pre-copy that fails for any reason undoes itself: the source runs on.

Driven without root: a stand-in daemon with one quiet connection (so the
pre-copy asks for the repair helper) and no helper configured, which
RepairSource.get() reports as a ControlError.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from ferryd.control import ControlError
from ferryd.migration.restore import RepairSource
from ferryd.migration.source import PRECOPY_QUIET, SourceMigration
from tests.unit.test_source_watchdog import FakeDaemon


def _quiet_conn() -> SimpleNamespace:
    """A connection quiet for long enough (TcpConn.settled) to be pre-copied."""

    def settled(now: float, quiet: float) -> bool:
        assert quiet == PRECOPY_QUIET
        return True

    return SimpleNamespace(settled=settled, closed=False)


class RunningDaemon(FakeDaemon):
    def __init__(self, outer: trio.Nursery) -> None:
        super().__init__(outer)
        self.role = "running"
        self.tcp = SimpleNamespace(table=[SimpleNamespace(handle=_quiet_conn())])
        self.udp = self.icmp = SimpleNamespace(table=[])
        self.stack = SimpleNamespace(guest_mac=b"\x02" * 6)
        self.link = SimpleNamespace(mac=b"\x02" * 6, mtu=1500, ipv4=None, ipv6=None)


async def test_precopy_without_a_helper_fails_and_runs_on() -> None:
    read_end, write_end = os.pipe()
    try:
        async with trio.open_nursery() as nursery:
            d = RunningDaemon(nursery)
            mig = SourceMigration(cast(Any, d), RepairSource(None, None))
            with pytest.raises(ControlError, match=r"pre-copy failed .*repair helper"):
                await mig.precopy(write_end)
            assert d.role == "running"
            assert mig.stream is None
            # Nothing pre-copied, so nothing for migrate-abort to undo.
            assert (await mig.abort())["note"] == "no migration in progress: nothing to undo"
    finally:
        os.close(read_end)
