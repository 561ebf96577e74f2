"""Between ferryd's live TCP connections and the migration stream's records.

The stream carries two halves per connection: the host socket's kernel state
(ferryd.migration.sockstate, dumped in repair mode) and the guest-facing
sequence and window bookkeeping that :class:`~ferryd.flows.tcp_conn.TcpConn`
keeps (:class:`~ferryd.flows.tcp_conn.TcpGuestState`, read with
``TcpConn.guest_state()`` and given back to ``TcpConn.restored()``).
Nothing else exists: ferryd holds no payload (DESIGN.md), so every byte
not yet acknowledged by the guest is still in the socket's receive queue,
and every byte the guest sent and ferryd acknowledged is in the send queue
or already with the peer.

On the target a connection resumes where the source left it, *not*
rewound: ``seq_to_guest`` stays what the source had sent and the peek offset
is set to the bytes in flight (sent, not acknowledged), which are still at
the head of the restored receive queue. Rewinding looks simpler but breaks:
ACKs the guest sent just before the freeze may have died in the source's
frontend queue, so the guest can be further along than ``seq_ack_from_guest``;
segments numbered from there are then entirely old to it, and Linux drops
an unacceptable segment — ACK field and all — with only a duplicate ACK in
return (tcp_validate_incoming, RFC 9293 §3.10.7.4), so the guest would
never see ferryd's ACKs for its own data. If something in flight was really
lost, the guest's duplicate ACKs or the retransmission timer rewind the
flow as usual, from an ACK the guest itself sent.
"""

from __future__ import annotations

import socket

from ferryd.flows.tcp_conn import CLOSING, STATE_NUMBERS, State, TcpConn, TcpGuestState
from ferryd.flows.tcp_host import TailError
from ferryd.migration.kernel_state import TcpKernelState, TcpState
from ferryd.migration.records import TcpFlowRecord
from ferryd.migration.sockstate import SocketStateError, finish_restore


def tcp_record(
    conn: TcpConn, kernel: TcpKernelState | None, *, handed_over: bool = False
) -> TcpFlowRecord:
    """``conn``'s record: with its socket's dumped state, or ``handed_over`` (the socket
    itself goes with the stream: ferryd.migration.handover); a connection still in its
    handshake is neither (the target resets it)."""
    e = conn.ends
    g = conn.guest_state()
    handshake = g.state is not State.ESTABLISHED
    return TcpFlowRecord(
        guest_addr=e.guest_addr,
        guest_port=e.guest_port,
        remote_addr=e.remote_addr,
        remote_port=e.remote_port,
        kernel=kernel,
        seq_to_guest=g.seq_to_guest,
        seq_ack_from_guest=g.seq_ack_from_guest,
        seq_from_guest=g.seq_from_guest,
        seq_ack_to_guest=g.seq_ack_to_guest,
        guest_window=min(g.guest_wnd >> g.guest_ws, 0xFFFF),
        guest_wscale=g.guest_ws,
        our_wscale=g.our_ws,
        guest_mss=min(g.guest_mss, 0xFFFF),
        flags=g.flags,
        state=STATE_NUMBERS[g.state],
        handshake=handshake,
        handed_over=handed_over and not handshake,
    )


def guest_state(rec: TcpFlowRecord) -> TcpGuestState:
    """The guest-side state a connection had on the source, for TcpConn.restored()
    (which goes on not rewound: module doc)."""
    return TcpGuestState(
        state=State.ESTABLISHED,
        flags=rec.flags,
        seq_to_guest=rec.seq_to_guest,
        seq_ack_from_guest=rec.seq_ack_from_guest,
        seq_from_guest=rec.seq_from_guest,
        seq_ack_to_guest=rec.seq_ack_to_guest,
        guest_wnd=rec.guest_window << rec.guest_wscale,
        guest_ws=rec.guest_wscale,
        our_ws=rec.our_wscale,
        guest_mss=rec.guest_mss,
    )


def at_rest(rec: TcpFlowRecord) -> bool:
    """Nothing to resynchronise when the connection resumes on the target.

    Established both ways with nothing in motion: no byte in either
    socket queue (so no unsent tail, nothing to push to the guest, and the
    window the guest holds was advertised with an empty send queue, never
    zero), nothing in flight to the guest, the guest holds our latest ACK
    (seq_ack_to_guest), no FIN either way. The ACK and window a resume
    would send the guest are then the ones it has, as for a pre-copied
    connection that stood unchanged (restore.py); a thousand idle
    connections cost a thousand frames less in the downtime.
    """
    k = rec.kernel
    return (
        k is not None
        and k.tcp_state == TcpState.ESTABLISHED
        and not k.send_queue
        and not k.recv_queue
        and guest_at_rest(rec)
    )


def guest_at_rest(rec: TcpFlowRecord) -> bool:
    """:func:`at_rest`'s half of the guest's side: established, nothing in flight to
    the guest, the guest holds our latest ACK, no FIN either way. The socket's half
    is the record's dump, or a handed-over socket's own (sockstate.queues_empty)."""
    return (
        not rec.handshake
        and rec.seq_to_guest == rec.seq_ack_from_guest
        and rec.seq_ack_to_guest == rec.seq_from_guest
        and not rec.flags & CLOSING
    )


class RestoreTail:
    """A restored socket's unsent bytes (and FIN) that did not all go at repair OFF.

    The connection writes the rest (UnsentTail) before any byte of the guest's.
    """

    def __init__(self, sock: socket.socket, kernel: TcpKernelState, sent: int) -> None:
        self._sock = sock
        self._kernel = kernel
        self._sent = sent

    def send_more(self) -> bool:
        try:
            self._sent = finish_restore(self._sock, self._kernel, sent=self._sent)
        except SocketStateError as exc:
            raise TailError(str(exc)) from exc
        return self._sent >= self._kernel.unsent
