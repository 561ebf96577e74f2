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
rewind (RFC 6582 "recover"). The flight is limited by the guest's window,
and by the room in the guest's queue: a segment the frontend refuses
(FrameSink.send: a full receive ring or socket) ends the push there, the
peek offset goes back to the flight, and the adapter pushes again at its
next flush (the guest's frames, or the frontend telling of new room), not
on readability (``_starved``). Sending on into a queue that drops would
make every segment after the first refused one a loss for the guest to
answer with duplicate ACKs, and a window larger than the queue a
go-back-N that never catches up. Because the queued flight keeps the
socket readable, the reader waits with SO_RCVLOWAT set to flight + 1:
tcp_poll then reports readability only when bytes beyond the flight
arrived (or on FIN/error).

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

Sans-IO. Time is passed in (``now``), never read here; nothing here waits,
and nothing here touches a socket or draws a random number itself. The
host socket's kernel is a port (:class:`~ferryd.flows.tcp_host.HostSocket`,
one synchronous call per kernel operation, because its answer is needed in
the middle of an event: how much a send() took, what a peek found), as are
the guest link (:class:`~ferryd.guest.GuestPort`: segments out) and the
source of randomness (:class:`~ferryd.flows.tcp_host.Entropy`: ISN, RTO
jitter). Inputs are the methods below (a guest segment, the socket readable
or writable or connected, a timer, the end of a burst); outputs are segments
to the guest, operations on the host socket, and what the connection waits
for next: ``reading()``, ``want_writable``, ``deadline()`` and ``ack_due``,
which the adapter in :mod:`ferryd.flows.tcp` (it owns the clock, the flow
table and the one reactor that waits for every connection) reads after
every event it delivers, to re-arm the connection once its batch of events
is done. A migration reads the guest-side bookkeeping with
:meth:`TcpConn.guest_state` and builds a connection from it with
:meth:`TcpConn.restored`.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
from typing import NamedTuple

from ferryd.flows.table import Flow, FlowKey
from ferryd.flows.tcp_host import Entropy, HostSocket, TailError, UnsentTail
from ferryd.flows.tcp_seq import seq_add, seq_diff
from ferryd.guest import GuestPort
from ferryd.wire.ip import IPPROTO_TCP, IpAddress
from ferryd.wire.tcp import (
    ACK,
    FIN,
    NO_OPTIONS,
    PSH,
    RST,
    SYN,
    TCP_CSUM_OFFSET,
    TcpOptions,
    TcpSegment,
    build_tcp_header_partial,
)

log = logging.getLogger("ferryd.tcp")

#: "No deadline". One float for every connection: float("inf") makes a new
#: 24-byte object each time, and an idle connection would keep one.
INF = float("inf")
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


