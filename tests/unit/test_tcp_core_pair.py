"""The TCP core between a guest's TCP and a host socket, in memory: bytes end to end.

No socket, no clock, no root: the core's ports are the in-memory kernel
(tests/unit/tcp_memory.py) and a reference guest TCP (tcp_ref_guest.py).
Every byte is compared at both ends, both directions at once; the pair's
checks run after every event (bookkeeping never goes back, the peek offset
is the flight, no ACK covers a byte the socket did not take, no payload
held).
"""

from __future__ import annotations

import errno
import random

import pytest

from ferryd.flows.tcp_conn import Flags, State, TcpConn, TcpGuestState, TcpShared
from ferryd.wire.tcp import ACK, NO_OPTIONS, RST, TcpSegment
from tests.unit.tcp_memory import (
    ENDS,
    LINK_MSS,
    PEEK_BUFFER,
    MemoryHost,
    Pair,
    WireGuest,
    new_conn,
)
from tests.unit.tcp_ref_guest import GState, RefGuest
from tests.unit.tcp_sim import run


def _payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("inbound", [False, True], ids=["outbound", "inbound"])
@pytest.mark.parametrize("timestamps", [False, True], ids=["plain", "timestamps"])
def test_both_directions_end_to_end(inbound: bool, timestamps: bool) -> None:
    up, down = _payload(300_000, 1), _payload(500_000, 2)
    out = run(up, down, inbound=inbound, timestamps=timestamps)
    assert out.at_peer == up
    assert out.at_guest == down
    assert out.conn.state is State.CLOSED
    assert out.host.shut_wr  # the guest's FIN became shutdown(SHUT_WR)
    assert out.host.closed and not out.host.aborted  # closed normally, no RST to the peer
    assert out.guest.fin_received  # the socket's EOF became a FIN to the guest


@pytest.mark.parametrize("drop", [0.0, 0.05], ids=["clean", "lossy"])
def test_pushes_limited_to_a_share_still_deliver_everything(drop: float) -> None:
    """With every push held to 3,000 bytes (a TcpFlows credit, while the guest
    uploads) the rest goes in later rounds; both streams arrive whole, in order."""
    up, down = _payload(200_000, 3), _payload(400_000, 4)
    out = run(up, down, share=3000, drop=drop, seed=7)
    assert out.at_peer == up
    assert out.at_guest == down
    assert out.conn.state is State.CLOSED


def test_a_push_sends_at_most_its_limit_and_leaves_the_rest_readable() -> None:
    pair, _guest = _established()
    conn, host = pair.conn, pair.host
    host.rcv += bytes(range(256)) * 40  # 10,240 bytes
    assert conn.push(2.0, 4000) == 4000
    assert conn.reading() and host.readable()  # bytes beyond the flight: a next round
    assert conn.push(2.0, 4000) == 4000
    assert conn.push(2.0) == 2240  # no limit: the rest
    sent = b"".join(bytes(s.payload) for s in pair.wire.out if len(s.payload))
    assert sent == bytes(range(256)) * 40


def test_empty_streams_still_close_cleanly() -> None:
    out = run(b"", b"")
    assert out.at_peer == b"" and out.at_guest == b""
    assert out.host.shut_wr and out.host.closed and not out.host.aborted


def test_short_writes_are_never_acknowledged() -> None:
    """A send queue that takes less than the window offered: the guest resends the rest."""
    up = _payload(400_000, 3)
    out = run(up, b"x", capacity=20_000, peer_read=3_000)
    assert out.at_peer == up
    assert out.host.closed and not out.host.aborted


def test_tiny_guest_mss_is_floored() -> None:
    out = run(b"", _payload(5_000, 4), guest_mss=1)
    assert out.at_guest == _payload(5_000, 4)


def _established() -> tuple[Pair, RefGuest]:
    host = MemoryHost()
    wire = WireGuest(host)
    guest = RefGuest(1000, b"", close=False)
    conn = new_conn(host, wire, State.CONNECTING)
    pair = Pair(conn, host, wire, 1.0)
    wire.irs = guest.isn
    conn.start_outbound(guest.connect(1.0), 1.0)
    conn.on_connected(1.0)
    for seg in list(wire.out):
        guest.receive(seg, 1.0)
    wire.out.clear()
    pair.burst(guest.take())
    assert conn.state is State.ESTABLISHED and guest.state is GState.ESTABLISHED
    return pair, guest


def test_guest_rst_aborts_the_socket() -> None:
    pair, guest = _established()
    rst = TcpSegment(40000, 80, guest.snd_nxt, 0, RST, 0, NO_OPTIONS, memoryview(b""))
    pair.burst([rst])
    assert pair.conn.closed
    assert pair.host.closed and pair.host.aborted  # SO_LINGER {1, 0}: RST to the peer
    assert not pair.wire.out  # a RST is never answered


def test_peer_reset_resets_the_guest() -> None:
    pair, guest = _established()
    pair.host.rcv += b"data"
    pair.host.error = ConnectionResetError(errno.ECONNRESET, "reset by peer")
    pair.host_events()
    assert pair.conn.closed and pair.host.closed
    assert [s.flags & RST for s in pair.wire.out] == [RST]
    for seg in pair.wire.out:
        guest.receive(seg, 1.0)
    assert guest.state is GState.RESET


