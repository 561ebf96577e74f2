"""Python's cyclic garbage collector, kept out of the stretches where a pause costs the guest.

Theory of operation
-------------------
CPython frees most objects by reference counting, at once and in small
steps. Its cyclic collector is the other part: it runs when the objects
allocated outnumber those freed by a threshold (700 for the youngest
generation), and every tenth collection of a generation also collects the
next one. A collection of the oldest generation walks every container
object still alive and stops the process meanwhile. ferryd is one thread:
while it runs, no frame moves for any connection.

Two things make that pause long in ferryd (measured on the development
machine, 2 vCPUs, Python 3.11):

* the modules ferryd imports leave ~38,000 objects behind (functions,
  classes, constants, trio's and protobuf's own), and a full collection
  walks them every time: 11.5 ms with nothing else alive, 27-50 ms in a
  ferryd holding 1,000 connections (~58,000 objects; 1.1-2.2 ms there
  once the imports are out of it, below);
* a migration target builds ~20 long-lived objects per connection
  (the record, the kernel state, the socket, the connection and its table
  entries) within milliseconds, which is what sets the collector off: 11
  or 12 young and 1 middle collection during the restore of 1,000
  connections (2.6-4.6 ms of the target's CPU in its downtime), and a full
  one when the thresholds line up (23 ms, once in four restores of an
  in-process benchmark).

So, :func:`freeze_imports` once at start, before the daemon is built:
``gc.freeze()`` moves every object alive then into a permanent generation
that no collection walks again. Those are the imported modules' objects,
alive until exit anyway; reference counting still frees any of them that
is dropped.

And a pause (:func:`paused` around a block, or a :class:`Pause` ended
later) over the work a migration does in its downtime: the source's
freeze and stream, the target's restore up to its resume. No collection
starts meanwhile; the first one after it collects whatever garbage was
left, so nothing is lost, but it walks everything allocated during the
pause (1.1-2.2 ms after a restore of 1,000 connections), which is why the
target's pause lasts until the resume and does not end with the restore.
Pauses nest, and a collector that someone else disabled stays disabled.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["Pause", "freeze_imports", "paused"]

_depth = 0
"""How many pauses are on; the collector runs again when the last ends."""
_was_enabled = False
"""Whether the collector ran when the first of them began."""


def freeze_imports() -> None:
    """Leave every object alive now out of all later collections (module docstring).

    Call once, after the imports and before the daemon builds anything that
    may be dropped later: an object frozen here that later became cyclic
    garbage would never be collected.
    """
    gc.collect()  # what start-up already left as garbage is freed, not frozen
    gc.freeze()


class Pause:
    """One reason to keep the collector off, from its creation until :meth:`end`.

    For a pause that no single block holds: a migration target's spans its
    restore and, a control request later, its resume (the collection it
    defers must not land between the two, still in the downtime).
    """

    __slots__ = ("_on",)

    def __init__(self) -> None:
        global _depth, _was_enabled
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
        self._on = True

    def end(self) -> None:
        """The collector may run again, once no other pause holds it; idempotent."""
        global _depth
        if not self._on:
            return
        self._on = False
        _depth -= 1
        if _depth == 0 and _was_enabled:
            gc.enable()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic cyclic collection inside this block (module docstring)."""
    pause = Pause()
    try:
        yield
    finally:
        pause.end()
