"""TcpConn's go-back-N resend and duplicate ACKs (RFC 6582 §3.2 "recover").

A real loopback TCP connection stands in for the host socket (TcpConn peeks
and discards on it); the guest is a recorder of the segments ferryd sends,
and its ACKs are built by hand, so time and order are explicit.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios

from ferryd.flows.tcp_conn import State, TcpConn
from ferryd.flows.tcp_seq import seq_add
from ferryd.wire.tcp import ACK, NO_OPTIONS, TcpSegment
from tests.unit.tcp_conn_support import RecordingGuest, bare_conn

MSS = 1000
WINDOW = 65535
GUEST_SEQ = 5000
_INT = struct.Struct("i")


def established(sock: socket.socket, guest: RecordingGuest) -> TcpConn:
    conn = bare_conn(sock, guest, State.ESTABLISHED, MSS)
    conn.seq_from_guest = conn.seq_ack_to_guest = GUEST_SEQ
    conn.guest_mss = MSS
    conn.guest_wnd = WINDOW
    return conn


def peer_sends(peer: socket.socket, ours: socket.socket, n: int) -> None:
    """The peer sends ``n`` bytes; returns once ``ours`` holds them (and nothing else)."""
    peer.sendall(bytes(n))
    for _ in range(100):  # loopback: there at once, but make sure
        select.select([ours], [], [], 0.01)
        if _INT.unpack(fcntl.ioctl(ours.fileno(), termios.FIONREAD, b"\0" * 4))[0] >= n:
            return
    raise AssertionError(f"{n} bytes did not arrive")


def ack(conn: TcpConn, seq: int, now: float) -> None:
    """A pure ACK from the guest, window unchanged, alone in its burst of frames."""
    seg = TcpSegment(40000, 80, GUEST_SEQ, seq, ACK, WINDOW, NO_OPTIONS, memoryview(b""))
    conn.on_guest_segment(seg, now)
    conn.flush_ack(now)  # what the adapter does when the frontend's queue ran dry


def test_acks_for_resent_old_data_do_not_rewind_again(
    host_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = host_pair
    guest = RecordingGuest()
    conn = established(ours, guest)
    start = conn.seq_to_guest
    peer_sends(peer, ours, 10 * MSS)
    assert conn.push(0.0) == 10 * MSS
    end = seq_add(start, 10 * MSS)

    # The first segment is lost; the guest holds the other nine and says so
    # with three duplicate ACKs: fast retransmit, go-back-N from `start`.
    for _ in range(3):
        ack(conn, start, 0.1)
    assert guest.data_at(start) == 2
    assert conn.seq_to_guest == end

    # The resent first segment fills the hole: the guest ACKs everything
    # (`end`) and answers each of the nine resent segments it already had
    # with the same ACK. The first of them lets new data go out...
    ack(conn, end, 0.2)
    peer_sends(peer, ours, 5 * MSS)
    conn.on_readable(0.2)
    assert guest.data_at(end) == 1
    assert conn.flight == 5 * MSS

    # ... and the other eight are duplicates of it, caused by our own
    # resend, not a loss: no second go-back-N (RFC 6582 §3.2 step 1).
    for _ in range(8):
        ack(conn, end, 0.3)
    assert guest.data_at(end) == 1
    assert conn.seq_to_guest == seq_add(end, 5 * MSS)

    # Once the guest ACKs beyond what was resent, a new loss is repaired by
    # fast retransmit again.
    after = seq_add(end, MSS)
    ack(conn, after, 0.4)
    for _ in range(3):
        ack(conn, after, 0.5)
    assert guest.data_at(after) == 2
