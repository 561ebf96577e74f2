"""Between ferryd's live TCP connections and the migration stream's records.

The stream carries two halves per connection: the host socket's kernel state
(ferryd.migration.sockstate, dumped in repair mode) and the guest-facing
sequence and window bookkeeping that :class:`~daemon.flows.tcp_conn.TcpConn`
keeps. Nothing else exists: ferryd holds no payload (DESIGN.md), so every
byte not yet acknowledged by the guest is still in the socket's receive
queue, and every byte the guest sent and ferryd acknowledged is in the send
queue or already with the peer.

On the target a connection resumes where the source left it, *not*
rewound: ``seq_to_guest`` stays what the source had sent and the peek offset
is set to the bytes in flight (sent, not acknowledged), which are still at
the head of the restored receive queue. Rewinding looks simpler but breaks:
ACKs the guest sent just before the freeze may have died in the source's
tap queue, so the guest can be further along than ``seq_ack_from_guest``;
segments numbered from there are then entirely old to it, and Linux drops
an unacceptable segment — ACK field and all — with only a duplicate ACK in
return (tcp_validate_incoming, RFC 9293 §3.10.7.4), so the guest would
never see ferryd's ACKs for its own data. If something in flight was really
lost, the guest's duplicate ACKs or the retransmission timer rewind the
flow as usual, from an ACK the guest itself sent.
"""

from __future__ import annotations

from ferryd.flows.tcp_conn import STATE_NUMBERS, Flags, State, TcpConn, guest_mss_untrusted
from ferryd.migration.kernel_state import TcpKernelState
from ferryd.migration.records import TcpFlowRecord


def tcp_record(conn: TcpConn, kernel: TcpKernelState | None) -> TcpFlowRecord:
    e = conn.ends
    return TcpFlowRecord(
        guest_addr=e.guest_addr,
        guest_port=e.guest_port,
        remote_addr=e.remote_addr,
        remote_port=e.remote_port,
        kernel=kernel,
        seq_to_guest=conn.seq_to_guest,
        seq_ack_from_guest=conn.seq_ack_from_guest,
        seq_from_guest=conn.seq_from_guest,
        seq_ack_to_guest=conn.seq_ack_to_guest,
        seq_init_from_guest=conn.seq_init_from_guest,
        guest_window=min(conn.guest_wnd >> conn.guest_ws, 0xFFFF),
        guest_wscale=conn.guest_ws,
        our_wscale=conn.our_ws,
        guest_mss=min(conn.guest_mss, 0xFFFF),
        flags=int(conn.flags),
        state=STATE_NUMBERS[conn.state],
        handshake=conn.state is not State.ESTABLISHED,
    )


def apply_guest_state(
    conn: TcpConn, rec: TcpFlowRecord, kernel: TcpKernelState, now: float
) -> None:
    """Give a restored connection the guest-side state it had on the source."""
    conn.seq_ack_from_guest = rec.seq_ack_from_guest
    conn.seq_to_guest = conn.seq_max_to_guest = rec.seq_to_guest  # not rewound (module doc)
    conn.seq_from_guest = rec.seq_from_guest
    conn.seq_ack_to_guest = rec.seq_ack_to_guest
    conn.seq_init_from_guest = rec.seq_init_from_guest
    conn.guest_ws = rec.guest_wscale
    conn.our_ws = rec.our_wscale
    conn.guest_wnd = rec.guest_window << rec.guest_wscale
    conn.guest_mss = guest_mss_untrusted(rec.guest_mss)
    flags = Flags(rec.flags)
    if Flags.FIN_TO_GUEST in flags:
        conn.fin_seq = (rec.seq_to_guest - 1) & 0xFFFFFFFF
    if Flags.TIMESTAMPS in flags:
        conn.continue_timestamps(kernel.timestamp, now)
    if kernel.fin_received:
        # A restored socket never reports the peer's earlier FIN as EOF
        # (sockstate: repair mode cannot queue a received FIN; rcv_nxt counts
        # it, but the kernel's state stays ESTABLISHED).
        flags |= Flags.SOCK_EOF
    conn.flags = flags
    conn.last_progress = now
