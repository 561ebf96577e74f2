"""TCP flows: the trio adapter around :class:`~daemon.flows.tcp_conn.TcpConn`.

Theory of operation
-------------------
Outbound: a guest SYN for an unknown 4-tuple opens a non-blocking host
socket and starts connect() to the destination (the gateway address maps
to the host itself only with ``--map-gw``). The guest gets its SYN-ACK only
once the host side is connected, and a RST if connect() fails (refused,
ICMP unreachable) or takes longer than ``CONNECT_TIMEOUT``, so the guest's
connect() reports what really happened.

Inbound (``-t SPEC``): listeners on the host accept peers; each accepted
socket becomes a connection that ferryd opens towards the guest with a
SYN, the peer's address preserved as the source the guest sees (a peer on
the host's own loopback shows up as the gateway).

Each connection has one task. It waits for whichever event can move the
connection on: writability while connecting, new bytes on the socket while
the guest's window has room, otherwise an explicit wake-up (a guest ACK
opened the window) — always bounded by the connection's deadline
(retransmission, handshake, window probe, idle). Segments from the guest
are handled synchronously as the stack dispatches them: acknowledging,
writing to the socket and sending more to the guest need no task switch.

Segments for unknown 4-tuples (other than a SYN) get a RST (RFC 9293
§3.10.7.1), as does a SYN when the table is full (``--max-flows``; logged,
rate-limited).
"""

from __future__ import annotations

import errno
import logging
import socket
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import trio

from daemon.flows.common import (
    LogThrottle,
    family_of,
    host_destination,
    is_group_destination,
    peer_as_seen_by_guest,
    sockaddr,
    strip_scope,
)
from daemon.flows.portspec import ForwardError, PortForward
from daemon.flows.table import FlowKey, FlowLimitReached, FlowTable
from daemon.flows.tcp_conn import SO_PEEK_OFF, Endpoints, State, TcpConn
from daemon.guest import GuestPort
from daemon.link import LinkConfig
from daemon.wire.ip import IPPROTO_TCP, IpAddress, IpPacket
from daemon.wire.tcp import ACK, FIN, RST, SYN, TcpSegment, build_tcp

log = logging.getLogger("ferryd.tcp")

#: One peek buffer shared by all connections: it is only used inside a
#: synchronous push and never holds data across an await (no-buffer
#: invariant: what is peeked is written to the guest at once).
PEEK_BUFFER = 1 << 20
LISTEN_BACKLOG = 1024


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


class _Listener:
    def __init__(self, sock: socket.socket, fwd: PortForward, addr: IpAddress, port: int) -> None:
        self.sock = sock
        self.fwd = fwd
        self.addr = addr
        self.port = port


