"""The last migrations of one ferryd, in or out: outcome, downtime, flows moved.

Counters (session.MigrationCounters) say how many migrations ended how;
an operator looking at one migration wants its own numbers: how long the
guest's network stood still, how many connections went, and whether it
worked. Each side appends one :class:`MigrationRecord` when a migration
reaches an end (the points are listed on :class:`Outcome`); the history
keeps the last :data:`HISTORY_SIZE`, so it costs a few kilobytes whatever
the uptime, and the metrics built on it (ferryd.metrics) have a bounded
number of series. Records are numbered from 1 for the life of the process
(``seq``), so a scraper tells a new migration from one it saw already.

Times are passed in (``finished_at``, wall-clock seconds since the epoch,
the one clock two hosts' records can be compared on); nothing here reads
a clock or does I/O.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HISTORY_SIZE", "Direction", "MigrationHistory", "MigrationRecord", "Outcome"]

#: Migrations remembered (the oldest is forgotten first).
HISTORY_SIZE = 32


class Direction(enum.Enum):
    OUT = "out"
    """This ferryd was the source."""
    IN = "in"
    """This ferryd was the target."""


class Outcome(enum.Enum):
    COMPLETED = "completed"
    """Source: committed (the guest handed over). Target: resumed."""
    ROLLED_BACK = "rolled-back"
    """Source: a failed or aborted migration undone, every connection running here again
    (a pending rollback that completes later adds this record then)."""
    ROLLBACK_PENDING = "rollback-pending"
    """Source: the rollback could not be completed yet (connections frozen, retried)."""
    FAILED = "failed"
    """Source: a pre-copy failed (nothing was frozen). Target: the restore failed or was
    aborted, and everything restored was discarded."""


@dataclass(frozen=True)
class MigrationRecord:
    """One migration's end on this ferryd."""

    seq: int
    direction: Direction
    outcome: Outcome
    finished_at: float
    """Wall-clock seconds since the epoch."""
    downtime_ms: float | None
    """This side's part of the guest's network downtime (source: freeze to the stream's
    end, or to the rollback; target: the first byte after the freeze to resume); None
    when the guest was never stopped here."""
    flows: Mapping[str, int] = field(default_factory=dict)
    """Flows streamed (source) or restored (target), by kind: tcp, udp, icmp, listeners."""
    error: str | None = None
    """Why it failed, for a failed or rolled-back migration."""

    def as_dict(self) -> dict[str, Any]:
        """The record as ``ferryctl history --json`` shows it."""
        return {
            "seq": self.seq,
            "direction": self.direction.value,
            "outcome": self.outcome.value,
            "finished_at": self.finished_at,
            "downtime_ms": self.downtime_ms,
            "flows": dict(self.flows),
            "error": self.error,
        }


#: The kinds of flows a record counts (a stream's other counts are left out).
FLOW_KINDS = ("tcp", "udp", "icmp", "listeners")


class MigrationHistory:
    """The last ``size`` migration records, oldest first."""

    def __init__(self, size: int = HISTORY_SIZE) -> None:
        if size < 1:
            raise ValueError(f"a migration history holds at least one record, not {size}")
        self._records: collections.deque[MigrationRecord] = collections.deque(maxlen=size)
        self._next = 1

    def add(
        self,
        direction: Direction,
        outcome: Outcome,
        *,
        finished_at: float,
        downtime_ms: float | None = None,
        flows: Mapping[str, int] | None = None,
        error: str | None = None,
    ) -> MigrationRecord:
        """Remember one migration's end (forgetting the oldest beyond the size)."""
        counts = {kind: int((flows or {}).get(kind, 0)) for kind in FLOW_KINDS}
        record = MigrationRecord(
            self._next, direction, outcome, finished_at, downtime_ms, counts, error
        )
        self._next += 1
        self._records.append(record)
        return record

    def records(self) -> list[MigrationRecord]:
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)
