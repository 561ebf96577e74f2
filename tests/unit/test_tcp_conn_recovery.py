"""TcpConn's go-back-N resend and duplicate ACKs (RFC 6582 §3.2 "recover").

The host socket is the in-memory kernel of tests/unit/tcp_memory.py (TcpConn
peeks and discards on it); the guest's side is a real handshake, then ACKs
built by hand, so time and order are explicit.
"""

from __future__ import annotations

import os
from typing import Any

from ferryd.flows.tcp_conn import CREDIT_WAIT, RTO_INITIAL, State, TcpConn
from ferryd.flows.tcp_seq import seq_add
from ferryd.wire.tcp import ACK, NO_OPTIONS, SYN, TcpOptions, TcpSegment
from tests.unit.tcp_memory import GUEST_PORT, REMOTE_PORT, MemoryHost, WireGuest, new_conn

MSS = 1000
WINDOW = 65535
GUEST_SEQ = 5000


def established(host: MemoryHost, wire: WireGuest) -> TcpConn:
    """The guest connected (SYN with MSS 1000, no window scaling), ferryd answered, the
    guest ACKed its SYN-ACK."""
    conn = new_conn(host, wire, State.CONNECTING)
    syn = TcpSegment(
        GUEST_PORT, REMOTE_PORT, GUEST_SEQ - 1, 0, SYN, WINDOW, TcpOptions(mss=MSS), memoryview(b"")
    )
    wire.irs = syn.seq
    conn.start_outbound(syn, 0.0)
    conn.on_connected(0.0)
    ack(conn, seq_add(conn.isn, 1), 0.0)
    assert conn.state is State.ESTABLISHED
    wire.out.clear()
    return conn


def ack(conn: TcpConn, seq: int, now: float) -> None:
    """A pure ACK from the guest, window unchanged, alone in its burst of frames."""
    seg = TcpSegment(
        GUEST_PORT, REMOTE_PORT, GUEST_SEQ, seq, ACK, WINDOW, NO_OPTIONS, memoryview(b"")
    )
    conn.on_guest_segment(seg, now)
    conn.flush_ack(now)  # what the adapter does when the frontend's queue ran dry


def data_at(wire: WireGuest, seq: int) -> int:
    """How many times a data segment starting at ``seq`` was sent to the guest."""
    return sum(1 for s in wire.out if s.seq == seq and len(s.payload))


def test_acks_for_resent_old_data_do_not_rewind_again() -> None:
    host = MemoryHost()
    wire = WireGuest(host)
    conn = established(host, wire)
    start = conn.seq_to_guest
    host.rcv += bytes(10 * MSS)  # the peer sends
    assert conn.push(0.0) == 10 * MSS
    end = seq_add(start, 10 * MSS)

    # The first segment is lost; the guest holds the other nine and says so
    # with three duplicate ACKs: fast retransmit, go-back-N from `start`.
    for _ in range(3):
        ack(conn, start, 0.1)
    assert data_at(wire, start) == 2
    assert conn.seq_to_guest == end

    # The resent first segment fills the hole: the guest ACKs everything
    # (`end`) and answers each of the nine resent segments it already had
    # with the same ACK. The first of them lets new data go out...
    ack(conn, end, 0.2)
    host.rcv += bytes(5 * MSS)
    conn.on_readable(0.2)
    assert data_at(wire, end) == 1
    assert conn.flight == 5 * MSS

    # ... and the other eight are duplicates of it, caused by our own
    # resend, not a loss: no second go-back-N (RFC 6582 §3.2 step 1).
    for _ in range(8):
        ack(conn, end, 0.3)
    assert data_at(wire, end) == 1
    assert conn.seq_to_guest == seq_add(end, 5 * MSS)

    # Once the guest ACKs beyond what was resent, a new loss is repaired by
    # fast retransmit again.
    after = seq_add(end, MSS)
    ack(conn, after, 0.4)
    for _ in range(3):
        ack(conn, after, 0.5)
    assert data_at(wire, after) == 2


class FullGuest(WireGuest):
    """A guest link whose queue takes ``room`` more segments, then refuses (a full ring)."""

    def __init__(self, host: MemoryHost, room: int) -> None:
        super().__init__(host)
        self.room = room
        self.refused = 0

    def send_ip(self, *args: Any, **kwargs: Any) -> bool:
        if self.room <= 0:
            self.refused += 1
            return False
        self.room -= 1
        return super().send_ip(*args, **kwargs)


def waits_for_room(conn: TcpConn) -> bool:
    """The adapter is to push it again (at its next flush), and not on readability."""
    return conn.push_due and not conn.reading()


