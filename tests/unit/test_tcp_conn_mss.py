"""The guest's MSS is clamped as Linux clamps it (issue 9 item 3).

A SYN advertising MSS 1 once made ferryd send a peer's data one byte per
frame. Linux raises any MSS below net.ipv4.tcp_min_snd_mss (48) to it;
ferryd does the same, and never cuts segments larger than its link allows.
"""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryd.flows.tcp_conn import (
    DEFAULT_MSS,
    MIN_SND_MSS,
    State,
    TcpConn,
    guest_mss_untrusted,
)
from ferryd.wire.tcp import ACK, SYN, TcpOptions, TcpSegment, _parse_options_untrusted
from tests.unit.tcp_conn_support import RecordingGuest, bare_conn

LINK_MSS = 65480


@pytest.mark.parametrize(
    ("advertised", "used"),
    [(None, DEFAULT_MSS), (0, DEFAULT_MSS), (1, 48), (47, 48), (48, 48), (1460, 1460)],
)
def test_guest_mss(advertised: int | None, used: int) -> None:
    assert guest_mss_untrusted(advertised) == used


def _established(sock: socket.socket, guest: RecordingGuest, options: TcpOptions) -> TcpConn:
    conn = bare_conn(sock, guest, State.CONNECTING, LINK_MSS)
    syn = TcpSegment(40000, 80, 1000, 0, SYN, 65535, options, memoryview(b""))
    conn.start_outbound(syn, 1.0)
    conn.on_connected(1.0)
    ts = None if options.timestamp is None else (1, 0)
    ack = TcpSegment(
        40000,
        80,
        1001,
        (conn.isn + 1) & 0xFFFFFFFF,
        ACK,
        65535,
        TcpOptions(timestamp=ts),
        memoryview(b""),
    )
    conn.on_guest_segment(ack, 1.5)
    return conn


@pytest.mark.parametrize("timestamps", [False, True])
def test_mss_1_gets_48_byte_segments(
    host_pair: tuple[socket.socket, socket.socket], timestamps: bool
) -> None:
    ours, peer = host_pair
    guest = RecordingGuest()
    ts = (5, 0) if timestamps else None
    conn = _established(ours, guest, TcpOptions(mss=1, timestamp=ts))
    peer.sendall(bytes(4800))
    sent = 0
    while sent < 4800:
        sent += conn.push(2.0)
    lengths = [s.length for s in guest.sent if s.length]
    assert sum(lengths) == 4800
    assert max(lengths) == MIN_SND_MSS and len(lengths) == 100


def test_floor_never_exceeds_the_link(host_pair: tuple[socket.socket, socket.socket]) -> None:
    """With a 68-byte MTU (link MSS 28) the link wins over the floor."""
    ours, peer = host_pair
    guest = RecordingGuest()
    conn = _established(ours, guest, TcpOptions(mss=1))
    conn.link_mss = 28
    peer.sendall(bytes(280))
    sent = 0
    while sent < 280:
        sent += conn.push(2.0)
    assert max(s.length for s in guest.sent if s.length) == 28


@given(st.integers(0, 255))
def test_window_scale_above_14_means_14(shift: int) -> None:
    """RFC 7323 §2.3: a shift above 14 is used as 14."""
    options = _parse_options_untrusted(memoryview(bytes((3, 3, shift, 0))))
    assert options.wscale == min(shift, 14)


@given(st.integers(0, 0xFFFF))
def test_any_mss_option_lands_in_range(mss: int) -> None:
    options = _parse_options_untrusted(memoryview(bytes((2, 4)) + mss.to_bytes(2, "big")))
    used = guest_mss_untrusted(options.mss)
    assert MIN_SND_MSS <= used <= 0xFFFF
