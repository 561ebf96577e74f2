"""The control protocol's wire format, sans-IO: frames, requests, responses.

ferryctl (and tests, and later libvirt hooks) talk to ferryd over a Unix
stream socket (server.py serves it, client.py asks). This module is the
contract between them: it owns no socket and reads no clock, so every
hostile input can be tested as bytes.

Framing
~~~~~~~
Both directions use the same frame::

    +----------------------+---------------------------------+
    | length: 4 bytes, BE  | payload: `length` bytes, UTF-8  |
    +----------------------+---------------------------------+

The payload is one JSON object (compact, UTF-8, no NaN). A request is
``{"cmd": "<name>", ...args}``; a response is ``{"ok": true, ...result}``
or ``{"ok": false, "error": "<message for a human>"}``. A request payload
may be at most :data:`MAX_REQUEST` bytes (64 KiB) and must not be empty;
responses may be larger (:data:`MAX_RESPONSE`), since a flow table with
thousands of entries is legitimately big while a request never is.

A connection carries any number of request/response pairs, strictly in turn
(the client waits for each response); most clients send one and close.

File descriptors
~~~~~~~~~~~~~~~~
A request may carry up to :data:`MAX_FDS` file descriptors (the kernel's
SCM_MAX_FD) in one SCM_RIGHTS control message attached to the bytes of its
frame. ``ferryctl migrate`` hands a pipe's write end to the source daemon
and its read end to the target this way, the same shape as vhost-user's
``SET_DEVICE_STATE_FD``. The Linux stream-socket code delivers a message's
descriptors with its first byte, never merged with another sender's
message; a receiver that reads a frame with exactly-sized reads therefore
knows every descriptor it got belongs to that frame. If the kernel had to
drop some (a too small control buffer, or EMFILE) it sets MSG_CTRUNC: such
a request cannot be carried out faithfully and is refused
(:func:`check_descriptors_untrusted`).

Errors
~~~~~~
Whose fault:

* :class:`ControlProtocolError`: the other side sent a malformed frame
  (bad length, not UTF-8, not JSON, not an object, no ``cmd``/``ok``, too
  many descriptors). Every ``*_untrusted`` function here raises it and
  nothing else.
* :class:`ControlError`: a well-formed request that cannot be done; raised
  by a command handler (and by code it calls), sent verbatim as the
  response's ``error``.
"""

from __future__ import annotations

import array
import json
import socket
import struct
from collections.abc import Mapping
from typing import Any

from ferry_repair.protocol import SCM_MAX_FD

__all__ = [
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_REQUEST",
    "MAX_RESPONSE",
    "ControlError",
    "ControlProtocolError",
    "check_descriptors_untrusted",
    "encode_frame",
    "encode_request",
    "error_response",
    "fds_from_ancdata",
    "ok_response",
    "parse_length_untrusted",
    "parse_request_untrusted",
    "parse_response_untrusted",
]

#: Largest request payload the server accepts. Requests are small commands;
#: anything bigger is a confused or hostile client.
MAX_REQUEST = 64 * 1024
#: Largest response payload a client accepts (a flow table can be large).
MAX_RESPONSE = 64 * 1024 * 1024
#: Most descriptors one request may carry (the kernel's SCM_MAX_FD).
MAX_FDS = SCM_MAX_FD

_HEADER = struct.Struct(">I")
#: Bytes of a frame's length header.
HEADER_SIZE = _HEADER.size


class ControlError(Exception):
    """Raised by a handler: the request cannot be done; the message is for the user.

    The message is sent verbatim as the response's ``error``, so it should
    say what was wrong with the request or the daemon's state, in one line.
    """


class ControlProtocolError(Exception):
    """A frame received from the other side is malformed (the sender's fault)."""


# ---------------------------------------------------------------------------
# Encoding


def encode_frame(obj: Mapping[str, Any]) -> bytes:
    """Encode one frame: 4-byte big-endian length, then compact UTF-8 JSON.

    Raises TypeError or ValueError if *obj* is not JSON-encodable (NaN
    included): the caller's bug, never the peer's.
    """
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    data = payload.encode("utf-8")
    return _HEADER.pack(len(data)) + data


def encode_request(cmd: str, args: Mapping[str, Any]) -> bytes:
    """The frame of request *cmd* with *args*; TypeError if they cannot be sent.

    The caller checks the size against :data:`MAX_REQUEST` (the frame minus
    :data:`HEADER_SIZE`), since only it knows how to report that.
    """
    if "cmd" in args:
        raise TypeError("request arguments must not contain 'cmd'")
    try:
        return encode_frame({"cmd": cmd, **args})
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{cmd}: request arguments are not JSON-encodable: {exc}") from None


def ok_response(result: Mapping[str, Any]) -> bytes:
    """The frame of a successful response carrying *result*'s fields.

    Raises TypeError or ValueError if *result* is not JSON-encodable (the
    handler's bug). ``ok`` comes last, so a result cannot override it.
    """
    return encode_frame({**result, "ok": True})


def error_response(message: str) -> bytes:
    """The frame of a failed response: ``ok: false`` and *message* for a human."""
    return encode_frame({"ok": False, "error": message})


# ---------------------------------------------------------------------------
# Decoding (untrusted)


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


def check_descriptors_untrusted(cmd: str, count: int, truncated: bool) -> None:
    """Refuse a request whose descriptors cannot all be honoured.

    *count* is how many arrived with its frame, *truncated* whether the
    kernel dropped some (MSG_CTRUNC). Raises ControlProtocolError (and
    nothing else).
    """
    if truncated or count > MAX_FDS:
        raise ControlProtocolError(f"{cmd}: too many file descriptors (at most {MAX_FDS})")


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]], into: list[int]) -> None:
    """Append the descriptors of every SCM_RIGHTS message to *into*.

    Any other control message is ignored (there is none we ask for). A
    trailing partial int (never made by the kernel) is ignored too: every
    descriptor the kernel installed is collected, so the caller can close it.
    """
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            usable = len(data) - len(data) % fds.itemsize
            fds.frombytes(data[:usable])
            into.extend(fds)
