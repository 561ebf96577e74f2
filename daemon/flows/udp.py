"""UDP flows: guest datagrams to host sockets and back, and UDP forwarding.

Theory of operation
-------------------
Every UDP conversation the guest takes part in is a flow in a
:class:`~ferryd.flows.table.FlowTable`, keyed by the guest-side 4-tuple
``(guest addr, guest port, remote addr, remote port)`` as the guest sees it.

Outbound (the guest sends first): the first datagram of a new 4-tuple opens
a host UDP socket of the same family, non-blocking, ``connect()``-ed to the
destination (the host itself for the guest's gateway when gateway mapping
is on; a destination that is the host itself otherwise is refused with an
ICMP administratively prohibited: :mod:`ferryd.flows.destinations`). A
connected socket only receives from that destination, so the kernel
demultiplexes replies for us, and it
receives ICMP port unreachable as ECONNREFUSED (RFC 1122 §4.1.3.3: UDP
passes ICMP errors to the application). A reader task per socket drains it
(``recv`` until EAGAIN, at most a batch, then awaits readability) and sends
each datagram to the guest with the remote's address as the guest knows it
as the source. ECONNREFUSED becomes an ICMP (type 3 code 3, RFC 792) or
ICMPv6 (type 1 code 4, RFC 4443 §3.1) port unreachable for the guest,
quoting a reconstructed IP and UDP header of the flow, so the guest's
socket sees the error as it would on a real network.

Inbound (port forwarding, ``-u`` specs): a listener socket bound to the host
port receives from any peer; each peer ``(addr, port)`` becomes a flow with
the guest's address and the forward's guest port, and the peer's address
kept as the source (a peer on the host itself is shown as the gateway).
The guest's replies match the flow's 4-tuple and leave through the
listener with ``sendto(peer)``, so the peer sees the port it sent to.

Invariants
----------
- No payload is ever stored: each datagram is sent on or dropped at once,
  in the same synchronous step it was received in. The kernel's socket
  queues (and the guest's) are the only buffers. One receive buffer per
  :class:`UdpFlows` is reused; nothing refers to it across an await.
- :meth:`UdpFlows.from_guest` never blocks and never raises for anything the
  guest or the network does: a full socket buffer (EAGAIN, ENOBUFS) drops
  the datagram and counts it, exactly as a congested link would; other
  errors are logged once per flow and counted.
- A flow's socket is open exactly as long as the flow is in the table; a
  closed flow's reader task is cancelled before its socket is closed.
- Flows idle for ``idle_timeout`` seconds are closed by :meth:`expire`,
  which the caller runs periodically with the current time.
"""

import contextlib
import errno
import logging
import socket
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

import trio

from ferryd.descriptors import DescriptorBudget
from ferryd.flows.common import (
    family_of,
    peer_as_seen_by_guest,
    sockaddr,
    strip_scope,
)
from ferryd.flows.datagram import DatagramFlows
from ferryd.flows.destinations import Destinations, Refusal
from ferryd.flows.portspec import ForwardError, PortForward
from ferryd.flows.table import Flow, FlowKey, FlowLimitReached
from ferryd.guest import GuestPort
from ferryd.link import LinkConfig
from ferryd.wire.icmp import PORT_UNREACHABLE, build_dest_unreach
from ferryd.wire.ip import (
    IPPROTO_UDP,
    IPV4_HLEN,
    IPV6_HLEN,
    IpAddress,
    IpPacket,
)
from ferryd.wire.udp import UDP_HLEN, UdpDatagram, build_udp

__all__ = ["UDP_IDLE_TIMEOUT", "UdpFlows"]

log = logging.getLogger(__name__)

UDP_IDLE_TIMEOUT = 180.0
_DRAIN_BATCH = 64
"""Datagrams read from one socket before yielding to other tasks."""
_UDP_HDR = struct.Struct("!HHHH")


@dataclass(eq=False)
class _Outbound:
    sock: socket.socket
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    last_len: int = 0
    """Payload length of the guest's last datagram (for ICMP quotes)."""
    error_logged: bool = False
    closed: bool = False


@dataclass(eq=False)
class _Listener:
    sock: socket.socket
    fwd: PortForward
    version: int
    local_addr: IpAddress
    local_port: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed: bool = False


@dataclass(eq=False)
class _Inbound:
    listener: _Listener
    peer: tuple[str, int] | tuple[str, int, int, int]
    error_logged: bool = False


_Handle = _Outbound | _Inbound


