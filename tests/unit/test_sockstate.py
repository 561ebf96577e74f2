"""sockstate's pure parts: struct layouts, option and window encodings, FIN arithmetic.

The kernel structs are built by hand here from their C definitions
(include/uapi/linux/tcp.h), so a wrong offset in the module shows up as a
wrong field, not as a silently shifted one. One check uses a real loopback
connection, which needs no privilege (TCP_INFO). The state type itself is
tested in test_kernel_state.py.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections.abc import Iterator
from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryd import linux
from ferryd.migration import sockstate
from ferryd.migration.kernel_state import SUPPORTED_STATES, TcpKernelState, TcpState
from ferryd.migration.repair_client import RepairMode
from ferryd.migration.sockstate import (
    SocketStateError,
    parse_tcp_info,
    repair_options,
    repair_window,
)
from testbed.sockstate_tools import set_repair_direct

BASE = TcpKernelState(
    local_addr=ip_address("10.0.0.1"),
    local_port=40000,
    remote_addr=ip_address("10.0.0.2"),
    remote_port=80,
    tcp_state=TcpState.ESTABLISHED,
    mss=1460,
    snd_wscale=7,
    rcv_wscale=9,
    options=linux.OPT_TIMESTAMPS | linux.OPT_SACK | linux.OPT_WSCALE,
    timestamp=123456,
    snd_wl1=1000,
    snd_wnd=65535,
    max_window=65535,
    rcv_wnd=64000,
    rcv_wup=5000,
    send_seq=2000,
    recv_seq=5000,
    send_queue=b"abcdef",
    unsent=2,
    recv_queue=b"xyz",
)


def test_tcp_info_head_layout() -> None:
    """Byte 0 state, byte 5 options, byte 6 wscales (snd low nibble), then u32s from byte 8."""
    u32s = list(range(100, 124))  # rto, ato, snd_mss, rcv_mss, ...
    raw = bytes([TcpState.CLOSE_WAIT, 0, 0, 0, 0, 7, 0x9E, 0]) + struct.pack("=24I", *u32s)
    assert sockstate.TCP_INFO_HEAD.size == 104
    info = parse_tcp_info(raw + b"\xff" * 100)  # longer structs from newer kernels
    assert info.state == TcpState.CLOSE_WAIT
    assert info.options == 7
    assert (info.snd_wscale, info.rcv_wscale) == (0xE, 0x9)
    assert (info.snd_mss, info.rcv_mss) == (102, 103)


@pytest.fixture
def loopback() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            yield client, server


def test_tcp_info_of_a_real_socket(loopback: tuple[socket.socket, socket.socket]) -> None:
    client, _ = loopback
    info = parse_tcp_info(
        client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, sockstate.TCP_INFO_HEAD.size)
    )
    assert info.state == TcpState.ESTABLISHED
    assert info.options & linux.OPT_SACK  # Linux negotiates SACK, TS, WSCALE by default
    assert info.snd_mss == client.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)


def test_repair_options_in_the_checked_order() -> None:
    pairs = list(struct.iter_unpack("=II", repair_options(BASE)))
    assert pairs == [(2, 1460), (3, 7 | 9 << 16), (4, 0), (8, 0)]


def test_repair_options_only_those_negotiated() -> None:
    state = dataclasses.replace(BASE, options=linux.OPT_SACK)
    assert list(struct.iter_unpack("=II", repair_options(state))) == [(2, 1460), (4, 0)]


def test_repair_window_is_the_dumped_one_also_after_peer_fin() -> None:
    assert struct.unpack("=5I", repair_window(BASE)) == (1000, 65535, 65535, 64000, 5000)
    closing = dataclasses.replace(BASE, tcp_state=TcpState.CLOSE_WAIT)
    # rcv_nxt is restored with the FIN counted (sockstate docstring): nothing to adjust.
    assert struct.unpack("=5I", repair_window(closing)) == (1000, 65535, 65535, 64000, 5000)


@pytest.mark.parametrize(
    ("recv_seq", "snd_wl1", "expected"),
    [
        (5000, 5000 + 64000, 5000 + 64000),  # at the right edge: kept
        (5000, 5000 + 64001, 5000 + 64000),  # past it (a segment dropped for memory): the edge
        (5000, 5000 + 1_571_504, 5000 + 64000),
        (0xFFFFFF00, 0xFFFFFF00 + 64000 - (1 << 32), 0xFFFFFF00 + 64000 - (1 << 32)),  # wraps
        (0xFFFFFF00, 0xFFFFFF00 + 70000 - (1 << 32), 0xFFFFFF00 + 64000 - (1 << 32)),
        (5000, 1000, 1000),  # before rcv_nxt, as usual: kept
    ],
)
def test_repair_window_holds_snd_wl1_inside_the_receive_window(
    recv_seq: int, snd_wl1: int, expected: int
) -> None:
    """tcp_repair_set_window() refuses snd_wl1 after rcv_nxt + rcv_wnd (sockstate.repair_window)."""
    state = dataclasses.replace(BASE, recv_seq=recv_seq, snd_wl1=snd_wl1, rcv_wup=recv_seq)
    assert struct.unpack("=5I", repair_window(state)) == (expected, 65535, 65535, 64000, recv_seq)


@pytest.mark.parametrize(
    ("state", "fin_sent", "fin_acked", "fin_received"),
    [
        (TcpState.ESTABLISHED, False, False, False),
        (TcpState.FIN_WAIT1, True, False, False),
        (TcpState.FIN_WAIT2, True, True, False),
        (TcpState.CLOSE_WAIT, False, False, True),
        (TcpState.LAST_ACK, True, False, True),
        (TcpState.CLOSING, True, False, True),
    ],
)
def test_fin_flags_follow_the_state(
    state: int, fin_sent: bool, fin_acked: bool, fin_received: bool
) -> None:
    s = dataclasses.replace(
        BASE, tcp_state=state, send_queue=b"" if fin_acked else b"abc", unsent=0
    )
    assert (s.fin_sent, s.fin_acked, s.fin_received) == (fin_sent, fin_acked, fin_received)


def _recv_start(s: TcpKernelState) -> int:
    """Sequence number of the dumped ``recv_queue``'s first byte (copied_seq)."""
    return (s.recv_seq - len(s.recv_queue) - int(s.fin_received)) % (1 << 32)


