"""Waiting for a condition with a deadline, never for a fixed time.

:func:`wait_for` blocks (threads, subprocess-driven tests); :func:`until` is
the same for trio code, polling a state that has no event to wait on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import trio

__all__ = ["UNTIL_SECONDS", "WaitTimeout", "until", "wait_for"]

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """wait_for() ran out of time; an AssertionError so pytest reports it as a failure."""


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    *,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll *predicate* until it returns something truthy, and return that.

    Raises WaitTimeout naming *what* if *timeout* seconds pass first. Tests
    wait on conditions through this, never on fixed sleeps: fast machines
    run fast and slow ones only fail after a generous deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


#: How long :func:`until` polls before it gives up: an upper bound, never a
#: timing assertion (a caller wanting a shorter one wraps it in trio.fail_after).
UNTIL_SECONDS = 10.0


async def until(
    predicate: Callable[[], T | None], *, what: str = "condition", interval: float = 0.002
) -> T:
    """:func:`wait_for` for trio code: the other tasks run while it polls."""
    with trio.move_on_after(UNTIL_SECONDS):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(interval)
    raise WaitTimeout(f"timed out after {UNTIL_SECONDS:g} s waiting for {what}")
