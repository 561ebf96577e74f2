"""ICMP and ICMPv6 echo (ping) flows through unprivileged ping sockets.

Theory of operation
-------------------
ferryd has no raw sockets. Linux's ping sockets,
``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`` and ``socket(AF_INET6,
SOCK_DGRAM, IPPROTO_ICMPV6)``, send echo requests and receive the matching
replies for any process whose group is in ``net.ipv4.ping_group_range``
(that sysctl covers both families). Such a socket carries the ICMP header
and body without the IP header; the kernel computes the checksum and
*replaces the echo identifier with the socket's own* (the socket's "port"),
and delivers only replies carrying that identifier.

So each guest echo conversation, keyed by (guest address, echo identifier,
destination) (a :class:`~ferryd.flows.table.FlowKey` with the identifier as
``guest_port`` and ``remote_port`` 0), gets its own ping socket,
``connect()``-ed to the destination (the host's loopback for the gateway
when gateway mapping is on, as for UDP). A reader task per socket drains
the replies and gives each to the guest with the guest's identifier put
back, the sequence number and body unchanged, from the destination the
guest pinged. Only echo requests (type 8, RFC 792; type 128, RFC 4443 §4.1)
travel this way; anything else the guest sends is ignored here. Echo
requests to multicast or broadcast addresses, or to the guest's own
address, are dropped; those to the host itself are answered with an ICMP
administratively prohibited (:mod:`ferryd.flows.destinations`).

Invariants
----------
- No payload is ever stored: each request is sent on or dropped at once,
  each reply is passed to the guest as soon as it is read. The kernel's
  socket queues are the only buffers.
- :meth:`IcmpFlows.from_guest` never blocks and never raises for anything
  the guest or the network does: errors are counted and logged at most
  once per flow.
- A flow's socket is open exactly as long as the flow is in the table.
- Flows idle for ``idle_timeout`` seconds are closed by :meth:`expire`.
"""

import errno
import logging
import socket
from dataclasses import dataclass, field

import trio

from ferryd.descriptors import DescriptorBudget
from ferryd.flows.common import family_of, sockaddr, strip_scope
from ferryd.flows.datagram import DatagramFlows
from ferryd.flows.destinations import Destinations, Refusal
from ferryd.flows.table import Flow, FlowKey, FlowLimitReached
from ferryd.guest import GuestPort
from ferryd.link import LinkConfig
from ferryd.wire.icmp import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_HLEN,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    IcmpMessage,
    build_icmp,
)
from ferryd.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPV4_HLEN, IPV6_HLEN, IpAddress, IpPacket

__all__ = ["ICMP_IDLE_TIMEOUT", "IcmpFlows"]

log = logging.getLogger(__name__)

ICMP_IDLE_TIMEOUT = 60.0
_DRAIN_BATCH = 64


@dataclass(eq=False)
class _Echo:
    sock: socket.socket
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    error_logged: bool = False
    closed: bool = False


@dataclass(frozen=True)
class EchoEntry:
    """One echo flow as a migration records it (IcmpFlows.entries)."""

    key: FlowKey
    idle: float
    """Seconds since the flow last carried a message."""


