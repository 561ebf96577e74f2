"""TCP flows: the trio adapter around :class:`~ferryd.flows.tcp_conn.TcpConn`.

Theory of operation
-------------------
Outbound: a guest SYN for an unknown 4-tuple opens a non-blocking host
socket and starts connect() to the destination (the gateway address maps
to the host itself only with ``--map-gw``). A destination the policy
refuses (the host itself, see :mod:`ferryd.flows.destinations`) gets a RST
and no socket; one sent to a group address gets nothing. The guest gets its SYN-ACK only
once the host side is connected, and a RST if connect() fails (refused,
ICMP unreachable) or takes longer than ``CONNECT_TIMEOUT``, so the guest's
connect() reports what really happened.

Inbound (``-t SPEC``): listeners on the host accept peers; each accepted
socket becomes a connection that ferryd opens towards the guest with a
SYN, the peer's address preserved as the source the guest sees (a peer on
the host's own loopback shows up as the gateway).

One reactor serves every connection. Each connection's socket sits in
a private epoll (:class:`ferryd.flows.reactor.Interest`) with the events
that can move it on, derived from its state: EPOLLOUT while connecting
(connect() completes as writability, failure included), EPOLLIN while new
bytes may go to the guest (``TcpConn.reading()``: the guest's window has
room; SO_RCVLOWAT, set by ``prepare_wait()`` each time reading is armed,
hides the bytes already in flight), EPOLLOUT while it waits for send-buffer
space to offer the guest a larger window (``want_writable``). Nothing else
is registered: with an empty mask the socket leaves the epoll, because
EPOLLERR and EPOLLHUP are reported whatever the mask (epoll_ctl(2)) and a
level-triggered registration would report a hung-up socket on every round.
Every connection's deadline (retransmission, handshake, window probe)
sits in one timer heap. The reactor's task waits until the epoll is
readable, then, synchronously: hands each ready socket's events to its
connection, fires the timers due by then, and re-arms (mask and deadline)
every connection that changed. A second task, the clock, sleeps until the
earliest deadline and fires what is due (a deadline on the epoll's wait
would cost a cancel scope per wait: TcpFlows._clock). The two-hour idle limit is not a
deadline: an idle connection would hold a heap entry all that time, so a
scan of the table once a minute (:meth:`TcpFlows.expire`) finds them.

Segments from the guest are handled synchronously as the stack dispatches
them: acknowledging, writing to the socket and sending more to the guest
need no task switch. Every connection handed an event is marked; what it
waits for is re-evaluated once the burst of guest frames is done
(:meth:`TcpFlows.flush`) or the reactor's round is, so a burst that touches
one connection many times costs one re-arm, and ``epoll_ctl`` runs only
when a mask really changes.

Why one task and not one per connection: a migration freezes by cancelling
the data path's nursery and resumes by attaching a new one. With a task per
connection both cost a cancellation or a spawn per connection (about 45 ms
and 27 ms at 1,000 connections, against a downtime budget of 30 ms);
with the reactor they cost two tasks, and the registrations and timers
survive the freeze in the epoll and the heap, so resuming only re-checks
each connection's mask (no system call unless it changed). Events of many
connections are also handled in one wake-up instead of a task switch each.

Segments for unknown 4-tuples (other than a SYN) get a RST (RFC 9293
§3.10.7.1), as does a SYN when the table is full (``--max-flows``) or no
descriptor is left for its socket (:mod:`ferryd.descriptors`); logged,
rate-limited. A forwarded port's peer is reset in those cases.

A bug of ours reached while one connection handles a guest segment, a
socket event or a timer costs that connection, not the daemon (issue 9):
the exception is caught there (``Exception`` only, see :mod:`ferryd.bugs`),
the connection is reset both ways, counted in ``counters.flow_errors`` and logged,
rate-limited.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import trio

from ferryd.bugs import describe_bug
from ferryd.descriptors import ACCEPT_BACKOFF, DescriptorBudget, is_exhaustion, open_flow_socket
from ferryd.flows.common import (
    family_of,
    peer_as_seen_by_guest,
    shared_address,
    shared_port,
    sockaddr,
    strip_scope,
)
from ferryd.flows.destinations import Destinations, Refusal
from ferryd.flows.portspec import ForwardError, PortForward
from ferryd.flows.reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Interest
from ferryd.flows.table import FlowCounters, FlowKey, FlowLimitReached, FlowTable
from ferryd.flows.tcp_conn import Endpoints, State, TcpConn, TcpGuestState, TcpShared
from ferryd.flows.tcp_host import SYSTEM_ENTROPY, Entropy, SocketHost, bound_queues
from ferryd.guest import GuestPort
from ferryd.link import LinkConfig
from ferryd.linux import SO_PEEK_OFF
from ferryd.logthrottle import LogThrottle
from ferryd.wire.ip import IPPROTO_TCP, IpAddress, IpPacket
from ferryd.wire.tcp import ACK, FIN, RST, SYN, TcpSegment, build_tcp

log = logging.getLogger("ferryd.tcp")

#: One peek buffer shared by all connections: it is only used inside a
#: synchronous push and never holds data across an await (no-buffer
#: invariant: what is peeked is written to the guest at once).
PEEK_BUFFER = 1 << 20
LISTEN_BACKLOG = 1024
#: Fairness between the two directions (RFC 9293 leaves it to the
#: implementation). A push sends what the guest's window allows, which with
#: a guest that reads fast is megabytes (its window grows to tens); done at
#: every burst's end and every reactor round, that starves the guest's own
#: frames: with iperf3 --bidir they waited ~11 ms in the tap's queue, and the
#: upload, limited by its window over that round trip, got 2.5 Gbit/s next to
#: a 13 Gbit/s download. So while the guest sends bulk data (a burst of its
#: frames carried at least BUSY_BURST payload bytes), what all pushes send to
#: the guest until its next burst is bounded by a credit: each busy burst
#: adds its own payload and PUSH_QUANTUM (at most PUSH_CREDIT_CAP in all),
#: each push spends what it sent, and a push with no credit left waits for
#: the next burst (TcpConn.push), so the download keeps pace with the upload
#: plus a quantum. A bound per push (1 MiB, before) let every reactor round
#: between two bursts push another MiB: in iperf3 --bidir the smaller
#: direction got 0.33-0.99 of the larger, below half in 10 of 24 runs; with
#: the credit 0.56-0.98, none below, the same total (bench/README.md). A
#: burst that is not busy (the guest only ACKs) lifts the bound: alone, a
#: download pushes its window.
BUSY_BURST = 1 << 16
PUSH_QUANTUM = 1 << 18
PUSH_CREDIT_CAP = 1 << 21
#: How often expire() starts looking for connections past their idle limit
#: (TcpConn.idle_expired, two hours): a reset comes at most this late, plus
#: a second per IDLE_SCAN_BATCH connections in the table.
IDLE_SCAN_INTERVAL = 60.0
#: Connections expire() looks at per call (one call a second).
IDLE_SCAN_BATCH = 1024


def new_peek_buffer() -> memoryview:
    """A scratch buffer of PEEK_BUFFER bytes for :class:`TcpFlows` (``peek_buffer``).

    Zeroing a fresh MiB costs 0.75-1 ms on the development machine (256 page
    faults, ~2 ms on a loaded host): a data path makes one and passes it to
    every TcpFlows it builds, so that a rebuild (a target's LOAD, inside the
    time the guest waits for it) does not pay it again.
    """
    return memoryview(bytearray(PEEK_BUFFER))


def _rcvlowat_cap() -> int:
    """SO_RCVLOWAT is capped at half of tcp_rmem's maximum (tcp_set_rcvlowat)."""
    try:
        rmem_max = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        rmem_max = 6 * 1024 * 1024
    return rmem_max // 2 - 1


