"""A tap deleted under a migration's freeze: the freeze goes on, the next run() says so.

A real multi-queue tap in a namespace of its own, deleted the way a guest
can delete it (``ip link del``); then the source's freeze sequence on its
frontend (DataPath.hand_over(drain=True): drain, then hand over), which
must not fail, and a new run(), which reports the gone device as before.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from ferryd.frontends.tap import TapFrontend, TapGone
from ferryd.link import LinkConfig
from testbed.netns import Netns

pytestmark = pytest.mark.integration


@pytest.fixture
def tap() -> Iterator[tuple[Netns, TapFrontend]]:
    with Netns("tapgone") as ns:
        frontend = TapFrontend.open(
            ns.path, "tap0", LinkConfig(mac=bytes.fromhex("02000000000a")), config_net=False
        )
        try:
            yield ns, frontend
        finally:
            frontend.close()


async def test_the_freeze_goes_on_over_a_deleted_tap(tap: tuple[Netns, TapFrontend]) -> None:
    ns, frontend = tap
    ns.run(["ip", "link", "del", "tap0"])
    frames: list[bytes] = []
    bursts: list[None] = []

    frontend.drain(lambda frame, _: frames.append(bytes(frame)), lambda: bursts.append(None))
    frontend.hand_over()

    assert frames == []
    assert bursts == [None]  # the burst still ends: deferred work is done
    assert not frontend.attached
    with pytest.raises(TapGone, match="the guest's tap device is gone"), trio.fail_after(10):
        await frontend.run(lambda frame, _: None, lambda: None)


async def test_hand_over_of_a_live_tap_still_fails_loudly(tap: tuple[Netns, TapFrontend]) -> None:
    # Only a deleted device is forgiven: detaching a queue that is not ours
    # to detach (already detached behind our back) is still an error.
    _, frontend = tap
    frontend.hand_over()
    frontend.attached = True  # a bookkeeping bug of ours
    with pytest.raises(OSError, match="Invalid argument"):
        frontend.hand_over()
