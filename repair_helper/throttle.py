"""Rate-limited logging of refusals: a flood of them costs a line per interval, not a line each.

Refusing is the helper's answer to callers it does not trust, so it must stay
cheap however many there are: 20,000 refused connections once wrote 20,000
log lines in 1.5 s and slowed a legitimate batch a hundredfold (issue 9,
item 7). :class:`Throttle` lets the first event of an interval through, counts
the others, and once the interval is over says how many there were, in one
line: nothing is hidden, only summarised, and a flood that stops is still
reported (the serving loop wakes up for :meth:`next_timer`).

Sans-IO, time passed in: the serving loop calls :meth:`admit` per event and
:meth:`handle_timer` when woken, and logs what they return. ferryd's
``LogThrottle`` (ferryd/logthrottle.py) uses the same counting without a
timer: it reports the count with the next line it lets through
(:meth:`take_count`). This module imports nothing of ferryd's, so
ferry-repair stays free of the daemon's code.
"""

from __future__ import annotations

import math

#: Seconds between two lines about the same kind of event.
INTERVAL = 10.0


class Throttle:
    """One kind of event: the first of each interval is logged, the rest counted."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self._interval = interval
        self._until = -math.inf
        self._suppressed = 0

    def admit(self, now: float) -> bool:
        """Whether to log this event; if not, it is counted for the summary."""
        if now < self._until:
            self._suppressed += 1
            return False
        self._until = now + self._interval
        return True

    def take_count(self) -> int:
        """The events counted so far, reported now by the caller's own line; resets the count.

        For a caller with no timer: right after :meth:`admit` said yes, it
        appends "and N more" to the line it logs instead of waiting for
        :meth:`handle_timer`.
        """
        count, self._suppressed = self._suppressed, 0
        return count

    def next_timer(self) -> float | None:
        """When a summary is due (the end of the interval), if any event was counted."""
        return self._until if self._suppressed else None

    def handle_timer(self, now: float) -> int:
        """The number of events to summarise now (0 if none, or not yet due)."""
        if not self._suppressed or now < self._until:
            return 0
        count, self._suppressed = self._suppressed, 0
        # The summary line takes this interval's place: the next event waits
        # for the next interval, so a steady flood gives one line per interval.
        self._until = now + self._interval
        return count
