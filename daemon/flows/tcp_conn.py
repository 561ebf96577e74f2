"""One guest TCP connection spliced onto one host TCP socket, holding no payload.

Theory of operation
-------------------
The guest speaks TCP to ferryd over the tap; the host socket speaks TCP to
the peer through the kernel. ferryd terminates neither byte stream in a
buffer of its own (DESIGN.md, "The invariant that makes migration
possible"): every byte is in the guest, on a wire, or in the host socket's
kernel queues. Only sequence and window bookkeeping lives here, which is
what a migration carries.

guest → host. A data segment at ``seq_from_guest`` is written to the socket
with a non-blocking send, and ``seq_from_guest`` advances by what the kernel
took, which is also all the guest is ACKed for. Whatever the kernel did not
take the guest still holds and resends: after a short write ferryd sends
three duplicate ACKs so the guest retransmits at once (RFC 5681 §3.2 fast
retransmit) instead of waiting for its timer. The window offered to the
guest is the free space of the socket's send buffer (SO_SNDBUF less
SIOCOUTQ, with headroom for the kernel's per-skb overhead), so short writes
are rare; when it gets small, ferryd waits for the socket to become writable
and sends a window update. Waiting for writability is also what lets the
kernel's send-buffer autotuning grow the buffer (tcp_poll sets SOCK_NOSPACE,
tcp_check_space then expands sk_sndbuf).

host → guest. Data is read with MSG_PEEK: SO_PEEK_OFF makes each peek start
after what was already sent, so ``seq_to_guest - seq_ack_from_guest`` bytes
(the flight) stay queued in the socket until the guest ACKs them; only then
are they dropped from the queue with ``recv(MSG_TRUNC)`` (which for TCP
discards without copying). Consuming moves the peek offset back by the
same amount (sk_peek_offset_bwd), so the offset always equals the flight. A
retransmission rewinds ``seq_to_guest`` to the guest's last ACK and the
peek offset to 0; until the guest ACKs beyond all that was resent, its
duplicate ACKs (its answers to resent bytes it already held) start no new
rewind (RFC 6582 "recover"). The flight is limited by the guest's window.
Because the queued flight keeps the socket readable, the reader waits with
SO_RCVLOWAT set to flight + 1: tcp_poll then reports readability only when
bytes beyond the flight arrived (or on FIN/error).

Timestamps (RFC 7323). When the guest's SYN (or its SYN-ACK) carries them,
every segment to the guest does too, on the host socket's own clock (see
``ts_offset``). Not for PAWS on our side: because ferryd keeps no
out-of-order data, a lost segment from the guest costs everything it sent
after it, and with data flowing to the guest ferryd's duplicate ACKs do not
count as such for Linux (each one also updates the window: tcp_ack); only
the guest's retransmission timer recovers, and without timestamps Karn's
rule gives it no RTT sample while it retransmits, so its RTO backs off to
tens of seconds and the connection crawls. With them every ACK is a sample.

Closing. The guest's FIN, once everything before it was written, becomes
``shutdown(SHUT_WR)`` on the socket. The socket's EOF, once every byte
before it was sent to the guest, becomes a FIN to the guest. When both
FINs are done and the guest ACKed ours, the socket is closed normally and
the kernel finishes the exchange with the peer. A RST from the guest
aborts the socket with SO_LINGER {1, 0} (the kernel sends RST); a reset
socket sends the guest a RST.

Time is passed in (``now``), never read here, and nothing here waits: the
adapter in ``daemon.flows.tcp`` owns the clock, the flow table and the one
reactor that waits for every connection. After any change to what the
connection waits for (``reading()``, ``want_writable``, the state) or until
when (``deadline()``) it calls ``on_changed``; the adapter re-arms the
connection from those once its current batch of events is done.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import random
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ferryd.flows.table import Flow
from ferryd.flows.tcp_seq import seq_add, seq_diff
from ferryd.guest import GuestPort
from ferryd.linux import SIOCOUTQ, SO_PEEK_OFF, TCP_TIMESTAMP
from ferryd.migration.kernel_state import TcpKernelState
from ferryd.migration.sockstate import SocketStateError, finish_restore
from ferryd.wire.ip import IPPROTO_TCP, IpAddress
from ferryd.wire.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TCP_CSUM_OFFSET,
    TcpOptions,
    TcpSegment,
    build_tcp_header_partial,
)

log = logging.getLogger("ferryd.tcp")

_INT = struct.Struct("i")
_LINGER_ABORT = struct.pack("ii", 1, 0)

#: Window scale ferryd offers the guest: windows up to 16 MiB.
OUR_WSCALE = 8
#: RFC 6298 §2: an initial RTO of 1 s; doubled on each expiry, at most 60 s.
RTO_INITIAL = 1.0
RTO_MAX = 60.0
#: Retransmissions without progress before the connection is given up.
MAX_RETRIES = 8
#: How long a host connect() may take before the guest gets a RST.
CONNECT_TIMEOUT = 10.0
#: An established connection with no traffic either way for this long is
#: reset (passt's activity timeout).
IDLE_TIMEOUT = 7200.0
#: Duplicate ACKs that make the guest retransmit (RFC 5681 §3.2).
DUPACK_THRESHOLD = 3
#: The guest's MSS when its SYN carries none (RFC 9293 §3.7.1).
DEFAULT_MSS = 536
#: The least payload a segment to the guest carries, whatever MSS it
#: advertised: Linux's net.ipv4.tcp_min_snd_mss default (__tcp_mtu_to_mss;
#: added in 5.2 for CVE-2019-11479). A guest advertising MSS 1 once made
#: ferryd send a peer's data one byte per frame (issue 9).
MIN_SND_MSS = 48


def guest_mss_untrusted(advertised: int | None) -> int:
    """The MSS to use for a guest that advertised ``advertised`` in its SYN.

    An absent or zero option means the default (tcp_parse_options ignores a
    zero MSS); anything below :data:`MIN_SND_MSS` is raised to it. The upper
    end is the link's, applied when segments are cut (:meth:`TcpConn.push`).
    """
    if not advertised:
        return DEFAULT_MSS
    return max(advertised, MIN_SND_MSS)


class State(enum.Enum):
    CONNECTING = "connecting"
    """Guest SYN received; the host socket's connect() is in progress."""
    SYN_ACK_SENT = "syn_ack_sent"
    """Host side connected; SYN-ACK sent to the guest, its ACK awaited."""
    SYN_SENT = "syn_sent"
    """Inbound: the host accepted a peer; SYN sent to the guest."""
    ESTABLISHED = "established"
    """Data both ways; half-closes are the ``Flags`` bits."""
    CLOSED = "closed"


