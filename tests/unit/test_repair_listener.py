"""RepairListener's socket file (--repair-listen), as the control socket's and
the stream frontend's (ferryd.unix_listener): a file a dead ferryd left is
replaced, a live listener or a non-socket is never taken over, and closing
removes the file only while it is still ours. Real Unix sockets, no root."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from ferryd.migration.repair_client import RepairListener, RepairUnavailable


def _dead_ferryds_socket(path: Path) -> None:
    """What a ferryd killed while listening leaves: the file, nobody behind it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert path.is_socket()


async def _connects(path: Path) -> bool:
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            await s.connect(str(path))
        except ConnectionRefusedError:
            return False
    return True


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "vm.repair"
    _dead_ferryds_socket(path)
    assert not await _connects(path)
    with await RepairListener.bind(path) as listener:
        assert await _connects(path)
        assert listener.path == str(path)
        assert path.stat().st_mode & 0o777 == 0o600
    assert not path.exists()


async def test_a_live_listener_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "vm.repair"
    with await RepairListener.bind(path):
        before = path.stat().st_ino
        with pytest.raises(RepairUnavailable, match=r"another process .* listens there"):
            await RepairListener.bind(path)
        assert path.stat().st_ino == before
        assert await _connects(path), "the first listener was disturbed"


async def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("mine")
    with pytest.raises(RepairUnavailable, match="not a socket"):
        await RepairListener.bind(path)
    assert path.read_text() == "mine"


async def test_close_leaves_a_newer_listener_alone(tmp_path: Path) -> None:
    # Our file was removed and another process listens at the path now:
    # closing our listener must not cut it off.
    path = tmp_path / "vm.repair"
    listener = await RepairListener.bind(path)
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as newer:
        newer.bind(str(path))
        newer.listen(1)
        listener.close()
        assert path.is_socket()
        assert await _connects(path)
