"""What a migration side (source or target) works with, handed to it by the controller."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ferryd.migration.history import MigrationHistory
from ferryd.migration.host import MigrationHost
from ferryd.migration.ports import RepairSupply
from ferryd.migration.roles import RoleMachine

#: A connection is pre-copied only if nothing moved on it for this long (seconds).
PRECOPY_QUIET = 0.05


@dataclass
class MigrationCounters:
    """Migration outcomes on this ferryd (read by the counters registry, ferryd.counters)."""

    out_completed: int = 0
    """Source: committed (the guest was handed over)."""
    out_failed: int = 0
    """Source: a pre-copy or a freeze that failed (rolled back or not)."""
    out_rolled_back: int = 0
    """Source: rollbacks completed (after a failure or an abort)."""
    in_completed: int = 0
    """Target: resumed."""
    in_failed: int = 0
    """Target: restores that failed or were aborted (everything discarded)."""
    last_downtime_ms: float = field(default=0.0, metadata={"gauge": True})
    """This side's part of the last downtime: source, freeze to stream end; target,
    the first byte after the freeze to resume (the whole downtime spans both hosts,
    ferryctl migrate measures it)."""
    last_connections: int = field(default=0, metadata={"gauge": True})
    """TCP connections in the last migration streamed out or restored here."""


@dataclass
class Session:
    """The ferryd-wide things every migration on it shares."""

    host: MigrationHost
    roles: RoleMachine
    repair: RepairSupply
    nursery: trio.Nursery
    """Background tasks (a target's restore, watchdogs, linger, rollback retries)."""
    counters: MigrationCounters
    linger: float
    """Seconds a committed source keeps its frozen sockets before it exits."""
    handed_over: Callable[[], None]
    """Called once a committed source's linger time is over: the daemon exits."""
    precopy_quiet: float = PRECOPY_QUIET
    history: MigrationHistory = field(default_factory=MigrationHistory)
    """Each migration's end (outcome, downtime, flows), the last few."""