def test_a_push_the_guest_has_no_room_for_waits_and_loses_nothing() -> None:
    """With no room in the guest's queue for a segment, the push stops there: the
    bytes stay in the socket, unpeeked, and go at the next flush, once each and in
    order (no go-back-N over a queue that drops)."""
    host = MemoryHost()
    wire = FullGuest(host, room=1_000)
    conn = established(host, wire)
    start = conn.seq_to_guest
    data = os.urandom(10 * MSS)
    host.rcv += data
    wire.room = 3
    assert conn.push(0.0) == 3 * MSS
    assert wire.refused == 1
    assert conn.seq_to_guest == conn.seq_max_to_guest == seq_add(start, 3 * MSS)
    assert host.peek_off == conn.data_flight == 3 * MSS  # the refused bytes are unpeeked
    assert waits_for_room(conn)  # pushed again by the adapter, not on EPOLLIN

    conn.flush_ack(0.1)  # a flush with still no room: nothing goes, nothing is lost
    assert wire.refused == 2 and conn.seq_to_guest == seq_add(start, 3 * MSS)
    assert host.peek_off == 3 * MSS and waits_for_room(conn)

    wire.room = 1_000  # the guest posted buffers
    conn.flush_ack(0.2)
    assert not waits_for_room(conn) and conn.seq_to_guest == seq_add(start, 10 * MSS)
    got = b"".join(bytes(s.payload) for s in wire.out if s.payload)
    assert got == data  # every byte once, in order
    assert [s.seq for s in wire.out if s.payload] == [seq_add(start, k * MSS) for k in range(10)]
    ack(conn, seq_add(start, 10 * MSS), 0.3)
    assert conn.flight == 0 and host.rcv == b"" and conn.reading()


def test_no_room_with_nothing_in_flight_is_tried_again_by_the_timer() -> None:
    """Nothing in flight means no retransmission timer: a push that found no room at
    all arms one, and tries again when it fires (without counting a retry)."""
    host = MemoryHost()
    wire = FullGuest(host, room=1_000)
    conn = established(host, wire)
    host.rcv += bytes(2 * MSS)
    wire.room = 0
    assert conn.push(0.0) == 0
    assert conn.flight == 0 and conn.deadline() < float("inf")
    wire.room = 1_000
    conn.on_timer(conn.deadline())
    assert conn.flight == 2 * MSS and conn.retries == 0


def test_a_readable_socket_with_no_room_waits_for_room_not_for_an_ack() -> None:
    """Readable, bytes in flight, and not one more segment taken: the connection
    waits for room (pushed again at the next flush), not for the guest's ACK, and
    reads again once that push went out."""
    host = MemoryHost()
    wire = FullGuest(host, room=1_000)
    conn = established(host, wire)
    wire.room = 2
    host.rcv += bytes(2 * MSS)
    assert conn.push(0.0) == 2 * MSS
    host.rcv += bytes(2 * MSS)
    conn.on_readable(0.1)  # the ring is full: nothing more goes
    assert conn.flight == 2 * MSS and waits_for_room(conn)
    wire.room = 1_000
    conn.flush_ack(0.2)  # no ACK came; room did
    assert conn.flight == 4 * MSS and conn.reading()


def test_a_push_with_no_credit_left_waits_for_the_next_flush() -> None:
    """The adapter's credit for this turn is spent (flows/tcp.py, PUSH_QUANTUM): the
    push sends nothing and stops reading; the next flush, with new credit, sends as
    much as that allows and reads again once the rest went too."""
    host = MemoryHost()
    wire = FullGuest(host, room=1_000)
    conn = established(host, wire)
    data = os.urandom(5 * MSS)
    host.rcv += data
    assert conn.on_readable(0.0, 0) == 0
    assert not wire.out and waits_for_room(conn)
    assert conn.flush_ack(0.1, 2 * MSS) == 2 * MSS
    assert conn.reading()  # three segments left: readable, pushed in the next rounds
    assert conn.on_readable(0.1, None) == 3 * MSS
    assert b"".join(bytes(s.payload) for s in wire.out if s.payload) == data


def test_no_credit_with_nothing_in_flight_is_pushed_by_the_timer_soon() -> None:
    """A guest that stopped sending (its upload ended) brings no flush: with nothing
    in flight no ACK will either, so the timer pushes, without counting a retry."""
    host = MemoryHost()
    wire = FullGuest(host, room=1_000)
    conn = established(host, wire)
    host.rcv += bytes(2 * MSS)
    assert conn.push(0.0, 0) == 0
    assert conn.deadline() == CREDIT_WAIT
    conn.on_timer(conn.deadline())
    assert conn.flight == 2 * MSS and conn.retries == 0


def test_bytes_sent_after_a_wait_get_a_whole_retransmission_timeout() -> None:
    """The short timer of a wait for credit is not the retransmission timer: the
    bytes a flush then sends are resent only a retransmission timeout later."""
    host = MemoryHost()
    wire = FullGuest(host, room=1_000)
    conn = established(host, wire)
    host.rcv += bytes(2 * MSS)
    assert conn.push(0.0, 0) == 0
    assert conn.flush_ack(0.001, 2 * MSS) == 2 * MSS
    assert conn.deadline() >= 0.001 + RTO_INITIAL
    wire.out.clear()
    conn.on_timer(CREDIT_WAIT)
    assert not wire.out and conn.retries == 0
