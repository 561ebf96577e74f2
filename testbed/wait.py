"""Waiting for a condition with a deadline, never for a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["WaitTimeout", "wait_for"]

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