@functools.lru_cache(maxsize=256)
def guest_mss_untrusted(advertised: int | None) -> int:
    """The MSS to use for a guest that advertised ``advertised`` in its SYN.

    An absent or zero option means the default (tcp_parse_options ignores a
    zero MSS); anything below :data:`MIN_SND_MSS` is raised to it. The upper
    end is the link's, applied when segments are cut (:meth:`TcpConn.push`).
    Cached (called per SYN, not per segment): every connection then keeps
    one shared int for the few values guests advertise, not 32 bytes of its own.
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


class Flags:
    """Closing progress and agreed options: bits of ``TcpConn.flags``, an int carried
    opaquely by the migration stream.

    Plain ints, not an enum.IntFlag: the enum's ``in`` and ``|`` run in Python
    (~1.3 and ~2.1 µs here against ~0.08 for an int's ``&``), and a
    connection tests these bits several times per segment.
    """

    FIN_FROM_GUEST = 1
    """The guest's FIN was accepted and the socket shut down for writing."""
    SOCK_EOF = 2
    """The socket reached end of file (the peer's FIN)."""
    FIN_TO_GUEST = 4
    """A FIN was sent to the guest (it occupies one sequence number)."""
    FIN_TO_GUEST_ACKED = 8
    TIMESTAMPS = 16
    """RFC 7323 timestamps were agreed with the guest (see TcpConn.ts_offset)."""
    TS_OFFERED = 32
    """The guest's SYN offered timestamps: agreed once the host socket connected."""


#: The bits of Flags that say how far closing went.
CLOSING = Flags.FIN_FROM_GUEST | Flags.SOCK_EOF | Flags.FIN_TO_GUEST | Flags.FIN_TO_GUEST_ACKED
#: How many window values TcpShared.share() keeps.
_SHARED_VALUES = 1024
#: What the timestamps option adds to each segment (10 bytes, 2 NOPs: RFC 7323 §3.2).
TS_OPTION_LEN = 12
#: TcpConn._starved: readable, but the receive queue holds only bytes in flight
#: (tcp_epollin_ready reports readability when the window is nearly closed):
#: the guest's ACK comes first.
FLIGHT_ONLY = 1
#: TcpConn._starved: the frontend had no room for a segment (FrameSink.send),
#: or the adapter's credit for this turn is spent (flows/tcp.py,
#: PUSH_QUANTUM): the adapter pushes again at the next flush (the guest's
#: frames, or new room).
NO_ROOM = 2
#: How long a push that found the adapter's credit spent, with nothing in
#: flight, waits for the guest's next burst before its timer pushes anyway:
#: a guest that stopped sending (its upload ended) must not stall a download.
CREDIT_WAIT = 0.002


class Endpoints(FlowKey):
    """The connection's addresses as the guest sees them: its key in the flow table.

    A :class:`FlowKey` whose protocol is TCP, so that one object is both
    (an endpoints object and a key were 152 bytes a flow, bench.memory);
    equal to, and hashed as, the FlowKey a guest frame of the connection
    builds for its lookup.
    """

    __slots__ = ()

    def __new__(
        cls, guest_addr: IpAddress, guest_port: int, remote_addr: IpAddress, remote_port: int
    ) -> Endpoints:
        return tuple.__new__(cls, (IPPROTO_TCP, guest_addr, guest_port, remote_addr, remote_port))


class TcpGuestState(NamedTuple):
    """A connection's guest-side bookkeeping: what a migration carries besides the socket.

    A named tuple rather than a frozen dataclass, as FlowKey: a migration's
    freeze builds one for every pre-copied connection and compares it with
    the one its pre-copy kept, and the dataclass's __init__ (each field set
    through object.__setattr__ in Python) and __eq__ (two tuples built)
    made that 3.7 µs a connection against ~1 here.

    Everything else a connection has (timers, duplicate-ACK counts, what it
    waits for) is rebuilt on the target; the bytes themselves are in the
    host socket's queues (no payload here, DESIGN.md).
    """

    state: State
    flags: int
    seq_to_guest: int
    """Next sequence number to the guest (SND.NXT, not rewound by a migration)."""
    seq_ack_from_guest: int
    """The guest's latest ACK (SND.UNA)."""
    seq_from_guest: int
    """Next sequence number expected from the guest (RCV.NXT)."""
    seq_ack_to_guest: int
    """The ACK last sent to the guest."""
    guest_wnd: int
    """The guest's receive window in bytes (already scaled)."""
    guest_ws: int
    our_ws: int
    guest_mss: int


class TcpShared:
    """What the connections of one adapter and IP version share: one slot each.

    Six values every connection reads (its guest link, the link's MSS, the
    peek buffer, the receive-low-water cap, the entropy, the clock) held
    once instead of in six slots of every TcpConn, the clock's own int
    object among them: 76-81 bytes less USS per idle flow at 16,384 flows,
    55-64 at 1,000 (bench.memory, alternated twice).

    ``now_ms`` is the clock of the latest event any of them handled, in ms,
    for the TSval of what they send (RFC 7323 §4.1: TSval from a clock that
    never goes back). Only ever raised (:meth:`tick`): an event handled
    with an older ``now`` than one before it then stamps the newer time,
    so no connection's TSval steps back, which the guest's PAWS check
    (RFC 7323 §5, tcp_paws_check) would punish by dropping the segment.
    """

    __slots__ = (
        "_values",
        "entropy",
        "guest",
        "link_mss",
        "now_ms",
        "peek_buffer",
        "rcvlowat_cap",
    )

    def __init__(
        self,
        guest: GuestPort,
        link_mss: int,
        peek_buffer: memoryview,
        rcvlowat_cap: int,
        entropy: Entropy,
    ) -> None:
        self.guest = guest
        self.link_mss = link_mss
        self.peek_buffer = peek_buffer
        self.rcvlowat_cap = rcvlowat_cap
        self.entropy = entropy
        self.now_ms = 0
        self._values: dict[int, int] = {}

    def tick(self, now: float) -> None:
        ms = int(now * 1000)
        if ms > self.now_ms:
            self.now_ms = ms

    def share(self, value: int) -> int:
        """The one int object kept for ``value``, for the windows connections hold.

        An int above 256 is an object of its own (28-32 bytes); every idle
        connection keeps two windows (the guest's, scaled, and ours), and
        those of idle connections are nearly all the same few values (the
        same buffer sizes and scales). Bounded: past 1,024 values (bulk
        transfers' windows vary) the cache starts again, nothing worse.
        """
        values = self._values
        kept = values.get(value)
        if kept is None:
            if len(values) >= _SHARED_VALUES:
                values.clear()
            values[value] = kept = value
        return kept


class TcpConn:
    """State of one spliced connection; driven by the adapter's events."""

    # One per connection, up to --max-flows (16,384): with ~40 attributes an
    # instance __dict__ is a full dict of its own (past CPython's 30 shared
    # keys), ~1.6 KB; slots make it ~0.4 KB (bench.memory). A new attribute
    # must be named here.
    __slots__ = (
        "_hole_acked",
        "_rcvlowat",
        "_starved",
        "_tail",
        "ack_due",
        "dupacks",
        "ends",
        "fin_seq",
        "flags",
        "flow",
        "guest_mss",
        "guest_wnd",
        "guest_ws",
        "host",
        "our_ws",
        "push_due",
        "reactor_fd",
        "reactor_mask",
        "recover",
        "retries",
        "rto",
        "seq_ack_from_guest",
        "seq_ack_to_guest",
        "seq_from_guest",
        "seq_max_to_guest",
        "seq_to_guest",
        "shared",
        "state",
        "timer",
        "ts_offset",
        "ts_recent",
        "want_writable",
        "wnd_to_guest",
    )

    def __init__(
        self,
        ends: Endpoints,
        host: HostSocket,
        shared: TcpShared,
        state: State,
        *,
        isn: int | None = None,
    ) -> None:
        """``isn``: our initial sequence number towards the guest; None: a fresh random one."""
        self.ends = ends
        self.host = host
        self.shared = shared
        self.flow: Flow[TcpConn]  # set by the adapter once the table holds it
        self.reactor_fd = -1
        self.reactor_mask = 0
        """The adapter's epoll registration (flows.reactor.Watched)."""
        self.state = state
        self.ack_due = False
        """Segments of the current burst wait for flush_ack() (the adapter queues it)."""
        self.push_due = False
        self.flags = 0
        if isn is None:
            isn = shared.entropy.getrandbits(32)
        self.seq_to_guest = isn
        self.seq_ack_from_guest = isn
        """The guest's latest ACK (SND.UNA); our ISN until it acknowledged the SYN."""
        self.seq_max_to_guest = isn
        """The highest sequence number sent to the guest (SND.NXT before any rewind)."""
        self.fin_seq: int | None = None
        """Sequence number of the FIN sent to the guest, once sent."""
        self.seq_from_guest = 0
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
        self.timer: float = INF
        self._rcvlowat = 1
        self._starved = 0
        """Not reading the socket: FLIGHT_ONLY, or NO_ROOM (see those); 0: reading."""
        self.want_writable = False
        """The adapter should wait for writability and call on_writable()."""
        self._hole_acked = -1
        """seq_from_guest at which a hole last got its duplicate ACKs."""
        self.ts_offset = 0
        """With Flags.TIMESTAMPS: TSval = now in ms + ts_offset, mod 2^32. Taken from the
        host socket's own timestamp clock (TCP_TIMESTAMP, CLOCK_MONOTONIC like ours), so a
        migration target, whose restored socket goes on with the source's clock, can go
        on with it too (TcpConn.restored): the guest's PAWS check (RFC 7323
        §5) never sees our TSval go back."""
        self.ts_recent = 0
        """The guest's latest TSval, echoed as TSecr (0 until one was seen)."""
        self._tail: UnsentTail | None = None
        """A migrated socket's unsent bytes still to write, before any of the guest's."""

    # --- migration: snapshot and restore ----------------------------------

    def guest_state(self) -> TcpGuestState:
        """The guest-side bookkeeping a migration carries (see TcpGuestState).

        Built with tuple.__new__, in the fields' order, as Endpoints is: the
        named tuple's own __new__ takes its arguments in Python.
        """
        return tuple.__new__(
            TcpGuestState,
            (
                self.state,
                self.flags,
                self.seq_to_guest,
                self.seq_ack_from_guest,
                self.seq_from_guest,
                self.seq_ack_to_guest,
                self.guest_wnd,
                self.guest_ws,
                self.our_ws,
                self.guest_mss,
            ),
        )

    @classmethod
    def restored(
        cls,
        ends: Endpoints,
        host: HostSocket,
        shared: TcpShared,
        saved: TcpGuestState,
        *,
        sock_timestamp: int,
        fin_received: bool,
        now: float,
    ) -> TcpConn:
        """A connection a migration moved here, going on where the source left it.

        ``host`` is the restored socket, its queues as they were; ``saved``
        is the source's guest_state(); ``sock_timestamp`` is the restored
        socket's timestamp clock and ``fin_received`` whether its peer's FIN
        had arrived (kernel facts the socket's dump carries). The state is
        ESTABLISHED whatever ``saved`` says: a connection still in its
        handshake is reset by the target (the caller aborts it).
        """
        conn = cls(
            ends,
            host,
            shared,
            State.ESTABLISHED,
            isn=saved.seq_ack_from_guest,  # past the handshake: no ISN to draw
        )
        conn.seq_ack_from_guest = saved.seq_ack_from_guest
        # Not rewound (flowstate's module doc): the flight is still queued.
        conn.seq_to_guest = conn.seq_max_to_guest = saved.seq_to_guest
        conn.seq_from_guest = saved.seq_from_guest
        conn.seq_ack_to_guest = saved.seq_ack_to_guest
        conn.guest_ws = saved.guest_ws
        conn.our_ws = saved.our_ws
        conn.guest_wnd = shared.share(saved.guest_wnd)
        conn.guest_mss = guest_mss_untrusted(saved.guest_mss)
        flags = saved.flags
        if flags & Flags.FIN_TO_GUEST:
            conn.fin_seq = seq_add(saved.seq_to_guest, -1)
        if flags & Flags.TIMESTAMPS:
            conn.continue_timestamps(sock_timestamp, now)
        if fin_received:
            # A restored socket never reports the peer's earlier FIN as EOF
            # (sockstate: repair mode cannot queue a received FIN; rcv_nxt counts
            # it, but the kernel's state stays ESTABLISHED).
            flags |= Flags.SOCK_EOF
        conn.flags = flags
        # What the guest was sent but has not acknowledged heads the
        # restored receive queue: peek past it.
        host.set_peek_offset(conn.data_flight)
        return conn

    def resume_tail(self, tail: UnsentTail) -> None:
        """The restored socket did not take all of its unsent bytes yet: they go first."""
        self._tail = tail
        self.want_writable = True

    def resume(self, now: float) -> None:
        """A migration target starts the data path: resynchronise the guest.

        The guest gets our ACK and window at once, then what its window
        lets go; what was in flight is retransmitted if it stays
        unacknowledged.
        """
        self.send_ack()
        self.push(now)
        if self.state is State.CLOSED:
            return  # the push found the socket reset by its peer
        if self.flight:
            self.timer = min(self.timer, now + self.rto_jittered())
        self.prepare_wait()

    def settled(self, now: float, quiet: float) -> bool:
        """Nothing in motion for ``quiet`` seconds: a pre-copy may dump the socket.

        Established, not closing, nothing in flight either way, no ACK,
        write or migrated tail pending.
        """
        return (
            self.state is State.ESTABLISHED
            and not self.flags & CLOSING
            and not self.flight
            and not self.ack_due
            and self._tail is None
            and not self.want_writable
            and now - self.flow.last_activity >= quiet
        )

    # --- derived state ----------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def flight(self) -> int:
        """Bytes sent to the guest and not yet acknowledged (FIN included)."""
        return seq_diff(self.seq_to_guest, self.seq_ack_from_guest)

    @property
    def isn(self) -> int:
        """Our initial sequence number, for the handshake's SYNs and checks.

        SND.UNA until the guest acknowledges the SYN (nothing else is sent
        before), and only read until then: a slot less per connection.
        """
        return self.seq_ack_from_guest

    @property
    def data_flight(self) -> int:
        """Payload bytes in flight: what sits peeked in the receive queue."""
        fin = self.flags & Flags.FIN_TO_GUEST and not self.flags & Flags.FIN_TO_GUEST_ACKED
        return self.flight - (1 if fin else 0)

    def reading(self) -> bool:
        """Whether the adapter should wait for new data on the socket."""
        return (
            self.state is State.ESTABLISHED
            and not self.flags & Flags.SOCK_EOF
            and not self._starved
            and self.flight < min(self.guest_wnd, self.shared.rcvlowat_cap)
        )

    def rto_jittered(self) -> float:
        """The RTO stretched by up to a quarter, at random.

        Thousands of connections that lost segments in one burst (a guest
        whose backlog overflowed, a migration) would otherwise retransmit
        in lockstep, overflow it again on every backoff, and never recover.
        """
        return self.rto * (1.0 + self.shared.entropy.random() / 4)

    def deadline(self) -> float:
        """When the adapter must call on_timer(): retransmission, handshake or
        window probe (inf: none).

        Not the idle limit: with it, every idle connection kept an entry of
        its own in the adapter's timer heap for two hours (~200 bytes a flow
        with the adapter's tables, bench.memory). The adapter looks for idle
        ones now and then instead (:meth:`idle_expired`) and calls on_timer().
        """
        return self.timer

    def idle_expired(self, now: float) -> bool:
        """Established with no traffic either way for IDLE_TIMEOUT: on_timer() resets it."""
        return self.state is State.ESTABLISHED and now >= self.flow.last_activity + IDLE_TIMEOUT

    def prepare_wait(self) -> None:
        """Only bytes beyond the flight make the socket readable.

        The adapter calls it whenever it arms reading (TcpFlows._arm), at the
        end of every burst of frames or reactor round that touched this
        connection, so a wait never keeps the mark of a larger, older flight
        (the guest's ACK shrank the queue below it): setting a lower mark on
        a socket holding that much signals readability at once
        (tcp_set_rcvlowat calls tcp_data_ready). Not called per ACK or per
        push: a request/response exchange moves the flight down and up again
        within one burst, and would pay two setsockopt calls for nothing.
        """
        want = min(self.data_flight + 1, self.shared.rcvlowat_cap)
        if want != self._rcvlowat:
            self.host.set_rcvlowat(want)
            self._rcvlowat = want

    # --- frames to the guest ----------------------------------------------

    def _send(
        self,
        flags: int,
        seq: int,
        payload: memoryview | bytes = b"",
        options: TcpOptions | None = None,
    ) -> bool:
        """Send the guest one segment; False if the frontend had no room for it."""
        e = self.ends
        if flags & SYN:
            window = min(self.wnd_to_guest, 0xFFFF)
        else:
            window = min(self.wnd_to_guest >> self.our_ws, 0xFFFF)
        ack = self.seq_from_guest if flags & ACK else 0
        self.seq_ack_to_guest = ack
        if options is None and self.flags & Flags.TIMESTAMPS:
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
            options if options is not None else NO_OPTIONS,
            len(payload),
        )
        return self.shared.guest.send_ip(
            e.remote_addr, e.guest_addr, IPPROTO_TCP, hdr, payload, TCP_CSUM_OFFSET
        )

    def send_ack(self) -> None:
        self._update_window()
        self._send(ACK, self.seq_to_guest)

    def flush_ack(self, now: float, limit: int | None = None) -> int:
        """The burst of guest frames ended: send what its segments let go (one push for
        all their ACKs, at most ``limit`` bytes: see push), then the ACK deferred by
        _data_from_guest unless data carried it."""
        self.ack_due = False
        pushed = 0
        if self.push_due:
            self.push_due = False
            if self.state is State.ESTABLISHED:
                pushed = self.push(now, limit)
                self._maybe_finish(now)
        if self.state is State.ESTABLISHED and self.seq_ack_to_guest != self.seq_from_guest:
            self.send_ack()
        return pushed

    def _at_burst_end(self) -> None:
        """Have the adapter call flush_ack() once the frontend's queue ran dry."""
        self.ack_due = True

    def _syn_options(self, offer_wscale: bool) -> TcpOptions:
        ts = (self._tsval(), self.ts_recent) if self.flags & Flags.TIMESTAMPS else None
        return TcpOptions(
            mss=self.shared.link_mss, wscale=OUR_WSCALE if offer_wscale else None, timestamp=ts
        )

    def continue_timestamps(self, sock_ts: int, now: float) -> None:
        """A migration target: go on with the clock of the restored host socket.

        The restored socket continues its timestamp clock from the dumped
        value ``sock_ts``; ours follows, one ms ahead so that rounding never
        takes it back. The guest's TSval is learnt again from its next
        segment (TSecr 0 until then gives the guest no RTT sample, nothing
        worse: tcp_ack_update_rtt).
        """
        shared = self.shared
        shared.tick(now)
        self.ts_offset = (sock_ts + 1 - shared.now_ms) & 0xFFFFFFFF
        self.ts_recent = 0

    def _tsval(self) -> int:
        return (self.shared.now_ms + self.ts_offset) & 0xFFFFFFFF

    def _start_timestamps(self, now: float) -> None:
        """Agree to RFC 7323 timestamps: our clock is the host socket's (ts_offset).

        They give the guest an RTT sample from every ACK, retransmissions
        included (RFC 7323 §4); without them Karn's rule leaves it none while
        it retransmits, so after a loss (ferryd keeps no out-of-order data)
        its RTO backs off for good (tcp_ack_update_rtt resets icsk_backoff
        only on a sample) and the connection crawls on timeouts.
        """
        shared = self.shared
        shared.tick(now)
        try:
            sock_ts = self.host.timestamp()
        except OSError:
            sock_ts = shared.entropy.getrandbits(32)
        self.ts_offset = sock_ts - shared.now_ms
        self.flags |= Flags.TIMESTAMPS

    def _update_window(self) -> None:
        """Window for the guest: the socket's free send space (see module doc)."""
        if self.flags & Flags.FIN_FROM_GUEST:
            wnd = 0xFFFF << self.our_ws  # nothing more may come
        else:
            sndbuf = self.host.sndbuf()
            free = max(0, sndbuf * 3 // 4 - self.host.outq())
            wnd = min(free, 0xFFFF << self.our_ws)
            if free < sndbuf // 4:
                self.want_writable = True
        if wnd != self.wnd_to_guest:
            self.wnd_to_guest = self.shared.share(wnd)

    # --- events from the adapter ------------------------------------------

    def start_outbound(self, syn: TcpSegment, now: float) -> None:
        """Guest SYN for a new connection; the adapter started connect()."""
        opts = syn.options
        self.seq_from_guest = seq_add(syn.seq, 1)
        if opts.wscale is not None:
            self.guest_ws, self.our_ws = opts.wscale, OUR_WSCALE
        self.guest_mss = guest_mss_untrusted(opts.mss)
        self.guest_wnd = syn.window
        if opts.timestamp is not None:  # agreed once connected (_start_timestamps)
            self.ts_recent = opts.timestamp[0]
            self.flags |= Flags.TS_OFFERED
        self.timer = now + CONNECT_TIMEOUT

    def on_connected(self, now: float) -> None:
        """The host connect() finished (writable): success or failure."""
        err = self.host.connect_error()
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
        if self.flags & Flags.TS_OFFERED:
            self.flags &= ~Flags.TS_OFFERED
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

    def on_guest_segment(self, seg: TcpSegment, now: float) -> None:
        flags = seg.flags
        self.shared.tick(now)
        ts = seg.options.timestamp
        # The newest TSval, for TSecr (RFC 7323 §4.3 asks for the one of the
        # segment that advanced the left edge; the newest errs on the short side).
        if (
            ts is not None
            and self.flags & Flags.TIMESTAMPS
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
            self._handshake_done()
            self.retries, self.rto, self.timer = 0, RTO_INITIAL, INF
        elif state is not State.ESTABLISHED:
            return
        elif flags & SYN:
            self.send_ack()  # RFC 9293 §3.10.7.4: a SYN in a synchronized state
            return
        # The connection's progress clock (idle_expired, settled) is its
        # flow's: a slot and a float object less per connection than a
        # clock of its own (bench.memory).
        self.flow.last_activity = now
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
        self.state = State.ESTABLISHED
        self.flow.state = self.state.value
        self._handshake_done()
        self.retries, self.rto, self.timer = 0, RTO_INITIAL, INF
        self.send_ack()
        self.push(now)

    def _handshake_done(self) -> None:
        """The guest acknowledged our SYN (its ACK is ISN + 1, checked): ESTABLISHED.

        What it acknowledged is ``seq_to_guest`` (nothing was sent after the
        SYN), kept as that int rather than the segment's: one int object for
        the life of the connection, 32 of an idle flow's bytes (bench.memory).
        """
        self.seq_ack_from_guest = self.seq_to_guest

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
                    self.host.discard(data)  # the kernel's peek offset shrinks with it
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
            self._starved = 0
            self.timer = now + self.rto_jittered() if self.flight else INF
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
        if new_wnd != self.guest_wnd:
            self.guest_wnd = self.shared.share(new_wnd)

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
        fin_again = bool(seg.flags & FIN and self.flags & Flags.FIN_FROM_GUEST)
        if (payload and off >= len(payload)) or fin_again:
            # Entirely old: our ACK for it was lost or is late. Answer at
            # once, even if we believe we already sent this ACK (RFC 9293
            # §3.10.7.4: an unacceptable segment gets an ACK).
            self.send_ack()
            return
        short = False
        if off < len(payload) and not self.flags & Flags.FIN_FROM_GUEST:
            data = payload[off:]
            try:
                if self._tail is not None and not self._finish_tail():
                    raise BlockingIOError  # the migrated unsent bytes go first
                n = self.host.write(data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._socket_error(exc, now)
                return
            except TailError as exc:  # the migrated tail could not be sent
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
            and not self.flags & Flags.FIN_FROM_GUEST
            and seq_add(seg.seq, len(payload)) == self.seq_from_guest
        ):
            try:
                # A migrated socket's unsent bytes go before the FIN: after
                # shutdown() they could never be sent (nor could the FIN wait).
                short = self._tail is not None and not self._finish_tail()
            except TailError as exc:
                log.info("%s: %s: reset", self.describe(), exc)
                self.abort(now, rst_guest=True, rst_peer=True)
                return
        if (
            seg.flags & FIN
            and not short
            and not self.flags & Flags.FIN_FROM_GUEST
            and seq_add(seg.seq, len(payload)) == self.seq_from_guest
        ):
            try:
                self.host.shutdown_write()
            except OSError as exc:  # the FIN is not taken: the RST must not ACK it
                self._socket_error(exc, now)
                return
            self.flags |= Flags.FIN_FROM_GUEST
            self.seq_from_guest = seq_add(self.seq_from_guest, 1)
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

    def _finish_tail(self) -> bool:
        """Send the rest of a migrated socket's unsent bytes; True once done."""
        assert self._tail is not None
        if not self._tail.send_more():
            self.want_writable = True
            return False
        self._tail = None
        return True

    def on_writable(self, now: float) -> None:
        """Send buffer space freed up: tell the guest its new window."""
        self.want_writable = False
        if self._tail is not None:
            try:
                if not self._finish_tail():
                    return
            except TailError as exc:
                log.info("%s: %s: reset", self.describe(), exc)
                self.abort(now, rst_guest=True, rst_peer=True)
                return
        if self.state is State.ESTABLISHED:
            before = self.wnd_to_guest
            self._update_window()
            if self.wnd_to_guest != before:
                self._send(ACK, self.seq_to_guest)

    def on_readable(self, now: float, limit: int | None = None) -> int:
        """New bytes in the socket: push them (at most ``limit``: see push)."""
        if self.state is not State.ESTABLISHED:
            return 0
        sent = self.push(now, limit)
        if (
            not sent
            and self.data_flight
            and not self.flags & Flags.SOCK_EOF
            and self._starved != NO_ROOM  # that one is pushed again at a flush
        ):
            # Readable but nothing beyond the flight: the receive queue is
            # full of unacknowledged bytes (tcp_epollin_ready reports
            # readability when the receive window is nearly closed). Wait
            # for the guest's ACK instead of spinning.
            self._starved = FLIGHT_ONLY
        self._maybe_finish(now)
        return sent

    def push(self, now: float, limit: int | None = None) -> int:
        """Send the guest what its window allows, at most ``limit`` payload bytes
        (None: no limit; the adapter's credit, flows/tcp.py, PUSH_QUANTUM);
        returns the payload bytes sent. What is left keeps the socket readable,
        or, with no credit left (``limit`` 0), waits for the next flush."""
        if self.state is not State.ESTABLISHED or self.flags & Flags.FIN_TO_GUEST:
            return 0
        if self._starved == NO_ROOM:
            self._starved = 0  # tried again: it stops again if there is still none
        if limit is not None and limit <= 0:
            # The adapter's credit is spent (flows/tcp.py, PUSH_QUANTUM): wait for
            # the guest's next burst as for room (TcpFlows.flush pushes it again).
            # Nothing in flight means no ACK may come: the timer then pushes it
            # (on_timer) if no burst came first.
            self._starved = NO_ROOM
            self.push_due = True
            if not self.flight:
                self.timer = min(self.timer, now + CREDIT_WAIT)
            return 0
        shared = self.shared
        link_mss = shared.link_mss
        idle = not self.flight
        left = min(self.guest_wnd, shared.rcvlowat_cap) - self.flight
        if limit is not None and limit < left:
            left = limit
        buf, total = shared.peek_buffer, 0
        mss = min(self.guest_mss, link_mss)
        if self.flags & Flags.TIMESTAMPS:
            mss -= TS_OPTION_LEN  # the MSS leaves options out (RFC 9293 §3.7.1)
        # guest_mss is floored already (guest_mss_untrusted); the option's
        # bytes must not take a segment below the floor either, but a link
        # smaller than the floor (MTU 68) still bounds it.
        mss = min(max(mss, MIN_SND_MSS), link_mss)
        shared.tick(now)
        # Every segment of this push carries the same timestamps: one options
        # object for all of them, not one per segment (_send's default).
        options = (
            TcpOptions(timestamp=(self._tsval(), self.ts_recent))
            if self.flags & Flags.TIMESTAMPS
            else NO_OPTIONS
        )
        drained = full = False
        while left > 0:
            want = min(left, len(buf))
            try:
                n = self.host.peek(buf, want)
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
                if not self._send(flags, seq_add(self.seq_to_guest, off), buf[off:end], options):
                    # The guest has no room for it (a full receive ring): what
                    # was not sent stays in the socket, unpeeked, and waits for
                    # room rather than go on into a queue that drops it (with
                    # a guest window larger than its ring, it did: go-back-N
                    # over and over, a download at ~1% of its speed).
                    n = off
                    full = True
                    break
            self.seq_to_guest = seq_add(self.seq_to_guest, n)
            if seq_diff(self.seq_to_guest, self.seq_max_to_guest) > 0:
                self.seq_max_to_guest = self.seq_to_guest
            total += n
            left -= n
            if full:
                self.host.set_peek_offset(self.data_flight)  # SO_PEEK_OFF back to the flight
                self._starved = NO_ROOM  # not reading: the socket's bytes wait for room
                self.push_due = True  # the adapter pushes it again (TcpFlows.flush)
                if not self.flight:  # no retransmission timer: this one, as a last resort
                    self.timer = min(self.timer, now + self.rto_jittered())
                break
            if n < want:
                drained = True
                break
        # The FIN follows the last byte, so only once the queue was drained
        # (a migrated socket knows its EOF from the flags, not from recv()).
        if drained and self.flags & Flags.SOCK_EOF and not self.flags & Flags.FIN_TO_GUEST:
            self._send(FIN | ACK, self.seq_to_guest)
            self.fin_seq = self.seq_to_guest
            self.seq_to_guest = seq_add(self.seq_to_guest, 1)
            if seq_diff(self.seq_to_guest, self.seq_max_to_guest) > 0:
                self.seq_max_to_guest = self.seq_to_guest
            self.flags |= Flags.FIN_TO_GUEST
        if total:
            self.flow.to_guest(total, now)
        if self.flight and (self.timer == INF or idle):
            # The first bytes in flight start the retransmission timer (RFC 6298
            # §5.1); a timer set while nothing was in flight (a probe, a wait for
            # room or credit) was not that one, and must not resend these early.
            self.timer = now + self.rto_jittered()
        elif not self.flight and self.guest_wnd == 0 and not total:
            # Zero window with data waiting: probe it (RFC 9293 §3.8.6.1).
            self.timer = min(self.timer, now + self.rto_jittered())
        return total

    def _rewind(self) -> None:
        """Go back to the guest's last ACK: everything after it is resent."""
        self.recover = self.seq_max_to_guest  # RFC 6582 §3.2 steps 2 and 4
        self.seq_to_guest = self.seq_ack_from_guest
        self.flags &= ~Flags.FIN_TO_GUEST
        self.host.set_peek_offset(0)
        self.dupacks = 0
        self._starved = 0
        self.prepare_wait()

    def on_timer(self, now: float) -> None:
        self.shared.tick(now)
        state = self.state
        if state is State.CONNECTING:
            log.debug("connect to %s:%d timed out", self.ends.remote_addr, self.ends.remote_port)
            self.abort(now, rst_guest=True, rst_peer=False)
            return
        if self.idle_expired(now):
            log.info("%s: idle for %.0f s: reset", self.describe(), IDLE_TIMEOUT)
            self.abort(now, rst_guest=True, rst_peer=True)
            return
        if now < self.timer:
            return  # woken for a deadline that has since moved
        if state is State.ESTABLISHED and not self.flight and self._starved == NO_ROOM:
            # Nothing in flight to resend: the frontend had no room, and
            # nothing told of new room since (push arms this again if so).
            self.timer = INF
            self.push(now)
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
                self.retries, self.rto, self.timer = 0, RTO_INITIAL, INF

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
        self.timer = float("-inf")
        self.host.hang_up(abort=abort)

    def describe(self) -> str:
        e = self.ends
        return f"tcp {e.guest_addr}:{e.guest_port} -> {e.remote_addr}:{e.remote_port}"
