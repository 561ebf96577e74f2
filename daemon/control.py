"""The control socket: how ferryctl (and tests, and later libvirt hooks) talk to ferryd.

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

Framing
~~~~~~~
Both directions use the same frame::

    +----------------------+---------------------------------+
    | length: 4 bytes, BE  | payload: `length` bytes, UTF-8  |
    +----------------------+---------------------------------+

The payload is one JSON object. A request is ``{"cmd": "<name>", ...args}``;
a response is ``{"ok": true, ...result}`` or
``{"ok": false, "error": "<message for a human>"}``. A request payload may be
at most :data:`MAX_REQUEST` bytes (64 KiB) and must not be empty; responses may
be larger (:data:`MAX_RESPONSE`), since a flow table with thousands of entries
is legitimately big while a request never is.

A connection carries any number of request/response pairs, strictly in turn
(the client waits for each response); most clients send one and close.

File descriptors
~~~~~~~~~~~~~~~~
A request may carry up to :data:`MAX_FDS` file descriptors in one SCM_RIGHTS
control message attached to the bytes of its frame (``socket.send_fds`` with
the whole frame does exactly that). ``ferryctl migrate`` will use this to
hand a pipe's write end to the source daemon and its read end to the target,
the same shape as vhost-user's ``SET_DEVICE_STATE_FD``. The server reads a
frame with exactly-sized reads, never past its end, so descriptors received
while a frame is being read belong to that frame. The Linux stream-socket
code delivers a message's descriptors with its first byte, never merged with
another sender's message.

Received descriptors are close-on-exec (MSG_CMSG_CLOEXEC). They are handed to
the handler as a list; the handler takes ownership of the ones it keeps by
removing them from the list (``fd = fds.pop()``). Whatever is still in the
list when the handler returns or raises, and every descriptor of a request
that is rejected before reaching a handler, is closed by the server: no
request, however malformed, leaks a descriptor into the daemon.

Errors
~~~~~~
Whose fault, and what happens:

* the client sent garbage (bad length, not UTF-8, not JSON, not an object,
  no ``cmd``, unknown ``cmd``, too many descriptors): an ``ok: false``
  response naming the problem. After a bad length the frame boundary is lost,
  so the server answers and closes; otherwise the connection stays usable.
* the request was well formed but cannot be done (a handler raises
  :class:`ControlError`): ``ok: false`` with the handler's message.
* a handler has a bug (any other exception): it is logged with its traceback,
  the client gets ``ok: false`` saying it is an internal error of ferryd, and
  the server keeps serving.

No client can crash the server or make it hold state across connections.

Client side
~~~~~~~~~~~
:func:`request` is a blocking helper (plain socket) for ferryctl and test
code; :func:`request_async` is its trio twin for async tests and daemons
talking to each other. Both raise :class:`ControlClientError` (or a subclass:
:class:`DaemonNotRunning`, :class:`ControlRequestFailed`) with a one-line
message fit for a terminal.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from ferryd.descriptors import ACCEPT_BACKOFF, MAX_CONTROL_CONNECTIONS, is_exhaustion
from ferryd.exits import StartupError, ensure_parent_dir
from ferryd.logthrottle import LogThrottle

__all__ = [
    "MAX_FDS",
    "MAX_REQUEST",
    "MAX_RESPONSE",
    "ControlAddressInUse",
    "ControlBindError",
    "ControlClientError",
    "ControlError",
    "ControlProtocolError",
    "ControlRequestFailed",
    "ControlServer",
    "DaemonNotRunning",
    "Handler",
    "encode_frame",
    "parse_length_untrusted",
    "parse_request_untrusted",
    "parse_response_untrusted",
    "request",
    "request_async",
]

log = logging.getLogger(__name__)

#: Largest request payload the server accepts. Requests are small commands;
#: anything bigger is a confused or hostile client.
MAX_REQUEST = 64 * 1024
#: Largest response payload a client accepts (a flow table can be large).
MAX_RESPONSE = 64 * 1024 * 1024
#: Most descriptors one request may carry (the kernel's SCM_MAX_FD).
MAX_FDS = 253

_HEADER = struct.Struct(">I")
#: A client that has started a frame must finish it within this time.
_FRAME_TIMEOUT = 10.0
_ANC_BUFSIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ControlError(Exception):
    """Raised by a handler: the request cannot be done; the message is for the user.

    The message is sent verbatim as the response's ``error``, so it should
    say what was wrong with the request or the daemon's state, in one line.
    """


class ControlProtocolError(Exception):
    """A frame received from the other side is malformed (the sender's fault)."""


class ControlBindError(Exception):
    """The control socket cannot be made at its path (the operator's to fix)."""


class ControlAddressInUse(ControlBindError):
    """Another live daemon already answers on the control socket path (bad config)."""


class ControlClientError(Exception):
    """A control request could not be completed; the message is for a terminal."""


class DaemonNotRunning(ControlClientError):
    """Nobody listens on the control socket (missing file or connection refused).

    Distinct so that ``ferryctl status --wait`` can retry exactly this case.
    """


class ControlRequestFailed(ControlClientError):
    """The daemon answered ``ok: false``; :attr:`error` is its message."""

    def __init__(self, cmd: str, error: str) -> None:
        super().__init__(f"{cmd}: {error}")
        self.cmd = cmd
        self.error = error


#: A command handler: gets the request object and the descriptors received
#: with it, returns the result fields of an ``ok: true`` response. It keeps a
#: descriptor by removing it from the list; the rest are closed for it.
Handler = Callable[[dict[str, Any], list[int]], Awaitable[dict[str, Any]]]


# ---------------------------------------------------------------------------
# Codec (no I/O)


def encode_frame(obj: Mapping[str, Any]) -> bytes:
    """Encode one frame: 4-byte big-endian length, then compact UTF-8 JSON."""
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    data = payload.encode("utf-8")
    return _HEADER.pack(len(data)) + data


def parse_length_untrusted(header: bytes, limit: int) -> int:
    """Decode a frame header; the length must be 1..limit.

    Raises ControlProtocolError (and nothing else) for a bad header.
    """
    if len(header) != _HEADER.size:
        raise ControlProtocolError(f"frame header is {len(header)} bytes, expected 4")
    length: int = _HEADER.unpack(header)[0]
    if length == 0:
        raise ControlProtocolError("empty frame")
    if length > limit:
        raise ControlProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
    return length


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_object_untrusted(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ControlProtocolError(f"frame is not valid UTF-8: {exc.reason}") from None
    except RecursionError:
        raise ControlProtocolError("frame JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, oversized integers, NaN
        raise ControlProtocolError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ControlProtocolError(f"frame is a JSON {type(obj).__name__}, expected an object")
    return obj


def parse_request_untrusted(payload: bytes) -> dict[str, Any]:
    """Decode a request payload: a JSON object with a non-empty string ``cmd``.

    Raises ControlProtocolError (and nothing else) for any malformed input.
    """
    obj = _parse_object_untrusted(payload)
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise ControlProtocolError('request has no "cmd" string')
    return obj


def parse_response_untrusted(payload: bytes) -> dict[str, Any]:
    """Decode a response payload: a JSON object with a boolean ``ok``.

    An ``ok: false`` response must carry a string ``error``. Raises
    ControlProtocolError (and nothing else) for any malformed input.
    """
    obj = _parse_object_untrusted(payload)
    ok = obj.get("ok")
    if not isinstance(ok, bool):
        raise ControlProtocolError('response has no boolean "ok"')
    if not ok and not isinstance(obj.get("error"), str):
        raise ControlProtocolError('error response has no "error" string')
    return obj


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]], into: list[int]) -> None:
    """Append the descriptors of every SCM_RIGHTS message to *into*.

    Any other control message is ignored (there is none we ask for).
    """
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            usable = len(data) - len(data) % fds.itemsize
            fds.frombytes(data[:usable])
            into.extend(fds)


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


