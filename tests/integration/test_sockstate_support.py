"""Shared pieces of the sockstate tests: connections, checked traffic, migration steps.

Not a test module (it defines no tests); named ``test_sockstate_*`` to live
beside the tests that use it.

Traffic. Every connection carries two byte streams, one each way, that are
slices of one seeded random pattern at a per-stream offset, so any byte of
any stream can be recomputed from (stream id, offset) and every received
byte is checked. A :class:`Traffic` thread drives all connections with
non-blocking sockets and poll(2): it writes each stream up to its total (then
shuts the direction down if asked), and reads and checks everything that
arrives. The "local" ends (the sockets that migrate) can be paused, which is
what ferryd does before it freezes a socket; the remote ends never stop, so
traffic keeps running in both directions while the local ends are frozen,
dumped, restored and the fabric moves.

Migration steps (with CAP_NET_ADMIN, so repair mode is set directly rather
than through the helper): :func:`freeze_and_dump` on the source,
:func:`restore_all` on the target, then the traffic thread adopts the new
sockets with :meth:`Traffic.adopt` and finishes each restore itself (the
unsent tail may need several non-blocking rounds).
"""

from __future__ import annotations

import fcntl
import os
import queue
import random
import resource
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from ferryd.migration.kernel_state import TcpKernelState
from ferryd.migration.repair_client import RepairMode
from ferryd.migration.sockstate import (
    close_silently,
    dump_tcp,
    finish_restore,
    new_socket_for,
    restore_in_repair,
)
from ferryd.netns import run_in_netns
from testbed.sockstate_tools import freeze_intake, set_repair_direct

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="TCP_REPAIR needs root")

T = TypeVar("T")

#: Upper bound on any wait for a condition; never a timing assertion.
WAIT_SECONDS = 60.0
CHUNK = 65536
_PERIOD = 1_000_003  # a prime, so streams do not line up with chunk sizes
_BASE = random.Random(0x5EED).randbytes(_PERIOD)
_PATTERN = memoryview(_BASE + _BASE[:CHUNK])  # so a slice may run over the period's end


