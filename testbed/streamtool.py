"""Checked TCP streams both ways on many connections, for migration tests.

A stand-alone script (run with ``ip netns exec NS python streamtool.py ...``)
with a server for the peer and a client for the guest. One thread per
process drives every connection through epoll with non-blocking sockets,
so 5,000 connections cost 5,000 descriptors and no threads.

The data
--------
Each direction of each connection is a slice of one seeded pattern of
prime length :data:`PERIOD`, starting at an offset derived from the
connection's seed and the direction: byte *n* of a stream is
``PATTERN[(start + n) % PERIOD]``. Every received byte is compared with
the pattern at its offset, so a lost, repeated, reordered or misdelivered
(another connection's) segment is caught where it happens, and the final
byte counts are compared across the two ends (what one sent is exactly
what the other received), which catches a loss of a whole multiple of the
period too.

The conversation
----------------
The client opens each connection with a header (``>IQQB``: seed, bytes it
will send up or :data:`UNLIMITED`, bytes the server is to send down or
UNLIMITED, flags: bit 0 = the server sends only after the client's EOF,
bits 1-7 = the rate, in MB/s, at which the server sends (0: full speed)).
The server sends its side (an UNLIMITED down stream ends when the up
stream ends), reads the up stream to EOF, shuts its write side down and
prints one JSON line per finished connection.

Connection kinds (client ``SPEC`` = ``KIND:COUNT[:UP:DOWN:RATE]``):

``busy``       both ways at full speed (or RATE bytes/s each way) until ``stop``.
``idle``       nothing until ``stop``; then UP bytes up (default 1000) and,
               after that, DOWN bytes back (default 1000).
``guestfirst`` UP bytes up, then the guest half-closes; DOWN bytes come back,
               read at RATE bytes/s (so the transfer spans a migration).
``peerfirst``  the peer sends DOWN bytes and half-closes at once; the guest
               sends UP bytes at RATE bytes/s, then closes.

A ``seeds:BASE`` spec numbers the connections from BASE instead of 0, so
that several clients can share one server (each checks its own seeds).

Client commands, one per line on stdin (answers are JSON lines on stdout):
``report`` (totals so far, per kind), ``stop`` (busy streams end, idle ones
send; when every connection is finished the client prints the final result
``{"done": true, "ok": ..., ...}`` and exits 0 if every byte checked).
It prints ``{"connected": N}`` once all connections are up.

UDP: ``udpecho ADDR PORT`` answers each datagram with itself;
``udp ADDR PORT`` sends numbered datagrams one at a time, each resent after
:data:`UDP_RESEND` s without its echo, until ``stop`` on stdin; it then prints
``{"done": true, "sent": N, "resent": R, "longest_gap_ms": G, ...}`` (G: the
longest wait for one echo, which spans any migration) and exits 1 if an
echo came back altered or one datagram went unanswered for :data:`UDP_GIVE_UP` s.

UDP without resending, to count what a migration loses: ``udpflood to ADDR
PORT`` sends numbered datagrams there, one every :data:`UDP_FLOOD_INTERVAL` s;
``udpflood reply ADDR PORT`` binds there and floods whoever sent it the first
datagram; ``stop`` on stdin ends either, which prints ``{"done": true,
"sent": N}``. ``udpcount listen ADDR PORT`` binds there and counts the
numbered datagrams it gets; ``udpcount hello ADDR PORT`` says hello to a
``udpflood reply`` until its first datagram comes, then counts; ``report``
prints ``{"received": R, "first": F, "last": L, "missing": M}`` (F and L:
the lowest and highest number seen, M: the numbers between them that never
came), ``stop`` the same with ``"done": true``.

Usage:
  ``streamtool.py server ADDR PORT``
  ``streamtool.py client ADDR PORT SPEC [SPEC ...]``
  ``streamtool.py udpecho ADDR PORT``
  ``streamtool.py udp ADDR PORT``
  ``streamtool.py udpflood to|reply ADDR PORT``
  ``streamtool.py udpcount listen|hello ADDR PORT``
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import select
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

#: Length of the pattern: a prime, so that no natural chunk size divides it.
PERIOD = 1_048_573
#: Largest send or receive at once (must not exceed PERIOD).
CHUNK = 256 * 1024
#: A stream with no byte count: it goes on until told to stop.
UNLIMITED = (1 << 63) - 1
HEADER = struct.Struct(">IQQB")
FLAG_DOWN_AFTER_UP = 1
RATE_SHIFT = 1  # flags >> RATE_SHIFT: the server's sending rate in MB/s
#: Connections connecting at once (non-blocking connect()s in flight).
CONNECT_WINDOW = 256

_PATTERN = random.Random(0x5EED).randbytes(PERIOD)
#: Twice over, so that any CHUNK-long slice starting below PERIOD is contiguous.
PATTERN2 = _PATTERN + _PATTERN[:CHUNK]


def start_offset(seed: int, down: bool) -> int:
    """Where in the pattern a stream starts (distinct per connection and direction)."""
    return ((2 * seed + int(down)) * 104_729 + 17) % PERIOD


@dataclass
class Direction:
    """One byte stream: how much, how fast, and how far it has come."""

    start: int
    total: int
    rate: float = 0.0  # bytes/s; 0 = as fast as possible
    done_bytes: int = 0
    began_at: float | None = None
    closed: bool = False  # sender: shut down; receiver: EOF seen
    bad: str | None = None

    def budget(self, now: float) -> int:
        """How many bytes may move now (total and rate limits)."""
        left = self.total - self.done_bytes
        if self.rate and self.began_at is not None:
            left = min(left, int(self.rate * (now - self.began_at)) - self.done_bytes + CHUNK // 4)
        return max(0, min(left, CHUNK))

    def next_chunk(self, size: int) -> bytes:
        pos = (self.start + self.done_bytes) % PERIOD
        return PATTERN2[pos : pos + size]

    def check(self, data: bytes) -> None:
        if self.bad is None and data != self.next_chunk(len(data)):
            expected = self.next_chunk(len(data))
            first = next(i for i in range(len(data)) if data[i] != expected[i])
            self.bad = f"wrong byte at offset {self.done_bytes + first}"
        self.done_bytes += len(data)


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _send_some(sock: socket.socket, direction: Direction, now: float) -> bool:
    """Send what the budget allows; False if the socket is full (or nothing to send)."""
    size = direction.budget(now)
    if size <= 0:
        return False
    try:
        sent = sock.send(direction.next_chunk(size))
    except BlockingIOError:
        return False
    direction.done_bytes += sent
    return sent == size


# ---------------------------------------------------------------------------
# server


@dataclass(eq=False)  # hashable by identity (the _PACED set)
class ServerConn:
    sock: socket.socket
    header: bytes = b""
    seed: int = -1
    up: Direction | None = None
    down: Direction | None = None
    down_after_up: bool = False
    error: str | None = None
    events: int = 0


def _server_result(conn: ServerConn) -> None:
    _PACED.discard(conn)
    up, down = conn.up, conn.down
    _emit(
        seed=conn.seed,
        received=up.done_bytes if up else 0,
        sent=down.done_bytes if down else 0,
        ok=conn.error is None and up is not None and up.bad is None,
        error=conn.error or (up.bad if up else "no header"),
    )


def server(addr: str, port: int) -> None:
    _raise_fd_limit()
    listener = socket.socket(_family(addr), socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    _emit(listening=port)
    while True:
        for key, mask in sel.select(timeout=0.005 if _PACED else None):
            if key.data is None:
                _accept(listener, sel)
            else:
                _serve_event(key.data, mask, sel)
        now = time.monotonic()
        for conn in list(_PACED):
            assert conn.down is not None
            if conn.down.budget(now) > 0:
                _PACED.discard(conn)
                _serve_event(conn, selectors.EVENT_WRITE, sel)


#: Connections whose sending waits for its rate budget (not for the socket).
_PACED: set[ServerConn] = set()


def _accept(listener: socket.socket, sel: selectors.BaseSelector) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = ServerConn(sock)
        conn.events = selectors.EVENT_READ
        sel.register(sock, conn.events, conn)


def _serve_event(conn: ServerConn, mask: int, sel: selectors.BaseSelector) -> None:
    now = time.monotonic()
    try:
        if mask & selectors.EVENT_READ:
            _server_read(conn)
        if conn.down is not None and not conn.down.closed and mask & selectors.EVENT_WRITE:
            _server_write(conn, now)
    except OSError as exc:
        conn.error = f"{type(exc).__name__}: {exc}"
        sel.unregister(conn.sock)
        conn.sock.close()
        _server_result(conn)
        return
    up, down = conn.up, conn.down
    if up is not None and down is not None and up.closed and down.closed:
        sel.unregister(conn.sock)
        conn.sock.close()
        _server_result(conn)
        return
    wanted = 0
    if up is None or not up.closed:
        wanted |= selectors.EVENT_READ
    if down is not None and not down.closed and (not conn.down_after_up or (up and up.closed)):
        if down.rate and down.budget(now) <= 0:
            _PACED.add(conn)  # the main loop asks for writability again in time
        else:
            wanted |= selectors.EVENT_WRITE
    if wanted != conn.events:
        conn.events = wanted
        sel.modify(conn.sock, wanted, conn)


def _server_read(conn: ServerConn) -> None:
    if conn.up is None:
        data = conn.sock.recv(HEADER.size - len(conn.header))
        if not data:
            raise ConnectionError("EOF before the header")
        conn.header += data
        if len(conn.header) < HEADER.size:
            return
        seed, up_total, down_total, flags = HEADER.unpack(conn.header)
        conn.seed = seed
        conn.up = Direction(start_offset(seed, False), up_total)
        conn.down = Direction(start_offset(seed, True), down_total)
        conn.down_after_up = bool(flags & FLAG_DOWN_AFTER_UP)
        conn.down.rate = (flags >> RATE_SHIFT) * 1e6
        conn.down.began_at = time.monotonic()
        return
    for _ in range(4):
        try:
            data = conn.sock.recv(CHUNK)
        except BlockingIOError:
            return
        if not data:
            conn.up.closed = True
            assert conn.down is not None
            if conn.down.total == UNLIMITED:
                conn.down.total = conn.down.done_bytes
            if conn.down.done_bytes >= conn.down.total:
                _server_finish_down(conn)
            return
        conn.up.check(data)


def _server_write(conn: ServerConn, now: float) -> None:
    down = conn.down
    assert down is not None
    while _send_some(conn.sock, down, now):
        pass
    if down.done_bytes >= down.total:
        _server_finish_down(conn)


def _server_finish_down(conn: ServerConn) -> None:
    assert conn.down is not None
    if not conn.down.closed:
        conn.sock.shutdown(socket.SHUT_WR)
        conn.down.closed = True


# ---------------------------------------------------------------------------
# client


@dataclass
class ClientConn:
    kind: str
    seed: int
    up: Direction
    down: Direction
    header: bytes
    up_on_stop: bool = False
    sock: socket.socket | None = None
    connected: bool = False
    header_sent: int = 0
    up_started: bool = True
    error: str | None = None
    events: int = 0
    finished: bool = False
    extra: dict[str, object] = field(default_factory=dict)


_DEFAULTS = {
    # kind: (up, down, rate)
    "busy": (UNLIMITED, UNLIMITED, 0.0),
    "idle": (1000, 1000, 0.0),
    "guestfirst": (100_000, 64 << 20, 16e6),
    "peerfirst": (64 << 20, 100_000, 16e6),
}


def parse_specs(specs: list[str]) -> list[ClientConn]:
    conns: list[ClientConn] = []
    base = 0
    for spec in specs:
        kind, count, *params = spec.split(":")
        if kind == "seeds":
            base = int(count)
            continue
        if kind not in _DEFAULTS:
            raise SystemExit(f"unknown connection kind {kind!r}")
        up_total, down_total, rate = _DEFAULTS[kind]
        if params:
            up_total, down_total, rate = int(params[0]), int(params[1]), float(params[2])
        for _ in range(int(count)):
            seed = base + len(conns)
            flags = FLAG_DOWN_AFTER_UP if kind in ("idle", "guestfirst") else 0
            if kind == "busy" and rate:  # the server paces what it sends
                flags |= max(1, min(127, round(rate / 1e6))) << RATE_SHIFT
            up = Direction(start_offset(seed, False), up_total)
            down = Direction(start_offset(seed, True), down_total)
            if kind == "guestfirst":
                down.rate = rate
            if kind == "peerfirst":
                up.rate = rate
            if kind == "busy":  # RATE (0: full speed) up; the server paces down (flags)
                up.rate = rate
            conn = ClientConn(kind, seed, up, down, HEADER.pack(seed, up_total, down_total, flags))
            if kind == "idle":
                conn.up_on_stop, conn.up_started = True, False
            conns.append(conn)
    return conns


class Client:
    def __init__(self, addr: str, port: int, conns: list[ClientConn]) -> None:
        self.addr, self.port = addr, port
        self.conns = conns
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.stdin_buf = b""
        self.unfinished = len(conns)

    def run(self) -> int:
        _raise_fd_limit()
        self._connect_all()
        _emit(connected=len(self.conns))
        os.set_blocking(sys.stdin.fileno(), False)
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
        now = time.monotonic()
        for conn in self.conns:
            if conn.up_started:
                conn.up.began_at = now
            conn.down.began_at = now
            self._update(conn)
        while self.unfinished:
            for key, mask in self.sel.select(timeout=0.01):
                if key.data is None:
                    self._stdin()
                else:
                    self._event(key.data, mask)
            self._throttled()
        return self._final()

    def _connect_all(self) -> None:
        """Connect every connection, CONNECT_WINDOW at a time, and send its header."""
        pending: dict[int, ClientConn] = {}
        todo = list(self.conns)
        deadline = time.monotonic() + 120
        while todo or pending:
            while todo and len(pending) < CONNECT_WINDOW:
                conn = todo.pop()
                sock = socket.socket(_family(self.addr), socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex((self.addr, self.port))
                if err not in (0, errno.EINPROGRESS):
                    raise SystemExit(f"connect: {os.strerror(err)}")
                conn.sock = sock
                pending[sock.fileno()] = conn
                self.sel.register(sock, selectors.EVENT_WRITE, conn)
            for key, _ in self.sel.select(timeout=1):
                conn = key.data
                assert conn.sock is not None
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise SystemExit(f"connect {conn.seed}: {os.strerror(err)}")
                conn.sock.setblocking(True)
                conn.sock.sendall(conn.header)
                conn.sock.setblocking(False)
                conn.connected = True
                # run() registers it again with what it then waits for.
                self.sel.unregister(conn.sock)
                conn.events = 0
                del pending[conn.sock.fileno()]
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(pending) + len(todo)} connections not up after 120 s")

    def _stdin(self) -> None:
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(sys.stdin.fileno())
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            command = line.decode().strip()
            if command == "report":
                _emit(**self._report())
            elif command == "stop":
                self._stop()
            elif command:
                _emit(error=f"unknown command {command!r}")

    def _report(self) -> dict[str, object]:
        kinds: dict[str, dict[str, int]] = {}
        for conn in self.conns:
            entry = kinds.setdefault(
                conn.kind,
                {
                    "sent": 0,
                    "received": 0,
                    "bad": 0,
                    "min_sent": UNLIMITED,
                    "min_received": UNLIMITED,
                },
            )
            entry["sent"] += conn.up.done_bytes
            entry["received"] += conn.down.done_bytes
            entry["min_sent"] = min(entry["min_sent"], conn.up.done_bytes)
            entry["min_received"] = min(entry["min_received"], conn.down.done_bytes)
            entry["bad"] += bool(conn.error or conn.up.bad or conn.down.bad)
        return {"report": kinds, "unfinished": self.unfinished}

    def _stop(self) -> None:
        self.stopping = True
        now = time.monotonic()
        for conn in self.conns:
            if conn.finished:
                continue
            if conn.up.total == UNLIMITED:
                conn.up.total = conn.up.done_bytes
            if conn.up_on_stop:
                conn.up_started = True
                conn.up.began_at = now
            self._update(conn)

    def _event(self, conn: ClientConn, mask: int) -> None:
        now = time.monotonic()
        sock = conn.sock
        assert sock is not None
        try:
            if mask & selectors.EVENT_READ:
                self._read(conn, now)
            if mask & selectors.EVENT_WRITE and not conn.up.closed:
                while _send_some(sock, conn.up, now):
                    pass
        except OSError as exc:
            conn.error = f"{type(exc).__name__}: {exc}"
            self._finish(conn)
            return
        self._update(conn)

    def _read(self, conn: ClientConn, now: float) -> None:
        sock = conn.sock
        assert sock is not None
        for _ in range(4):
            down = conn.down
            # Past its total a stream reads on, to see its EOF (or extra bytes: an error).
            size = down.budget(now) if down.rate and down.done_bytes < down.total else CHUNK
            if size <= 0:
                return
            try:
                data = sock.recv(size)
            except BlockingIOError:
                return
            if not data:
                conn.down.closed = True
                return
            down.check(data)
            if down.done_bytes > down.total:
                down.bad = down.bad or f"{down.done_bytes - down.total} bytes past the end"

    def _throttled(self) -> None:
        now = time.monotonic()
        for conn in self.conns:
            if not conn.finished and (conn.down.rate or conn.up.rate):
                self._update(conn, now)

    def _update(self, conn: ClientConn, now: float | None = None) -> None:
        """Finish the up stream if it is complete, then set what to wait for."""
        sock = conn.sock
        if conn.finished or sock is None:
            return
        now = time.monotonic() if now is None else now
        up, down = conn.up, conn.down
        if conn.up_started and not up.closed and up.done_bytes >= up.total:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                conn.error = f"shutdown: {exc}"
            up.closed = True
        if up.closed and down.closed:
            self._finish(conn)
            return
        wanted = 0
        if not down.closed and (
            not down.rate or down.done_bytes >= down.total or down.budget(now) > 0
        ):
            wanted |= selectors.EVENT_READ
        if conn.up_started and not up.closed and up.budget(now) > 0:
            wanted |= selectors.EVENT_WRITE
        if wanted != conn.events:
            if wanted:
                if conn.events:
                    self.sel.modify(sock, wanted, conn)
                else:
                    self.sel.register(sock, wanted, conn)
            else:
                self.sel.unregister(sock)
            conn.events = wanted

    def _finish(self, conn: ClientConn) -> None:
        if conn.finished:
            return
        conn.finished = True
        self.unfinished -= 1
        if conn.sock is not None:
            if conn.events:
                self.sel.unregister(conn.sock)
            conn.events = 0
            conn.sock.close()

    def _final(self) -> int:
        bad = [
            {
                "seed": c.seed,
                "kind": c.kind,
                "error": c.error or c.up.bad or c.down.bad or "short",
                "sent": c.up.done_bytes,
                "received": c.down.done_bytes,
            }
            for c in self.conns
            if c.error
            or c.up.bad
            or c.down.bad
            # An UNLIMITED down stream's length is the server's to report.
            or (c.down.total != UNLIMITED and c.down.done_bytes != c.down.total)
        ]
        _emit(
            done=True,
            ok=not bad,
            bad=bad[:20],
            bad_count=len(bad),
            sent={c.seed: c.up.done_bytes for c in self.conns},
            received={c.seed: c.down.done_bytes for c in self.conns},
            report=self._report()["report"],
        )
        return 0 if not bad else 1


# ---------------------------------------------------------------------------
# UDP

UDP_RESEND = 0.2
UDP_GIVE_UP = 30.0


def udpecho(addr: str, port: int) -> None:
    sock = socket.socket(_family(addr), socket.SOCK_DGRAM)
    sock.bind((addr, port))
    _emit(listening=port)
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def udp_client(addr: str, port: int) -> int:
    sock = socket.socket(_family(addr), socket.SOCK_DGRAM)
    sock.connect((addr, port))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    os.set_blocking(sys.stdin.fileno(), False)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    rng = random.Random(7)
    index, resent, longest, error = 0, 0, 0.0, None
    payload = b""
    first_sent = last_sent = 0.0
    stopping = False
    stdin_buf = b""
    _emit(started=True)

    def send_next() -> None:
        nonlocal payload, first_sent, last_sent
        payload = index.to_bytes(8, "big") + rng.randbytes(56)
        first_sent = last_sent = time.monotonic()
        sock.send(payload)

    send_next()
    while error is None:
        for key, _ in sel.select(timeout=UDP_RESEND / 4):
            if key.data == "stdin":
                data = os.read(sys.stdin.fileno(), 4096)
                if not data:
                    sel.unregister(sys.stdin.fileno())
                stdin_buf += data
                if b"stop" in stdin_buf:
                    stopping = True
                if b"report" in stdin_buf:
                    stdin_buf = stdin_buf.replace(b"report", b"")
                    _emit(sent=index, resent=resent, longest_gap_ms=longest * 1000)
                continue
            while True:
                try:
                    reply = sock.recv(65535)
                except BlockingIOError:
                    break
                except OSError as exc:  # ICMP unreachable while the path moves
                    _emit(note=f"{type(exc).__name__}: {exc}")
                    break
                if reply == payload:
                    longest = max(longest, time.monotonic() - first_sent)
                    index += 1
                    if stopping:
                        break
                    send_next()
                elif int.from_bytes(reply[:8], "big") >= index or len(reply) != 64:
                    error = f"datagram {index}: an altered echo came back"
                # else: a late echo of a datagram already answered.
        if stopping and reply_done(index, payload):
            break
        now = time.monotonic()
        if now - first_sent > UDP_GIVE_UP:
            error = f"datagram {index} unanswered for {UDP_GIVE_UP:g} s"
        elif now - last_sent > UDP_RESEND:
            last_sent = now
            resent += 1
            sock.send(payload)
    ok = error is None
    _emit(done=True, ok=ok, error=error, sent=index, resent=resent, longest_gap_ms=longest * 1000)
    return 0 if ok else 1


UDP_FLOOD_INTERVAL = 0.002


def _stdin_says(buf: bytearray) -> set[str]:
    """The commands (``report``, ``stop``) that arrived on stdin since the last call."""
    with contextlib.suppress(BlockingIOError):
        buf += os.read(sys.stdin.fileno(), 4096)
    lines = buf[: buf.rfind(b"\n") + 1]  # (complete lines only: a word may come in halves)
    del buf[: len(lines)]
    return {word for word in ("report", "stop") if word.encode() in lines}


def udp_flood(mode: str, addr: str, port: int) -> int:
    sock = socket.socket(_family(addr), socket.SOCK_DGRAM)
    dest: Any = (addr, port)
    if mode == "reply":
        sock.bind(dest)
        _emit(listening=port)
        _, dest = sock.recvfrom(65535)
    sock.setblocking(False)
    os.set_blocking(sys.stdin.fileno(), False)
    buf = bytearray()
    index, due = 0, time.monotonic()
    while "stop" not in _stdin_says(buf):
        now = time.monotonic()
        if now >= due:
            due += UDP_FLOOD_INTERVAL
            with contextlib.suppress(BlockingIOError):  # (sent on the next turn)
                sock.sendto(index.to_bytes(8, "big") + bytes(56), dest)
                index += 1
        select.select([sys.stdin.fileno()], [], [], max(0.0, due - time.monotonic()))
    _emit(done=True, sent=index)
    return 0


def udp_count(mode: str, addr: str, port: int) -> int:
    sock = socket.socket(_family(addr), socket.SOCK_DGRAM)
    if mode == "listen":
        sock.bind((addr, port))
    else:
        sock.connect((addr, port))
    sock.setblocking(False)
    os.set_blocking(sys.stdin.fileno(), False)
    _emit(listening=port)
    seen: set[int] = set()
    buf = bytearray()
    hello_at = 0.0
    while True:
        said = _stdin_says(buf)
        if said:
            counts = {"received": len(seen), "missing": 0, "first": None, "last": None}
            if seen:
                first, last = min(seen), max(seen)
                counts.update(first=first, last=last, missing=last - first + 1 - len(seen))
            if "stop" in said:
                _emit(done=True, **counts)
                return 0
            _emit(**counts)
        if mode == "hello" and not seen and time.monotonic() >= hello_at:
            hello_at = time.monotonic() + 0.1
            with contextlib.suppress(OSError):  # refused until the flood listens
                sock.send(b"hello")
        select.select([sock, sys.stdin.fileno()], [], [], 0.05)
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                break
            except OSError:  # an ICMP error for a hello (ECONNREFUSED): said again
                continue
            seen.add(int.from_bytes(data[:8], "big"))


def reply_done(index: int, payload: bytes) -> bool:
    """On stop: the last datagram sent was answered (index moved past it)."""
    return int.from_bytes(payload[:8], "big") < index


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "server":
        server(argv[1], int(argv[2]))
        return 0
    if len(argv) >= 4 and argv[0] == "client":
        return Client(argv[1], int(argv[2]), parse_specs(argv[3:])).run()
    if len(argv) == 3 and argv[0] == "udpecho":
        udpecho(argv[1], int(argv[2]))
        return 0
    if len(argv) == 3 and argv[0] == "udp":
        return udp_client(argv[1], int(argv[2]))
    if len(argv) == 4 and argv[0] == "udpflood" and argv[1] in ("to", "reply"):
        return udp_flood(argv[1], argv[2], int(argv[3]))
    if len(argv) == 4 and argv[0] == "udpcount" and argv[1] in ("listen", "hello"):
        return udp_count(argv[1], argv[2], int(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
