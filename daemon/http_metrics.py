"""``ferryd --metrics ADDR``: the metrics over HTTP, for a Prometheus scraper.

Theory of operation. The smallest HTTP/1.x server that a scraper needs
(RFC 9112): ``GET /metrics`` (or ``HEAD``) answers the exposition text
(ferryd.metrics) with ``Connection: close``, and the connection ends; any
other path is 404, any other method 405. One trio task accepts, one task
per connection reads the request head and answers; no thread (ferryd has
none, and the seccomp filter is installed after the socket is bound).

Whoever reaches the address is hostile (anyone on the host, or on the
network for a non-loopback address): the request head is read up to
:data:`MAX_HEAD` bytes and must be complete within :data:`TIMEOUT`
seconds, or the connection is closed (431 or 408 when it can still be
said); a body is never read; at most :data:`~ferryd.descriptors.MAX_METRICS_CONNECTIONS`
are served at once (their descriptors are in ferryd's reserve), the others
wait in the backlog. Parsing the head is :func:`parse_request_untrusted`'s,
which raises :class:`HttpRequestError` and nothing else. The metrics hold
no secret of the guest's traffic (counts, no addresses), but they do tell
how busy it is: bind to loopback, or to a Unix socket path (mode 0600, the
starter's: a scraper runs as the same user, or ``curl --unix-socket``).

``ADDR`` is ``HOST:PORT`` (``127.0.0.1:9650``), ``[IPV6]:PORT``
(``[::1]:9650``), or an absolute path for a Unix socket. 9650 is a port in
Prometheus' exporter allocation range that no registered exporter uses
(none is needed: an operator picks any).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ferryd.descriptors import MAX_METRICS_CONNECTIONS, serve_accepted
from ferryd.exits import StartupError, ensure_parent_dir
from ferryd.logthrottle import LogThrottle
from ferryd.metrics import CONTENT_TYPE
from ferryd.unix_listener import ListenError, listen_at, unlink_if_ours

__all__ = [
    "MAX_HEAD",
    "TIMEOUT",
    "HttpRequestError",
    "MetricsAddress",
    "MetricsServer",
    "parse_address",
    "parse_request_untrusted",
]

log = logging.getLogger("ferryd.metrics")

#: The longest request head read (a scraper's is about 200 bytes).
MAX_HEAD = 8192
#: Seconds a client has to send its request head and take the answer.
TIMEOUT = 5.0
#: Bytes of a request read and dropped after the answer (see _lingering_close).
LINGER_BYTES = 64 * 1024
#: The only path served.
PATH = "/metrics"


class HttpRequestError(Exception):
    """The client's request is not one this server answers (the client's fault)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class MetricsAddress:
    """Where to listen: a TCP host and port, or a Unix socket path."""

    host: str | None = None
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        assert self.host is not None
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> MetricsAddress:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``/PATH``; ValueError saying what is wrong."""
    if text.startswith("/"):
        return MetricsAddress(path=text)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected HOST:PORT, [IPV6]:PORT or an absolute socket path")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:  # ValueError if not an address
            raise ValueError(f"{text!r}: only an IPv6 address goes in brackets")
    elif ":" in host:
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets: [{host}]:{port}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return MetricsAddress(host=host, port=int(port))


def parse_request_untrusted(head: bytes) -> tuple[str, str]:
    """The method and path of a request head (up to and without its blank line).

    Raises :class:`HttpRequestError` (the status to answer with) for
    anything but a well-formed HTTP/1.x request line (RFC 9112 §3).
    """
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HttpRequestError(400, "Bad Request", "request head is not ASCII") from None
    line = text.split("\n", 1)[0].rstrip("\r")
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise HttpRequestError(400, "Bad Request", "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpRequestError(505, "HTTP Version Not Supported", f"version {version[:16]!r}")
    if method not in ("GET", "HEAD"):
        raise HttpRequestError(405, "Method Not Allowed", f"method {method[:16]!r}")
    path = target.split("?", 1)[0]
    if path != PATH:
        raise HttpRequestError(404, "Not Found", f"only {PATH} is served")
    return method, path


def response(status: int, reason: str, body: bytes, content_type: str, head: bool) -> bytes:
    """A complete response that closes the connection (the body left out for HEAD)."""
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head else body)


class MetricsServer:
    """Serve ``render()`` at ``/metrics`` on ``address`` (see the module docstring).

    :meth:`bind` runs at start-up, before the privilege drop and the seccomp
    filter (a port below 1024 needs the capability then, and a Unix socket
    file is made as ferryd's starter); :meth:`serve` runs as a task.
    """

    def __init__(self, address: MetricsAddress, render: Callable[[], bytes]) -> None:
        self.address = address
        self.render = render
        self._listener: socket.socket | None = None
        self._bound: os.stat_result | None = None
        self.sockname: object = None
        """Where it listens once bound (getsockname(): a port given as 0 is chosen then)."""

    def bind(self) -> None:
        """Listen now; StartupError naming ``--metrics`` if that cannot be."""
        addr = self.address
        if addr.path is not None:
            ensure_parent_dir(addr.path, "--metrics socket")
            try:
                self._listener, self._bound = listen_at(addr.path, 16)
                self.sockname = addr.path
            except ListenError as exc:
                why = exc.error.strerror if exc.error is not None else exc.failure.value
                raise StartupError(f"--metrics {addr.path}: cannot listen there: {why}") from exc
            return
        assert addr.host is not None
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr.host, addr.port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"--metrics {addr}: cannot listen there: {exc.strerror or exc}"
            ) from exc
        sock.setblocking(False)
        self._listener = sock
        self.sockname = sock.getsockname()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.address.path is not None and self._bound is not None:
            unlink_if_ours(self.address.path, self._bound)
            self._bound = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and answer until cancelled; the listener is closed at the end."""
        assert self._listener is not None, "bind() first"
        listener = trio.socket.from_stdlib_socket(self._listener)
        where = f"Unix socket {self.address}" if self.address.path else f"http://{self.address}"
        log.info("metrics: serving %s on %s", PATH, where)

        async def accept() -> trio.socket.SocketType:
            conn, _ = await listener.accept()
            return conn

        try:
            await serve_accepted(
                accept,
                self._answer,
                MAX_METRICS_CONNECTIONS,
                "metrics",
                LogThrottle(log),
                task_status=task_status,
            )
        finally:
            self.close()

    async def _answer(self, conn: trio.socket.SocketType, slots: trio.Semaphore) -> None:
        try:
            with conn, trio.move_on_after(TIMEOUT) as scope:
                data = await self._respond(conn)
                view = memoryview(data)
                while view:
                    sent = await conn.send(view)
                    view = view[sent:]
                await _lingering_close(conn)
            if scope.cancelled_caught:
                log.debug("metrics: a client took longer than %g s: closed", TIMEOUT)
        except OSError as exc:
            log.debug("metrics: connection error: %s", exc)
        finally:
            slots.release()

    async def _respond(self, conn: trio.socket.SocketType) -> bytes:
        """Read the request head and build the answer (an error status for a bad one)."""
        head = bytearray()
        while True:
            end = head.find(b"\r\n\r\n")
            if end < 0:
                end = head.find(b"\n\n")
            if end >= 0:
                break
            if len(head) >= MAX_HEAD:
                return response(431, "Request Header Fields Too Large", b"", "text/plain", False)
            chunk = await conn.recv(MAX_HEAD - len(head))
            if not chunk:
                return b""  # the client went away before finishing its request
            head += chunk
        try:
            method, _ = parse_request_untrusted(bytes(head[:end]))
        except HttpRequestError as exc:
            body = f"{exc}\n".encode("ascii", "replace")
            return response(exc.status, exc.reason, body, "text/plain; charset=utf-8", False)
        try:
            body = self.render()
        except Exception:  # a ferryd bug: the scrape fails, the daemon goes on
            log.exception("metrics: rendering failed")
            return response(500, "Internal Server Error", b"", "text/plain", False)
        return response(200, "OK", body, CONTENT_TYPE, method == "HEAD")


async def _lingering_close(conn: trio.socket.SocketType) -> None:
    """Send FIN, then read and drop what the client still sends, up to LINGER_BYTES.

    Closing a socket with unread bytes makes the kernel send a RST
    (RFC 1122 §4.2.2.13), which can destroy the answer before the client
    read it (an oversized head answered 431); the caller's timeout bounds
    the wait.
    """
    conn.shutdown(socket.SHUT_WR)
    dropped = 0
    while dropped < LINGER_BYTES:
        chunk = await conn.recv(MAX_HEAD)
        if not chunk:
            return
        dropped += len(chunk)
