"""Shared pieces of the ferry-repair tests: a helper process, TCP sockets, checks.

Not a test module (it defines no tests); it is named ``test_repair_*`` to
live beside the tests that use it. The helper runs as a real subprocess;
its stderr is read by a thread into a list of lines, so a test can wait for
a log line (the helper logs one per connection and per refusal) instead of
sleeping. Every process started here is killed by PID when its context
exits, whatever the test did.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest

from ferry_repair.protocol import SCM_MAX_FD, TCP_REPAIR

REPO = Path(__file__).resolve().parents[2]
HELPER = [sys.executable, "-m", "ferry_repair.main"]
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_SEND_QUEUE = 2
TCP_NO_QUEUE = 0
WAIT_SECONDS = 30.0  # upper bound on waits for a condition; never a timing assertion

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="TCP_REPAIR needs root")


class HelperProcess:
    """A running ferry-repair (or passt-repair) whose log lines are collected."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        preexec_fn: Callable[[], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
            preexec_fn=preexec_fn,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, needle: str, *, count: int = 1) -> str:
        """Wait until ``count`` log lines contain ``needle``; return the last one."""

        def matching() -> list[str]:
            return [line for line in self.lines if needle in line]

        with self._changed:
            done = self._changed.wait_for(
                lambda: len(matching()) >= count or not self._reader.is_alive(),
                timeout=WAIT_SECONDS,
            )
            found = matching()
        if not done or len(found) < count:
            raise AssertionError(f"helper never logged {needle!r} x{count}; log: {self.lines}")
        return found[count - 1]

    def count(self, needle: str) -> int:
        with self._changed:
            return sum(needle in line for line in self.lines)

    def wait_exit(self) -> int:
        rc = self.proc.wait(timeout=WAIT_SECONDS)
        self._reader.join(timeout=WAIT_SECONDS)
        return rc

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def status(self) -> dict[str, str]:
        with open(f"/proc/{self.pid}/status") as f:
            return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=WAIT_SECONDS)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> HelperProcess:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def listening_helper(
    path: Path, *extra: str, prefix: Sequence[str] = ()
) -> Iterator[HelperProcess]:
    """ferry-repair --listen PATH, once it serves."""
    with HelperProcess([*prefix, *HELPER, "--listen", str(path), *extra]) as helper:
        helper.wait_for_line("serving")
        yield helper


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


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
