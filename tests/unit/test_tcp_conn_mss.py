"""The guest's MSS is clamped as Linux clamps it (issue 9 item 3).

A SYN advertising MSS 1 once made ferryd send a peer's data one byte per
frame. Linux raises any MSS below net.ipv4.tcp_min_snd_mss (48) to it;
ferryd does the same, and never cuts segments larger than its link allows.
The host socket is the in-memory kernel of tests/unit/tcp_memory.py.
"""

from __future__ import annotations

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
from ferryd.flows.tcp_seq import seq_add
from ferryd.wire.tcp import ACK, SYN, TcpOptions, TcpSegment, _parse_options_untrusted
from tests.unit.tcp_memory import GUEST_PORT, REMOTE_PORT, MemoryHost, WireGuest, new_conn

LINK_MSS = 65480


@pytest.mark.parametrize(
    ("advertised", "used"),
    [(None, DEFAULT_MSS), (0, DEFAULT_MSS), (1, 48), (47, 48), (48, 48), (1460, 1460)],
)
def test_guest_mss(advertised: int | None, used: int) -> None:
    assert guest_mss_untrusted(advertised) == used


def _established(
    host: MemoryHost, wire: WireGuest, options: TcpOptions, link_mss: int = LINK_MSS
) -> TcpConn:
    conn = new_conn(host, wire, State.CONNECTING, link_mss=link_mss)
    syn = TcpSegment(GUEST_PORT, REMOTE_PORT, 1000, 0, SYN, 65535, options, memoryview(b""))
    wire.irs = syn.seq
    conn.start_outbound(syn, 1.0)
    conn.on_connected(1.0)
    ts = None if options.timestamp is None else (1, 0)
    ack = TcpSegment(
        GUEST_PORT,
        REMOTE_PORT,
        1001,
        seq_add(conn.isn, 1),
        ACK,
        65535,
        TcpOptions(timestamp=ts),
        memoryview(b""),
    )
    conn.on_guest_segment(ack, 1.5)
    assert conn.state is State.ESTABLISHED
    return conn


def _data_lengths(conn: TcpConn, host: MemoryHost, wire: WireGuest, n: int) -> list[int]:
    """The peer sends ``n`` bytes; the payload lengths of the segments they go out in."""
    host.rcv += bytes(n)
    assert conn.push(2.0) == n  # all of it at once: the window is open
    return [len(s.payload) for s in wire.out if len(s.payload)]


@pytest.mark.parametrize("timestamps", [False, True])
def test_mss_1_gets_48_byte_segments(timestamps: bool) -> None:
    host = MemoryHost()
    wire = WireGuest(host)
    ts = (5, 0) if timestamps else None
    conn = _established(host, wire, TcpOptions(mss=1, timestamp=ts))
    lengths = _data_lengths(conn, host, wire, 4800)
    assert sum(lengths) == 4800
    assert max(lengths) == MIN_SND_MSS and len(lengths) == 100


def test_floor_never_exceeds_the_link() -> None:
    """With a 68-byte MTU (link MSS 28) the link wins over the floor."""
    host = MemoryHost()
    wire = WireGuest(host)
    conn = _established(host, wire, TcpOptions(mss=1), link_mss=28)
    lengths = _data_lengths(conn, host, wire, 280)
    assert sum(lengths) == 280
    assert max(lengths) == 28


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
