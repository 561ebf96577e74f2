"""vhost-user's wire format: every payload ferryd handles, and everything it refuses."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryd.frontends.vhost_user.errors import VhostUserProtocolError
from ferryd.frontends.vhost_user.messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    MAX_REGIONS,
    VERSION,
    DeviceStateFd,
    LogArea,
    MemoryRegion,
    MemoryTable,
    Message,
    Request,
    TransferDirection,
    TransferPhase,
    VringAddress,
    VringFile,
    VringState,
    build_request,
    pack_device_state,
    pack_log_area,
    pack_memory_table,
    pack_u64,
    pack_vring_address,
    pack_vring_file,
    pack_vring_state,
    parse_message_untrusted,
    parse_reply,
    payload_size_untrusted,
    reply_u64,
    reply_vring_state,
)

REGION = MemoryRegion(0x1000, 0x10000, 0x7F00_0000_0000, 0x2000)


def test_header_layout_is_three_native_u32() -> None:
    data = build_request(Request.SET_FEATURES, pack_u64(1 << 32), need_reply=True)
    assert data == struct.pack("=III", 2, VERSION | FLAG_NEED_REPLY, 8) + struct.pack("=Q", 1 << 32)
    assert payload_size_untrusted(data[:HEADER_SIZE]) == 8


@pytest.mark.parametrize(
    ("request_", "payload", "fds", "expected"),
    [
        (Request.GET_FEATURES, b"", (), None),
        (Request.SET_FEATURES, pack_u64(0x1_4000_8000), (), 0x1_4000_8000),
        (Request.SET_VRING_NUM, pack_vring_state(1, 256), (), VringState(1, 256)),
        (
            Request.SET_VRING_ADDR,
            pack_vring_address(VringAddress(0, 1, 0x10, 0x20, 0x30, 0x40)),
            (),
            VringAddress(0, 1, 0x10, 0x20, 0x30, 0x40),
        ),
        (Request.SET_VRING_KICK, pack_vring_file(1, True), (7,), VringFile(1, 7)),
        (Request.SET_VRING_CALL, pack_vring_file(0, False), (), VringFile(0, None)),
        (
            Request.SET_MEM_TABLE,
            pack_memory_table([REGION, REGION]),
            (8, 9),
            MemoryTable((REGION, REGION), (8, 9)),
        ),
        (Request.SET_LOG_BASE, pack_log_area(4096, 64), (5,), LogArea(4096, 64, 5)),
        (Request.SET_LOG_FD, b"", (5,), None),
        (
            Request.SET_DEVICE_STATE_FD,
            pack_device_state(1, 0),
            (6,),
            DeviceStateFd(TransferDirection.LOAD, TransferPhase.STOPPED, 6),
        ),
        (Request.CHECK_DEVICE_STATE, b"", (), None),
    ],
)
def test_each_payload_parses(
    request_: Request, payload: bytes, fds: tuple[int, ...], expected: object
) -> None:
    message = parse_message_untrusted(build_request(request_, payload), fds)
    assert message == Message(request_, False, expected, fds)  # type: ignore[arg-type]


def test_memory_table_of_eight_regions_is_the_largest_payload() -> None:
    payload = pack_memory_table([REGION] * MAX_REGIONS)
    assert len(payload) == MAX_PAYLOAD_SIZE
    message = parse_message_untrusted(build_request(Request.SET_MEM_TABLE, payload), range(8))
    assert isinstance(message.payload, MemoryTable)
    assert len(message.payload.regions) == MAX_REGIONS


@pytest.mark.parametrize(
    ("data", "fds", "says"),
    [
        (b"\x01\x00\x00\x00", (), "truncated message header"),
        (build_request(Request.GET_FEATURES, flags=2), (), "protocol version 2"),
        (build_request(Request.GET_FEATURES, flags=0), (), "protocol version 0"),
        (build_request(Request.GET_FEATURES, flags=VERSION | FLAG_REPLY), (), "reply flag"),
        (build_request(99), (), "unknown or unsupported vhost-user request 99"),
        (build_request(0), (), "request 0"),
        (build_request(Request.SET_VRING_ENABLE, bytes(MAX_PAYLOAD_SIZE + 1)), (), "at most"),
        (build_request(Request.SET_FEATURES, bytes(4)), (), "expected 8"),
        (build_request(Request.SET_FEATURES, pack_u64(1))[:-1], (), "8 payload bytes, 7 came"),
        (build_request(Request.SET_FEATURES, pack_u64(1)) + b"x", (), "8 payload bytes, 9 came"),
        (build_request(Request.SET_FEATURES, pack_u64(1)), (3,), "1 file descriptors"),
        (build_request(Request.SET_VRING_KICK, pack_vring_file(0, True)), (), "0 file descr"),
        (build_request(Request.SET_VRING_KICK, pack_vring_file(0, False)), (3,), "expected 0"),
        (build_request(Request.SET_VRING_KICK, pack_u64(0x200)), (3,), "reserved bits"),
        (build_request(Request.SET_MEM_TABLE, pack_memory_table([])), (), "0 regions"),
        (
            build_request(Request.SET_MEM_TABLE, struct.pack("=II", 9, 0) + bytes(9 * 32)),
            range(9),
            "at most",
        ),
        (
            build_request(Request.SET_MEM_TABLE, pack_memory_table([REGION])[:-8]),
            (3,),
            "expected 40",
        ),
        (build_request(Request.SET_MEM_TABLE, pack_memory_table([REGION] * 2)), (3,), "expected 2"),
        (build_request(Request.SET_LOG_BASE, pack_log_area(1, 0)), (), "expected 1"),
        (build_request(Request.SET_DEVICE_STATE_FD, pack_device_state(2, 0)), (4,), "direction"),
        (build_request(Request.SET_DEVICE_STATE_FD, pack_device_state(0, 1)), (4,), "phase 1"),
    ],
)
def test_hostile_messages_are_refused_with_one_error(
    data: bytes, fds: tuple[int, ...], says: str
) -> None:
    with pytest.raises(VhostUserProtocolError, match=says):
        parse_message_untrusted(data, fds)


def test_oversized_payload_is_refused_from_the_header_alone() -> None:
    header = struct.pack("=III", Request.SET_MEM_TABLE, VERSION, 1 << 31)
    with pytest.raises(VhostUserProtocolError, match="at most 264"):
        payload_size_untrusted(header)


def test_replies_have_exactly_version_and_reply_flags() -> None:
    """QEMU's vhost_user_read_header() refuses a reply whose flags are anything else."""
    assert parse_reply(reply_u64(Request.GET_FEATURES, 5)) == (1, 0x5, struct.pack("=Q", 5))
    assert parse_reply(reply_vring_state(Request.GET_VRING_BASE, 1, 77)) == (
        11,
        0x5,
        struct.pack("=II", 1, 77),
    )


@given(st.binary(max_size=400), st.integers(min_value=0, max_value=10))
def test_any_bytes_give_a_message_or_the_declared_error(data: bytes, nfds: int) -> None:
    try:
        message = parse_message_untrusted(data, tuple(range(100, 100 + nfds)))
    except VhostUserProtocolError:
        return
    assert isinstance(message, Message)
    assert len(data) == HEADER_SIZE + struct.unpack_from("=I", data, 8)[0]


@given(
    st.sampled_from(list(Request)),
    st.integers(min_value=0, max_value=0xF),
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=9),
)
def test_any_payload_for_a_known_request_parses_or_is_refused(
    request_: Request, flags: int, payload: bytes, nfds: int
) -> None:
    data = build_request(request_, payload, flags=flags)
    try:
        message = parse_message_untrusted(data, tuple(range(nfds)))
    except VhostUserProtocolError:
        return
    assert message.request is request_
    assert flags & 0x7 == VERSION
    assert message.need_reply == bool(flags & FLAG_NEED_REPLY)
    assert message.fds == tuple(range(nfds))