def test_queue_starts_exclude_the_fins() -> None:
    assert BASE.send_start == 2000 - 6
    s = dataclasses.replace(BASE, tcp_state=TcpState.LAST_ACK)
    assert s.send_start == 2000 - 6 - 1


def test_restored_receive_queue_starts_after_the_peers_fin() -> None:
    assert BASE.restored_recv_start == _recv_start(BASE) == 5000 - 3
    for state in (TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING):
        s = dataclasses.replace(BASE, tcp_state=state)
        # rcv_nxt ends up at recv_seq, FIN included: the peer must not see old ACKs.
        assert s.restored_recv_start == _recv_start(s) + 1 == 5000 - 3


@given(
    seq=st.integers(0, 0xFFFFFFFF),
    queue=st.binary(max_size=64),
    state=st.sampled_from(sorted(SUPPORTED_STATES)),
)
def test_queue_starts_wrap_around(seq: int, queue: bytes, state: int) -> None:
    s = dataclasses.replace(
        BASE,
        tcp_state=state,
        send_seq=seq,
        recv_seq=seq,
        send_queue=b"" if state == TcpState.FIN_WAIT2 else queue,
        unsent=0,
        recv_queue=queue,
    )
    assert 0 <= s.send_start <= 0xFFFFFFFF
    assert (s.send_start + len(s.send_queue) + s.fin_sent) % (1 << 32) == seq
    assert (s.restored_recv_start + len(s.recv_queue)) % (1 << 32) == seq


@given(st.integers(0, 0xFFFFFFFF))
def test_signed_round_trips_through_a_c_int(value: int) -> None:
    signed = sockstate._signed(value)
    assert -(1 << 31) <= signed < 1 << 31
    assert struct.unpack("=I", struct.pack("=i", signed))[0] == value


def test_errors_name_the_four_tuple_and_the_step() -> None:
    v6 = dataclasses.replace(
        BASE, local_addr=ip_address("fd00::1"), remote_addr=ip_address("fd00::2")
    )
    error = SocketStateError(v6.describe(), "restore: connect", "Connection refused")
    assert str(error) == "TCP [fd00::1]:40000 -> [fd00::2]:80: restore: connect: Connection refused"


@pytest.mark.parametrize("off", [RepairMode.OFF, RepairMode.OFF_NO_WINDOW_PROBE])
def test_repair_off_clears_address_reuse_and_the_helper_restores_it(
    loopback: tuple[socket.socket, socket.socket], off: RepairMode
) -> None:
    """The kernel quirk reuse_after_repair_off() is for (needs CAP_NET_ADMIN)."""
    _, server = loopback  # accepted from a listener: no SO_REUSEADDR unless inherited
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        set_repair_direct([server], RepairMode.ON)
    except SocketStateError as exc:
        pytest.skip(f"TCP_REPAIR needs CAP_NET_ADMIN: {exc}")
    set_repair_direct([server], off)
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
    sockstate.reuse_after_repair_off([server])
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
