"""The TCP core on an in-memory kernel: a fake host socket, a guest link, and the adapter's loop.

A fake is fine here: this drives a pure state machine (STYLE.md). The
:class:`MemoryHost` is the kernel side of one host socket together with its
peer: the receive queue with a peek offset (SO_PEEK_OFF semantics: a
discard moves it back, sk_peek_offset_bwd), a bounded send queue the peer
drains, EOF, a reset. :class:`WireGuest` is the guest link: it parses every
segment ferryd sends and checks, as it goes, that no ACK covers a byte the
host socket did not accept. :class:`Pair` is what TcpFlows does around a
connection (bursts, flush_ack, readiness, timers), with explicit time.
"""

from __future__ import annotations

import errno
import random
from collections import deque
from dataclasses import dataclass
from ipaddress import IPv4Address

from ferryd.flows.table import Flow, FlowKey
from ferryd.flows.tcp_conn import Endpoints, State, TcpConn, TcpShared
from ferryd.flows.tcp_seq import seq_add, seq_diff
from ferryd.wire.ip import IPPROTO_TCP, IpAddress, IpPacket
from ferryd.wire.tcp import ACK, TcpSegment, parse_tcp_untrusted

GUEST = IPv4Address("10.0.2.15")
REMOTE = IPv4Address("192.0.2.1")
GUEST_PORT = 40000
REMOTE_PORT = 80
ENDS = Endpoints(GUEST, GUEST_PORT, REMOTE, REMOTE_PORT)
LINK_MSS = 1460
PEEK_BUFFER = 1 << 18


class MemoryHost:
    """A host TCP socket and its peer, in memory (the HostSocket port)."""

    def __init__(self, *, sndbuf: int = 1 << 16, capacity: int | None = None) -> None:
        self.rcv = bytearray()
        """The receive queue: from the peer, not yet discarded (acknowledged by the guest)."""
        self.peek_off = 0
        self.eof = False
        """The peer's FIN arrived (a peek at the end of the queue returns 0)."""
        self.snd = bytearray()
        """The send queue: what the socket took, not yet read by the peer."""
        self.sndbuf_size = sndbuf
        self.capacity = sndbuf * 3 // 4 if capacity is None else capacity
        """What the send queue takes at most: below the window's 3/4, short writes happen."""
        self.accepted = 0
        """Bytes send() ever took."""
        self.shut_wr = False
        self.closed = False
        self.aborted = False
        self.error: OSError | None = None
        self.rcvlowat = 1
        self.connect_err = 0
        self.clock = 123_456

    # --- the HostSocket port --------------------------------------------

    def fileno(self) -> int:
        return -1 if self.closed else 7

    def _check(self) -> None:
        assert not self.closed, "the core used its socket after closing it"
        if self.error is not None:
            raise self.error

    def write(self, data: memoryview) -> int:
        self._check()
        if self.shut_wr:
            raise BrokenPipeError(errno.EPIPE, "send after shutdown")
        room = self.capacity - len(self.snd)
        if room <= 0:
            raise BlockingIOError(errno.EAGAIN, "send queue full")
        n = min(room, len(data))
        self.snd += data[:n]
        self.accepted += n
        return n

    def peek(self, buf: memoryview, n: int) -> int:
        self._check()
        avail = len(self.rcv) - self.peek_off
        if avail <= 0:
            if self.eof:
                return 0
            raise BlockingIOError(errno.EAGAIN, "nothing to peek")
        k = min(n, avail)
        buf[:k] = self.rcv[self.peek_off : self.peek_off + k]
        self.peek_off += k
        return k

    def discard(self, n: int) -> None:
        self._check()
        k = min(n, len(self.rcv))
        del self.rcv[:k]
        self.peek_off = max(0, self.peek_off - k)

    def set_peek_offset(self, offset: int) -> None:
        assert not self.closed
        self.peek_off = offset

    def set_rcvlowat(self, n: int) -> None:
        assert not self.closed
        self.rcvlowat = n

    def sndbuf(self) -> int:
        assert not self.closed
        return self.sndbuf_size

    def outq(self) -> int:
        assert not self.closed
        return len(self.snd)

    def shutdown_write(self) -> None:
        self._check()
        self.shut_wr = True

    def connect_error(self) -> int:
        return self.connect_err

    def timestamp(self) -> int:
        return self.clock

    def hang_up(self, *, abort: bool) -> None:
        assert not self.closed, "closed twice"
        self.closed = True
        self.aborted = abort

    # --- readiness, as epoll would report it ----------------------------

    def readable(self) -> bool:
        return len(self.rcv) > self.peek_off or self.eof or self.error is not None

    def writable(self) -> bool:
        return len(self.snd) <= self.capacity // 2 or self.error is not None

    # --- the peer -------------------------------------------------------

    def peer_read(self, n: int) -> bytes:
        data = bytes(self.snd[:n])
        del self.snd[:n]
        return data