#: State numbers in the migration stream (records.TcpFlowRecord.state).
STATE_NUMBERS = {
    State.CONNECTING: 1,
    State.SYN_ACK_SENT: 2,
    State.SYN_SENT: 3,
    State.ESTABLISHED: 4,
}


class Flags(enum.IntFlag):
    """Closing progress; carried opaquely by the migration stream."""

    FIN_FROM_GUEST = 1
    """The guest's FIN was accepted and the socket shut down for writing."""
    SOCK_EOF = 2
    """The socket reached end of file (the peer's FIN)."""
    FIN_TO_GUEST = 4
    """A FIN was sent to the guest (it occupies one sequence number)."""
    FIN_TO_GUEST_ACKED = 8
    TIMESTAMPS = 16
    """RFC 7323 timestamps were agreed with the guest (see TcpConn.ts_offset)."""


#: The bits of Flags that say how far closing went.
CLOSING = Flags.FIN_FROM_GUEST | Flags.SOCK_EOF | Flags.FIN_TO_GUEST | Flags.FIN_TO_GUEST_ACKED
#: What the timestamps option adds to each segment (10 bytes, 2 NOPs: RFC 7323 §3.2).
TS_OPTION_LEN = 12


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The connection's addresses as the guest sees them."""

    guest_addr: IpAddress
    guest_port: int
    remote_addr: IpAddress
    remote_port: int