# ---------------------------------------------------------------------------
# Server


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
        self._handlers: dict[str, Handler] = {}
        self._spare: int | None = None
        """A descriptor held back for accept() under EMFILE (see _accept)."""

    def register(self, cmd: str, handler: Handler) -> None:
        """Make *handler* answer requests whose ``cmd`` is *cmd*."""
        if not cmd:
            raise ValueError("control command name must not be empty")
        if cmd in self._handlers:
            raise ValueError(f"control command {cmd!r} is already registered")
        self._handlers[cmd] = handler

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
        listener, bound = await self._bind()
        # At most MAX_CONTROL_CONNECTIONS at once (their descriptors are in
        # ferryd's reserve, ferryd.descriptors); more wait in the backlog.
        slots = trio.Semaphore(MAX_CONTROL_CONNECTIONS)
        throttle = LogThrottle(log)
        self._spare = _open_spare()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await slots.acquire()
                    try:
                        conn = await self._accept(listener)
                    except OSError as exc:
                        slots.release()
                        if not is_exhaustion(exc):
                            raise
                        # EMFILE: the listener stays readable, so retrying at
                        # once would spin; the clients wait in the backlog.
                        throttle.warning(
                            "accept", trio.current_time(), "control: cannot accept: %s", exc
                        )
                        await trio.sleep(ACCEPT_BACKOFF)
                        continue
                    nursery.start_soon(self._serve_connection, conn, slots)
        finally:
            listener.close()
            if self._spare is not None:
                os.close(self._spare)
                self._spare = None
            self._unlink_if_ours(bound)

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

    async def _bind(self) -> tuple[trio.socket.SocketType, os.stat_result]:
        try:
            ensure_parent_dir(self.path, "control socket")
        except StartupError as exc:
            raise ControlBindError(str(exc)) from exc
        await self._remove_stale()
        # Bound synchronously: trio binds a Unix socket path in a worker thread,
        # and a thread left over from setup would keep its capabilities past
        # the privilege drop (capset(2) changes the calling thread only).
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                raw.bind(self.path)
            except OSError as exc:
                raise ControlBindError(f"control socket {self.path}: {exc.strerror}") from exc
            # Not listening yet, so nobody can connect before the mode is tight.
            os.chmod(self.path, 0o600)
            bound = os.lstat(self.path)
            raw.listen(64)
        except BaseException:
            raw.close()
            raise
        sock = trio.socket.from_stdlib_socket(raw)
        log.debug("control: listening on %s", self.path)
        return sock, bound

    async def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlAddressInUse(
                f"control path {self.path} exists and is not a socket; refusing to replace it"
            )
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with trio.move_on_after(2):
                await probe.connect(self.path)
                raise ControlAddressInUse(
                    f"another daemon is already listening on control socket {self.path}"
                )
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: nobody listens
        finally:
            probe.close()
        log.info("control: removing stale socket %s", self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _unlink_if_ours(self, bound: os.stat_result) -> None:
        try:
            now = os.lstat(self.path)
            if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
                os.unlink(self.path)
        except OSError:
            pass

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
                    await _send_all(conn, encode_frame(response))
            except _ConnectionClosed:
                pass
            except _FrameLost as exc:
                log.info("control: closing connection: %s", exc)
                # Best effort: the client may already be gone.
                with trio.move_on_after(1), contextlib.suppress(OSError):
                    await _send_all(conn, encode_frame({"ok": False, "error": str(exc)}))
            except OSError as exc:
                log.info("control: connection error: %s", exc)

    async def _one_request(self, conn: trio.socket.SocketType, fds: list[int]) -> dict[str, Any]:
        """Read one request, run its handler, return the response object.

        Raises _ConnectionClosed at a clean end, _FrameLost when the stream
        cannot be resynchronised. Every descriptor received is in *fds*.
        """
        truncated = False
        header, trunc = await _recv_exact(conn, _HEADER.size, fds, first=True)
        truncated |= trunc
        try:
            length = parse_length_untrusted(header, MAX_REQUEST)
        except ControlProtocolError as exc:
            raise _FrameLost(f"bad request: {exc}") from None
        payload, trunc = await _recv_exact(conn, length, fds, first=False)
        truncated |= trunc
        try:
            req = parse_request_untrusted(payload)
        except ControlProtocolError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        cmd: str = req["cmd"]
        if truncated or len(fds) > MAX_FDS:
            return {
                "ok": False,
                "error": f"bad request: {cmd}: too many file descriptors (at most {MAX_FDS})",
            }
        handler = self._handlers.get(cmd)
        if handler is None:
            known = ", ".join(self.commands) or "none"
            return {"ok": False, "error": f"unknown command {cmd!r} (known: {known})"}
        try:
            result = await handler(req, fds)
            # Encode here so that an unencodable result is the handler's bug.
            response = {**result, "ok": True}
            encode_frame(response)
        except ControlError as exc:
            return {"ok": False, "error": str(exc) or type(exc).__name__}
        except Exception as exc:
            log.exception("control: handler for %r failed", cmd)
            return {
                "ok": False,
                "error": f"internal error in ferryd while handling {cmd!r}: "
                f"{type(exc).__name__}: {exc} (a ferryd bug; see its log)",
            }
        return response


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
        _fds_from_ancdata(ancdata, fds)
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


# ---------------------------------------------------------------------------
# Clients


def _check_response(cmd: str, path: str, payload: bytes) -> dict[str, Any]:
    try:
        response = parse_response_untrusted(payload)
    except ControlProtocolError as exc:
        raise ControlClientError(f"{cmd}: bad response from {path}: {exc}") from None
    if not response["ok"]:
        raise ControlRequestFailed(cmd, response["error"])
    return response


def _request_frame(cmd: str, args: Mapping[str, Any]) -> bytes:
    if "cmd" in args:
        raise TypeError("request arguments must not contain 'cmd'")
    try:
        frame = encode_frame({"cmd": cmd, **args})
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{cmd}: request arguments are not JSON-encodable: {exc}") from None
    if len(frame) - _HEADER.size > MAX_REQUEST:
        raise ControlClientError(f"{cmd}: request exceeds {MAX_REQUEST} bytes")
    return frame


def _connect_error(path: str, exc: OSError) -> ControlClientError:
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return DaemonNotRunning(f"ferryd is not running (no one listens on {path})")
    if isinstance(exc, PermissionError):
        return ControlClientError(
            f"permission denied on control socket {path} (it is mode 0600: run as its owner)"
        )
    return ControlClientError(f"cannot connect to control socket {path}: {exc.strerror or exc}")


def _left(deadline: float) -> float:
    """Seconds until ``deadline`` (time.monotonic()); TimeoutError once it passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def recv_exact_sync(sock: socket.socket, size: int, cmd: str, path: str, deadline: float) -> bytes:
    """Read exactly ``size`` bytes of a response by ``deadline`` (time.monotonic();
    TimeoutError after it, however slowly the bytes trickle in)."""
    buf = bytearray()
    while len(buf) < size:
        sock.settimeout(_left(deadline))
        data = sock.recv(size - len(buf))
        if not data:
            raise ControlClientError(f"{cmd}: ferryd at {path} closed the connection unanswered")
        buf += data
    return bytes(buf)


def request(
    path: str,
    cmd: str,
    /,
    *,
    fds: Sequence[int] = (),
    timeout: float = 10.0,
    hand_over: bool = False,
    **args: Any,
) -> dict[str, Any]:
    """Send one request to the daemon at *path* and return its ``ok`` response.

    *fds* are passed with the request (the caller keeps its own copies and
    may close them afterwards). With *hand_over* they are the daemon's: ours
    are closed as soon as sendmsg() returns (the kernel holds them in flight
    from then on), and in every case. That is what a pipe's write end needs
    when the answer comes only after the stream ended: the reader sees the
    end once the daemon closes the last copy, not ours (ferryctl migrate).
    *timeout* bounds the whole exchange. Raises DaemonNotRunning,
    ControlRequestFailed (``ok: false``) or ControlClientError (timeout,
    broken or malformed response).
    """
    owned = list(fds) if hand_over else []
    try:
        return _request(path, cmd, fds, owned, timeout, args)
    finally:
        for fd in owned:
            os.close(fd)


def _request(
    path: str,
    cmd: str,
    fds: Sequence[int],
    owned: list[int],
    timeout: float,
    args: Mapping[str, Any],
) -> dict[str, Any]:
    frame = _request_frame(cmd, args)
    if len(fds) > MAX_FDS:
        raise ControlClientError(f"{cmd}: at most {MAX_FDS} descriptors per request")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except OSError as exc:
                raise _connect_error(path, exc) from None

            sent = socket.send_fds(sock, [frame], list(fds)) if fds else sock.send(frame)
            while owned:
                os.close(owned.pop())
            sock.settimeout(_left(deadline))
            sock.sendall(frame[sent:])
            header = recv_exact_sync(sock, _HEADER.size, cmd, path, deadline)
            try:
                length = parse_length_untrusted(header, MAX_RESPONSE)
            except ControlProtocolError as exc:
                raise ControlClientError(f"{cmd}: bad response from {path}: {exc}") from None
            payload = recv_exact_sync(sock, length, cmd, path, deadline)
        except TimeoutError:
            raise ControlClientError(
                f"{cmd}: no answer from ferryd at {path} within {timeout:g} s"
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            raise ControlClientError(
                f"{cmd}: ferryd at {path} closed the connection unanswered"
            ) from None
    return _check_response(cmd, path, payload)


async def request_async(
    path: str,
    cmd: str,
    /,
    *,
    fds: Sequence[int] = (),
    **args: Any,
) -> dict[str, Any]:
    """The trio version of :func:`request`, with the same arguments and errors.

    It has no timeout of its own: bound it with ``trio.fail_after`` or
    ``trio.move_on_after`` around the call, as trio code does.
    """
    frame = _request_frame(cmd, args)
    if len(fds) > MAX_FDS:
        raise ControlClientError(f"{cmd}: at most {MAX_FDS} descriptors per request")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            await sock.connect(path)
        except OSError as exc:
            raise _connect_error(path, exc) from None
        try:
            sent = 0
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = await sock.sendmsg([frame], anc)
            await _send_all(sock, frame[sent:])
            header = await _recv_exact_client(sock, _HEADER.size, cmd, path)
            try:
                length = parse_length_untrusted(header, MAX_RESPONSE)
            except ControlProtocolError as exc:
                raise ControlClientError(f"{cmd}: bad response from {path}: {exc}") from None
            payload = await _recv_exact_client(sock, length, cmd, path)
        except (BrokenPipeError, ConnectionResetError):
            raise ControlClientError(
                f"{cmd}: ferryd at {path} closed the connection unanswered"
            ) from None
    return _check_response(cmd, path, payload)


async def _recv_exact_client(sock: trio.socket.SocketType, size: int, cmd: str, path: str) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        data = await sock.recv(size - len(buf))
        if not data:
            raise ControlClientError(f"{cmd}: ferryd at {path} closed the connection unanswered")
        buf += data
    return bytes(buf)
