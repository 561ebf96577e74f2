"""bench.migration's report and streamtool's connection numbering: the pure parts.

The bench needs root, namespaces and minutes (bench/README.md); what it
concludes from its rows (ratios to the solo run of the same run, the
targets met or not) and how a client numbers its connections when several
share one server are checked here.
"""

from __future__ import annotations

from typing import Any

from bench.migration import format_targets, target_of
from testbed.streams import connection_count
from testbed.streamtool import parse_specs


def _row(
    run: int, k: int, index: int, downtime: float, checked: str = "ok", busy: int = 4
) -> dict[str, Any]:
    return {
        "run": run, "parallel": k, "index": index, "n": 1000, "mode": "precopy", "busy": busy,
        "downtime_ms": downtime, "checked": checked,
        "cpu_ms": {"helper A": 10.0, "helper B": 5.0, "ferryds": 100.0},
    }  # fmt: skip


def test_parallel_ratios_are_to_the_solo_of_the_same_run() -> None:
    rows = [
        _row(1, 1, 0, 10.0),
        *(_row(1, 4, i, t) for i, t in enumerate((12.0, 14.0, 15.0, 11.0))),
        _row(2, 1, 0, 20.0),
        *(_row(2, 4, i, t) for i, t in enumerate((20.0, 22.0, 24.0, 26.0))),
    ]
    text = format_targets(rows, rate=10)
    assert "run 1: solo 10.0 ms; 4 at once: 12.0 ms (1.20 x)" in text
    assert "26.0 ms (1.30 x)" in text  # run 2's against run 2's solo, not run 1's
    assert "worst per run median 1.4 x" in text  # 1.5 and 1.3
    assert text.rstrip().endswith("target each <= 1.5 x solo: met")
    assert "pre-copy migration, 1,000 (4 at 10 MB/s): median 15.0 ms" in text
    assert "target <= 15 ms: met" in text


def test_a_failed_migration_gives_no_ratio_and_no_verdict() -> None:
    rows = [
        _row(1, 1, 0, 10.0, busy=0),
        _row(1, 4, 0, 11.0, busy=0),
        _row(1, 4, 1, 12.0, checked="FAILED: x", busy=0),
    ]
    text = format_targets(rows, rate=0)
    assert "4 at once" not in text
    assert text.rstrip().endswith("target each <= 1.5 x solo:")


def test_a_busy_row_is_compared_with_the_idle_one_of_the_same_invocation() -> None:
    rows = [_row(1, 1, 0, 30.0, busy=4), _row(1, 1, 0, 20.0, busy=0)]
    text = format_targets(rows, rate=0)
    assert "1,000 with 4 at full speed both ways: median 30.0 ms (1.50 x the idle 20.0 ms)" in text
    assert "target <= 60 ms: met" in text


def test_targets_by_row() -> None:
    assert target_of(16384, "precopy", 4, 10) == ("16,384 connections, pre-copy", 150.0)
    assert target_of(1000, "plain", 0, 0) == ("plain migration, 1,000 idle", 50.0)
    assert target_of(100, "precopy", 4, 10) is None


def test_seeds_spec_numbers_connections_from_its_base() -> None:
    specs = ("seeds:2000", "busy:2", "idle:3")
    conns = parse_specs(list(specs))
    assert [c.seed for c in conns] == [2000, 2001, 2002, 2003, 2004]
    assert connection_count(specs) == 5
    assert [c.seed for c in parse_specs(["idle:2"])] == [0, 1]


def test_a_handover_row_is_compared_with_plain_between_two_hosts() -> None:
    rows = [
        {**_row(1, 1, 0, 100.0, busy=0), "mode": "handover"},
        {**_row(1, 1, 0, 160.0, busy=0), "mode": "plain"},
    ]
    text = format_targets(rows, rate=0)
    assert "median 100.0 ms (0.62 x plain's 160.0 ms between two hosts)" in text