def reset_for(ip: IpPacket, seg: TcpSegment) -> bytes | None:
    """The RST answering ``seg`` for a connection that does not exist.

    RFC 9293 §3.10.7.1: if the segment has ACK, the RST takes its sequence
    number from that ACK; otherwise it has sequence 0 and acknowledges the
    segment. A RST is never answered.
    """
    if seg.flags & RST:
        return None
    if seg.flags & ACK:
        seq, ack, flags = seg.ack, 0, RST
    else:
        length = len(seg.payload) + bool(seg.flags & SYN) + bool(seg.flags & FIN)
        seq, ack, flags = 0, seg.seq + length, RST | ACK
    return build_tcp(ip.dst, ip.src, seg.dport, seg.sport, seq, ack, flags, 0)


@dataclass(eq=False)
class _Listener:
    """A forwarded port's listening socket (compared by identity)."""

    sock: socket.socket
    fwd: PortForward
    addr: IpAddress
    port: int


@dataclass
class TcpCounters(FlowCounters):
    """What the TCP flows count (read by ferryd's counters registry)."""

    resets_sent: int = 0
    """RSTs answering a segment of no connection (RFC 9293 §3.10.7.1), refused SYNs included."""
    flow_errors: int = 0
    """Connections reset because handling them raised (a ferryd bug, contained)."""
    held_drops: int = 0
    """Guest segments dropped while a pre-copy held their connection (the guest resends)."""


