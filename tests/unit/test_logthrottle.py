"""ferryd.logthrottle: one warning per kind and interval, the rest counted into the next line."""

from __future__ import annotations

import logging

import pytest

from ferryd.logthrottle import LogThrottle

log = logging.getLogger("test.logthrottle")


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == log.name]


def test_one_line_per_interval_and_the_count_with_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttle = LogThrottle(log, interval=10.0)
    with caplog.at_level(logging.WARNING, logger=log.name):
        for now in (0.0, 1.0, 2.0, 9.9):
            throttle.warning("refused", now, "refused %s", now)
        throttle.warning("refused", 10.0, "refused %s", 10.0)
        throttle.warning("refused", 25.0, "refused %s", 25.0)
    assert _lines(caplog) == [
        "refused 0.0",
        "refused 10.0 (and 3 more like it)",
        "refused 25.0",
    ]


def test_kinds_are_throttled_apart(caplog: pytest.LogCaptureFixture) -> None:
    throttle = LogThrottle(log, interval=10.0)
    with caplog.at_level(logging.WARNING, logger=log.name):
        throttle.warning("a", 0.0, "a")
        throttle.warning("b", 0.5, "b")
        throttle.warning("a", 1.0, "a")
    assert _lines(caplog) == ["a", "b"]
