"""ferry_repair.throttle: one line per interval, every event counted, explicit time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ferry_repair.throttle import Throttle


def test_first_event_logged_then_counted_then_summarised() -> None:
    t = Throttle(interval=10.0)
    assert t.admit(0.0)
    assert t.next_timer() is None  # nothing counted yet: no wake-up needed
    assert [t.admit(now) for now in (1.0, 2.0, 9.9)] == [False, False, False]
    assert t.next_timer() == 10.0
    assert t.handle_timer(9.9) == 0  # not due yet
    assert t.handle_timer(10.0) == 3
    assert t.next_timer() is None
    assert not t.admit(15.0)  # the summary took this interval's line
    assert t.handle_timer(20.0) == 1
    assert t.admit(31.0)  # quiet for a whole interval: logged at once


@given(st.lists(st.floats(0, 1000), max_size=200))
def test_nothing_hidden_and_lines_bounded(times: list[float]) -> None:
    t = Throttle(interval=10.0)
    logged = summarised = lines = 0
    for now in sorted(times):
        due = t.next_timer()
        if due is not None and due <= now:
            count = t.handle_timer(due)
            summarised += count
            lines += count > 0
        if t.admit(now):
            logged += 1
            lines += 1
    due = t.next_timer()
    if due is not None:
        summarised += t.handle_timer(due)
        lines += 1
    assert logged + summarised == len(times)
    assert lines <= 1 + 1000 / 10 + 1


def test_take_count_reports_with_the_next_line_instead_of_a_timer() -> None:
    t = Throttle(interval=10.0)
    assert t.admit(0.0)
    assert t.take_count() == 0
    assert not t.admit(1.0)
    assert not t.admit(2.0)
    assert t.admit(10.0)
    assert t.take_count() == 2
    assert t.next_timer() is None  # taken: no summary is due any more
    assert t.take_count() == 0