class TcpFlows:
    def __init__(
        self,
        guest: GuestPort,
        link: LinkConfig,
        nursery: trio.Nursery | None,
        *,
        destinations: Destinations,
        limit: int = 4096,
        budget: DescriptorBudget | None = None,
        entropy: Entropy = SYSTEM_ENTROPY,
        max_queue: int | None = None,
        peek_buffer: memoryview | None = None,
    ) -> None:
        self._guest = guest
        self._budget = budget
        self._link = link
        self._nursery = nursery
        self._destinations = destinations
        self.counters = TcpCounters()
        self.table: FlowTable[TcpConn] = FlowTable(limit, budget, self.counters)
        self._peek = new_peek_buffer() if peek_buffer is None else peek_buffer
        cap = _rcvlowat_cap()
        self._shared = {
            version: TcpShared(guest, link.mtu - header, self._peek, cap, entropy)
            for version, header in ((4, 40), (6, 60))
        }
        """What the connections of each IP version share (the link's MSS differs)."""
        self._burst_payload = 0
        """Payload bytes the guest sent in the burst of frames so far (see PUSH_QUANTUM)."""
        self._credit: int | None = None
        """What pushes may send until the guest's next burst (see PUSH_QUANTUM); None
        after a burst that was not busy: no bound."""
        self._listeners: list[_Listener] = []
        self._throttle = LogThrottle(log)
        self._ack_due: list[TcpConn] = []
        self._interest: Interest[TcpConn] | None = None
        """Created at the first attach(): a TcpFlows never started holds no epoll."""
        self._dirty: dict[TcpConn, None] = {}
        """Connections to re-arm, in the order they changed."""
        self._held: dict[TcpConn, bool] = {}
        """Connections a migration's pre-copy is dumping: value, a guest RST came meanwhile."""
        self._prearmed: set[TcpConn] = set()
        """Armed ahead of attach() and unchanged since: attach() leaves them be."""
        self._deferring = False
        """A burst of guest frames (or a reactor round) is under way: re-arm at its end."""
        self._wait: trio.CancelScope | None = None
        """The clock's sleep, until the next deadline (see _clock)."""
        self._max_queue = max_queue
        """--max-queue: the cap every socket has always (None: autotuning)."""
        self._queue_bound = max_queue
        """The cap now: --max-queue's, or a migration's smaller one (bound_queues)."""
        self._forget = self.forget
        """One bound method for every socket's before_close (each access makes a new one)."""
        self._next_idle_scan = 0.0
        self._idle_scan: list[TcpConn] = []
        """Connections the idle scan under way has still to look at (expire)."""

    # --- from the guest ---------------------------------------------------

    def from_guest(self, ip: IpPacket, seg: TcpSegment, now: float) -> None:
        self._deferring = True  # the stack calls flush() at the burst's end
        self._burst_payload += len(seg.payload)
        key = FlowKey(IPPROTO_TCP, ip.src, seg.sport, ip.dst, seg.dport)
        flow = self.table.get(key)
        if flow is not None:
            conn = flow.handle
            if conn in self._held:
                # In repair mode for a pre-copy dump: the socket takes no
                # data. Not acknowledged, so the guest sends it again; a RST
                # (never resent) is carried out at release().
                self.counters.held_drops += 1
                if seg.flags & RST:
                    self._held[conn] = True
                return
            self._dirty[conn] = None
            queued = conn.ack_due
            try:
                conn.on_guest_segment(seg, now)
            except Exception as exc:  # a bug the guest reached: this connection pays
                self._bug(conn, exc, now)
                return
            if conn.ack_due and not queued:
                self._ack_due.append(conn)  # flush() sends it at the burst's end
            return
        if seg.flags & (SYN | ACK | RST | FIN) == SYN:
            self._outbound(ip, seg, key, now)
        else:
            self._reset(ip, seg)

    def _reset(self, ip: IpPacket, seg: TcpSegment) -> None:
        rst = reset_for(ip, seg)
        if rst is not None:
            self.counters.resets_sent += 1
            self._guest.send_ip(ip.dst, ip.src, IPPROTO_TCP, rst)

    def _outbound(self, ip: IpPacket, seg: TcpSegment, key: FlowKey, now: float) -> None:
        dst = self._destinations.policy.route(ip.dst)
        if isinstance(dst, Refusal):
            # Before the flow limit: a refusal must not depend on the table's fill.
            if self._destinations.refuse("tcp", ip.src, ip.dst, seg.dport, dst, now):
                self._reset(ip, seg)
            return
        try:
            self.table.check_room()
            sock: SocketHost[TcpConn] = open_flow_socket(
                SocketHost, self._budget, family_of(ip.version), socket.SOCK_STREAM
            )
        except (FlowLimitReached, OSError) as exc:  # table full, no descriptor left...
            self._throttle.warning(
                "limit", now, "refusing TCP connection to %s:%d: %s", ip.dst, seg.dport, exc
            )
            self._reset(ip, seg)
            return
        try:
            _tune(sock)
            # Shared with ferry's other sockets on the port connect() picks:
            # connect() gives one local port to connections towards different
            # peers, and a migration restoring a connection binds its port
            # (SO_REUSEADDR, sockstate.new_socket_for) before connecting. With
            # ferryds of several VMs in one namespace (vhost-user, libvirt),
            # a restore whose port one of ours holds without the option fails
            # (EADDRINUSE: inet_bind_conflict lets two sockets share a port
            # only if both reuse it), and the whole migration rolls back.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            err = sock.connect_ex(sockaddr(dst, seg.dport))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, errno.errorcode.get(err, str(err)))
        except OSError as exc:
            sock.close()
            self._throttle.warning(
                "connect", now, "cannot connect to %s:%d: %s", dst, seg.dport, exc
            )
            self._reset(ip, seg)
            return
        ends = Endpoints(
            shared_address(ip.src), seg.sport, shared_address(ip.dst), shared_port(seg.dport)
        )
        conn = self._start(
            ends, sock, State.CONNECTING, ip.version, now, lambda c: c.start_outbound(seg, now)
        )
        if conn is not None:
            self._dirty[conn] = None  # armed by flush(), at the end of this burst

    def _start(
        self,
        ends: Endpoints,
        sock: SocketHost[TcpConn],
        state: State,
        version: int,
        now: float,
        begin: Callable[[TcpConn], None],
    ) -> TcpConn | None:
        """Register a new connection and ``begin`` its handshake; a bug costs it alone.

        Without this, a bug in the first step of a connection would end the
        guest's frame (outbound: the stack's catch-all, leaving a half-started
        entry) or the accept loop and the daemon with it (inbound).
        """
        try:
            conn = self._register(ends, sock, state, version, now)
        except Exception as exc:
            self.counters.flow_errors += 1
            self._throttle.warning(
                "bug", now, "%s: not started, ferryd bug: %s", ends, describe_bug(exc)
            )
            with contextlib.suppress(OSError):
                _abort(sock)
            return None
        try:
            begin(conn)
        except Exception as exc:
            self._bug(conn, exc, now)
            return None
        return conn

    def _register(
        self, ends: Endpoints, host: SocketHost[TcpConn], state: State, version: int, now: float
    ) -> TcpConn:
        """A new connection on ``host``, entered in the flow table."""
        conn = TcpConn(ends, host, self._shared[version], state)
        return self._enter(conn, host, now)

    def _enter(self, conn: TcpConn, host: SocketHost[TcpConn], now: float) -> TcpConn:
        """Into the table.

        Without the host socket's own address and port: those are asked of
        the socket when the flows are listed (:meth:`snapshot`). Kept, the
        port was an int object of every connection's, for the one reader
        that is rare (bench.memory), and the getsockname() a syscall of
        every new or restored connection's.
        """
        # TcpConn.close() closes the socket: out of the epoll first, while
        # the descriptor's number is still this socket's (reused at once).
        host.before_close, host.owner = self._forget, conn
        key = conn.ends  # (a FlowKey: one object for both)
        conn.flow = self.table.add(key, conn, now, state=conn.state.value)
        if self._queue_bound is not None:
            bound_queues(host, self._queue_bound)
        return conn

    def bound_queues(self, limit: int | None) -> None:
        """Cap every socket's kernel queues at ``limit`` bytes each way, new ones too
        (--max-queue's cap, if smaller, stays); None: back to --max-queue's cap or
        the kernel's autotuning (ferryd.flows.tcp_host.bound_queues)."""
        if limit is None or (self._max_queue is not None and self._max_queue < limit):
            limit = self._max_queue
        self._queue_bound = limit
        for flow in self.table:
            sock = socket_of(flow.handle)
            if sock.fileno() >= 0:
                with contextlib.suppress(OSError):  # a socket that failed: its flow ends anyway
                    bound_queues(sock, limit)

    def flush(self, now: float) -> None:
        """The frontend's queue ran dry: send the ACKs deferred meanwhile,
        and re-arm the connections the burst changed."""
        due, self._ack_due = self._ack_due, []
        burst, self._burst_payload = self._burst_payload, 0
        if burst >= BUSY_BURST:
            credit = (self._credit or 0) + burst + PUSH_QUANTUM
            self._credit = min(credit, PUSH_CREDIT_CAP)
        else:
            self._credit = None
        for conn in due:
            try:
                self._spend(conn.flush_ack(now, self._credit))
            except Exception as exc:
                self._bug(conn, exc, now)
            self._dirty[conn] = None
        self._settle(now)

    # --- the reactor ------------------------------------------------------

    def _changed(self, conn: TcpConn) -> None:
        """What ``conn`` waits for, or until when, changed outside an event of ours."""
        self._dirty[conn] = None
        self._prearmed.discard(conn)
        if not self._deferring and self._wait is not None:
            # Changed from outside a burst or a round (a migration's
            # resume): the clock's task wakes and re-arms it.
            self._wait.cancel()

    def resume(self, conn: TcpConn, now: float) -> None:
        """A migration target's restored ``conn`` starts (TcpConn.resume), then is re-armed."""
        conn.resume(now)
        self._changed(conn)

    def hold(self, conns: list[TcpConn]) -> None:
        """Leave ``conns`` alone until release(): no events, no timers, guest segments dropped.

        A migration's pre-copy holds a batch while its sockets are in
        repair mode, where a send fails and a peek reads nothing
        (tcp_sendmsg_locked, tcp_recvmsg_locked with tp->repair): a held
        connection must not touch its socket.
        """
        for conn in conns:
            self._held[conn] = False
            self._dirty.pop(conn, None)
            if self._interest is not None:
                self._interest.set_mask(conn, conn.host.fileno(), 0)

    def release(self, conns: list[TcpConn], now: float) -> None:
        """Undo hold(): re-arm, and carry out a RST the guest sent meanwhile."""
        for conn in conns:
            if self._held.pop(conn, False) and not conn.closed:
                conn.abort(now, rst_guest=False, rst_peer=True)
            self._changed(conn)

    def forget(self, conn: TcpConn) -> None:
        """Let go of ``conn``: out of the epoll, the timers and the flow table.

        Call it BEFORE the socket is closed by someone else (a migration
        hands it over with close_silently()): the descriptor's number is
        reused at once, and the epoll must not keep (or the reactor mistake)
        the next socket for this connection. Harmless on a connection never
        armed, or already forgotten.
        """
        if self._interest is not None:
            self._interest.forget(conn)
        self._dirty.pop(conn, None)
        self._prearmed.discard(conn)
        key = conn.ends
        flow = self.table.get(key)
        if flow is not None and flow.handle is conn:
            self.table.remove(key)

    def expire(self, now: float) -> None:
        """Reset the connections idle for too long (TcpConn.idle_expired).

        The data path calls it every second. A scan of the table rather
        than a timer per connection: an idle connection then has no entry
        in the reactor's heap (TcpConn.deadline). Once every
        IDLE_SCAN_INTERVAL a scan starts from a list of the connections,
        IDLE_SCAN_BATCH of them a call: one pass over 16,384 took 6-10 ms
        on a loaded machine, a stall of the data path; a batch takes
        0.2-0.3 ms, the call that makes the list ~1 ms.
        """
        pending = self._idle_scan
        if not pending:
            if now < self._next_idle_scan:
                return
            self._next_idle_scan = now + IDLE_SCAN_INTERVAL
            pending = self._idle_scan = [flow.handle for flow in self.table]
        batch = pending[-IDLE_SCAN_BATCH:]
        del pending[-IDLE_SCAN_BATCH:]
        self._deferring = True
        for conn in batch:
            if conn in self._held:
                continue
            try:
                if not conn.idle_expired(now):  # (closed meanwhile: not established)
                    continue
                self._dirty[conn] = None
                conn.on_timer(now)
            except OSError as exc:
                self._failed(conn, exc, now)
            except Exception as exc:
                self._bug(conn, exc, now)
        self._settle(now)

    def _settle(self, now: float) -> None:
        """Re-arm every connection changed since the last call."""
        interest = self._interest
        if self._nursery is None or interest is None:
            self._deferring = False
            return  # stopped: attach() re-arms everything
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            for conn in dirty:
                self._arm(interest, conn, now)
        self._deferring = False
        if self._wait is not None:
            when = interest.next_deadline()
            if when < self._wait.deadline:
                self._wait.deadline = when

    def _arm(self, interest: Interest[TcpConn], conn: TcpConn, now: float) -> None:
        """Register the events ``conn`` waits for now, and its deadline."""
        fd = conn.host.fileno()
        if conn.closed or fd < 0:
            interest.forget(conn)  # closed, or handed over by a migration
            return
        if conn in self._held:
            return  # release() arms it
        if conn.push_due and not conn.ack_due:
            # Its push stopped for want of room in the guest's queue
            # (TcpConn.push): the next flush() pushes it again.
            conn.ack_due = True
            self._ack_due.append(conn)
        try:
            if conn.state is State.CONNECTING:
                mask = EPOLLOUT
            elif conn.reading():
                conn.prepare_wait()
                mask = EPOLLIN
            else:
                mask = 0
            if conn.want_writable:
                mask |= EPOLLOUT
            interest.set_mask(conn, fd, mask)
        except OSError as exc:
            self._failed(conn, exc, now)
            return
        except Exception as exc:
            self._bug(conn, exc, now)
            return
        interest.set_deadline(conn, conn.deadline())

    def _failed(self, conn: TcpConn, exc: OSError, now: float) -> None:
        if not conn.closed:
            log.info("%s: %s: reset", conn.describe(), exc)
            conn.abort(now, rst_guest=True, rst_peer=True)

    def _bug(self, conn: TcpConn, exc: Exception, now: float) -> None:
        """Handling ``conn`` raised: reset it, count and log; the rest goes on."""
        self.counters.flow_errors += 1
        self._throttle.warning(
            "bug", now, "%s: reset, ferryd bug: %s", conn.describe(), describe_bug(exc)
        )
        try:
            conn.abort(now, rst_guest=True, rst_peer=True)
        except Exception:
            # Its state is beyond saving: reset the peer and let it go.
            self.forget(conn)
            conn.state = State.CLOSED
            with contextlib.suppress(OSError):
                _abort(socket_of(conn))

    async def _reactor(self, interest: Interest[TcpConn]) -> None:
        """The sockets' events: one wait on the epoll, no deadline (see _clock)."""
        epoll_fd = interest.fileno()
        now = trio.current_time()
        while True:
            self._settle(now)
            await trio.lowlevel.wait_readable(epoll_fd)
            now = self._round(interest)

    def _round(self, interest: Interest[TcpConn]) -> float:
        """The sockets' events, then the timers due: an event that came in time wins."""
        self._deferring = True
        now = trio.current_time()
        self._dispatch(interest, now)
        self._timers(interest, now)
        return now

    async def _clock(self, interest: Interest[TcpConn]) -> None:
        """The connections' deadlines, in a task of their own.

        Why not a cancel scope with the next deadline around the reactor's
        wait: entering one and giving it a deadline cost trio ~13-20 us of
        CPU per wait here (a socketpair ping-pong: 15-34 us of CPU per wake
        without a scope, 28-54 with one), paid by every round of the
        reactor, and a connection's deadline rarely comes due: this task
        sleeps through the reactor's rounds. _settle() only brings its
        wake-up earlier (a deadline that moved later wakes it once for
        nothing); _changed() wakes it at once to re-arm. Its round reads
        the epoll first, as the reactor's does: a socket's event that came
        before a deadline (the connect() that completed as its timeout
        came due) is handled before the timer.
        """
        while True:
            with trio.CancelScope(deadline=interest.next_deadline()) as wait:
                self._wait = wait
                try:
                    await trio.sleep_forever()
                finally:
                    self._wait = None
            self._settle(self._round(interest))

    def _dispatch(self, interest: Interest[TcpConn], now: float) -> None:
        """Hand each ready socket's events to its connection."""
        for conn, events in interest.ready():
            if conn in self._held:
                continue
            self._dirty[conn] = None
            try:
                if conn.state is State.CONNECTING:
                    conn.on_connected(now)  # EPOLLOUT, or ERR/HUP: SO_ERROR tells
                    continue
                if events & (EPOLLIN | EPOLLERR | EPOLLHUP) and conn.reading():
                    self._spend(conn.on_readable(now, self._credit))
                writable = events & (EPOLLOUT | EPOLLERR | EPOLLHUP)
                if writable and conn.want_writable and not conn.closed:
                    conn.on_writable(now)
            except OSError as exc:
                self._failed(conn, exc, now)
            except Exception as exc:
                self._bug(conn, exc, now)

    def _spend(self, sent: int) -> None:
        """A push sent ``sent`` payload bytes to the guest: out of the credit, if any."""
        if self._credit is not None:
            self._credit = max(0, self._credit - sent)

    def _timers(self, interest: Interest[TcpConn], now: float) -> None:
        """Fire the due deadlines; reschedule those that moved later."""
        for conn in interest.due(now):
            if conn.closed:
                continue
            if conn in self._held:
                self._dirty[conn] = None  # its deadline is set again once released
                continue
            when = conn.deadline()
            if when > now:
                interest.set_deadline(conn, when)
                continue
            self._dirty[conn] = None
            try:
                conn.on_timer(now)
            except OSError as exc:
                self._failed(conn, exc, now)
            except Exception as exc:
                self._bug(conn, exc, now)

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Run the reactor and the listeners in ``nursery`` from now on; None: stopped.

        A migration cancels the data path's nursery (freeze: the reactor's
        two tasks and the listeners', whatever the number of connections)
        and attaches a new one on rollback, or on the target at resume.
        Registrations and deadlines stay in the epoll and the heap while
        stopped. Attaching marks every connection in the table for re-arming
        (the restored ones are armed for the first time); the reactor's
        first round does it, or the first flush() if that comes sooner. So
        the resynchronisation a resume does right after attach() (ACKs,
        retransmissions, timers) costs one re-arm per connection, not two,
        and none of it delays the resume's reply.
        """
        self._nursery = nursery
        self._wait = None
        self._deferring = False
        if nursery is None:
            return
        if self._interest is None:
            self._interest = Interest()
        interest = self._interest
        conns = [flow.handle for flow in self.table]
        # Taken out of the table behind our back meanwhile (a rollback drops
        # the connections it handed over): watch them no more.
        for gone in interest.handles().difference(conns):
            interest.forget(gone)
        prearmed, self._prearmed = self._prearmed, set()
        self._dirty = dict.fromkeys(c for c in conns if c not in prearmed)
        nursery.start_soon(self._reactor, interest)
        nursery.start_soon(self._clock, interest)
        for lst in self._listeners:
            nursery.start_soon(self._accept_loop, lst)

    def prearm(self, conns: list[TcpConn], now: float) -> None:
        """Arm restored connections now, while stopped (a migration target's pre-copy).

        Registering a thousand sockets and their deadlines costs ~9 ms; done
        before the freeze it is out of the downtime. Nothing reads the epoll
        until attach(), which leaves these alone unless they changed since.
        """
        if self._interest is None:
            self._interest = Interest()
        for conn in conns:
            self._arm(self._interest, conn, now)
            self._prearmed.add(conn)

    def adopt(
        self,
        ends: Endpoints,
        sock: SocketHost[TcpConn],
        version: int,
        saved: TcpGuestState,
        *,
        sock_timestamp: int,
        fin_received: bool,
        now: float,
    ) -> TcpConn:
        """A connection a migration restored (TcpConn.restored): in the table, armed at attach().

        ``sock`` comes from the kernel's restore, blocking and untuned: it is
        made non-blocking and given TCP_NODELAY here, as :func:`_tune` does
        for a new one. (Not SO_PEEK_OFF: the restored TcpConn sets its own
        offset past what the guest has not acknowledged.)
        """
        if sock.gettimeout() != 0.0:  # sockstate makes them non-blocking: no syscall then
            sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = TcpConn.restored(
            ends,
            sock,
            self._shared[version],
            saved,
            sock_timestamp=sock_timestamp,
            fin_received=fin_received,
            now=now,
        )
        return self._enter(conn, sock, now)

    def connections(self) -> list[TcpConn]:
        """Every connection in the table, closed ones included (a migration dumps them)."""
        return [flow.handle for flow in self.table]

    def count(self) -> int:
        """Connections in the table now."""
        return len(self.table)

    def send_reset(self, ends: Endpoints, seq: int, ack: int) -> None:
        """Reset the guest's side of ``ends``, a connection no socket stands for.

        A migration restores a connection caught in its handshake this way
        (documented: the guest's connect() fails and it tries again).
        """
        e = ends
        l4 = build_tcp(
            e.remote_addr, e.guest_addr, e.remote_port, e.guest_port, seq, ack, RST | ACK, 0
        )
        self._guest.send_ip(e.remote_addr, e.guest_addr, IPPROTO_TCP, l4)

    def close_listeners(self) -> None:
        for lst in self._listeners:
            trio.lowlevel.notify_closing(lst.sock)
            lst.sock.close()
        self._listeners.clear()

    # --- inbound forwarding -----------------------------------------------

    async def add_forward(self, fwd: PortForward) -> None:
        """Listen on ``fwd.host_port``; connections are opened to the guest.

        ``bind=None`` listens on both families (an IPV6_V6ONLY socket and an
        IPv4 one). Raises :class:`ForwardError` naming the port on failure.
        """
        addrs: list[IpAddress]
        if fwd.bind is not None:
            addrs = [fwd.bind]
        else:
            addrs = []
            if self._link.ipv6 is not None:
                addrs.append(IPv6Address("::"))
            if self._link.ipv4 is not None:
                addrs.append(IPv4Address("0.0.0.0"))
        for addr in addrs:
            lst = self._listen(fwd, addr)
            self._listeners.append(lst)
            if self._nursery is not None:
                self._nursery.start_soon(self._accept_loop, lst)
        await trio.lowlevel.checkpoint()

    def _listen(self, fwd: PortForward, addr: IpAddress) -> _Listener:
        where = f"[{addr}]" if addr.version == 6 else str(addr)
        sock = socket.socket(
            family_of(addr.version), socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if addr.version == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr(addr, fwd.host_port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ForwardError(f"cannot forward TCP {where}:{fwd.host_port}: {exc}") from exc
        return _Listener(sock, fwd, addr, sock.getsockname()[1])

    def listeners(self) -> list[tuple[PortForward, IpAddress, int]]:
        return [(lst.fwd, lst.addr, lst.port) for lst in self._listeners]

    def listening_sockets(self, fwd: PortForward) -> list[socket.socket]:
        """The sockets listening for ``fwd`` (one per family), for a migration to hand over."""
        return [lst.sock for lst in self._listeners if lst.fwd is fwd]

    def adopt_forward(self, fwd: PortForward, socks: list[socket.socket]) -> None:
        """Forward with listening sockets handed over by a migration's source (in one
        namespace), as they are: connections already waiting in their accept queues
        are the guest's. Raises :class:`ForwardError` for one that is not listening on
        ``fwd.host_port``; the caller keeps ownership of ``socks`` then.
        """
        adopted = []
        for sock in socks:
            try:
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                host, port = sock.getsockname()[:2]
            except OSError as exc:
                raise ForwardError(
                    f"a TCP socket handed over for port {fwd.host_port}: {exc}"
                ) from exc
            if not listening or port != fwd.host_port:
                raise ForwardError(
                    f"a TCP socket handed over for port {fwd.host_port} is not listening on it"
                )
            sock.setblocking(False)
            adopted.append(_Listener(sock, fwd, strip_scope(host), port))
        for lst in adopted:
            self._listeners.append(lst)
            if self._nursery is not None:
                self._nursery.start_soon(self._accept_loop, lst)

    async def _accept_loop(self, lst: _Listener) -> None:
        while True:
            try:
                await trio.lowlevel.wait_readable(lst.sock)
            except (trio.ClosedResourceError, OSError):
                return  # the listener was closed (shutdown, or handed over)
            backoff = False
            while True:
                try:
                    sock, peer = lst.sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # ECONNABORTED, EMFILE, ...
                    self._throttle.warning(
                        "accept", trio.current_time(), "accept on port %d: %s", lst.port, exc
                    )
                    # Out of descriptors the listener stays readable: retrying
                    # at once would spin. The peers wait in the backlog.
                    backoff = is_exhaustion(exc)
                    if backoff and self._budget is not None:
                        self._budget.exhausted_by(exc)
                    break
                self._inbound(sock, peer, lst)
            if backoff:
                await trio.sleep(ACCEPT_BACKOFF)

    def _inbound(self, accepted: socket.socket, peer: tuple[str, int], lst: _Listener) -> None:
        now = trio.current_time()
        sock: SocketHost[TcpConn] = SocketHost.taking(accepted)
        peer_addr = strip_scope(peer[0])
        guest_addr = self._guest.guest_address(peer_addr.version)
        shown = (
            None if guest_addr is None else peer_as_seen_by_guest(self._link, peer_addr, guest_addr)
        )
        key = None
        if guest_addr is not None and shown is not None:
            key = FlowKey(IPPROTO_TCP, guest_addr, lst.fwd.guest_port, shown, peer[1])
        try:
            if key is None or key in self.table:
                raise ConnectionRefusedError("no guest address or a clashing flow")
            self.table.check_room()
            sock.setblocking(False)
            _tune(sock)
        except (OSError, FlowLimitReached) as exc:
            self._throttle.warning("inbound", now, "refusing peer %s:%d: %s", peer[0], peer[1], exc)
            _abort(sock)
            return
        assert guest_addr is not None and shown is not None
        ends = Endpoints(guest_addr, lst.fwd.guest_port, shown, peer[1])
        self._deferring = True
        conn = self._start(
            ends, sock, State.SYN_SENT, peer_addr.version, now, lambda c: c.start_inbound(now)
        )
        if conn is not None:
            self._dirty[conn] = None
        self._settle(now)

    # --- housekeeping -----------------------------------------------------

    def snapshot(self) -> list[dict[str, object]]:
        """The table's flows, each with its host socket's address (None once closed)."""
        out = []
        for flow in self.table:
            entry = flow.snapshot()
            try:
                name = socket_of(flow.handle).getsockname()
            except OSError:  # closed
                pass
            else:
                entry["host_addr"], entry["host_port"] = str(strip_scope(name[0])), name[1]
            out.append(entry)
        return out

    def close_reactor(self) -> None:
        """Close the reactor's epoll: these tables are being replaced (DataPath.rebuild).

        Stopped (no reactor task reads it), and its descriptor is not left
        for the garbage collector.
        """
        assert self._nursery is None, "close_reactor() on a running TcpFlows"
        if self._interest is not None:
            self._interest.close()
            self._interest = None

    def close(self, now: float) -> None:
        """Reset every connection both ways and close the listeners."""
        for flow in self.table:
            flow.handle.abort(now, rst_guest=True, rst_peer=True)
        self.close_listeners()


def socket_of(conn: TcpConn) -> socket.socket:
    """The host socket under ``conn``, for a migration to dump, restore or hand over."""
    host = conn.host
    assert isinstance(host, SocketHost), "TcpFlows builds every connection on a SocketHost"
    return host


def _tune(sock: socket.socket) -> None:
    # The guest already coalesces small writes (its own Nagle): forward
    # at once. SO_PEEK_OFF enables offset peeking (TCP since Linux 6.9).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)


def _abort(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    finally:
        sock.close()
