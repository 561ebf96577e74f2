"""The helper's parser of client messages, on real descriptors.

The descriptors handed to the parser are real (pipes), because what matters
besides the verdict is that the parser closes none of them, even on refusal:
the server hands them all to the closer thread (closer.py), since a close()
may block.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry_repair.protocol import (
    SCM_MAX_FD,
    RepairCommand,
    Request,
    RequestRefused,
    close_fds,
    fds_in,
    parse_request_untrusted,
)


@pytest.fixture
def pipe_fds() -> Iterator[list[int]]:
    """Descriptors the test may hand over; whatever the parser leaves open is closed after."""
    opened: list[int] = []
    yield opened
    close_fds(opened)


def make_fds(opened: list[int], n: int) -> list[int]:
    fds: list[int] = []
    for _ in range(n // 2 + 1):
        fds.extend(os.pipe())
    opened.extend(fds)
    close_fds(fds[n:])
    return fds[:n]


def rights(fds: list[int]) -> tuple[int, int, bytes]:
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


@pytest.mark.parametrize("command", [c for c in RepairCommand if c.takes_descriptors])
def test_valid_request(pipe_fds: list[int], command: RepairCommand) -> None:
    fds = make_fds(pipe_fds, 5)
    request = parse_request_untrusted(command.to_byte(), [rights(fds)], 0)
    assert request == Request(command, tuple(fds))
    assert all(is_open(fd) for fd in fds)  # the caller's to close


def test_the_armed_commands_take_no_descriptor_and_freeze_carries_its_count() -> None:
    freeze = RepairCommand.FREEZE_ARMED.to_byte() + (1000).to_bytes(4, "little")
    assert parse_request_untrusted(freeze, [], 0) == Request(RepairCommand.FREEZE_ARMED, (), 1000)
    disarm = RepairCommand.DISARM.to_byte()
    assert parse_request_untrusted(disarm, [], 0) == Request(RepairCommand.DISARM, ())


@pytest.mark.parametrize(
    ("data", "with_fds", "why"),
    [
        (RepairCommand.FREEZE_ARMED.to_byte(), False, "expected 5"),
        (RepairCommand.FREEZE_ARMED.to_byte() + bytes(5), False, "expected 5"),
        (RepairCommand.DISARM.to_byte() + bytes(4), False, "expected 1"),
        (RepairCommand.DISARM.to_byte(), True, "which takes none"),
        (RepairCommand.FREEZE_ARMED.to_byte() + bytes(4), True, "which takes none"),
        (RepairCommand.ARM.to_byte(), False, "no descriptors"),
        (RepairCommand.ARM.to_byte() + bytes(4), True, "expected 1"),
    ],
)
def test_malformed_armed_commands_are_refused(
    pipe_fds: list[int], data: bytes, with_fds: bool, why: str
) -> None:
    ancdata = [rights(make_fds(pipe_fds, 2))] if with_fds else []
    with pytest.raises(RequestRefused, match=why):
        parse_request_untrusted(data, ancdata, 0)


def test_command_bytes_are_signed() -> None:
    assert RepairCommand.OFF_NO_WINDOW_PROBE.to_byte() == b"\xff"
    assert RepairCommand.ON.to_byte() == b"\x01"
    assert RepairCommand.OFF.to_byte() == b"\x00"


def test_full_batch(pipe_fds: list[int]) -> None:
    fds = make_fds(pipe_fds, SCM_MAX_FD)
    assert parse_request_untrusted(b"\x01", [rights(fds)], 0).fds == tuple(fds)


def refused(data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int, why: str) -> None:
    with pytest.raises(RequestRefused, match=why):
        parse_request_untrusted(data, ancdata, flags)


def test_too_many_descriptors_in_two_control_messages(pipe_fds: list[int]) -> None:
    fds = make_fds(pipe_fds, SCM_MAX_FD + 1)
    refused(b"\x01", [rights(fds[:200]), rights(fds[200:])], 0, "254 descriptors")
    assert all(is_open(fd) for fd in fds)  # the caller's to close


def test_truncated_control_data(pipe_fds: list[int]) -> None:
    fds = make_fds(pipe_fds, 3)
    data = rights(fds)
    # The kernel cut the control message inside the third int.
    cut = (data[0], data[1], data[2][:10])
    refused(b"\x01", [cut], socket.MSG_CTRUNC, "MSG_CTRUNC")
    assert fds_in([cut]) == fds[:2]  # only whole ints were installed: the caller closes those


@pytest.mark.parametrize("data", [b"", b"\x01\x01", b"\x01" * 64])
def test_wrong_length(pipe_fds: list[int], data: bytes) -> None:
    fds = make_fds(pipe_fds, 2)
    refused(data, [rights(fds)], 0, f"message of {len(data)} bytes")
    assert all(is_open(fd) for fd in fds)


def test_no_descriptors() -> None:
    refused(b"\x01", [], 0, "no descriptors")


def test_other_control_message(pipe_fds: list[int]) -> None:
    fds = make_fds(pipe_fds, 2)
    creds = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, bytes(12))
    refused(b"\x01", [rights(fds), creds], 0, "unexpected control message")
    assert all(is_open(fd) for fd in fds)


@given(st.integers(-128, 127).filter(lambda v: v not in {int(c) for c in RepairCommand}))
def test_unknown_commands(value: int) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(RequestRefused, match=f"unknown command {value}"):
            parse_request_untrusted(
                value.to_bytes(1, "little", signed=True), [rights([read_end])], 0
            )
        assert is_open(read_end)
    finally:
        close_fds([read_end, write_end])


@given(
    st.binary(max_size=6),
    st.lists(st.tuples(st.sampled_from([0, 1, 6]), st.integers(0, 3), st.binary(max_size=24))),
    st.sampled_from([0, socket.MSG_CTRUNC]),
)
def test_never_raises_anything_else(
    data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int
) -> None:
    # No real descriptors here: SCM_RIGHTS (level 1, type 1) payloads become
    # all -1 (the parser closes nothing anyway).
    ancdata = [
        (level, kind, b"\xff" * len(payload) if (level, kind) == (1, 1) else payload)
        for level, kind, payload in ancdata
    ]
    try:
        request = parse_request_untrusted(data, ancdata, flags)
    except RequestRefused:
        return
    if request.command.takes_descriptors:
        assert 1 <= len(request.fds) <= SCM_MAX_FD
    else:
        assert not request.fds
