"""The Prometheus exposition (ferryd.metrics) and the migration history it shows.

The text is parsed back with prometheus_client's own parser, as a scraper
would read it: names, types, labels and values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferryd.counters import Registry
from ferryd.metrics import CONTENT_TYPE, ROLES, MetricsView, render
from ferryd.migration.history import Direction, MigrationHistory, Outcome


@dataclass
class _Table:
    flows: int = field(default=0, metadata={"gauge": True})
    opened: int = 0


@dataclass
class _Frontend:
    frames_in: int = 0
    dropped_out: int = 0


_Parsed = dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]


def _parse(text: bytes) -> _Parsed:
    """Family name -> (type, {sorted labels of a sample (its name included): value})."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        samples = {
            tuple(sorted({**s.labels, "__name__": s.name}.items())): s.value for s in family.samples
        }
        out[family.name] = (family.type, samples)
    return out


def _value(parsed: _Parsed, name: str, sample: str | None = None, **labels: str) -> float:
    _, samples = parsed[name]
    key = tuple(sorted({**labels, "__name__": sample or name}.items()))
    return float(samples[key])


def test_counters_and_gauges_from_the_registry() -> None:
    registry = Registry()
    tcp, frontend = _Table(flows=3, opened=10), _Frontend(frames_in=1234, dropped_out=2)
    registry.add("tcp", tcp)
    registry.add("frontend", frontend)
    assert registry.gauges() == frozenset({("tcp", "flows")})
    view = MetricsView(
        counters=registry.snapshot(),
        gauges=registry.gauges(),
        role="migrated",
        ready=True,
        descriptors={"in_use": 3, "for_flows": 900},
    )
    parsed = _parse(render(view))
    assert parsed["ferry_tcp_flows"][0] == "gauge"
    assert _value(parsed, "ferry_tcp_flows") == 3
    assert parsed["ferry_tcp_opened"][0] == "counter"
    assert _value(parsed, "ferry_tcp_opened", "ferry_tcp_opened_total") == 10
    assert _value(parsed, "ferry_frontend_frames_in", "ferry_frontend_frames_in_total") == 1234
    assert _value(parsed, "ferry_descriptors_in_use") == 3
    assert _value(parsed, "ferry_ready") == 1
    # The role as a state set (a gauge per role in the text format): exactly
    # one of every role ferryd has is 1.
    assert parsed["ferry_role"][0] == "gauge"
    states = {dict(k)["ferry_role"]: v for k, v in parsed["ferry_role"][1].items()}
    assert states == {role: float(role == "migrated") for role in ROLES}
    assert {"running", "incoming", "migrating", "migrated", "rollback-pending"} <= set(ROLES)


def test_history_as_labelled_gauges() -> None:
    history = MigrationHistory()
    history.add(
        Direction.OUT,
        Outcome.COMPLETED,
        finished_at=1700000000.5,
        downtime_ms=12.5,
        flows={"tcp": 7, "udp": 1, "listeners": 2, "reset": 9},
    )
    history.add(Direction.IN, Outcome.FAILED, finished_at=1700000100.0, error="restore failed")
    parsed = _parse(render(MetricsView(counters={}, history=history.records())))
    first = {"seq": "1", "direction": "out", "outcome": "completed"}
    second = {"seq": "2", "direction": "in", "outcome": "failed"}
    assert _value(parsed, "ferry_migration_downtime_seconds", **first) == pytest.approx(0.0125)
    assert _value(parsed, "ferry_migration_flows_moved", kind="tcp", **first) == 7
    assert _value(parsed, "ferry_migration_flows_moved", kind="listeners", **first) == 2
    assert _value(parsed, "ferry_migration_flows_moved", kind="tcp", **second) == 0
    assert _value(parsed, "ferry_migration_finished_timestamp_seconds", **second) == 1700000100
    # No downtime for a migration that never stopped the guest here.
    assert len(parsed["ferry_migration_downtime_seconds"][1]) == 1


def test_history_is_bounded_and_numbered() -> None:
    history = MigrationHistory(size=3)
    for n in range(5):
        history.add(Direction.OUT, Outcome.COMPLETED, finished_at=float(n))
    assert [r.seq for r in history.records()] == [3, 4, 5]
    assert history.records()[0].as_dict() == {
        "seq": 3,
        "direction": "out",
        "outcome": "completed",
        "finished_at": 2.0,
        "downtime_ms": None,
        "flows": {"tcp": 0, "udp": 0, "icmp": 0, "listeners": 0},
        "error": None,
    }
    with pytest.raises(ValueError, match="at least one"):
        MigrationHistory(size=0)


def test_content_type_is_the_text_format() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
