"""ferryd's --repair-listen client against the real passt-repair (Debian 13's passt).

passt-repair is passt's counterpart of ferry-repair: it connects to the
daemon's socket (a path, or a directory where a ``*.repair`` socket will
appear) and speaks the same protocol. Running ferryd's client against it
shows the two implementations agree on the wire. The binary comes from
``scripts/fetch-passt-repair.sh`` (or ``$FERRY_PASST_REPAIR``); without it
the test is skipped and says how to get it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ferryd.migration.repair_client import RepairListener, RepairMode
from testbed.paths import REPO
from testbed.repair import WAIT_SECONDS, HelperProcess
from tests.integration.test_repair_support import (
    TcpConnections,
    clear_repair,
    repair_states,
    requires_root,
)

pytestmark = [pytest.mark.integration, requires_root]

PASST_REPAIR = Path(
    os.environ.get("FERRY_PASST_REPAIR", REPO / ".venv" / "cache" / "passt-repair" / "passt-repair")
)


@pytest.fixture
def passt_repair() -> str:
    if not os.access(PASST_REPAIR, os.X_OK):
        pytest.skip(
            f"passt-repair not found at {PASST_REPAIR}: run scripts/fetch-passt-repair.sh"
            " (downloads Debian 13's passt package) or set FERRY_PASST_REPAIR"
        )
    return str(PASST_REPAIR)


@pytest.fixture
def connections() -> Iterator[TcpConnections]:
    with TcpConnections(2_000) as conns:
        yield conns
        clear_repair(conns.clients)


async def exercise(
    listener: RepairListener, helper: HelperProcess, socks: list[socket.socket]
) -> None:
    with trio.fail_after(WAIT_SECONDS):
        client = await listener.accept()
    async with client:
        for mode, state in [
            (RepairMode.ON, True),
            (RepairMode.OFF, False),
            (RepairMode.ON, True),
            (RepairMode.OFF_NO_WINDOW_PROBE, False),
        ]:
            await client.set_repair(socks, mode)
            assert repair_states(socks) == [state] * len(socks)
        # A small batch, then a large set again: passt-repair would silently
        # cut batches larger than the last one; the client keeps them steady.
        await client.set_repair(socks[:7], RepairMode.ON)
        await client.set_repair(socks, RepairMode.ON)
        assert repair_states(socks) == [True] * len(socks)
        await client.set_repair(socks, RepairMode.OFF)
        assert repair_states(socks) == [False] * len(socks)
    assert helper.wait_exit() == 0  # passt-repair exits 0 at end-of-file


async def test_passt_repair_connects_to_socket_path(
    tmp_path: Path, passt_repair: str, connections: TcpConnections
) -> None:
    listener = await RepairListener.bind(tmp_path / "passt.socket.repair")
    with listener, HelperProcess([passt_repair, listener.path]) as helper:
        await exercise(listener, helper, connections.clients)


async def test_passt_repair_waits_in_directory(
    tmp_path: Path, passt_repair: str, connections: TcpConnections
) -> None:
    # passt-repair only reacts to a socket *created* after it watches the
    # directory (inotify IN_CREATE), so the socket is bound once it runs.
    with HelperProcess([passt_repair, str(tmp_path)]) as helper:
        inotify_ready = wait_for_inotify(helper.pid)
        assert inotify_ready, "passt-repair never set up its inotify watch"
        with await RepairListener.bind(tmp_path / "vm.repair") as listener:
            await exercise(listener, helper, connections.clients)


def wait_for_inotify(pid: int) -> bool:
    """Whether ``pid`` came to hold an inotify descriptor (polled: no event says so)."""
    import time

    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                    return True
            except FileNotFoundError:
                continue
        time.sleep(0.005)
    return False