class TcpConn:
    """State of one spliced connection; driven by the adapter's events."""

    def __init__(
        self,
        ends: Endpoints,
        sock: socket.socket,
        guest: GuestPort,
        state: State,
        link_mss: int,
        peek_buffer: memoryview,
        on_closed: Callable[[TcpConn], None],
        on_ack_due: Callable[[TcpConn], None],
        on_changed: Callable[[TcpConn], None],
        rcvlowat_cap: int,
    ) -> None:
        self.ends = ends
        self.sock = sock
        self.fd = sock.fileno()
        self.guest = guest
        self.flow: Flow[TcpConn]  # set by the adapter once the table holds it
        self.state = state
        self.link_mss = link_mss
        self._buf = peek_buffer
        self._on_closed = on_closed
        self._on_ack_due = on_ack_due
        self._on_changed = on_changed
        self.ack_due = False
        self.push_due = False
        self._rcvlowat_cap = rcvlowat_cap
        self.flags = Flags(0)
        self.isn = secrets.randbits(32)
        self.seq_to_guest = self.isn
        self.seq_ack_from_guest = self.isn
        self.seq_max_to_guest = self.isn
        """The highest sequence number sent to the guest (SND.NXT before any rewind)."""
        self.fin_seq: int | None = None
        """Sequence number of the FIN sent to the guest, once sent."""
        self.seq_from_guest = 0
        self.seq_init_from_guest = 0
        self.seq_ack_to_guest = 0
        self.guest_wnd = 0
        """The guest's receive window in bytes (already scaled)."""
        self.guest_ws = 0
        self.our_ws = 0
        self.guest_mss = DEFAULT_MSS
        self.wnd_to_guest = 0
        """Last window (bytes) advertised to the guest."""
        self.dupacks = 0
        self.recover: int | None = None
        """seq_max_to_guest when the flight was last resent, until an ACK goes
        beyond it (RFC 6582 §3.2 "recover"; None: no resend outstanding)."""
        self.retries = 0
        self.rto = RTO_INITIAL
        self.timer: float = float("inf")
        self.last_progress = 0.0
        self._rcvlowat = 1
        self._starved = False
        self.want_writable = False
        """The adapter should wait for writability and call on_writable()."""
        self._hole_acked = -1
        """seq_from_guest at which a hole last got its duplicate ACKs."""
        self.ts_offset = 0
        """With Flags.TIMESTAMPS: TSval = now in ms + ts_offset, mod 2^32. Taken from the
        host socket's own timestamp clock (TCP_TIMESTAMP, CLOCK_MONOTONIC like ours), so a
        migration target, whose restored socket goes on with the source's clock, can go
        on with it too (flowstate.apply_guest_state): the guest's PAWS check (RFC 7323
        §5) never sees our TSval go back."""
        self.ts_recent = 0
        """The guest's latest TSval, echoed as TSecr (0 until one was seen)."""
        self._now_ms = 0
        self._ts_offered = False
        self.restore_tail: tuple[TcpKernelState, int] | None = None
        """A migrated socket's unsent bytes still to write, and how many went."""

    # --- derived state ----------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def flight(self) -> int:
        """Bytes sent to the guest and not yet acknowledged (FIN included)."""
        return seq_diff(self.seq_to_guest, self.seq_ack_from_guest)

    @property
    def data_flight(self) -> int:
        """Payload bytes in flight: what sits peeked in the receive queue."""
        fin = Flags.FIN_TO_GUEST in self.flags and Flags.FIN_TO_GUEST_ACKED not in self.flags
        return self.flight - (1 if fin else 0)

    def reading(self) -> bool:
        """Whether the adapter should wait for new data on the socket."""
        return (
            self.state is State.ESTABLISHED
            and Flags.SOCK_EOF not in self.flags
            and not self._starved
            and self.flight < min(self.guest_wnd, self._rcvlowat_cap)
        )

    def rto_jittered(self) -> float:
        """The RTO stretched by up to a quarter, at random.

        Thousands of connections that lost segments in one burst (a guest
        whose backlog overflowed, a migration) would otherwise retransmit
        in lockstep, overflow it again on every backoff, and never recover.
        """
        return self.rto * (1.0 + random.random() / 4)

    def deadline(self) -> float:
        """When the adapter must call on_timer(): retransmission, handshake,
        window probe or, for an established connection, the idle limit."""
        if self.state is State.ESTABLISHED:
            return min(self.timer, self.last_progress + IDLE_TIMEOUT)
        return self.timer

    def prepare_wait(self) -> None:
        """Only bytes beyond the flight make the socket readable.

        Called whenever the flight changes (bytes sent to the guest, bytes
        acknowledged and dropped), not just before waiting: a wait that began
        with a larger flight would otherwise miss new data once the guest's
        ACK shrinks the queue below the old mark.
        """
        want = min(self.data_flight + 1, self._rcvlowat_cap)
        if want != self._rcvlowat:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            self._rcvlowat = want

    def _poke(self) -> None:
        """Make the adapter re-evaluate what this connection waits for and until when."""
        self._on_changed(self)

    # --- frames to the guest ----------------------------------------------

    def _send(
        self,
        flags: int,
        seq: int,
        payload: memoryview | bytes = b"",
        options: TcpOptions | None = None,
    ) -> None:
        e = self.ends
        if flags & SYN:
            window = min(self.wnd_to_guest, 0xFFFF)
        else:
            window = min(self.wnd_to_guest >> self.our_ws, 0xFFFF)
        ack = self.seq_from_guest if flags & ACK else 0
        self.seq_ack_to_guest = ack
        if options is None and Flags.TIMESTAMPS in self.flags:
            options = TcpOptions(timestamp=(self._tsval(), self.ts_recent))
        hdr = build_tcp_header_partial(
            e.remote_addr,
            e.guest_addr,
            e.remote_port,
            e.guest_port,
            seq,
            ack,
            flags,
            window,
            options if options is not None else _NO_OPTIONS,
            len(payload),
        )
        self.guest.send_ip(e.remote_addr, e.guest_addr, IPPROTO_TCP, hdr, payload, TCP_CSUM_OFFSET)

    def send_ack(self) -> None:
        self._update_window()
        self._send(ACK, self.seq_to_guest)

    def flush_ack(self, now: float) -> None:
        """The burst of guest frames ended: send what its segments let go (one push for
        all their ACKs), then the ACK deferred by _data_from_guest unless data carried it."""
        self.ack_due = False
        if self.push_due:
            self.push_due = False
            if self.state is State.ESTABLISHED:
                self.push(now)
                self._maybe_finish(now)
        if self.state is State.ESTABLISHED and self.seq_ack_to_guest != self.seq_from_guest:
            self.send_ack()

    def _at_burst_end(self) -> None:
        """Have the adapter call flush_ack() once the frontend's queue ran dry."""
        if not self.ack_due:
            self.ack_due = True
            self._on_ack_due(self)

    def _syn_options(self, offer_wscale: bool) -> TcpOptions:
        ts = (self._tsval(), self.ts_recent) if Flags.TIMESTAMPS in self.flags else None
        return TcpOptions(
            mss=self.link_mss, wscale=OUR_WSCALE if offer_wscale else None, timestamp=ts
        )

    def continue_timestamps(self, sock_ts: int, now: float) -> None:
        """A migration target: go on with the clock of the restored host socket.

        The restored socket continues its timestamp clock from the dumped
        value ``sock_ts``; ours follows, one ms ahead so that rounding never
        takes it back. The guest's TSval is learnt again from its next
        segment (TSecr 0 until then gives the guest no RTT sample, nothing
        worse: tcp_ack_update_rtt).
        """
        self._now_ms = int(now * 1000)
        self.ts_offset = (sock_ts + 1 - self._now_ms) & 0xFFFFFFFF
        self.ts_recent = 0

    def _tsval(self) -> int:
        return (self._now_ms + self.ts_offset) & 0xFFFFFFFF

    def _start_timestamps(self, now: float) -> None:
        """Agree to RFC 7323 timestamps: our clock is the host socket's (ts_offset).

        They give the guest an RTT sample from every ACK, retransmissions
        included (RFC 7323 §4); without them Karn's rule leaves it none while
        it retransmits, so after a loss (ferryd keeps no out-of-order data)
        its RTO backs off for good (tcp_ack_update_rtt resets icsk_backoff
        only on a sample) and the connection crawls on timeouts.
        """
        self._now_ms = int(now * 1000)
        try:
            sock_ts = self.sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF
        except OSError:
            sock_ts = secrets.randbits(32)
        self.ts_offset = sock_ts - self._now_ms
        self.flags |= Flags.TIMESTAMPS

    def _update_window(self) -> None:
        """Window for the guest: the socket's free send space (see module doc)."""
        if Flags.FIN_FROM_GUEST in self.flags:
            self.wnd_to_guest = 0xFFFF << self.our_ws  # nothing more may come
            return
        sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        outq = _INT.unpack(fcntl.ioctl(self.fd, SIOCOUTQ, b"\0\0\0\0"))[0]
        free = max(0, sndbuf * 3 // 4 - outq)
        self.wnd_to_guest = min(free, 0xFFFF << self.our_ws)
        if free < sndbuf // 4 and not self.want_writable:
            self.want_writable = True
            self._poke()

    # --- events from the adapter ------------------------------------------

    def start_outbound(self, syn: TcpSegment, now: float) -> None:
        """Guest SYN for a new connection; the adapter started connect()."""
        opts = syn.options
        self.seq_init_from_guest = syn.seq
        self.seq_from_guest = seq_add(syn.seq, 1)
        if opts.wscale is not None:
            self.guest_ws, self.our_ws = opts.wscale, OUR_WSCALE
        self.guest_mss = guest_mss_untrusted(opts.mss)
        self.guest_wnd = syn.window
        if opts.timestamp is not None:  # agreed once connected (_start_timestamps)
            self.ts_recent = opts.timestamp[0]
            self._ts_offered = True
        self.timer = now + CONNECT_TIMEOUT
        self.last_progress = now

    def on_connected(self, now: float) -> None:
        """The host connect() finished (writable): success or failure."""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            log.debug(
                "connect to %s:%d failed: %s",
                self.ends.remote_addr,
                self.ends.remote_port,
                errno.errorcode.get(err, err),
            )
            self.abort(now, rst_guest=True, rst_peer=False)
            return
        self.state = State.SYN_ACK_SENT
        self.flow.state = self.state.value
        if self._ts_offered:
            self._start_timestamps(now)
        self._update_window()
        self.seq_to_guest = self.seq_max_to_guest = seq_add(self.isn, 1)
        self._send(SYN | ACK, self.isn, options=self._syn_options(self.our_ws != 0))
        self.retries = 0
        self.rto = RTO_INITIAL
        self.timer = now + self.rto_jittered()

    def start_inbound(self, now: float) -> None:
        """A peer connected to a forwarded port: open the guest side (SYN)."""
        self.our_ws = OUR_WSCALE  # tentative: in effect only if the guest agrees
        self._start_timestamps(now)  # offered; dropped unless the guest's SYN-ACK agrees
        self._update_window()
        self.seq_to_guest = self.seq_max_to_guest = seq_add(self.isn, 1)
        self._send(SYN, self.isn, options=self._syn_options(True))
        self.timer = now + self.rto_jittered()
        self.last_progress = now

    def on_guest_segment(self, seg: TcpSegment, now: float) -> None:
        flags = seg.flags
        self._now_ms = int(now * 1000)
        ts = seg.options.timestamp
        # The newest TSval, for TSecr (RFC 7323 §4.3 asks for the one of the
        # segment that advanced the left edge; the newest errs on the short side).
        if (
            ts is not None
            and Flags.TIMESTAMPS in self.flags
            and (not self.ts_recent or seq_diff(ts[0], self.ts_recent) > 0)
        ):
            self.ts_recent = ts[0]
        if flags & RST:
            # The guest aborts: RFC 9293 §3.10.7.4; the guest is our own
            # link, so any RST for this tuple is taken as genuine.
            self.abort(now, rst_guest=False, rst_peer=True)
            return
        state = self.state
        if state is State.CONNECTING:
            return  # a retransmitted SYN: the SYN-ACK follows once connected
        if state is State.SYN_SENT:
            self._syn_ack_from_guest(seg, now)
            return
        if state is State.SYN_ACK_SENT:
            if flags & SYN:
                self._send(SYN | ACK, self.isn, options=self._syn_options(self.our_ws != 0))
                return
            if not flags & ACK or seg.ack != seq_add(self.isn, 1):
                return
            self.state = State.ESTABLISHED
            self.flow.state = self.state.value
            self.seq_ack_from_guest = seg.ack
            self.retries, self.rto, self.timer = 0, RTO_INITIAL, float("inf")
        elif state is not State.ESTABLISHED:
            return
        elif flags & SYN:
            self.send_ack()  # RFC 9293 §3.10.7.4: a SYN in a synchronized state
            return
        self.last_progress = now
        if flags & ACK:
            self._ack_from_guest(seg, now)
            if self.state is State.CLOSED:
                return
        if seg.payload or flags & FIN:
            self._data_from_guest(seg, now)
        elif seq_diff(seg.seq, self.seq_from_guest) < 0:
            # An old sequence number with no data: a zero-window probe or a
            # keep-alive (Linux sends both at snd_una - 1). It must be answered
            # with an ACK carrying the current window (RFC 9293 §3.8.6.1,
            # §3.10.7.4), or a guest we told "window 0" waits for its timer.
            self.send_ack()
        if self.state is State.ESTABLISHED:
            # What the window now lets go is sent once the burst of frames
            # has been read, for all its ACKs at once: pushing megabytes for
            # each ACK would keep the guest's own data waiting behind them in
            # the frontend's queue (an upload next to a download crawls).
            self.push_due = True
            self._at_burst_end()
            self._maybe_finish(now)

    def _syn_ack_from_guest(self, seg: TcpSegment, now: float) -> None:
        if seg.flags & (SYN | ACK) != SYN | ACK or seg.ack != seq_add(self.isn, 1):
            return
        opts = seg.options
        self.seq_init_from_guest = seg.seq
        self.seq_from_guest = seq_add(seg.seq, 1)
        if opts.wscale is not None:
            self.guest_ws = opts.wscale
        else:
            self.our_ws = 0  # RFC 7323 §2.2: scaling only if both SYNs carry it
        self.guest_mss = guest_mss_untrusted(opts.mss)
        self.guest_wnd = seg.window  # never scaled in a SYN (RFC 7323 §2.2)
        if opts.timestamp is None:
            self.flags &= ~Flags.TIMESTAMPS  # RFC 7323 §3.2: only if both SYNs carry it
        else:
            self.ts_recent = opts.timestamp[0]
        self.seq_ack_from_guest = seg.ack
        self.state = State.ESTABLISHED
        self.flow.state = self.state.value
        self.retries, self.rto, self.timer = 0, RTO_INITIAL, float("inf")
        self.send_ack()
        self.push(now)
        self._poke()

    def _ack_from_guest(self, seg: TcpSegment, now: float) -> None:
        acked = seq_diff(seg.ack, self.seq_ack_from_guest)
        new_wnd = seg.window << self.guest_ws
        # After a rewind the guest may acknowledge more than was sent since:
        # up to the highest sequence number ever sent is valid (RFC 9293
        # §3.10.7.4: SND.UNA < SEG.ACK =< SND.NXT, with SND.NXT the highest).
        if 0 < acked <= seq_diff(self.seq_max_to_guest, self.seq_ack_from_guest):
            fin = self.fin_seq is not None and seq_diff(seg.ack, self.fin_seq) > 0
            data = acked - 1 if fin else acked
            if data:
                try:
                    self._discard(data)  # the kernel's peek offset shrinks with it
                except OSError as exc:
                    self._socket_error(exc, now)
                    return
            self.seq_ack_from_guest = seg.ack
            if self.recover is not None and seq_diff(seg.ack, self.recover) > 0:
                self.recover = None  # beyond what was resent: dupacks count again
            if seq_diff(seg.ack, self.seq_to_guest) > 0:
                self.seq_to_guest = seg.ack  # past a rewound point: peek offset is 0
            if fin:
                self.flags |= Flags.FIN_TO_GUEST | Flags.FIN_TO_GUEST_ACKED
            self.dupacks = 0
            self.retries = 0
            self.rto = RTO_INITIAL
            self._starved = False
            self.timer = now + self.rto_jittered() if self.flight else float("inf")
            self.prepare_wait()
        elif (
            acked == 0
            and self.flight
            and not seg.payload
            and not seg.flags & (SYN | FIN)
            and new_wnd == self.guest_wnd
        ):
            self.dupacks += 1
            # Not while a resend is outstanding (RFC 6582 §3.2 step 1: no
            # fast retransmit unless the ACK covers more than "recover").
            # A rewind resends up to a whole window, and the guest answers
            # every segment it already holds with an immediate ACK of its
            # rcv_nxt (tcp_data_queue: old data forces an ACK); once ours
            # run past that point again, those ACKs are duplicates, and
            # counting them rewound again and again: a storm of old data and
            # ACKs that overflowed the tap queue and starved the guest's own
            # segments of room (its uploads stalled on RTO backoff, and other
            # connections' ACKs were lost for 8 retransmissions).
            if self.dupacks == DUPACK_THRESHOLD and self.recover is None:
                self._rewind()
        opened = new_wnd > self.guest_wnd
        self.guest_wnd = new_wnd
        if opened or acked > 0:
            self._poke()

    def _data_from_guest(self, seg: TcpSegment, now: float) -> None:
        payload = seg.payload
        off = seq_diff(self.seq_from_guest, seg.seq)
        if off < 0:
            # A hole before this segment (ferryd keeps no out-of-order data:
            # no buffer, DESIGN.md). The first time this hole is seen, send
            # the three duplicate ACKs that make the guest retransmit from
            # seq_from_guest at once (RFC 5681 §3.2) instead of at its RTO.
            self.send_ack()
            if self._hole_acked != self.seq_from_guest:
                self._hole_acked = self.seq_from_guest
                self._send(ACK, self.seq_to_guest)
                self._send(ACK, self.seq_to_guest)
            return
        fin_again = bool(seg.flags & FIN) and Flags.FIN_FROM_GUEST in self.flags
        if (payload and off >= len(payload)) or fin_again:
            # Entirely old: our ACK for it was lost or is late. Answer at
            # once, even if we believe we already sent this ACK (RFC 9293
            # §3.10.7.4: an unacceptable segment gets an ACK).
            self.send_ack()
            return
        short = False
        if off < len(payload) and Flags.FIN_FROM_GUEST not in self.flags:
            data = payload[off:]
            try:
                if self.restore_tail is not None and not self._finish_tail():
                    raise BlockingIOError  # the migrated unsent bytes go first
                n = self.sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._socket_error(exc, now)
                return
            except SocketStateError as exc:  # the migrated tail could not be sent
                log.info("%s: %s: reset", self.describe(), exc)
                self.abort(now, rst_guest=True, rst_peer=True)
                return
            if n:
                self.seq_from_guest = seq_add(self.seq_from_guest, n)
                self.flow.from_guest(n, now)
            short = n < len(data)
        if (
            seg.flags & FIN
            and not short
            and Flags.FIN_FROM_GUEST not in self.flags
            and seq_add(seg.seq, len(payload)) == self.seq_from_guest
        ):
            try:
                # A migrated socket's unsent bytes go before the FIN: after
                # shutdown() they could never be sent (nor could the FIN wait).
                short = self.restore_tail is not None and not self._finish_tail()
            except SocketStateError as exc:
                log.info("%s: %s: reset", self.describe(), exc)
                self.abort(now, rst_guest=True, rst_peer=True)
                return
        if (
            seg.flags & FIN
            and not short
            and Flags.FIN_FROM_GUEST not in self.flags
            and seq_add(seg.seq, len(payload)) == self.seq_from_guest
        ):
            self.flags |= Flags.FIN_FROM_GUEST
            self.seq_from_guest = seq_add(self.seq_from_guest, 1)
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._socket_error(exc, now)
                return
        if not short:
            # Acknowledged once the stack has handled the whole burst of
            # frames the tap had queued: one ACK covers many segments.
            self._at_burst_end()
            return
        self.send_ack()
        if short:
            # Make the guest resend from seq_from_guest at once: two more
            # identical ACKs make three duplicates (same window: a changed
            # window would not count, RFC 5681 §2).
            self._send(ACK, self.seq_to_guest)
            self._send(ACK, self.seq_to_guest)
            self.want_writable = True
            self._poke()

    def _finish_tail(self) -> bool:
        """Send the rest of a migrated socket's unsent bytes; True once done."""
        assert self.restore_tail is not None
        state, sent = self.restore_tail
        sent = finish_restore(self.sock, state, sent=sent)
        if sent < state.unsent:
            self.restore_tail = (state, sent)
            self.want_writable = True
            self._poke()
            return False
        self.restore_tail = None
        return True

    def on_writable(self, now: float) -> None:
        """Send buffer space freed up: tell the guest its new window."""
        self.want_writable = False
        if self.restore_tail is not None:
            try:
                if not self._finish_tail():
                    return
            except SocketStateError as exc:
                log.info("%s: %s: reset", self.describe(), exc)
                self.abort(now, rst_guest=True, rst_peer=True)
                return
        if self.state is State.ESTABLISHED:
            before = self.wnd_to_guest
            self._update_window()
            if self.wnd_to_guest != before:
                self._send(ACK, self.seq_to_guest)

    def on_readable(self, now: float) -> None:
        if self.state is not State.ESTABLISHED:
            return
        sent = self.push(now)
        if not sent and self.data_flight and Flags.SOCK_EOF not in self.flags:
            # Readable but nothing beyond the flight: the receive queue is
            # full of unacknowledged bytes (tcp_epollin_ready reports
            # readability when the receive window is nearly closed). Wait
            # for the guest's ACK instead of spinning.
            self._starved = True
        self._maybe_finish(now)

    def push(self, now: float) -> int:
        """Send the guest what its window allows; returns payload bytes sent."""
        if self.state is not State.ESTABLISHED or Flags.FIN_TO_GUEST in self.flags:
            return 0
        left = min(self.guest_wnd, self._rcvlowat_cap) - self.flight
        buf, total = self._buf, 0
        mss = min(self.guest_mss, self.link_mss)
        if Flags.TIMESTAMPS in self.flags:
            mss -= TS_OPTION_LEN  # the MSS leaves options out (RFC 9293 §3.7.1)
        # guest_mss is floored already (guest_mss_untrusted); the option's
        # bytes must not take a segment below the floor either, but a link
        # smaller than the floor (MTU 68) still bounds it.
        mss = min(max(mss, MIN_SND_MSS), self.link_mss)
        self._now_ms = int(now * 1000)
        drained = False
        while left > 0:
            want = min(left, len(buf))
            try:
                n = self.sock.recv_into(buf, want, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                drained = True
                break
            except OSError as exc:
                self._socket_error(exc, now)
                return total
            if n == 0:
                self.flags |= Flags.SOCK_EOF
                drained = True
                break
            if not total:
                # Data segments carry our ACK and window too: a window computed
                # when the socket was full would otherwise ride on every one of
                # them, and flush_ack() sends no separate ACK once data carried
                # it, so the guest's uploads would stay throttled.
                self._update_window()
            for off in range(0, n, mss):
                end = min(off + mss, n)
                flags = ACK | PSH if end == n else ACK
                self._send(flags, seq_add(self.seq_to_guest, off), buf[off:end])
            self.seq_to_guest = seq_add(self.seq_to_guest, n)
            if seq_diff(self.seq_to_guest, self.seq_max_to_guest) > 0:
                self.seq_max_to_guest = self.seq_to_guest
            total += n
            left -= n
            if n < want:
                drained = True
                break
        # The FIN follows the last byte, so only once the queue was drained
        # (a migrated socket knows its EOF from the flags, not from recv()).
        if drained and Flags.SOCK_EOF in self.flags and Flags.FIN_TO_GUEST not in self.flags:
            self._send(FIN | ACK, self.seq_to_guest)
            self.fin_seq = self.seq_to_guest
            self.seq_to_guest = seq_add(self.seq_to_guest, 1)
            if seq_diff(self.seq_to_guest, self.seq_max_to_guest) > 0:
                self.seq_max_to_guest = self.seq_to_guest
            self.flags |= Flags.FIN_TO_GUEST
        if total:
            self.flow.to_guest(total, now)
            self.last_progress = now
            self.prepare_wait()
        if self.flight and self.timer == float("inf"):
            self.timer = now + self.rto_jittered()
            self._poke()
        elif not self.flight and self.guest_wnd == 0 and not total:
            # Zero window with data waiting: probe it (RFC 9293 §3.8.6.1).
            self.timer = min(self.timer, now + self.rto_jittered())
            self._poke()
        return total

    def _discard(self, n: int) -> None:
        """Drop ``n`` acknowledged bytes from the receive queue, copying nothing.

        For TCP, MSG_TRUNC discards instead of copying (tcp_recvmsg); the
        buffer is only there to satisfy the API (recv(n) would allocate n
        bytes per call, which for megabytes means an mmap and page faults).
        """
        buf = self._buf
        while n > 0:
            got = self.sock.recv_into(buf, min(n, len(buf)), socket.MSG_TRUNC | socket.MSG_DONTWAIT)
            if got <= 0:
                break
            n -= got

    def _rewind(self) -> None:
        """Go back to the guest's last ACK: everything after it is resent."""
        self.recover = self.seq_max_to_guest  # RFC 6582 §3.2 steps 2 and 4
        self.seq_to_guest = self.seq_ack_from_guest
        self.flags &= ~Flags.FIN_TO_GUEST
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        self.dupacks = 0
        self._starved = False
        self.prepare_wait()

    def on_timer(self, now: float) -> None:
        self._now_ms = int(now * 1000)
        state = self.state
        if state is State.CONNECTING:
            log.debug("connect to %s:%d timed out", self.ends.remote_addr, self.ends.remote_port)
            self.abort(now, rst_guest=True, rst_peer=False)
            return
        if state is State.ESTABLISHED and now >= self.last_progress + IDLE_TIMEOUT:
            log.info("%s: idle for %.0f s: reset", self.describe(), IDLE_TIMEOUT)
            self.abort(now, rst_guest=True, rst_peer=True)
            return
        if now < self.timer:
            self._poke()  # woken for a deadline that has since moved
            return
        if self.retries >= MAX_RETRIES:
            log.info(
                "%s: no answer from the guest after %d retransmissions: reset",
                self.describe(),
                self.retries,
            )
            self.abort(now, rst_guest=True, rst_peer=True)
            return
        self.retries += 1
        self.rto = min(self.rto * 2, RTO_MAX)
        self.timer = now + self.rto_jittered()
        if state is State.SYN_SENT:
            self._send(SYN, self.isn, options=self._syn_options(True))
        elif state is State.SYN_ACK_SENT:
            self._send(SYN | ACK, self.isn, options=self._syn_options(self.our_ws != 0))
        elif state is State.ESTABLISHED:
            if self.flight:
                self._rewind()
                self.push(now)
            elif self.guest_wnd == 0:
                # Window probe: an old sequence number makes the guest ACK
                # with its current window (RFC 9293 §3.8.6.1).
                self._send(ACK, seq_add(self.seq_to_guest, -1))
            else:
                self.retries, self.rto, self.timer = 0, RTO_INITIAL, float("inf")
        self._poke()

    def _maybe_finish(self, now: float) -> None:
        """Both FINs exchanged and ours acknowledged: close the socket."""
        done = Flags.FIN_FROM_GUEST | Flags.FIN_TO_GUEST_ACKED
        if self.flags & done == done:
            self.close(now, abort=False)

    def _socket_error(self, exc: OSError, now: float) -> None:
        if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
            log.info("%s: socket error %s: reset", self.describe(), exc)
        self.abort(now, rst_guest=True, rst_peer=False)

    def abort(self, now: float, *, rst_guest: bool, rst_peer: bool) -> None:
        if self.state is State.CLOSED:
            return
        if rst_guest and self.state is not State.SYN_SENT:
            if self.state is State.CONNECTING:
                self._send(RST | ACK, 0)
            else:
                self._send(RST | ACK, self.seq_to_guest)
        elif rst_guest:
            self._send(RST, self.seq_to_guest)
        self.close(now, abort=rst_peer)

    def close(self, now: float, *, abort: bool) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.flow.state = self.state.value
        if abort:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        self.timer = float("-inf")
        # Before close(): the adapter takes the descriptor out of its epoll
        # while the number is still this socket's (it is reused at once).
        self._on_closed(self)
        self.sock.close()

    def describe(self) -> str:
        e = self.ends
        return f"tcp {e.guest_addr}:{e.guest_port} -> {e.remote_addr}:{e.remote_port}"


_NO_OPTIONS = TcpOptions()
