"""TcpKernelState: the one type of a TCP socket's kernel state, its validator, its stream form.

A state is restorable once it exists (kernel_state.py): every hostile value
is refused at construction with KernelStateError, and from the migration
stream with StreamError only. What the source dumps reaches the target
unchanged: state -> flow record -> protobuf bytes -> flow record -> state.
"""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryd.link import Ip4Config, Ip6Config
from ferryd.migration import migration_pb2 as pb
from ferryd.migration.kernel_state import (
    SUPPORTED_STATES,
    KernelStateError,
    TcpKernelState,
    TcpState,
)
from ferryd.migration.records import (
    StreamError,
    StreamHeader,
    TcpFlowRecord,
    flow_from_proto_untrusted,
    flow_to_proto,
    kernel_state_from_proto_untrusted,
)
from ferryd.wire.ip import IpAddress

U32 = 1 << 32

VALID: dict[str, Any] = {
    "local_addr": IPv4Address("10.0.0.1"),
    "local_port": 40000,
    "remote_addr": IPv4Address("10.0.0.2"),
    "remote_port": 80,
    "tcp_state": TcpState.ESTABLISHED,
    "mss": 1460,
    "snd_wscale": 7,
    "rcv_wscale": 9,
    "options": 7,
    "timestamp": 123456,
    "snd_wl1": 1000,
    "snd_wnd": 65535,
    "max_window": 65535,
    "rcv_wnd": 64000,
    "rcv_wup": 5000,
    "send_seq": 2000,
    "recv_seq": 5000,
    "send_queue": b"abcdef",
    "unsent": 2,
    "recv_queue": b"xyz",
}

_U32_FIELDS = (
    "timestamp",
    "snd_wl1",
    "snd_wnd",
    "max_window",
    "rcv_wnd",
    "rcv_wup",
    "send_seq",
    "recv_seq",
)

HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"local_addr": "10.0.0.1"}, "are not IP addresses"),
    ({"remote_addr": b"\n\0\0\2"}, "are not IP addresses"),
    ({"remote_addr": IPv6Address("fd00::2")}, "IPv4 and IPv6 addresses mixed"),
    ({"local_port": 0}, "local port 0 is not a port"),
    ({"remote_port": 65536}, "remote port 65536 is not a port"),
    ({"local_port": -1}, "local port -1 is not a port"),
    ({"tcp_state": 0}, "TCP state 0"),
    ({"tcp_state": 99}, "TCP state 99"),
    ({"tcp_state": TcpState.LISTEN}, "TCP state LISTEN"),
    ({"tcp_state": TcpState.TIME_WAIT}, "TCP state TIME_WAIT"),
    ({"tcp_state": TcpState.SYN_SENT}, "TCP state SYN_SENT"),
    ({"tcp_state": TcpState.CLOSE}, "TCP state CLOSE"),
    ({"mss": 65536}, "MSS 65536"),
    ({"mss": -1}, "MSS -1"),
    ({"snd_wscale": 15}, "snd_wscale 15 is not a window scale (0-14)"),
    ({"rcv_wscale": -1}, "rcv_wscale -1 is not a window scale"),
    ({"options": 256}, "options bits 256"),
    ({"unsent": 7}, "7 unsent bytes in a send queue of 6"),
    ({"unsent": -1}, "-1 unsent bytes"),
    ({"tcp_state": TcpState.FIN_WAIT2}, "FIN_WAIT2 with data in the send queue"),
    *[({name: U32}, f"{name} {U32} is not a 32-bit unsigned value") for name in _U32_FIELDS],
    *[({name: -1}, f"{name} -1 is not a 32-bit unsigned value") for name in _U32_FIELDS],
]


