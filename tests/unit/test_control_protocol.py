"""The control protocol's wire format (ferryd.control.protocol): bytes in, objects or one error out.

Pure: no socket. Every hostile frame a client or a daemon can send
(truncated, oversized, not JSON, too many descriptors) must end in
ControlProtocolError and nothing else.
"""

from __future__ import annotations

import array
import contextlib
import json
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryd.control.protocol import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_REQUEST,
    MAX_RESPONSE,
    ControlProtocolError,
    check_descriptors_untrusted,
    encode_frame,
    encode_request,
    error_response,
    fds_from_ancdata,
    ok_response,
    parse_length_untrusted,
    parse_request_untrusted,
    parse_response_untrusted,
)


def test_encode_frame_roundtrip() -> None:
    data = encode_frame({"cmd": "status", "x": "é"})
    length = parse_length_untrusted(data[:4], MAX_REQUEST)
    assert length == len(data) - 4
    assert parse_request_untrusted(data[4:]) == {"cmd": "status", "x": "é"}


def test_wire_bytes_are_exact() -> None:
    """The format ferryctl and every ferryd share: compact JSON, UTF-8, big-endian length."""
    assert encode_request("migrate-in", {"precopy": True}) == (
        b'\x00\x00\x00\x23{"cmd":"migrate-in","precopy":true}'
    )
    assert ok_response({"ready": True}) == b'\x00\x00\x00\x18{"ready":true,"ok":true}'
    assert error_response("nö") == b'\x00\x00\x00\x1a{"ok":false,"error":"n\xc3\xb6"}'


def test_ok_response_cannot_be_overridden_by_the_result() -> None:
    assert json.loads(ok_response({"ok": False})[HEADER_SIZE:]) == {"ok": True}


@pytest.mark.parametrize("args", [{"cmd": "x"}, {"v": object()}, {"v": float("nan")}])
def test_encode_request_refuses_what_cannot_be_sent(args: dict[str, object]) -> None:
    with pytest.raises(TypeError):
        encode_request("status", args)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"\x00\x00\x00\x00", "empty frame"),
        (struct.pack(">I", MAX_REQUEST + 1), "exceeds the limit"),
        (b"\xff\xff\xff\xff", "exceeds the limit"),
        (b"\x00\x01", "expected 4"),  # truncated header
        (b"", "expected 4"),
        (b"\x00\x00\x00\x01\x00", "expected 4"),
    ],
)
def test_parse_length_untrusted_rejects(header: bytes, message: str) -> None:
    with pytest.raises(ControlProtocolError, match=message):
        parse_length_untrusted(header, MAX_REQUEST)


def test_a_response_may_be_larger_than_a_request() -> None:
    header = struct.pack(">I", MAX_REQUEST + 1)
    assert parse_length_untrusted(header, MAX_RESPONSE) == MAX_REQUEST + 1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe", "not valid UTF-8"),
        (b"{", "not valid JSON"),  # a truncated payload
        (b'{"cmd": "status"', "not valid JSON"),
        (b'{"cmd": NaN}', "not valid JSON"),
        (b'{"cmd": "x", "n": Infinity}', "not valid JSON"),
        (b"1" * 5000, "not valid JSON"),  # beyond int's max string digits
        (b"[" * 60000, "nested too deeply"),
        (b"[]", "JSON list, expected an object"),
        (b"{}", 'no "cmd"'),
        (b'{"cmd": 3}', 'no "cmd"'),
        (b'{"cmd": ""}', 'no "cmd"'),
    ],
)
def test_parse_request_untrusted_rejects(payload: bytes, message: str) -> None:
    with pytest.raises(ControlProtocolError, match=message):
        parse_request_untrusted(payload)


@pytest.mark.parametrize(
    "payload", [b'{"ok": 1}', b'{"ok": false}', b'{"ok": false, "error": 3}', b'"ok"', b"\x80"]
)
def test_parse_response_untrusted_rejects(payload: bytes) -> None:
    with pytest.raises(ControlProtocolError):
        parse_response_untrusted(payload)


@given(st.binary(max_size=64))
def test_request_parser_lets_only_its_error_escape(payload: bytes) -> None:
    with contextlib.suppress(ControlProtocolError):
        parse_request_untrusted(payload)


@given(st.binary(max_size=64))
def test_response_parser_lets_only_its_error_escape(payload: bytes) -> None:
    with contextlib.suppress(ControlProtocolError):
        parse_response_untrusted(payload)


def test_descriptors_up_to_the_kernel_limit_are_accepted() -> None:
    check_descriptors_untrusted("migrate-in", MAX_FDS, truncated=False)


@pytest.mark.parametrize(("count", "truncated"), [(MAX_FDS + 1, False), (1, True), (0, True)])
def test_too_many_descriptors_are_refused(count: int, truncated: bool) -> None:
    with pytest.raises(ControlProtocolError, match=r"migrate-in: too many file descriptors"):
        check_descriptors_untrusted("migrate-in", count, truncated)


def test_fds_from_ancdata_collects_every_rights_message_only() -> None:
    rights = array.array("i", [7, 8]).tobytes()
    fds: list[int] = [3]
    fds_from_ancdata(
        [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, rights),
            (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, b"\x01" * 12),
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [9]).tobytes() + b"\x00"),
        ],
        fds,
    )
    assert fds == [3, 7, 8, 9]
