"""The control socket's client: one request, one answer, blocking.

ferryctl, the migration coordinator (ferryd/coordinator.py) and tests ask
a ferryd through :func:`request`: connect, send one frame (with descriptors
if any), read one response, close. It is a plain blocking socket with one
deadline for the whole exchange, so a daemon that trickles its answer a
byte at a time cannot hold the caller past ``timeout``. Trio code calls it
through ``trio.to_thread.run_sync``.

Every failure is a :class:`ControlClientError` (or a subclass:
:class:`DaemonNotRunning`, :class:`ControlRequestFailed`) with a one-line
message fit for a terminal, saying whether nobody listens, the daemon
refused, or its answer was broken (protocol.py's parsers decide that).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ferryd.control.protocol import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_REQUEST,
    MAX_RESPONSE,
    ControlProtocolError,
    encode_request,
    parse_length_untrusted,
    parse_response_untrusted,
)

__all__ = ["ControlClientError", "ControlRequestFailed", "DaemonNotRunning", "request"]


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
    frame = encode_request(cmd, args)
    if len(frame) - HEADER_SIZE > MAX_REQUEST:
        raise ControlClientError(f"{cmd}: request exceeds {MAX_REQUEST} bytes")
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
            header = _recv_exact(sock, HEADER_SIZE, cmd, path, deadline)
            try:
                length = parse_length_untrusted(header, MAX_RESPONSE)
            except ControlProtocolError as exc:
                raise ControlClientError(f"{cmd}: bad response from {path}: {exc}") from None
            payload = _recv_exact(sock, length, cmd, path, deadline)
        except TimeoutError:
            raise ControlClientError(
                f"{cmd}: no answer from ferryd at {path} within {timeout:g} s"
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            raise ControlClientError(
                f"{cmd}: ferryd at {path} closed the connection unanswered"
            ) from None
    try:
        response = parse_response_untrusted(payload)
    except ControlProtocolError as exc:
        raise ControlClientError(f"{cmd}: bad response from {path}: {exc}") from None
    if not response["ok"]:
        raise ControlRequestFailed(cmd, response["error"])
    return response


def _recv_exact(sock: socket.socket, size: int, cmd: str, path: str, deadline: float) -> bytes:
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


def _left(deadline: float) -> float:
    """Seconds until ``deadline`` (time.monotonic()); TimeoutError once it passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _connect_error(path: str, exc: OSError) -> ControlClientError:
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return DaemonNotRunning(f"ferryd is not running (no one listens on {path})")
    if isinstance(exc, PermissionError):
        return ControlClientError(
            f"permission denied on control socket {path} (it is mode 0600: run as its owner)"
        )
    return ControlClientError(f"cannot connect to control socket {path}: {exc.strerror or exc}")
