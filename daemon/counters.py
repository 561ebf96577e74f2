"""One registry of everything ferryd counts, read at once for ``ferryctl status``.

Components keep their own counters: a dataclass of int (or float) fields
that they increment where the event happens (``self.counters.malformed +=
1``), as cheap as an attribute can be on the data path. They never import
this module. Whoever owns a component registers its dataclass under a
group name: the data path (ferryd.datapath) its frontend, stack, flow
tables, destination refusals and descriptor budget; the daemon
(ferryd.main) the migration controller's; :meth:`Registry.snapshot` reads
every field at that moment. So a new counter is a new field, and shows up
in ``ferryctl status`` and ``ferryctl counters`` with nothing else to
change; the metrics (ferryd.metrics) read the same snapshot. A field
that is a level rather than a running total (a table's ``flows``) says so
in its metadata, ``field(default=0, metadata={"gauge": True})``
(:meth:`Registry.gauges`), so the metrics type it as a gauge.

A group registered again is replaced: a migration target rebuilds its stack
and flow tables from the stream's link, and registers the new components
under the same names (their counts start again, as the components do).
"""

from __future__ import annotations

import dataclasses

__all__ = ["GAUGE", "Registry", "Snapshot"]

#: The field metadata key marking a level, not a running total.
GAUGE = "gauge"

#: Group name -> counter name -> value.
Snapshot = dict[str, dict[str, int | float]]


class Registry:
    """Counter dataclasses by group name; reads them all on demand."""

    def __init__(self) -> None:
        self._groups: dict[str, object] = {}

    def add(self, group: str, counters: object) -> None:
        """Read *counters* (a dataclass instance) as *group* from now on, replacing any before.

        Raises TypeError for anything but a dataclass instance (a bug of the
        caller: a plain object's attributes are not a declared set of counters).
        """
        if not group:
            raise ValueError("a counter group needs a name")
        if not dataclasses.is_dataclass(counters) or isinstance(counters, type):
            raise TypeError(
                f"counters of {group!r} must be a dataclass instance, not {type(counters).__name__}"
            )
        self._groups[group] = counters

    def snapshot(self) -> Snapshot:
        """Every group's int and float fields as they are now (other fields are not counters)."""
        out: Snapshot = {}
        for group, counters in self._groups.items():
            values: dict[str, int | float] = {}
            for f in dataclasses.fields(counters):  # type: ignore[arg-type]
                value = getattr(counters, f.name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values[f.name] = value
            out[group] = values
        return out

    def gauges(self) -> frozenset[tuple[str, str]]:
        """(group, name) of every field marked as a level (metadata ``gauge``)."""
        return frozenset(
            (group, f.name)
            for group, counters in self._groups.items()
            for f in dataclasses.fields(counters)  # type: ignore[arg-type]
            if f.metadata.get(GAUGE)
        )