def test_peer_fin_reaches_the_guest_after_the_data() -> None:
    pair, guest = _established()
    pair.host.rcv += b"hello"
    pair.host.eof = True
    pair.host_events()  # a short peek: the data
    pair.host_events()  # the socket stays readable at EOF: the FIN
    segs = list(pair.wire.out)
    assert [bytes(s.payload) for s in segs] == [b"hello", b""]
    assert segs[-1].seq == (segs[0].seq + 5) & 0xFFFFFFFF
    assert pair.conn.flags & Flags.FIN_TO_GUEST
    # Until the guest ACKs it, the FIN and the data stay in flight.
    assert pair.conn.flight == 6 and pair.host.peek_off == 5
    for seg in segs:
        guest.receive(seg, 1.1)
    pair.burst(guest.take())
    assert pair.conn.flags & Flags.FIN_TO_GUEST_ACKED
    assert not pair.host.rcv  # acknowledged: dropped from the receive queue
    assert not pair.conn.closed  # the guest has not closed its side


def test_an_entirely_old_segment_is_answered_at_once() -> None:
    """A segment entirely below RCV.NXT gets an ACK at once (RFC 9293 §3.10.7.4)."""
    pair, guest = _established()
    old = TcpSegment(
        40000,
        80,
        guest.snd_nxt - 10,
        guest.rcv_nxt,
        ACK,
        100,
        NO_OPTIONS,
        memoryview(b"0123456789"),
    )
    pair.burst([old])
    assert [s.flags for s in pair.wire.out] == [ACK]
    assert pair.wire.out[0].ack == guest.snd_nxt


def test_settled_only_when_nothing_moves() -> None:
    """What a pre-copy may dump: established, nothing in flight, no ACK due, quiet long enough."""
    pair, _guest = _established()
    conn = pair.conn
    assert not conn.settled(1.01, 0.05)  # not quiet for long enough yet
    assert conn.settled(2.0, 0.05)
    pair.host.rcv += b"abc"
    pair.host_events()
    assert conn.flight == 3 and not conn.settled(9.0, 0.05)


class _Tail:
    """A migrated socket's unsent bytes (UnsentTail), written in pieces as space frees up."""

    def __init__(self, host: MemoryHost, data: bytes) -> None:
        self.host, self.left = host, data

    def send_more(self) -> bool:
        try:
            n = self.host.write(memoryview(self.left))
        except BlockingIOError:
            return False
        self.left = self.left[n:]
        return not self.left


def test_a_migrated_tail_goes_before_the_guests_next_bytes() -> None:
    pair, guest = _established()
    saved = pair.conn.guest_state()
    host = MemoryHost(capacity=4)
    wire = WireGuest(host)
    wire.irs = guest.isn
    conn = TcpConn.restored(
        ENDS,
        host,
        TcpShared(
            wire, LINK_MSS, memoryview(bytearray(PEEK_BUFFER)), PEEK_BUFFER, random.Random(3)
        ),
        saved,
        sock_timestamp=0,
        fin_received=False,
        now=2.0,
    )
    conn.flow = pair.conn.flow
    assert conn.guest_state() == saved
    tail = _Tail(host, b"TAIL")
    host.accepted = 0
    conn.resume_tail(tail)
    assert conn.want_writable
    # The guest sends before the tail is out: not taken (not ACKed), and the
    # socket's send queue holds the tail's bytes first.
    host.capacity = 2
    tail.send_more()
    data = TcpSegment(
        40000,
        80,
        saved.seq_from_guest,
        saved.seq_ack_from_guest,
        ACK,
        100,
        NO_OPTIONS,
        memoryview(b"next"),
    )
    conn.on_guest_segment(data, 2.0)
    assert conn.seq_from_guest == saved.seq_from_guest
    assert bytes(host.snd) == b"TA"
    host.peer_read(2)
    host.capacity = 10
    conn.on_writable(2.1)  # the rest of the tail
    conn.on_guest_segment(data, 2.2)
    assert bytes(host.snd) == b"ILnext"
    assert conn.seq_from_guest == (saved.seq_from_guest + 4) & 0xFFFFFFFF


def test_guest_state_names_each_value_as_the_connection_does() -> None:
    """guest_state() builds its tuple by position: every field must hold the
    connection's attribute of that name (a swapped pair would migrate wrong)."""
    host = MemoryHost()
    conn = new_conn(host, WireGuest(host), State.ESTABLISHED)
    for i, name in enumerate(TcpGuestState._fields):
        if name not in ("state",):
            setattr(conn, name, 1000 + i)  # all different
    conn.guest_ws, conn.our_ws = 3, 5
    state = conn.guest_state()
    assert state._asdict() == {name: getattr(conn, name) for name in TcpGuestState._fields}


def test_shared_windows_stay_bounded_whatever_windows_the_guest_sends() -> None:
    """The guest chooses its windows: any number of distinct values keeps the
    shared cache at its bound, and each value comes back equal (one object per
    value while it is kept)."""
    host = MemoryHost()
    shared = new_conn(host, WireGuest(host), State.ESTABLISHED).shared
    for value in range(70_000, 70_000 + 5 * 1024):
        assert shared.share(value) == value
        assert len(shared._values) <= 1024
    kept = shared.share(10**6)
    assert shared.share(int("1000000")) is kept
