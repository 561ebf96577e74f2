"""What ferryd counted and its last migrations, in Prometheus' text format.

Theory of operation. Nothing is counted twice: the numbers are the
counters registry's (ferryd.counters: every component's dataclass, the same
snapshot ``ferryctl counters`` shows), the descriptor budget's levels, the
migration role, and the migration history (ferryd.migration.history). A
scrape takes a :class:`MetricsView` of them at that moment and renders it
with prometheus_client (a :class:`~prometheus_client.registry.CollectorRegistry`
holding one custom collector, then ``generate_latest``): the library, not
this module, owns the format's escaping and type lines. This module reads
no clock and owns no socket; ``ferryctl metrics`` gets the text through the
control socket, ``ferryd --metrics ADDR`` serves it over HTTP
(ferryd.http_metrics).

Names. A counter field ``NAME`` of group ``GROUP`` is
``ferry_GROUP_NAME_total`` (``ferry_frontend_frames_in_total``,
``ferry_refusals_tcp_total``); a field its dataclass marks as a level
(``field(metadata={"gauge": True})``: a table's ``flows``, the migration's
``last_downtime_ms``) is the gauge ``ferry_GROUP_NAME``
(``ferry_tcp_flows``). A migration target rebuilds its stack and flow
tables from the stream, and their counts start again: Prometheus takes a
counter that goes down for a restart (``rate()`` handles it).

The migration history is a set of gauges per remembered migration,
labelled with its ``seq`` (numbered from 1 for the life of the process),
``direction`` (``out``, ``in``) and ``outcome``:
``ferry_migration_downtime_seconds``, ``ferry_migration_flows_moved`` (with
``kind``: tcp, udp, icmp, listeners) and
``ferry_migration_finished_timestamp_seconds``. The history is bounded
(HISTORY_SIZE), so are these series; totals by outcome are the
``ferry_migration_*_total`` counters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from ferryd.counters import Snapshot
from ferryd.migration.history import FLOW_KINDS, MigrationRecord
from ferryd.migration.roles import Role

__all__ = ["CONTENT_TYPE", "PREFIX", "MetricsView", "render"]

#: Every metric's name starts so.
PREFIX = "ferry"
#: The exposition's media type (text format 0.0.4, what generate_latest writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Every role a ferryd can be in, as ``ferryctl status`` shows it (a state set).
ROLES = tuple(dict.fromkeys(str(role) for role in Role))

_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(frozen=True)
class MetricsView:
    """What one scrape shows, read at one moment (see the module docstring)."""

    counters: Snapshot
    gauges: frozenset[tuple[str, str]] = frozenset()
    """(group, name) of the counters registry's fields that are levels, not totals."""
    role: str = "running"
    ready: bool = True
    descriptors: Mapping[str, int] = field(default_factory=dict)
    """The descriptor budget's levels (DescriptorBudget.snapshot)."""
    history: Sequence[MigrationRecord] = ()


def _name(*parts: str) -> str:
    return _NOT_NAME.sub("_", "_".join((PREFIX, *parts)))


class _Collector(Collector):
    def __init__(self, view: MetricsView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        view = self.view
        yield GaugeMetricFamily(_name("ready"), "1 once ferryd serves its guest", int(view.ready))
        yield StateSetMetricFamily(
            _name("role"),
            "this ferryd's migration role, as ferryctl status shows it",
            {role: role == view.role for role in ROLES},
        )
        for group, values in view.counters.items():
            for counter, value in values.items():
                doc = f"ferryd's {group} counter {counter} (ferryctl counters)"
                if (group, counter) in view.gauges:
                    yield GaugeMetricFamily(_name(group, counter), doc, value)
                else:
                    yield CounterMetricFamily(_name(group, counter), doc, value)
        for level, value in view.descriptors.items():
            yield GaugeMetricFamily(
                _name("descriptors", level),
                f"descriptor budget: {level} (ferryctl status: descriptors)",
                value,
            )
        yield from _history(view.history)


def _history(records: Sequence[MigrationRecord]) -> Iterator[Metric]:
    labels = ["seq", "direction", "outcome"]
    downtime = GaugeMetricFamily(
        _name("migration", "downtime_seconds"),
        "this side's part of the guest's network downtime in each remembered migration",
        labels=labels,
    )
    moved = GaugeMetricFamily(
        _name("migration", "flows_moved"),
        "flows streamed out or restored in each remembered migration, by kind",
        labels=[*labels, "kind"],
    )
    finished = GaugeMetricFamily(
        _name("migration", "finished_timestamp_seconds"),
        "when each remembered migration ended (seconds since the epoch)",
        labels=labels,
    )
    for record in records:
        values = [str(record.seq), record.direction.value, record.outcome.value]
        if record.downtime_ms is not None:
            downtime.add_metric(values, record.downtime_ms / 1e3)
        for kind in FLOW_KINDS:
            moved.add_metric([*values, kind], record.flows.get(kind, 0))
        finished.add_metric(values, record.finished_at)
    yield from (downtime, moved, finished)


def render(view: MetricsView) -> bytes:
    """The exposition text (Prometheus text format 0.0.4) of ``view``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(view))
    return generate_latest(registry)
