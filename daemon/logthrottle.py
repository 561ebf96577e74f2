"""Warnings about events a guest or a client can trigger at line rate, rate-limited.

A guest can make ferryd refuse, drop or fail at the rate it sends frames,
and a crowd of clients can keep the control socket's accept() failing: a
log line per event would let them fill the disk and slow the daemon (issue
9 measured 20,000 lines in 1.5 s in ferry-repair). :class:`LogThrottle`
lets the first event of each kind per interval through and counts the
others; the count is reported with the next line of that kind ("and N more
like it"), so nothing is hidden, only summarised.

The counting is ferry-repair's sans-IO :class:`~ferry_repair.throttle.Throttle`
(one per kind), time passed in; unlike ferry-repair, ferryd has no timer
for a summary of its own, so a burst that stops is reported with the next
event of its kind.
"""

from __future__ import annotations

import logging

from ferry_repair.throttle import INTERVAL, Throttle

__all__ = ["LogThrottle"]


class LogThrottle:
    """Log each kind of event at most once per ``interval`` seconds; count the rest."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL) -> None:
        self._log = logger
        self._interval = interval
        self._kinds: dict[str, Throttle] = {}

    def warning(self, kind: str, now: float, message: str, *args: object) -> None:
        """Log ``message % args`` unless ``kind`` was logged within the interval."""
        throttle = self._kinds.get(kind)
        if throttle is None:
            throttle = self._kinds[kind] = Throttle(self._interval)
        if not throttle.admit(now):
            return
        skipped = throttle.take_count()
        if skipped:
            self._log.warning(message + " (and %d more like it)", *args, skipped)
        else:
            self._log.warning(message, *args)