def pattern(stream: int, offset: int, length: int) -> memoryview:
    """Bytes ``offset .. offset+length`` (length <= CHUNK) of stream number ``stream``."""
    start = (stream * 7919 + offset) % _PERIOD
    return _PATTERN[start : start + length]


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tcp_state(sock: socket.socket) -> int:
    """tcpi_state of a socket."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def connect_pairs(
    client_netns: str | None,
    server_netns: str | None,
    server_addr: str,
    count: int,
    client_addr: str | None = None,
) -> list[tuple[socket.socket, socket.socket]]:
    """``count`` connections from sockets made in ``client_netns`` to a server in ``server_netns``.

    Returns (client, accepted server socket) pairs; the listener is closed.
    A namespace of None means this process's own.
    """
    family = socket.AF_INET6 if ":" in server_addr else socket.AF_INET

    def in_ns(path: str | None, fn: Callable[[], object]) -> object:
        return fn() if path is None else run_in_netns(path, fn)

    def make_listener() -> socket.socket:
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((server_addr, 0))
        listener.listen(4096)
        return listener

    listener = in_ns(server_netns, make_listener)
    assert isinstance(listener, socket.socket)
    port = listener.getsockname()[1]
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        batch = 512  # the listen backlog bounds how many may wait for accept()
        while len(pairs) < count:
            n = min(batch, count - len(pairs))

            def connect_some(n: int = n) -> list[socket.socket]:
                out = []
                for _ in range(n):
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    if client_addr is not None:
                        sock.bind((client_addr, 0))
                    sock.connect((server_addr, port))
                    out.append(sock)
                return out

            clients = in_ns(client_netns, connect_some)
            assert isinstance(clients, list)
            by_peer = {}
            for _ in range(n):
                server, peer = listener.accept()
                by_peer[peer[:2]] = server
            for client in clients:
                pairs.append((client, by_peer.pop(client.getsockname()[:2])))
    finally:
        listener.close()
    return pairs


@dataclass
class Direction:
    """One byte stream of a connection, and how far each end got with it."""

    stream: int
    total: int
    close_after: bool = True
    sent: int = 0
    received: int = 0
    shut: bool = False
    eof: bool = False
    #: The receiving socket was restored after the FIN arrived: it will not say EOF.
    fin_known: bool = False

    @property
    def done(self) -> bool:
        if self.received != self.total:
            return False
        return self.eof or self.fin_known or not self.close_after


@dataclass
class Conn:
    """A connection: ``local`` migrates, ``remote`` stays; ``up`` is local → remote."""

    local: socket.socket
    remote: socket.socket
    up: Direction
    down: Direction
    read_local: bool = True
    read_remote: bool = True
    #: A restore whose unsent tail is still being sent: (state, bytes of it sent so far).
    finishing: tuple[TcpKernelState, int] | None = None

    @property
    def done(self) -> bool:
        return self.up.done and self.down.done and self.finishing is None


class TrafficError(AssertionError):
    """A stream broke: wrong bytes, too many bytes, an error from the socket."""


@dataclass
class Traffic:
    """Drives and checks every connection's two streams from one thread (module docstring).

    Everything else talks to the thread through :meth:`call`, which runs a
    function in the thread between two rounds, when no socket operation is
    under way (a lock would not do: the thread would take it back at once).
    """

    conns: list[Conn]
    read_local: bool = True
    read_remote: bool = True
    local_paused: bool = False
    error: str | None = None
    _requests: queue.SimpleQueue[Callable[[], None]] = field(default_factory=queue.SimpleQueue)
    _stop: bool = False
    _thread: threading.Thread | None = None

    def __enter__(self) -> Traffic:
        for conn in self.conns:
            conn.local.setblocking(False)
            conn.remote.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def check(self) -> None:
        """Raise the traffic thread's failure, if any."""
        if self.error is not None:
            raise TrafficError(self.error)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` in the traffic thread between two rounds and return its result."""
        done = threading.Event()
        result: list[T] = []

        def request() -> None:
            result.append(fn())
            done.set()

        self._requests.put(request)
        while not done.wait(0.05):
            self.check()
            if self._thread is None or not self._thread.is_alive():
                raise TrafficError("the traffic thread is not running")
        return result[0]

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
        """Wait until ``predicate()`` (run in the traffic thread) holds; fail on a traffic error."""
        deadline = time.monotonic() + timeout
        while not self.call(predicate):
            if time.monotonic() > deadline:
                stuck = self.call(self._unfinished)
                raise TrafficError(f"timed out after {timeout:g} s waiting for {what}; {stuck}")
            time.sleep(0.01)

    def _unfinished(self) -> str:
        """The connections not done yet, how far each stream got (a timeout's diagnosis)."""
        left = [(i, c) for i, c in enumerate(self.conns) if not c.done]

        def stream(d: Direction) -> str:
            return f"{d.sent}/{d.received}/{d.total}{' eof' if d.eof else ''}"

        def state(sock: socket.socket) -> str:
            try:
                return str(tcp_state(sock))
            except OSError as exc:
                return exc.strerror or "?"

        shown = "; ".join(
            f"#{i} up {stream(c.up)} down {stream(c.down)} (sent/received/total)"
            f"{' finishing' if c.finishing else ''} tcp state local {state(c.local)}"
            f" remote {state(c.remote)}"
            for i, c in left[:5]
        )
        return f"{len(left)} of {len(self.conns)} unfinished: {shown}"

    def set(self, **flags: bool) -> None:
        """Set ``read_local``, ``read_remote`` or ``local_paused`` between two rounds."""

        def apply() -> None:
            for name, value in flags.items():
                assert name in ("read_local", "read_remote", "local_paused")
                setattr(self, name, value)

        self.call(apply)

    def adopt(self, restored: Sequence[tuple[socket.socket, TcpKernelState]]) -> None:
        """Replace each connection's local end by its restored socket and resume it."""

        def apply() -> None:
            for conn, (sock, state) in zip(self.conns, restored, strict=True):
                sock.setblocking(False)
                conn.local = sock
                conn.finishing = (state, 0)
                if state.fin_received:
                    conn.down.fin_known = True
            self.local_paused = False

        self.call(apply)

    # -- the thread

    def _run(self) -> None:
        try:
            while not self._stop:
                while not self._requests.empty():
                    self._requests.get()()
                if not self._round():
                    self._poll_set().poll(10)
        except Exception as exc:  # reported through check()
            self.error = f"traffic thread failed: {exc!r}"

    def _round(self) -> bool:
        progress = False
        for index, conn in enumerate(self.conns):
            try:
                if not self.local_paused:
                    progress |= self._finish(conn)
                    if conn.finishing is None:
                        progress |= self._send(conn.local, conn.up)
                    if self.read_local and conn.read_local:
                        progress |= self._recv(conn.local, conn.down)
                progress |= self._send(conn.remote, conn.down)
                if self.read_remote and conn.read_remote:
                    progress |= self._recv(conn.remote, conn.up)
            except TrafficError as exc:
                self.error = f"connection {index}: {exc}"
                self._stop = True
                return False
        return progress

    def _poll_set(self) -> select.poll:
        poller = select.poll()
        for conn in self.conns:
            for sock, out, into, reading, active in (
                (
                    conn.local,
                    conn.up,
                    conn.down,
                    self.read_local and conn.read_local,
                    not self.local_paused,
                ),
                (conn.remote, conn.down, conn.up, self.read_remote and conn.read_remote, True),
            ):
                if not active:
                    continue
                mask = select.POLLIN if reading and not into.eof else 0
                if out.sent < out.total or (sock is conn.local and conn.finishing):
                    mask |= select.POLLOUT
                if mask:
                    poller.register(sock, mask)
        return poller

    @staticmethod
    def _finish(conn: Conn) -> bool:
        if conn.finishing is None:
            return False
        state, sent = conn.finishing
        now = finish_restore(conn.local, state, sent=sent)
        conn.finishing = None if now == state.unsent else (state, now)
        return now != sent

    @staticmethod
    def _send(sock: socket.socket, out: Direction) -> bool:
        progress = False
        while out.sent < out.total:
            try:
                n = sock.send(
                    pattern(out.stream, out.sent, min(CHUNK, out.total - out.sent)),
                    socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL,
                )
            except BlockingIOError:
                return progress
            except OSError as exc:
                raise TrafficError(f"stream {out.stream}: send failed: {exc}") from None
            out.sent += n
            progress = True
        if out.close_after and not out.shut:
            sock.shutdown(socket.SHUT_WR)
            out.shut = True
            progress = True
        return progress

    @staticmethod
    def _recv(sock: socket.socket, into: Direction) -> bool:
        progress = False
        while not into.eof:
            try:
                data = sock.recv(CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return progress
            except OSError as exc:
                raise TrafficError(f"stream {into.stream}: recv failed: {exc}") from None
            progress = True
            if not data:
                if into.received != into.total:
                    raise TrafficError(
                        f"stream {into.stream}: EOF after {into.received} of {into.total} bytes"
                    )
                into.eof = True
                return True
            if into.received + len(data) > into.total:
                raise TrafficError(f"stream {into.stream}: more than {into.total} bytes")
            if data != pattern(into.stream, into.received, len(data)):
                first = next(
                    i
                    for i, (a, b) in enumerate(
                        zip(data, pattern(into.stream, into.received, len(data)), strict=True)
                    )
                    if a != b
                )
                raise TrafficError(
                    f"stream {into.stream}: wrong byte at offset {into.received + first}"
                )
            into.received += len(data)
        return progress


def fill_queues(traffic: Traffic, conns: Sequence[Conn], extra: int) -> None:
    """A slow guest and a slow peer: both ends stop reading and each writes ``extra`` more.

    Returns once every sender has written its share or its send buffer is
    full; what was written is then in the local and remote queues (or on the
    wire). The streams stay open.
    """

    def cap() -> None:
        traffic.read_local = traffic.read_remote = False
        for conn in conns:
            for direction in (conn.up, conn.down):
                direction.total = direction.sent + extra
                direction.close_after = False

    def stalled(sock: socket.socket, direction: Direction) -> bool:
        if direction.sent == direction.total:
            return True
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        return not poller.poll(0)

    traffic.call(cap)
    traffic.wait(
        lambda: all(stalled(c.local, c.up) and stalled(c.remote, c.down) for c in conns),
        "every sender to write its share into the queues",
    )


def extend_and_close(conns: Sequence[Conn], extra: int) -> None:
    """Let every stream go on for ``extra`` bytes, then end with a FIN (through Traffic.call)."""
    for conn in conns:
        for direction in (conn.up, conn.down):
            direction.total += extra
            direction.close_after = True


#: A total no stream reaches before cap_totals() ends it.
ENDLESS = 1 << 62


def make_conns(
    pairs: Sequence[tuple[socket.socket, socket.socket]], total: int, *, first_stream: int = 0
) -> list[Conn]:
    """Conns with ``total`` bytes each way, streams numbered from ``first_stream``."""
    return [
        Conn(
            local,
            remote,
            up=Direction(first_stream + 2 * i, total),
            down=Direction(first_stream + 2 * i + 1, total),
        )
        for i, (local, remote) in enumerate(pairs)
    ]


@dataclass
class Timing:
    """Wall-clock seconds of each migration phase, for the numbers a test prints."""

    count: int = 0
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def report(self, label: str) -> str:
        parts = [
            f"{name} {secs * 1e3:.1f} ms ({secs / max(self.count, 1) * 1e6:.1f} us/conn)"
            for name, secs in self.phases.items()
        ]
        return f"[sockstate] {label}, {self.count} connections: " + "; ".join(parts)


def freeze_and_dump(
    socks: Sequence[socket.socket],
    timing: Timing,
    *,
    after_freeze: Callable[[], None] | None = None,
) -> list[TcpKernelState]:
    """Source side: freeze intake, repair ON (direct), dump each. Sockets stay open.

    ``after_freeze`` runs once every socket is frozen (not timed).
    """
    timing.count = len(socks)
    start = time.perf_counter()
    for sock in socks:
        freeze_intake(sock)
    if after_freeze is not None:
        elapsed = time.perf_counter() - start
        after_freeze()
        start = time.perf_counter() - elapsed
    set_repair_direct(socks, RepairMode.ON)
    timing.add("freeze+repair on", time.perf_counter() - start)
    start = time.perf_counter()
    states = [dump_tcp(sock) for sock in socks]
    timing.add("dump", time.perf_counter() - start)
    return states


def restore_all(
    states: Sequence[TcpKernelState],
    timing: Timing,
    *,
    netns: str | None = None,
    close_sources: Sequence[socket.socket] | None = None,
    before_repair_off: Callable[[], None] | None = None,
) -> list[socket.socket]:
    """Target side: create (in ``netns``), repair ON, restore each, repair OFF.

    With ``close_sources`` (same host), each source socket is closed
    silently just before its replacement connects the same 4-tuple.
    ``before_repair_off`` runs between the restores and repair OFF (the
    fabric switch). finish_restore() is left to the caller (Traffic.adopt).
    """
    start = time.perf_counter()

    def create() -> list[socket.socket]:
        return [new_socket_for(state, socket.socket) for state in states]

    socks = create() if netns is None else run_in_netns(netns, create)
    set_repair_direct(socks, RepairMode.ON)
    timing.add("create+repair on", time.perf_counter() - start)
    start = time.perf_counter()
    for index, (sock, state) in enumerate(zip(socks, states, strict=True)):
        if close_sources is not None:
            close_silently(close_sources[index])
        restore_in_repair(sock, state)
    timing.add("restore", time.perf_counter() - start)
    if before_repair_off is not None:
        before_repair_off()
    start = time.perf_counter()
    set_repair_direct(socks, RepairMode.OFF)
    timing.add("repair off", time.perf_counter() - start)
    return socks


def close_all(socks: Sequence[socket.socket]) -> None:
    """Close sockets, silently where they are still in repair mode (never raise)."""
    for sock in socks:
        try:
            if sock.fileno() >= 0:
                close_silently(sock)
        except Exception:
            sock.close()


def queued(sock: socket.socket) -> int:
    """Bytes in a socket's send and receive queues (SIOCOUTQ + SIOCINQ)."""
    out = struct.unpack("i", fcntl.ioctl(sock.fileno(), 0x5411, b"\0" * 4))[0]
    inq = struct.unpack("i", fcntl.ioctl(sock.fileno(), 0x541B, b"\0" * 4))[0]
    return int(out) + int(inq)