@pytest.mark.parametrize(("change", "complaint"), HOSTILE)
def test_hostile_values_are_refused_with_the_declared_error(
    change: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(KernelStateError) as caught:
        TcpKernelState(**(VALID | change))
    message = str(caught.value)
    assert complaint in message
    assert message.startswith(f"TCP {VALID['local_addr']}:") or "not IP addresses" in complaint


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(KernelStateError) as caught:
        TcpKernelState(**(VALID | {"local_port": 0, "mss": 1 << 20, "unsent": 9}))
    message = str(caught.value)
    assert "local port 0" in message and "MSS 1048576" in message and "9 unsent" in message


def test_the_error_is_a_value_error() -> None:
    """The records' decoders turn ValueError into StreamError: this one included."""
    assert issubclass(KernelStateError, ValueError)


def test_replace_validates_too() -> None:
    state = TcpKernelState(**VALID)
    with pytest.raises(KernelStateError, match="FIN_WAIT2"):
        dataclasses.replace(state, tcp_state=TcpState.FIN_WAIT2)


@pytest.mark.parametrize(
    ("local", "remote", "family", "described"),
    [
        ("10.0.0.1", "10.0.0.2", 4, "TCP 10.0.0.1:40000 -> 10.0.0.2:80"),
        ("fd00::1", "fd00::2", 6, "TCP [fd00::1]:40000 -> [fd00::2]:80"),
        # An IPv6 socket talking to an IPv4 peer: getsockname() gives mapped addresses.
        ("::ffff:10.0.0.1", "::ffff:10.0.0.2", 6, "TCP [::ffff:a00:1]:40000 -> [::ffff:a00:2]:80"),
    ],
)
def test_family_is_that_of_the_addresses(
    local: str, remote: str, family: int, described: str
) -> None:
    state = TcpKernelState(
        **(VALID | {"local_addr": ip_address(local), "remote_addr": ip_address(remote)})
    )
    assert state.family == family
    assert state.describe() == described


# --------------------------------------------------------------------------- the stream


def test_the_schema_and_the_type_name_the_same_fields() -> None:
    """Every TcpSocket field is a state field, or one of the documented compactions of one."""
    compacted = {
        "wscales": {"snd_wscale", "rcv_wscale"},
        "rcv_wup_delta": {"rcv_wup"},
        "snd_wl1_delta": {"snd_wl1"},
        "max_window_delta": {"max_window"},
    }
    wire = {f.name for f in pb.TcpSocket.DESCRIPTOR.fields}
    state = {f.name for f in dataclasses.fields(TcpKernelState)}
    assert wire - compacted.keys() | set().union(*compacted.values()) == state


u32 = st.integers(0, U32 - 1)
ports = st.integers(1, 65535)


@st.composite
def addresses(draw: st.DrawFn, version: int) -> IpAddress:
    if version == 4:
        return IPv4Address(draw(st.integers(0, (1 << 32) - 1)))
    return IPv6Address(draw(st.integers(0, (1 << 128) - 1)))


@st.composite
def states(draw: st.DrawFn) -> TcpKernelState:
    version = draw(st.sampled_from([4, 6]))
    tcp_state = draw(st.sampled_from(sorted(SUPPORTED_STATES)))
    send_queue = b"" if tcp_state == TcpState.FIN_WAIT2 else draw(st.binary(max_size=64))
    return TcpKernelState(
        local_addr=draw(addresses(version)),
        local_port=draw(ports),
        remote_addr=draw(addresses(version)),
        remote_port=draw(ports),
        tcp_state=tcp_state,
        mss=draw(st.integers(0, 65535)),
        snd_wscale=draw(st.integers(0, 14)),
        rcv_wscale=draw(st.integers(0, 14)),
        options=draw(st.integers(0, 255)),
        **{name: draw(u32) for name in _U32_FIELDS},
        send_queue=send_queue,
        unsent=draw(st.integers(0, len(send_queue))),
        recv_queue=draw(st.binary(max_size=64)),
    )


HEADER = StreamHeader(
    ferry_mac=b"\x02\0\0\0\0\x01",
    mtu=1500,
    ipv4=Ip4Config(IPv4Address("10.0.0.1"), 24, IPv4Address("10.0.0.254"), ()),
    ipv6=Ip6Config(IPv6Address("fd00::1"), 64, IPv6Address("fd00::fe"), ()),
)


def _flow(state: TcpKernelState, *, as_guest_sees_it: bool) -> TcpFlowRecord:
    """A flow around ``state``: its guest side the socket's own (the usual case) or not."""
    if as_guest_sees_it:
        guest, remote, port = state.local_addr, state.remote_addr, state.remote_port
    else:
        config = HEADER.ipv4 if state.family == 4 else HEADER.ipv6
        assert config is not None
        guest = config.address
        remote, port = guest, 1 + state.remote_port % 65535
    return TcpFlowRecord(
        guest_addr=guest,
        guest_port=state.local_port,
        remote_addr=remote,
        remote_port=port,
        kernel=state,
        seq_to_guest=1,
        seq_ack_from_guest=1,
        seq_from_guest=2,
        seq_ack_to_guest=2,
        guest_window=1000,
        guest_wscale=7,
        guest_mss=1460,
        our_wscale=8,
        flags=0,
        state=1,
    )


@given(state=states(), as_guest_sees_it=st.booleans())
def test_round_trip_state_record_protobuf_record_state(
    state: TcpKernelState, as_guest_sees_it: bool
) -> None:
    record = _flow(state, as_guest_sees_it=as_guest_sees_it)
    wire = flow_to_proto(record, HEADER).SerializeToString()
    back = flow_from_proto_untrusted(pb.TcpFlow.FromString(wire), HEADER)
    assert isinstance(back, TcpFlowRecord)
    assert back == record
    assert back.kernel == state


@pytest.mark.parametrize(
    ("socket", "complaint"),
    [
        (pb.TcpSocket(local_port=1, tcp_state=TcpState.LISTEN), "TCP state LISTEN"),
        (pb.TcpSocket(local_port=1, tcp_state=TcpState.FIN_WAIT2, send_queue=b"x"), "FIN_WAIT2"),
        (pb.TcpSocket(local_port=0), "local port 0"),
        (pb.TcpSocket(local_port=1, wscales=0x1FF), "do not fit a byte"),
        (pb.TcpSocket(local_port=1, local_addr=b"\0" * 5), "local address of 5 bytes"),
        (pb.TcpSocket(local_port=1, remote_addr=bytes(16)), "IPv4 and IPv6 addresses mixed"),
        (pb.TcpSocket(local_port=1, remote_port=70000), "remote port 70000"),
        (pb.TcpSocket(local_port=1, mss=1 << 20), "MSS 1048576"),
    ],
)
def test_hostile_stream_values_raise_stream_error_only(
    socket: pb.TcpSocket, complaint: str
) -> None:
    with pytest.raises(StreamError, match="invalid socket state: ") as caught:
        kernel_state_from_proto_untrusted(
            socket, IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), 80
        )
    assert complaint in str(caught.value)


@given(
    fields=st.fixed_dictionaries(
        {
            "local_addr": st.binary(max_size=17),
            "local_port": u32,
            "remote_addr": st.binary(max_size=17),
            "remote_port": u32,
            "tcp_state": u32,
            "mss": u32,
            "wscales": u32,
            "options": u32,
            "timestamp": u32,
            "send_seq": u32,
            "recv_seq": u32,
            "snd_wnd": u32,
            "rcv_wnd": u32,
            "rcv_wup_delta": u32,
            "snd_wl1_delta": u32,
            "max_window_delta": u32,
            "send_queue": st.binary(max_size=8),
            "unsent": u32,
            "recv_queue": st.binary(max_size=8),
        }
    )
)
def test_any_socket_message_gives_a_state_or_stream_error(fields: dict[str, Any]) -> None:
    try:
        state = kernel_state_from_proto_untrusted(
            pb.TcpSocket(**fields), IPv6Address("fd00::1"), IPv6Address("fd00::2"), 443
        )
    except StreamError:
        return
    assert state.tcp_state in SUPPORTED_STATES or fields["tcp_state"] == 0
    assert 0 <= state.unsent <= len(state.send_queue)
