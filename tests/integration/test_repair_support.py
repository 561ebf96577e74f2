"""Shared pieces of the ferry-repair tests: TCP sockets in and out of repair mode, checks.

Not a test module (it defines no tests); it is named ``test_repair_*`` to
live beside the tests that use it. The helper process itself is the bed's
(testbed/repair.py).
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from ferry_repair.protocol import SCM_MAX_FD, TCP_REPAIR
from ferryd.linux import TCP_NO_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE
from testbed.repair import WAIT_SECONDS, raise_fd_limit

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="TCP_REPAIR needs root")


@contextlib.contextmanager
def public_tmp_dir() -> Iterator[Path]:
    """A temporary directory that uid 65534 can use too (pytest's are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="ferry-repair-"))
    try:
        path.chmod(0o777)
        yield path
    finally:
        shutil.rmtree(path)


def wait_until(probe: Callable[[], int], wanted: int) -> int:
    """Poll ``probe`` until it returns ``wanted`` (or give up after WAIT_SECONDS).

    Only for states that no event announces, such as the size of another
    process's descriptor table.
    """
    deadline = time.monotonic() + WAIT_SECONDS
    while (value := probe()) != wanted and time.monotonic() < deadline:
        time.sleep(0.005)
    return value


class TcpConnections:
    """``n`` established loopback TCP connections; ``clients`` are the sockets under test."""

    def __init__(self, n: int) -> None:
        raise_fd_limit()
        self.clients: list[socket.socket] = []
        self.servers: list[socket.socket] = []
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(socket.SOMAXCONN)
            try:
                for _ in range(n):
                    self.clients.append(socket.create_connection(listener.getsockname()))
                    self.servers.append(listener.accept()[0])
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        for sock in self.clients + self.servers:
            sock.close()

    def __enter__(self) -> TcpConnections:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def in_repair(sock: socket.socket) -> bool:
    """Whether ``sock`` is in repair mode, by a repair-only operation.

    Selecting a repair queue is refused with EPERM unless the socket is in
    repair mode (net/ipv4/tcp.c, TCP_REPAIR_QUEUE); TCP_QUEUE_SEQ then reads
    the selected queue's sequence number.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    except PermissionError:
        return False
    sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    return True


def repair_states(socks: Sequence[socket.socket]) -> list[bool]:
    return [in_repair(s) for s in socks]


def clear_repair(socks: Sequence[socket.socket]) -> None:
    """Leave sockets out of repair mode so that closing them sends FINs."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)


def send_batch(unix: socket.socket, command: bytes, fds: Sequence[int]) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    unix.sendmsg([command], rights)


def recv_reply_or_eof(unix: socket.socket) -> bytes:
    """The next reply byte, or b"" if the helper closed the connection."""
    try:
        return unix.recv(1)
    except ConnectionResetError:
        return b""


def recv_exactly(unix: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = unix.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def unix_client(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_SECONDS)
    try:
        sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    return sock


def assert_serves(path: Path, n: int = 3) -> None:
    """The helper at ``path`` still switches sockets for a fresh client."""
    with TcpConnections(n) as conns, unix_client(path) as unix:
        fds = [s.fileno() for s in conns.clients]
        batches = [fds[i : i + SCM_MAX_FD] for i in range(0, n, SCM_MAX_FD)]
        for command, state in ((b"\x01", True), (b"\x00", False)):
            for batch in batches:
                send_batch(unix, command, batch)
            assert recv_exactly(unix, len(batches)) == command * len(batches)
            assert repair_states(conns.clients) == [state] * n


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False