class IcmpFlows(DatagramFlows[_Echo]):
    """Echo flows of one guest, one ping socket each."""

    kind = "icmp"

    def __init__(
        self,
        guest: GuestPort,
        link: LinkConfig,
        nursery: trio.Nursery | None,
        *,
        destinations: Destinations,
        idle_timeout: float = ICMP_IDLE_TIMEOUT,
        limit: int = 1024,
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
        self._max_message = {4: link.mtu - IPV4_HLEN, 6: link.mtu - IPV6_HLEN}

    def from_guest(self, ip: IpPacket, icmp: IcmpMessage, now: float) -> None:
        """Send one guest echo request on (never blocks, never raises)."""
        if self._closed:
            return
        if ip.version == 4:
            proto, request = IPPROTO_ICMP, ICMP_ECHO_REQUEST
        else:
            proto, request = IPPROTO_ICMPV6, ICMPV6_ECHO_REQUEST
        if icmp.type != request or icmp.code != 0 or ip.proto != proto:
            self.drops["not an echo request"] += 1
            return
        if ip.fragment:
            self.drops["fragment"] += 1
            return
        dst = ip.dst
        if dst == ip.src or dst == self._guest.guest_address(ip.version):
            self.drops["bad destination"] += 1
            return
        ident, _seq = icmp.echo_id_seq
        key = FlowKey(proto, ip.src, ident, dst, 0)
        flow = self.table.get(key)
        if flow is None:
            flow = self._new_flow(
                ip,
                dst,
                ident,
                now,
                group_drop="bad destination",
                open_flow=lambda target: self._open(key, target, now),
            )
            if flow is None:
                return
        handle = flow.handle
        try:
            # The whole message, header included: the kernel rewrites the
            # identifier and the checksum.
            handle.sock.send(ip.payload)
        except (BlockingIOError, InterruptedError):
            self._drop(flow, "socket buffer full")
            return
        except OSError as exc:
            self._drop(flow, "send error" if exc.errno != errno.ENOBUFS else "socket buffer full")
            if exc.errno != errno.ENOBUFS:
                self._flow_error(flow, "send", exc)
            return
        flow.from_guest(len(ip.payload), now)

    def _open(self, key: FlowKey, target: IpAddress, now: float) -> Flow[_Echo] | None:
        """A flow for ``key`` on a ping socket connected to ``target`` (the policy's
        route); None if its socket fails. Raises :class:`FlowLimitReached` (or
        :class:`DescriptorsSpent`) if there is no room."""
        self.table.check_room()
        proto = socket.IPPROTO_ICMP if key.remote_addr.version == 4 else socket.IPPROTO_ICMPV6
        try:
            sock = self._new_socket(family_of(key.remote_addr.version), proto)
        except OSError as exc:
            # EACCES: our group is outside net.ipv4.ping_group_range.
            self.drops["socket"] += 1
            self._throttle.warning("socket", now, "ICMP: cannot open a ping socket: %s", exc)
            return None
        try:
            sock.connect(sockaddr(target, 0))
            local = sock.getsockname()
        except OSError as exc:
            sock.close()
            self.drops["connect"] += 1
            self._throttle.warning("connect", now, "ICMP: cannot reach %s: %s", target, exc)
            return None
        handle = _Echo(sock)
        flow = self.table.add(
            key, handle, now, state="echo", host_addr=strip_scope(local[0]), host_port=local[1]
        )
        self._spawn(flow, handle)
        return flow

    def _spawn(self, flow: Flow[_Echo], handle: _Echo) -> None:
        if self._nursery is not None:
            handle.scope = trio.CancelScope()
            self._nursery.start_soon(self._reader, flow, handle)

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Run readers in ``nursery`` from now on (see UdpFlows.attach)."""
        self._nursery = nursery
        if nursery is not None:
            for flow in self.table:
                self._spawn(flow, flow.handle)

    def restore(self, key: FlowKey, now: float) -> None:
        """Recreate a migrated echo flow (a new ping socket, same guest id)."""
        target = self._destinations.policy.route(key.remote_addr)
        if isinstance(target, Refusal):  # admitted, then the host's addresses changed
            log.warning("ICMP flow to %s not restored: %s", key.remote_addr, target.value)
            return
        try:
            self._open(key, target, now)
        except FlowLimitReached as exc:
            log.info("ICMP echo flow %s id %d: %s", key.guest_addr, key.guest_port, exc)

    def flow_socket(self, key: FlowKey) -> socket.socket | None:
        """An echo flow's ping socket, for a migration in one namespace to hand over."""
        flow = self.table.get(key)
        return None if flow is None else flow.handle.sock

    def adopt(self, key: FlowKey, sock: socket.socket, now: float) -> None:
        """Take a migrated echo flow's ping socket over (handed over in one namespace,
        replies waiting in it included), connected again to this ferryd's route for
        the flow; as UdpFlows.adopt_outbound otherwise."""
        handle = _Echo(sock)
        flow = self._adopt(key, handle, sock, None, "echo", now)
        if flow is not None:
            self._spawn(flow, handle)

    async def _reader(self, flow: Flow[_Echo], handle: _Echo) -> None:
        with handle.scope:
            while not handle.closed:
                try:
                    await trio.lowlevel.wait_readable(handle.sock)
                except trio.ClosedResourceError:
                    return
                now = trio.current_time()
                try:
                    self._drain(flow, handle, now)
                except Exception as exc:  # a bug: this flow pays (DatagramFlows._contain)
                    self._contain(flow, exc, now)
                    return

    def _drain(self, flow: Flow[_Echo], handle: _Echo, now: float) -> None:
        if handle.closed:
            return
        key = flow.key
        reply = ICMP_ECHO_REPLY if key.proto == IPPROTO_ICMP else ICMPV6_ECHO_REPLY
        limit = self._max_message[key.guest_addr.version]
        view = memoryview(self._buf)
        for _ in range(_DRAIN_BATCH):
            try:
                n = handle.sock.recv_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # An ICMP error about the destination, reported once.
                self._flow_error(flow, "receive", exc)
                continue
            if n < ICMP_HLEN or view[0] != reply:
                self.drops["not an echo reply"] += 1
                continue
            if n > limit:
                self._drop(flow, "larger than the guest MTU")
                continue
            # Identifier back to the guest's; sequence number kept.
            rest = key.guest_port.to_bytes(2, "big") + bytes(view[6:8])
            l4 = build_icmp(
                key.remote_addr, key.guest_addr, reply, view[1], rest, view[ICMP_HLEN:n]
            )
            self._guest.send_ip(key.remote_addr, key.guest_addr, key.proto, l4)
            flow.to_guest(n, now)

    def _flow_error(self, flow: Flow[_Echo], what: str, exc: OSError) -> None:
        if flow.handle.error_logged:
            return
        flow.handle.error_logged = True
        key = flow.key
        log.warning(
            "ICMP echo flow %s id %d → %s: %s failed: %s (further errors not logged)",
            key.guest_addr,
            key.guest_port,
            key.remote_addr,
            what,
            exc,
        )

    def entries(self, now: float) -> list[EchoEntry]:
        """Every echo flow, as a migration records it."""
        return [EchoEntry(flow.key, max(0.0, now - flow.last_activity)) for flow in self.table]

    def expire(self, now: float) -> None:
        """Close flows idle for longer than ``idle_timeout``."""
        timeouts = {IPPROTO_ICMP: self.idle_timeout, IPPROTO_ICMPV6: self.idle_timeout}
        for flow in self.table.expired(now, timeouts):
            self._close_flow(flow)

    def _close_flow(self, flow: Flow[_Echo]) -> None:
        self.table.remove(flow.key)
        self._close_socket(flow.handle)

    def close(self) -> None:
        """Close every flow (idempotent)."""
        self._closed = True
        for flow in self.table:
            self._close_flow(flow)
