"""The control socket's server: ferryd answers ferryctl here.

Theory of operation
-------------------
ferryd listens on a Unix stream socket whose path the operator chooses
(``ferryd --control PATH``). The socket file is created with mode 0600, so
only the user who started the daemon (and root) can connect: the file mode is
the whole access control, as with passt's and QEMU's sockets. It is created
before the privilege drop (privileges.py), so a ferryd started as root keeps
a root-owned socket while it runs as ``--runas``: that user (nobody, which
other ferryds may share) cannot drive it. Two ferryds started by the same
non-root user can drive each other's; give each guest its own user. The
socket is bound, then chmod'ed, and only then listened on: until
``listen()`` every connect() is refused, so no client ever reaches it
through a wider umask-derived mode.

At start a leftover socket file from a crashed daemon is removed, but only
after checking that nobody answers on it: if a connect() succeeds, another
live daemon owns the path and we refuse to start (:class:`ControlAddressInUse`)
instead of silently stealing its name. A path that exists and is not a
socket is never removed (that is the operator's file, not ours).

The wire format (frames, requests, responses, descriptors) is protocol.py's.
The server reads a frame with exactly-sized reads, never past its end, so
descriptors received while a frame is being read belong to that frame.

Limits
~~~~~~
At most :data:`~ferryd.descriptors.MAX_CONTROL_CONNECTIONS` clients are
served at once (their descriptors are in ferryd's reserve); more wait in the
listen backlog, and a connection holds its slot until the client closes it.
A descriptor is held back so that accept() still works when the process is
out of descriptors (see :meth:`ControlServer._accept`); when accept() fails
anyway the server backs off (ACCEPT_BACKOFF) instead of spinning on a
listener that stays readable, and says so in a rate-limited line. A client
that has started a frame must finish it within :data:`_FRAME_TIMEOUT`.

Descriptors received are close-on-exec (MSG_CMSG_CLOEXEC). A command takes
at most as many as it was registered with (``max_fds``; a request with more
is refused before its handler runs). They are handed to the handler as a
list; the handler takes ownership of the ones it keeps by removing them from
the list (``fd = fds.pop()``). Whatever is still in the list when the
handler returns or raises, and every descriptor of a request that is
rejected before reaching a handler, is closed by the server: no request,
however malformed, leaks a descriptor into the daemon.

Errors
~~~~~~
Whose fault, and what happens:

* the client sent garbage (protocol.py's ControlProtocolError, or an
  unknown ``cmd``): an ``ok: false`` response naming the problem. After a
  bad length the frame boundary is lost, so the server answers and closes;
  otherwise the connection stays usable.
* the request was well formed but cannot be done (a handler raises
  :class:`~ferryd.control.protocol.ControlError`): ``ok: false`` with the
  handler's message.
* a handler has a bug (any other exception): it is logged with its traceback,
  the client gets ``ok: false`` saying it is an internal error of ferryd, and
  the server keeps serving.

No client can crash the server or make it hold state across connections.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ferryd.control.protocol import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_REQUEST,
    ControlError,
    ControlProtocolError,
    check_descriptors_untrusted,
    error_response,
    fds_from_ancdata,
    ok_response,
    parse_length_untrusted,
    parse_request_untrusted,
)
from ferryd.descriptors import MAX_CONTROL_CONNECTIONS, serve_accepted
from ferryd.exits import StartupError, ensure_parent_dir
from ferryd.logthrottle import LogThrottle
from ferryd.unix_listener import ListenError, ListenFailure, listen_at, unlink_if_ours

__all__ = ["ControlAddressInUse", "ControlBindError", "ControlServer", "Handler"]

log = logging.getLogger("ferryd.control")

#: A client that has started a frame must finish it within this time.
_FRAME_TIMEOUT = 10.0
_ANC_BUFSIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ControlBindError(Exception):
    """The control socket cannot be made at its path (the operator's to fix)."""


class ControlAddressInUse(ControlBindError):
    """Another live daemon already answers on the control socket path (bad config)."""


#: A command handler: gets the request object and the descriptors received
#: with it, returns the result fields of an ``ok: true`` response. It keeps a
#: descriptor by removing it from the list; the rest are closed for it.
Handler = Callable[[dict[str, Any], list[int]], Awaitable[dict[str, Any]]]


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _close_all(fds: list[int]) -> None:
    while fds:
        fd = fds.pop()
        try:
            os.close(fd)
        except OSError:  # pragma: no cover - already closed by a careless handler
            log.warning("control: descriptor %d was already closed", fd)


class _ConnectionClosed(Exception):
    """The client went away between frames (a normal end)."""


class _FrameLost(Exception):
    """Framing is broken on this connection; answer (if possible) and close."""


class ControlServer:
    """Serve the control protocol on a Unix socket (see the module docstring).

    Register handlers before calling :meth:`serve`; handlers of one
    connection run one at a time, different connections concurrently.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._spare: int | None = None
        """A descriptor held back for accept() under EMFILE (see _accept)."""

    def register(self, cmd: str, handler: Handler, *, max_fds: int = MAX_FDS) -> None:
        """Make *handler* answer requests whose ``cmd`` is *cmd*, with at most
        *max_fds* descriptors (more: refused, the client's fault, and closed)."""
        if not cmd:
            raise ValueError("control command name must not be empty")
        if cmd in self._handlers:
            raise ValueError(f"control command {cmd!r} is already registered")
        if not 0 <= max_fds <= MAX_FDS:
            raise ValueError(f"control command {cmd!r}: max_fds must be 0 to {MAX_FDS}")
        self._handlers[cmd] = (handler, max_fds)

    @property
    def commands(self) -> list[str]:
        """The registered command names, sorted."""
        return sorted(self._handlers)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket, report started, and serve until cancelled.

        Creates the socket's directory if it is missing (mode 0755, like a
        systemd RuntimeDirectory). Raises ControlAddressInUse if another
        daemon answers on the path, ControlBindError if the path cannot be
        bound. The socket file is removed when serving ends (if it is still
        ours).
        """
        listener, bound = self._bind()
        # At most MAX_CONTROL_CONNECTIONS at once (their descriptors are in
        # ferryd's reserve, ferryd.descriptors); more wait in the backlog.
        self._spare = _open_spare()
        try:
            await serve_accepted(
                lambda: self._accept(listener),
                self._serve_connection,
                MAX_CONTROL_CONNECTIONS,
                "control",
                LogThrottle(log),
                task_status=task_status,
            )
        finally:
            listener.close()
            if self._spare is not None:
                os.close(self._spare)
                self._spare = None
            unlink_if_ours(self.path, bound)

    async def _accept(self, listener: trio.socket.SocketType) -> trio.socket.SocketType:
        """Accept one client, even when the process is out of descriptors.

        A spare descriptor is held for that case (the classic EMFILE
        trick): when accept() fails with EMFILE it is given up so this one
        connection gets through, and taken again once a connection ends.
        So the owner can still ask ``status`` while a guest (or a lowered
        limit) has used every descriptor.
        """
        try:
            conn, _ = await listener.accept()
        except OSError as exc:
            if exc.errno != errno.EMFILE or self._spare is None:
                raise
            os.close(self._spare)
            self._spare = None
            conn, _ = await listener.accept()
        return conn

    def _bind(self) -> tuple[trio.socket.SocketType, os.stat_result]:
        """The listener (ferryd.unix_listener: bound synchronously, before the
        privilege drop, with no worker thread left holding capabilities)."""
        try:
            ensure_parent_dir(self.path, "control socket")
        except StartupError as exc:
            raise ControlBindError(str(exc)) from exc
        try:
            raw, bound = listen_at(self.path, 64)
        except ListenError as exc:
            if exc.failure is ListenFailure.LIVE:
                raise ControlAddressInUse(
                    f"another daemon is already listening on control socket {self.path}"
                ) from exc
            if exc.failure is ListenFailure.NOT_SOCKET:
                raise ControlAddressInUse(
                    f"control path {self.path} exists and is not a socket; refusing to replace it"
                ) from exc
            if exc.failure is ListenFailure.PROBE:
                raise ControlBindError(
                    f"control socket {self.path}: cannot tell whether it is in use: {exc.error}"
                ) from exc
            assert exc.error is not None
            raise ControlBindError(f"control socket {self.path}: {exc.error.strerror}") from exc
        log.debug("control: listening on %s", self.path)
        return trio.socket.from_stdlib_socket(raw), bound

    async def _serve_connection(self, conn: trio.socket.SocketType, slots: trio.Semaphore) -> None:
        try:
            await self._serve_one_connection(conn)
        finally:
            slots.release()
            if self._spare is None:
                self._spare = _open_spare()

    async def _serve_one_connection(self, conn: trio.socket.SocketType) -> None:
        with conn:
            try:
                while True:
                    fds: list[int] = []
                    try:
                        response = await self._one_request(conn, fds)
                    finally:
                        _close_all(fds)
                    await _send_all(conn, response)
            except _ConnectionClosed:
                pass
            except _FrameLost as exc:
                log.info("control: closing connection: %s", exc)
                # Best effort: the client may already be gone.
                with trio.move_on_after(1), contextlib.suppress(OSError):
                    await _send_all(conn, error_response(str(exc)))
            except OSError as exc:
                log.info("control: connection error: %s", exc)

    async def _one_request(self, conn: trio.socket.SocketType, fds: list[int]) -> bytes:
        """Read one request, run its handler, return the response frame.

        Raises _ConnectionClosed at a clean end, _FrameLost when the stream
        cannot be resynchronised. Every descriptor received is in *fds*.
        """
        header, truncated = await _recv_exact(conn, HEADER_SIZE, fds, first=True)
        try:
            length = parse_length_untrusted(header, MAX_REQUEST)
        except ControlProtocolError as exc:
            raise _FrameLost(f"bad request: {exc}") from None
        payload, trunc = await _recv_exact(conn, length, fds, first=False)
        try:
            req = parse_request_untrusted(payload)
            check_descriptors_untrusted(req["cmd"], len(fds), truncated or trunc)
        except ControlProtocolError as exc:
            return error_response(f"bad request: {exc}")
        cmd: str = req["cmd"]
        registered = self._handlers.get(cmd)
        if registered is None:
            known = ", ".join(self.commands) or "none"
            return error_response(f"unknown command {cmd!r} (known: {known})")
        handler, max_fds = registered
        if len(fds) > max_fds:
            takes = f"at most {max_fds}" if max_fds else "no"
            noun = "file descriptor" if max_fds == 1 else "file descriptors"
            return error_response(f"bad request: {cmd!r} takes {takes} {noun}, not {len(fds)}")
        try:
            result = await handler(req, fds)
            # Encoded here, so that an unencodable result is the handler's bug.
            return ok_response(result)
        except ControlError as exc:
            return error_response(str(exc) or type(exc).__name__)
        except Exception as exc:
            log.exception("control: handler for %r failed", cmd)
            return error_response(
                f"internal error in ferryd while handling {cmd!r}: "
                f"{type(exc).__name__}: {exc} (a ferryd bug; see its log)"
            )


async def _recv_exact(
    conn: trio.socket.SocketType, size: int, fds: list[int], *, first: bool
) -> tuple[bytes, bool]:
    """Read exactly *size* bytes, collecting descriptors into *fds*.

    Returns the bytes and whether the kernel truncated control data (some
    descriptors were dropped). EOF before the first byte of a frame is a
    clean close; EOF inside a frame is a broken frame. Once a frame has
    begun, the rest must arrive within _FRAME_TIMEOUT.
    """
    buf = bytearray()
    truncated = False
    deadline = None if first else trio.current_time() + _FRAME_TIMEOUT
    while len(buf) < size:
        want = size - len(buf)
        result: tuple[bytes, list[tuple[int, int, bytes]], int, Any] | None = None
        if deadline is None:
            # Idle between requests: no deadline until a frame begins.
            result = await conn.recvmsg(want, _ANC_BUFSIZE, socket.MSG_CMSG_CLOEXEC)
            deadline = trio.current_time() + _FRAME_TIMEOUT
        else:
            with trio.move_on_at(deadline):
                result = await conn.recvmsg(want, _ANC_BUFSIZE, socket.MSG_CMSG_CLOEXEC)
            if result is None:
                raise _FrameLost(f"incomplete request frame: timed out after {_FRAME_TIMEOUT:g} s")
        data, ancdata, flags, _ = result
        fds_from_ancdata(ancdata, fds)
        truncated |= bool(flags & socket.MSG_CTRUNC)
        if not data:
            if first and not buf:
                raise _ConnectionClosed
            raise _FrameLost("connection closed in the middle of a request frame")
        buf += data
    return bytes(buf), truncated


async def _send_all(conn: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await conn.send(view)
        view = view[sent:]