class TcpFlows:
    def __init__(
        self,
        guest: GuestPort,
        link: LinkConfig,
        nursery: trio.Nursery | None,
        *,
        map_gateway: bool,
        limit: int = 4096,
    ) -> None:
        self._guest = guest
        self._link = link
        self._nursery = nursery
        self._map_gateway = map_gateway
        self.table: FlowTable[TcpConn] = FlowTable(limit)
        self._peek = memoryview(bytearray(PEEK_BUFFER))
        self._rcvlowat_cap = _rcvlowat_cap()
        self._listeners: list[_Listener] = []
        self._throttle = LogThrottle(log)
        self._writers: set[TcpConn] = set()
        self._ack_due: list[TcpConn] = []
        self.resets_sent = 0

    # --- from the guest ---------------------------------------------------

    def from_guest(self, ip: IpPacket, seg: TcpSegment, now: float) -> None:
        key = FlowKey(IPPROTO_TCP, ip.src, seg.sport, ip.dst, seg.dport)
        flow = self.table.get(key)
        if flow is not None:
            conn = flow.handle
            conn.on_guest_segment(seg, now)
            if conn.want_writable:
                self._start_writer(conn)
            return
        if seg.flags & (SYN | ACK | RST | FIN) == SYN:
            self._outbound(ip, seg, key, now)
        else:
            self._reset(ip, seg)

    def _reset(self, ip: IpPacket, seg: TcpSegment) -> None:
        rst = reset_for(ip, seg)
        if rst is not None:
            self.resets_sent += 1
            self._guest.send_ip(ip.dst, ip.src, IPPROTO_TCP, rst)

    def _mss(self, version: int) -> int:
        return self._link.mtu - (40 if version == 4 else 60)

    def _outbound(self, ip: IpPacket, seg: TcpSegment, key: FlowKey, now: float) -> None:
        if is_group_destination(self._link, ip.dst):
            return
        try:
            self.table.check_room()
        except FlowLimitReached as exc:
            self._throttle.warning(
                "limit", now, "refusing TCP connection to %s:%d: %s", ip.dst, seg.dport, exc
            )
            self._reset(ip, seg)
            return
        dst = host_destination(self._link, self._map_gateway, ip.dst)
        sock = socket.socket(
            family_of(ip.version), socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            _tune(sock)
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
        ends = Endpoints(ip.src, seg.sport, ip.dst, seg.dport)
        conn = self._register(ends, sock, State.CONNECTING, ip.version, now)
        conn.start_outbound(seg, now)
        self._spawn(conn)

    def _register(
        self, ends: Endpoints, sock: socket.socket, state: State, version: int, now: float
    ) -> TcpConn:
        """A new connection on ``sock``, entered in the flow table."""
        conn = TcpConn(
            ends,
            sock,
            self._guest,
            state,
            self._mss(version),
            self._peek,
            self._closed,
            self._queue_ack,
            self._rcvlowat_cap,
        )
        local = sock.getsockname()
        e = ends
        key = FlowKey(IPPROTO_TCP, e.guest_addr, e.guest_port, e.remote_addr, e.remote_port)
        conn.flow = self.table.add(
            key, conn, now, state=state.value, host_addr=strip_scope(local[0]), host_port=local[1]
        )
        return conn

    def _closed(self, conn: TcpConn) -> None:
        e = conn.ends
        self.table.remove(
            FlowKey(IPPROTO_TCP, e.guest_addr, e.guest_port, e.remote_addr, e.remote_port)
        )

    def _queue_ack(self, conn: TcpConn) -> None:
        self._ack_due.append(conn)

    def flush(self) -> None:
        """The frontend's queue ran dry: send the ACKs deferred meanwhile."""
        due, self._ack_due = self._ack_due, []
        for conn in due:
            conn.flush_ack()
            if conn.want_writable:
                self._start_writer(conn)

    # --- per-connection task ----------------------------------------------

    async def _run(self, conn: TcpConn) -> None:
        sock = conn.sock
        try:
            while not conn.closed:
                with trio.CancelScope(deadline=conn.deadline()) as scope:
                    conn.scope = scope
                    if conn.state is State.CONNECTING:
                        await trio.lowlevel.wait_writable(sock)
                        conn.on_connected(trio.current_time())
                    elif conn.reading():
                        conn.prepare_wait()
                        await trio.lowlevel.wait_readable(sock)
                        conn.on_readable(trio.current_time())
                    else:
                        conn.wakeup = trio.Event()
                        await conn.wakeup.wait()
                conn.scope = None
                conn.wakeup = None
                if scope.cancelled_caught and not conn.closed:
                    conn.on_timer(trio.current_time())
                if conn.want_writable:
                    self._start_writer(conn)
        except (trio.ClosedResourceError, OSError) as exc:
            if conn.state is not State.CLOSED:
                log.info("%s: %s: reset", conn.describe(), exc)
                conn.abort(trio.current_time(), rst_guest=True, rst_peer=True)

    def _spawn(self, conn: TcpConn) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._run, conn)

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Run connection tasks in ``nursery`` from now on; None: stop spawning.

        A migration cancels the data path's nursery (freeze) and attaches a
        new one on rollback, or on the target at resume: every connection and
        listener then gets its task again.
        """
        self._nursery = nursery
        self._writers.clear()
        if nursery is None:
            return
        for flow in self.table:
            conn = flow.handle
            conn.scope = conn.wakeup = None
            nursery.start_soon(self._run, conn)
            if conn.want_writable:
                self._start_writer(conn)
        for lst in self._listeners:
            nursery.start_soon(self._accept_loop, lst)

    def adopt(self, ends: Endpoints, sock: socket.socket, version: int, now: float) -> TcpConn:
        """A connection restored by a migration: in the table, no task yet."""
        return self._register(ends, sock, State.ESTABLISHED, version, now)

    def close_listeners(self) -> None:
        for lst in self._listeners:
            trio.lowlevel.notify_closing(lst.sock)
            lst.sock.close()
        self._listeners.clear()

    def _start_writer(self, conn: TcpConn) -> None:
        if self._nursery is None:
            return
        if conn not in self._writers and conn.state is not State.CLOSED:
            self._writers.add(conn)
            self._nursery.start_soon(self._writer, conn)

    async def _writer(self, conn: TcpConn) -> None:
        try:
            await trio.lowlevel.wait_writable(conn.sock)
        except (trio.ClosedResourceError, OSError):
            return
        finally:
            self._writers.discard(conn)
        if conn.state is not State.CLOSED:
            conn.on_writable(trio.current_time())

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

    async def _accept_loop(self, lst: _Listener) -> None:
        while True:
            try:
                await trio.lowlevel.wait_readable(lst.sock)
            except (trio.ClosedResourceError, OSError):
                return  # the listener was closed (shutdown, or handed over)
            while True:
                try:
                    sock, peer = lst.sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # ECONNABORTED, EMFILE, ...
                    self._throttle.warning(
                        "accept", trio.current_time(), "accept on port %d: %s", lst.port, exc
                    )
                    break
                self._inbound(sock, peer, lst)

    def _inbound(self, sock: socket.socket, peer: tuple[str, int], lst: _Listener) -> None:
        now = trio.current_time()
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
        conn = self._register(ends, sock, State.SYN_SENT, peer_addr.version, now)
        conn.start_inbound(now)
        self._spawn(conn)

    # --- housekeeping -----------------------------------------------------

    def expire(self, now: float) -> None:
        """Connections keep their own deadlines; nothing to sweep here."""

    def snapshot(self) -> list[dict[str, object]]:
        return self.table.snapshot()

    def close(self) -> None:
        """Reset every connection both ways and close the listeners."""
        now = trio.current_time()
        for flow in self.table:
            flow.handle.abort(now, rst_guest=True, rst_peer=True)
        self.close_listeners()


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