class WireGuest:
    """The guest link (GuestPort): parses each segment and checks what its ACK claims."""

    def __init__(self, host: MemoryHost) -> None:
        self.host = host
        self.out: deque[TcpSegment] = deque()
        self.irs: int | None = None
        """The guest's ISN once known: ACKs are checked against what the socket took."""
        self.sent = 0

    def send_ip(
        self,
        src: IpAddress,
        dst: IpAddress,
        proto: int,
        l4: bytes,
        payload: bytes | memoryview = b"",
        csum_offset: int | None = None,
    ) -> bool:
        assert proto == IPPROTO_TCP and src == REMOTE and dst == GUEST
        packet = IpPacket(4, src, dst, IPPROTO_TCP, 64, memoryview(bytes(l4) + bytes(payload)))
        seg = parse_tcp_untrusted(packet, verify_checksum=False)
        self.check_ack(seg)
        self.sent += 1
        self.out.append(seg)
        return True

    def check_ack(self, seg: TcpSegment) -> None:
        """No ACK covers a byte (or a FIN) the host socket did not take."""
        if self.irs is None or not seg.flags & ACK:
            return
        limit = seq_add(self.irs, 1 + self.host.accepted + (1 if self.host.shut_wr else 0))
        assert seq_diff(seg.ack, limit) <= 0, f"ACK {seg.ack} beyond what the socket took ({limit})"

    def guest_address(self, version: int) -> IpAddress | None:
        return GUEST


class FixedEntropy(random.Random):
    """A seeded Random: the Entropy port, reproducible."""


def new_conn(
    host: MemoryHost, wire: WireGuest, state: State, seed: int = 1, link_mss: int = LINK_MSS
) -> TcpConn:
    shared = TcpShared(
        wire, link_mss, memoryview(bytearray(PEEK_BUFFER)), PEEK_BUFFER, FixedEntropy(seed)
    )
    conn = TcpConn(ENDS, host, shared, state)
    key = FlowKey(IPPROTO_TCP, GUEST, GUEST_PORT, REMOTE, REMOTE_PORT)
    conn.flow = Flow(key, conn, state.value, 0.0)
    return conn


@dataclass
class Watch:
    """Bookkeeping that must never go back, checked after every event."""

    seq_from_guest: int | None = None
    seq_ack_from_guest: int | None = None
    seq_max_to_guest: int | None = None
    closed: bool = False

    def check(self, conn: TcpConn, host: MemoryHost) -> None:
        if self.closed:
            assert conn.closed, "a closed connection came back"
        self.closed = conn.closed
        if conn.closed:
            assert host.closed, "CLOSED but the socket is still open"
            return
        for name in ("seq_from_guest", "seq_ack_from_guest", "seq_max_to_guest"):
            # Until the guest's SYN-ACK, an inbound connection knows no
            # sequence number of the guest's yet.
            if name == "seq_from_guest" and conn.state is State.SYN_SENT:
                continue
            now = getattr(conn, name)
            before = getattr(self, name)
            if before is not None:
                assert seq_diff(now, before) >= 0, f"{name} went back: {before} -> {now}"
            setattr(self, name, now)
        if conn.state is State.ESTABLISHED:
            # The peek offset is the flight's payload: what was sent and not
            # acknowledged stays queued, and nothing else was consumed.
            assert host.peek_off == conn.data_flight, (host.peek_off, conn.data_flight)
            assert conn.flight >= 0
            assert seq_diff(conn.seq_max_to_guest, conn.seq_to_guest) >= 0
        held = [
            name
            for name in TcpConn.__slots__
            if isinstance(getattr(conn, name, None), bytes | bytearray | memoryview)
            and name != "_buf"
        ]
        assert not held, f"the connection holds payload in {held}"


class Pair:
    """The adapter around one connection (what TcpFlows does), with explicit time."""

    def __init__(
        self,
        conn: TcpConn,
        host: MemoryHost,
        wire: WireGuest,
        now: float,
        share: int | None = None,
    ) -> None:
        self.conn = conn
        self.host = host
        self.wire = wire
        self.now = now
        self.share = share
        """The most one push may send (as TcpFlows' credit may allow while the guest is busy)."""
        self.watch = Watch()
        self.connect_done = False

    def check(self) -> None:
        self.watch.check(self.conn, self.host)

    def burst(self, segs: list[TcpSegment]) -> None:
        """Guest frames read in one go, then the deferred ACK (TcpFlows.flush)."""
        conn = self.conn
        for seg in segs:
            conn.on_guest_segment(seg, self.now)
            self.check()
        if conn.ack_due:
            conn.flush_ack(self.now, self.share)
            self.check()

    def host_events(self) -> bool:
        """Readiness of the host socket, as the reactor dispatches it; True if any."""
        conn, host, did = self.conn, self.host, False
        if conn.closed:
            return False
        if conn.state is State.CONNECTING:
            if self.connect_done:
                conn.on_connected(self.now)
                self.check()
                return True
            return False
        if conn.reading() and host.readable():
            conn.on_readable(self.now, self.share)
            self.check()
            did = True
        if not conn.closed and conn.want_writable and host.writable():
            conn.on_writable(self.now)
            self.check()
            did = True
        return did

    def timers(self) -> bool:
        conn = self.conn
        if conn.closed or conn.deadline() > self.now:
            return False
        conn.on_timer(self.now)
        self.check()
        return True

    def established(self) -> bool:
        return self.conn.state is State.ESTABLISHED
