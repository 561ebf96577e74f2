"""A private epoll plus a timer heap: what one reactor task needs to drive many handles.

Theory of operation
-------------------
:class:`Interest` keeps, for each handle (a TCP connection, say), the file
descriptor it waits on and the epoll event mask registered for it (in two
attributes of the handle itself, :class:`Watched`, and a list by descriptor
number), and a deadline. It owns no task and reads no clock: the adapter asks it for the
ready handles (:meth:`Interest.ready`, a non-blocking ``epoll_wait``) and
the due ones (:meth:`Interest.due`, given ``now``), and tells it after every
change what each handle waits for now (:meth:`Interest.set_mask`,
:meth:`Interest.set_deadline`).

Readiness. Registrations are level-triggered (epoll(7)): a socket stays
reported for as long as it is readable or writable, so a handle that is not
served in one round is reported again in the next, and no wake-up is lost
between the adapter's check and its next wait. The price is that a
registered descriptor must always be wanted: EPOLLERR and EPOLLHUP are
reported whatever the mask says (epoll_ctl(2)), so a socket kept
registered with nothing to wait for would be reported on every round once
its peer hung up. A handle whose mask becomes empty is therefore
unregistered (EPOLL_CTL_DEL), and registered again when it becomes
non-empty; ``epoll_ctl`` is only called when the mask actually changes.

An epoll registration belongs to the open file *and* its descriptor number
(epoll(7), "Questions and answers"): closing the last descriptor of a socket
removes it from the set silently, and the number is reused by the next
socket at once. So :meth:`Interest.forget` must run BEFORE the socket is
closed; otherwise this table would take a new socket for the old handle.

Timers. A binary heap of ``(deadline, tiebreak, handle)`` with lazy
invalidation: an entry counts only while its deadline is the one scheduled
for its handle (the tiebreak only orders equal deadlines). A new
deadline is pushed only if it is earlier than that one; a later one is
ignored, and when the earlier entry falls due the adapter finds the
handle's real deadline later and schedules it again. Entries of forgotten
or superseded schedules stay in the heap until popped (skipped then), or
until the heap holds more than twice as many entries as live schedules, when
it is rebuilt from the live ones (a connection that alternates between
a short retransmission timer and none would otherwise leave one dead
entry per burst).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import select
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP

#: Events taken from the kernel per round; more stay reported (level-triggered).
MAX_EVENTS = 1024
_INF = float("inf")
#: The heap is rebuilt when it holds this many more entries than twice the live ones.
_HEAP_SLACK = 64


class Watched(Hashable, Protocol):
    """What :class:`Interest` keeps in a handle: its registration (one Interest at a time).

    In the handle, not in a table of the Interest: two dict entries and an
    int a connection were ~180 bytes of an idle flow's ~1.5 KB (bench.memory);
    two slots and one list item are 24. ``reactor_fd`` holds the int the
    caller passed, the only one kept for the registration.
    """

    reactor_fd: int
    """The descriptor registered for the handle (-1: none)."""
    reactor_mask: int
    """The events registered (0: not registered; never an empty registration)."""


H = TypeVar("H", bound=Watched)


class Interest(Generic[H]):
    """Which descriptor each handle waits on, for which events, until when."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._by_fd: list[H | None] = []
        """The registered handle of each descriptor number (descriptors are small, dense
        ints: a list item is 8 bytes where a dict entry is ~70)."""
        self._heap: list[tuple[float, int, H]] = []
        self._scheduled: dict[H, float] = {}
        """The deadline of each scheduled handle (its live heap entry has it)."""
        self._tiebreak = itertools.count()

    def fileno(self) -> int:
        """The epoll descriptor: readable when some registered handle is ready."""
        return self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()
        for handle in self._by_fd:
            if handle is not None:
                # Its registration was this epoll's: another Interest starts afresh.
                handle.reactor_fd, handle.reactor_mask = -1, 0
        self._by_fd.clear()
        self._heap.clear()
        self._scheduled.clear()

    # --- readiness --------------------------------------------------------

    def mask(self, handle: H) -> int:
        """The events registered for ``handle`` (0: not registered)."""
        return handle.reactor_mask

    def set_mask(self, handle: H, fd: int, mask: int) -> None:
        """Wait for ``mask`` on ``fd`` from now on; 0 unregisters."""
        old = handle.reactor_mask
        if mask == old:
            return
        if not mask:
            self._unregister(handle)
        elif not old:
            by_fd = self._by_fd
            if fd >= len(by_fd):
                by_fd.extend([None] * max(fd + 1 - len(by_fd), len(by_fd)))
            stale = by_fd[fd]
            if stale is not None:
                # Its socket was closed without forget(): the kernel already
                # dropped that registration, and the number is this socket's.
                stale.reactor_fd, stale.reactor_mask = -1, 0
            self._epoll.register(fd, mask)
            handle.reactor_fd, handle.reactor_mask = fd, mask
            by_fd[fd] = handle
        else:
            self._epoll.modify(fd, mask)
            handle.reactor_mask = mask

    def _unregister(self, handle: H) -> None:
        if not handle.reactor_mask:
            return  # never registered
        fd = handle.reactor_fd
        handle.reactor_fd, handle.reactor_mask = -1, 0
        by_fd = self._by_fd
        if fd >= len(by_fd) or by_fd[fd] is not handle:
            return  # its number now belongs to another socket
        by_fd[fd] = None
        try:
            self._epoll.unregister(fd)
        except OSError as exc:
            # Closed behind our back (the kernel dropped the registration
            # with the file): nothing left to remove.
            if exc.errno not in (errno.ENOENT, errno.EBADF):
                raise

    def ready(self, max_events: int = MAX_EVENTS) -> list[tuple[H, int]]:
        """Registered handles with events now (never blocks)."""
        by_fd = self._by_fd
        out = []
        for fd, ev in self._epoll.poll(0, max_events):
            handle = by_fd[fd] if fd < len(by_fd) else None
            if handle is not None:
                out.append((handle, ev))
        return out

    # --- timers -----------------------------------------------------------

    def set_deadline(self, handle: H, when: float) -> None:
        """Make sure ``handle`` is due no later than ``when`` (inf: no deadline).

        A deadline later than the one scheduled is not pushed: :meth:`due`
        returns the handle at the earlier time, and the caller schedules it
        again from the handle's real deadline. No deadline at all (inf)
        unschedules it at once, its heap entry left for next_deadline() to
        pop: a TCP handshake's retransmission timer ends when the connection
        is established, and kept until it popped (a second or more) every
        new connection of a burst held a dict entry, a heap tuple and an int
        here at once, memory the process kept afterwards (bench.memory: 127-
        134 bytes less USS per idle flow at 16,384, 214-237 at 1,000; the
        same with the old code measured 4 s later).
        """
        current = self._scheduled.get(handle)
        if when == _INF:
            if current is not None:
                del self._scheduled[handle]
                self._compact()
            return
        if current is not None and when >= current:
            return
        self._scheduled[handle] = when
        heapq.heappush(self._heap, (when, next(self._tiebreak), handle))
        self._compact()

    def _compact(self) -> None:
        """Rebuild the heap and the schedule from the live entries once the heap
        holds more than twice as many entries as there are live ones.

        Checked where an entry dies as well as where one is pushed: after a
        burst of handshakes, the dead entries of their retransmission timers
        behind a later live one were never popped, and with no new deadline
        never rebuilt either: a tuple and an int of ~half of the idle flows'
        (bench.memory). The rebuilt dict is sized for the live entries (a
        dict keeps the table of its largest size through deletions).
        """
        scheduled = self._scheduled
        if len(self._heap) > 2 * len(scheduled) + _HEAP_SLACK:
            tiebreak = self._tiebreak
            self._scheduled = scheduled = dict(scheduled)
            self._heap = [(w, next(tiebreak), h) for h, w in scheduled.items()]
            heapq.heapify(self._heap)

    def next_deadline(self) -> float:
        """The earliest scheduled deadline (inf if none)."""
        heap, scheduled = self._heap, self._scheduled
        while heap:
            when, _, handle = heap[0]
            if scheduled.get(handle) == when:
                return when
            heapq.heappop(heap)  # superseded or forgotten
        return _INF

    def due(self, now: float) -> list[H]:
        """Handles whose scheduled deadline is ``now`` or earlier, each
        unscheduled (the caller schedules it again from its real deadline).

        A handle forgotten and scheduled again for the same deadline has two
        entries that both look live: the first unschedules it, so the second
        is skipped, and the handle comes once."""
        heap, scheduled, out = self._heap, self._scheduled, []
        while heap and heap[0][0] <= now:
            when, _, handle = heapq.heappop(heap)
            if scheduled.get(handle) == when:
                del scheduled[handle]
                out.append(handle)
        if out:
            self._compact()
        return out

    # --- both -------------------------------------------------------------

    def forget(self, handle: H) -> None:
        """No more events or deadlines for ``handle``. Call BEFORE closing its fd."""
        self._unregister(handle)
        if self._scheduled.pop(handle, None) is not None:
            self._compact()

    def handles(self) -> set[H]:
        """Every handle registered or scheduled."""
        registered = {handle for handle in self._by_fd if handle is not None}
        return registered | set(self._scheduled)
