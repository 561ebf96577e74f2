"""testbed.wait: the conditions tests wait on, bounded, never a fixed sleep."""

from __future__ import annotations

import pytest
import trio

from testbed.wait import UNTIL_SECONDS, WaitTimeout, until, wait_for


async def test_until_returns_what_the_condition_found_while_others_run() -> None:
    seen: list[int] = []

    async def producer() -> None:
        for i in range(5):
            seen.append(i)
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        assert await until(lambda: len(seen) >= 3 and seen[:3], what="three") == [0, 1, 2]


async def test_until_gives_up_naming_what_it_waited_for(autojump_clock: trio.abc.Clock) -> None:
    start = trio.current_time()
    with pytest.raises(WaitTimeout, match="waiting for the impossible"):
        await until(lambda: False, what="the impossible")
    assert trio.current_time() - start == pytest.approx(UNTIL_SECONDS, abs=0.01)


def test_wait_for_returns_the_value_and_names_what_timed_out() -> None:
    assert wait_for(lambda: "yes", what="a yes") == "yes"
    with pytest.raises(WaitTimeout, match=r"timed out after 0\.01 s waiting for nothing"):
        wait_for(lambda: None, 0.01, interval=0.001, what="nothing")