@dataclass(frozen=True)
class UdpEntry:
    """One UDP flow as a migration records it (UdpFlows.entries)."""

    key: FlowKey
    idle: float
    """Seconds since the flow last carried a datagram."""
    listener_port: int | None
    """Inbound: the port of the forwarding listener it arrived on."""
    host_port: int | None
    """Outbound: the host port its socket is bound to (kept by a restore)."""


_ANY: dict[int, IpAddress] = {4: IPv4Address("0.0.0.0"), 6: IPv6Address("::")}


class UdpFlows(DatagramFlows[_Handle]):
    """UDP flows of one guest: outbound sockets and forwarding listeners."""

    kind = "udp"

    def __init__(
        self,
        guest: GuestPort,
        link: LinkConfig,
        nursery: trio.Nursery | None,
        *,
        destinations: Destinations,
        idle_timeout: float = UDP_IDLE_TIMEOUT,
        limit: int = 4096,
        budget: DescriptorBudget | None = None,
    ) -> None:
        super().__init__(
            guest,
            link,
            nursery,
            destinations=destinations,
            idle_timeout=idle_timeout,
            limit=limit,
            logger=log,
            budget=budget,
        )
        self._listeners: list[_Listener] = []
        # Largest payload that fits the guest's MTU with IP and UDP headers.
        self._max_payload = {
            4: link.mtu - IPV4_HLEN - UDP_HLEN,
            6: link.mtu - IPV6_HLEN - UDP_HLEN,
        }

    # ------------------------------------------------------------------
    # guest → host

    def from_guest(self, ip: IpPacket, udp: UdpDatagram, now: float) -> None:
        """Send one guest datagram on (never blocks, never raises)."""
        if self._closed:
            return
        if ip.fragment:
            self.drops["fragment"] += 1
            return
        key = FlowKey(IPPROTO_UDP, ip.src, udp.sport, ip.dst, udp.dport)
        flow = self.table.get(key)
        if flow is None:
            flow = self._new_flow(
                ip,
                ip.dst,
                udp.dport,
                now,
                group_drop="multicast",
                open_flow=lambda target: self._open_outbound(key, target, now),
            )
            if flow is None:
                return
        self._send_to_host(flow, udp.payload, now)

    def _open_outbound(
        self,
        key: FlowKey,
        target: IpAddress,
        now: float,
        bind: tuple[IpAddress | None, int | None] = (None, None),
    ) -> Flow[_Handle] | None:
        """A flow for ``key`` on a socket connected to ``target`` (the policy's route);
        None if its socket fails. Raises :class:`FlowLimitReached` (or
        :class:`DescriptorsSpent`) if there is no room."""
        self.table.check_room()
        try:
            sock = self._new_socket(family_of(key.remote_addr.version))
        except OSError as exc:
            self.drops["socket"] += 1
            self._throttle.warning("socket", now, "UDP: cannot open a socket: %s", exc)
            return None
        try:
            if bind[1]:
                with contextlib.suppress(OSError):  # keeping the port is best effort
                    sock.bind(sockaddr(bind[0] or _ANY[key.remote_addr.version], bind[1]))
            sock.connect(sockaddr(target, key.remote_port))
            local = sock.getsockname()
        except OSError as exc:
            sock.close()
            self.drops["connect"] += 1
            self._throttle.warning(
                "connect", now, "UDP: cannot reach %s port %d: %s", target, key.remote_port, exc
            )
            return None
        handle = _Outbound(sock)
        flow = self.table.add(
            key,
            handle,
            now,
            state="outbound",
            host_addr=strip_scope(local[0]),
            host_port=local[1],
        )
        self._spawn_outbound(flow, handle)
        return flow

    def _send_to_host(self, flow: Flow[_Handle], payload: memoryview, now: float) -> None:
        handle = flow.handle
        for attempt in (1, 2):
            try:
                if isinstance(handle, _Inbound):
                    handle.listener.sock.sendto(payload, handle.peer)
                else:
                    handle.sock.send(payload)
            except (BlockingIOError, InterruptedError):
                self._drop(flow, "socket buffer full")
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._drop(flow, "socket buffer full")
                    return
                if (
                    exc.errno == errno.ECONNREFUSED
                    and isinstance(handle, _Outbound)
                    and attempt == 1
                ):
                    # The pending error of an earlier datagram (ICMP port
                    # unreachable). Reporting it clears it: tell the guest,
                    # then send this datagram.
                    self._port_unreachable(flow, handle)
                    continue
                self._drop(flow, "send error")
                self._flow_error(flow, handle, "send", exc)
                return
            flow.from_guest(len(payload), now)
            if isinstance(handle, _Outbound):
                handle.last_len = len(payload)
            return

    # ------------------------------------------------------------------
    # host → guest

    async def _outbound_reader(self, flow: Flow[_Handle], handle: _Outbound) -> None:
        with handle.scope:
            while not handle.closed:
                try:
                    await trio.lowlevel.wait_readable(handle.sock)
                except trio.ClosedResourceError:
                    return
                now = trio.current_time()
                try:
                    self._drain_outbound(flow, handle, now)
                except Exception as exc:  # a bug: this flow pays (DatagramFlows._contain)
                    self._contain(flow, exc, now)
                    return

    def _drain_outbound(self, flow: Flow[_Handle], handle: _Outbound, now: float) -> None:
        if handle.closed:
            return
        view = memoryview(self._buf)
        for _ in range(_DRAIN_BATCH):
            try:
                n = handle.sock.recv_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Asynchronous errors (ICMP) are reported once and cleared,
                # so draining goes on after them.
                if exc.errno == errno.ECONNREFUSED:
                    self._port_unreachable(flow, handle)
                else:
                    self._flow_error(flow, handle, "receive", exc)
                continue
            self._to_guest(flow, view[:n], now)

    async def _listener_reader(self, listener: _Listener) -> None:
        with listener.scope:
            while not listener.closed:
                try:
                    await trio.lowlevel.wait_readable(listener.sock)
                except trio.ClosedResourceError:
                    return
                now = trio.current_time()
                try:
                    self._drain_listener(listener, now)
                except Exception as exc:  # a bug: one datagram pays, the listener goes on
                    self._contain(None, exc, now)

    def _drain_listener(self, listener: _Listener, now: float) -> None:
        if listener.closed:
            return
        view = memoryview(self._buf)
        for _ in range(_DRAIN_BATCH):
            try:
                n, peer = listener.sock.recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._throttle.warning(
                    "listener",
                    now,
                    "UDP: receive on forwarded port %d: %s",
                    listener.fwd.host_port,
                    exc,
                )
                continue
            self._from_peer(listener, peer, view[:n], now)

    def _from_peer(
        self, listener: _Listener, peer: tuple[str, int], data: memoryview, now: float
    ) -> None:
        guest_addr = self._guest.guest_address(listener.version)
        if guest_addr is None:
            self.drops["no guest address"] += 1
            return
        remote = peer_as_seen_by_guest(self._link, strip_scope(peer[0]), guest_addr)
        if remote is None:
            self.drops["no gateway"] += 1
            return
        key = FlowKey(IPPROTO_UDP, guest_addr, listener.fwd.guest_port, remote, peer[1])
        flow = self.table.get(key)
        if flow is None:
            try:
                flow = self.table.add(
                    key,
                    _Inbound(listener, peer),
                    now,
                    state="inbound",
                    host_addr=listener.local_addr,
                    host_port=listener.local_port,
                    holds_descriptor=False,
                )
            except FlowLimitReached as exc:
                self.drops["flow limit"] += 1
                self._throttle.warning("limit", now, "UDP: %s; datagram dropped", exc)
                return
        self._to_guest(flow, data, now)

    def _to_guest(self, flow: Flow[_Handle], payload: memoryview, now: float) -> None:
        key = flow.key
        if len(payload) > self._max_payload[key.guest_addr.version]:
            self._drop(flow, "larger than the guest MTU")
            return
        l4 = build_udp(key.remote_addr, key.guest_addr, key.remote_port, key.guest_port, payload)
        self._guest.send_ip(key.remote_addr, key.guest_addr, IPPROTO_UDP, l4)
        flow.to_guest(len(payload), now)

    def _port_unreachable(self, flow: Flow[_Handle], handle: _Outbound) -> None:
        """Tell the guest its flow's destination port is closed.

        The quote is the guest's datagram as it was sent (RFC 792: IP header
        plus the first 8 bytes; RFC 4443 §3.1: as much as fits), rebuilt
        from the flow's addresses and the last datagram's length, since no
        payload is kept. The quoted UDP checksum is 0 (not checked by
        receivers: Linux matches the error to a socket by addresses and
        ports only).
        """
        key = flow.key
        length = UDP_HLEN + handle.last_len
        udp = _UDP_HDR.pack(key.guest_port, key.remote_port, length, 0)
        src, dst = key.guest_addr, key.remote_addr
        proto, l4 = build_dest_unreach(dst, src, dst, IPPROTO_UDP, length, udp, PORT_UNREACHABLE)
        self.drops["port unreachable"] += 1
        self._guest.send_ip(dst, src, proto, l4)

    # ------------------------------------------------------------------
    # errors

    def _flow_error(self, flow: Flow[_Handle], handle: _Handle, what: str, exc: OSError) -> None:
        if handle.error_logged:
            return
        handle.error_logged = True
        key = flow.key
        log.warning(
            "UDP flow %s:%d → %s:%d: %s failed: %s (further errors of this flow not logged)",
            key.guest_addr,
            key.guest_port,
            key.remote_addr,
            key.remote_port,
            what,
            exc,
        )

    # ------------------------------------------------------------------
    # forwarding

    async def add_forward(self, fwd: PortForward) -> None:
        """Listen on ``fwd.host_port`` and forward what arrives to the guest.

        ``bind=None`` listens on every address of both families (an IPv6
        socket with IPV6_V6ONLY plus an IPv4 one; just IPv4 if the host has
        IPv6 disabled). Raises :class:`ForwardError` naming the port if a
        socket cannot be bound.
        """
        listeners: list[_Listener] = []
        try:
            if fwd.bind is None:
                if self._link.ipv6 is not None:
                    lst = self._bind(fwd, IPv6Address("::"), optional=True)
                    if lst is not None:
                        listeners.append(lst)
                if self._link.ipv4 is not None:
                    lst = self._bind(fwd, IPv4Address("0.0.0.0"), optional=False)
                    assert lst is not None
                    listeners.append(lst)
            else:
                if (self._link.ipv4 if fwd.bind.version == 4 else self._link.ipv6) is None:
                    raise ForwardError(
                        f"cannot forward UDP {fwd.bind} port {fwd.host_port}: "
                        f"the guest has no IPv{fwd.bind.version} address"
                    )
                lst = self._bind(fwd, fwd.bind, optional=False)
                assert lst is not None
                listeners.append(lst)
            if not listeners:
                raise ForwardError(
                    f"cannot forward UDP port {fwd.host_port}: the guest has no IP address"
                )
        except BaseException:
            for lst in listeners:
                lst.sock.close()
            raise
        for lst in listeners:
            self._listeners.append(lst)
            self._spawn_listener(lst)
        await trio.lowlevel.checkpoint()

    def _bind(self, fwd: PortForward, addr: IpAddress, *, optional: bool) -> _Listener | None:
        where = f"[{addr}]" if addr.version == 6 else str(addr)
        try:
            sock = socket.socket(
                family_of(addr.version),
                socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            )
        except OSError as exc:
            if optional and exc.errno == errno.EAFNOSUPPORT:
                return None  # IPv6 disabled on the host
            raise ForwardError(f"cannot forward UDP port {fwd.host_port}: {exc}") from exc
        try:
            if addr.version == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr(addr, fwd.host_port))
            port = sock.getsockname()[1]
        except OSError as exc:
            sock.close()
            if optional and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                return None
            raise ForwardError(f"cannot forward UDP {where}:{fwd.host_port}: {exc}") from exc
        return _Listener(sock, fwd, addr.version, addr, port)

    # ------------------------------------------------------------------
    # tasks: readers run in the data path's nursery, which a migration
    # cancels (freeze) and recreates (rollback, or resume on the target)

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Run readers in ``nursery`` from now on; None: stop spawning them.

        Attaching starts a reader for every existing flow and listener
        (each with a fresh cancel scope: a scope can be entered only once).
        """
        self._nursery = nursery
        if nursery is None:
            return
        for flow in self.table:
            if isinstance(flow.handle, _Outbound):
                self._spawn_outbound(flow, flow.handle)
        for lst in self._listeners:
            self._spawn_listener(lst)

    def _spawn_outbound(self, flow: Flow[_Handle], handle: _Outbound) -> None:
        if self._nursery is not None:
            handle.scope = trio.CancelScope()
            self._nursery.start_soon(self._outbound_reader, flow, handle)

    def _spawn_listener(self, lst: _Listener) -> None:
        if self._nursery is not None:
            lst.scope = trio.CancelScope()
            self._nursery.start_soon(self._listener_reader, lst)

    def restore_outbound(
        self, key: FlowKey, host_addr: IpAddress | None, host_port: int | None, now: float
    ) -> None:
        """Recreate a migrated outbound flow, keeping its host port if possible.

        The peer keeps talking to the same host address and port, so an
        exchange in progress continues on the new host (two-host topology:
        the target's namespace has the same addresses).
        """
        target = self._destinations.policy.route(key.remote_addr)
        if isinstance(target, Refusal):  # admitted, then the host's addresses changed
            log.warning("UDP flow to %s not restored: %s", key.remote_addr, target.value)
            return
        try:
            flow = self._open_outbound(key, target, now, bind=(host_addr, host_port))
        except FlowLimitReached as exc:
            log.info("UDP flow %s:%d: %s", key.guest_addr, key.guest_port, exc)
            flow = None
        if flow is None:
            log.info("UDP flow %s:%d could not be restored", key.guest_addr, key.guest_port)

    def flow_socket(self, key: FlowKey) -> socket.socket | None:
        """An outbound flow's socket, for a migration in one namespace to hand over;
        None for an inbound one (it answers through its listener's socket)."""
        flow = self.table.get(key)
        return flow.handle.sock if flow is not None and isinstance(flow.handle, _Outbound) else None

    def adopt_outbound(self, key: FlowKey, sock: socket.socket, now: float) -> None:
        """Take a migrated outbound flow's socket over as it is: handed over in one
        namespace (ferryd.migration.handover), with its port and the datagrams
        waiting in it. Raises AdoptionRefused if it is not connected where this
        ferryd routes the flow (``sock`` stays the caller's); owns it otherwise
        (a full table drops the flow, as restore_outbound)."""
        handle = _Outbound(sock)
        flow = self._adopt(key, handle, sock, key.remote_port, "outbound", now)
        if flow is not None:
            self._spawn_outbound(flow, handle)

    def listening_sockets(self, fwd: PortForward) -> list[socket.socket]:
        """The sockets listening for ``fwd`` (one per family), for a migration to hand over."""
        return [lst.sock for lst in self._listeners if lst.fwd is fwd]

    def adopt_forward(self, fwd: PortForward, socks: list[socket.socket]) -> None:
        """Forward with listening sockets a migration's source handed over (in one
        namespace), as they are: datagrams waiting in them are the guest's. Raises
        :class:`ForwardError` for one that is not an unconnected socket bound to
        ``fwd``'s port (and address, if it names one); ``socks`` stay the caller's then.
        """
        adopted = []
        for sock in socks:
            what = f"a UDP socket handed over for port {fwd.host_port}"
            try:
                host, port = sock.getsockname()[:2]
                sock.getpeername()
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise ForwardError(f"{what}: {exc}") from exc
            else:
                raise ForwardError(f"{what} is connected: not a listener")
            addr = strip_scope(host)
            if port != fwd.host_port or fwd.bind not in (None, addr):
                raise ForwardError(f"{what} is bound to {host} port {port}")
            adopted.append(_Listener(sock, fwd, addr.version, addr, port))
        for lst in adopted:
            lst.sock.setblocking(False)
            self._listeners.append(lst)
            self._spawn_listener(lst)

    def restore_inbound(self, key: FlowKey, listener_port: int, now: float) -> None:
        """Recreate a migrated inbound flow on its (already restored) listener."""
        for lst in self._listeners:
            if lst.local_port == listener_port and lst.version == key.remote_addr.version:
                peer = sockaddr(key.remote_addr, key.remote_port)
                self.table.add(
                    key,
                    _Inbound(lst, peer),
                    now,
                    state="inbound",
                    host_addr=lst.local_addr,
                    host_port=lst.local_port,
                    holds_descriptor=False,
                )
                return
        log.info("UDP flow from %s: no listener on port %d", key.remote_addr, listener_port)

    # ------------------------------------------------------------------
    # housekeeping

    def entries(self, now: float) -> list[UdpEntry]:
        """Every flow, as a migration records it."""
        out = []
        for flow in self.table:
            handle = flow.handle
            inbound = isinstance(handle, _Inbound)
            out.append(
                UdpEntry(
                    flow.key,
                    max(0.0, now - flow.last_activity),
                    handle.listener.local_port if isinstance(handle, _Inbound) else None,
                    None if inbound else flow.host_port,
                )
            )
        return out

    def expire(self, now: float) -> None:
        """Close flows idle for longer than ``idle_timeout``."""
        for flow in self.table.expired(now, {IPPROTO_UDP: self.idle_timeout}):
            self._close_flow(flow)

    def _close_flow(self, flow: Flow[_Handle]) -> None:
        self.table.remove(flow.key)
        handle = flow.handle
        if isinstance(handle, _Outbound):
            self._close_socket(handle)

    def listeners(self) -> list[tuple[PortForward, IpAddress, int]]:
        """Each forwarding listener: its forward and bound address and port."""
        return [(lst.fwd, lst.local_addr, lst.local_port) for lst in self._listeners]

    def close(self) -> None:
        """Close every flow and listener (idempotent)."""
        self._closed = True
        for flow in self.table:
            self._close_flow(flow)
        for lst in self._listeners:
            lst.closed = True
            lst.scope.cancel()
            trio.lowlevel.notify_closing(lst.sock)
            lst.sock.close()
        self._listeners.clear()
