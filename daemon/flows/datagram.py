"""What UDP flows and ICMP echo flows share: one socket per flow, one reader each.

Both adapters keep a :class:`~ferryd.flows.table.FlowTable` of handles that
own a datagram socket, read it from a task in the data path's nursery
(None while a migration has it stopped), count what they drop by reason and
close a flow by cancelling its reader and closing its socket. The receive
buffer is shared by all flows of an adapter and only used inside a
synchronous drain, so it never holds a datagram across an await (no-buffer
invariant, DESIGN.md).

A bug of ours reached while a flow's datagrams are handled costs that flow
(:meth:`DatagramFlows._contain`): it is closed, counted in ``counters.flow_errors``
and logged, rate-limited, and the reader task ends quietly instead of taking
the data path's nursery, and the daemon, with it.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar

import trio

from ferryd.bugs import describe_bug
from ferryd.descriptors import DescriptorBudget, open_flow_socket
from ferryd.flows.common import gateway_of, sockaddr, strip_scope
from ferryd.flows.destinations import Destinations, Refusal
from ferryd.flows.table import (
    DescriptorsSpent,
    Flow,
    FlowCounters,
    FlowKey,
    FlowLimitReached,
    FlowTable,
)
from ferryd.guest import GuestPort
from ferryd.link import LinkConfig
from ferryd.logthrottle import LogThrottle
from ferryd.wire.icmp import build_admin_prohibited
from ferryd.wire.ip import IpAddress, IpPacket

RECV_SIZE = 65536


class AdoptionRefused(Exception):
    """A socket a migration handed over does not fit the flow it came for (the
    message says how); the caller keeps the socket."""


class SocketHandle(Protocol):
    sock: socket.socket
    scope: trio.CancelScope
    closed: bool


H = TypeVar("H")


@dataclass
class DatagramCounters(FlowCounters):
    """What a datagram protocol's flows count (read by ferryd's counters registry)."""

    flow_errors: int = 0
    """Flows closed because handling them raised (a ferryd bug, contained)."""


class DatagramFlows(Generic[H]):
    kind: ClassVar[str]
    """The protocol's name in counters and logs ("udp", "icmp")."""

    def __init__(
        self,
        guest: GuestPort,
        link: LinkConfig,
        nursery: trio.Nursery | None,
        *,
        destinations: Destinations,
        idle_timeout: float,
        limit: int,
        logger: logging.Logger,
        budget: DescriptorBudget | None = None,
    ) -> None:
        self._guest = guest
        self._link = link
        self._nursery = nursery
        self._destinations = destinations
        self.idle_timeout = idle_timeout
        self.counters = DatagramCounters()
        self.table: FlowTable[H] = FlowTable(limit, budget, self.counters)
        self._budget = budget
        self.drops: Counter[str] = Counter()
        """Datagrams dropped or ignored, by reason (for status and tests)."""
        self._buf = bytearray(RECV_SIZE)
        self._log = logger
        self._throttle = LogThrottle(logger)
        self._closed = False

    def _drop(self, flow: Flow[H], reason: str) -> None:
        flow.dropped += 1
        self.drops[reason] += 1

    def _new_flow(
        self,
        ip: IpPacket,
        dst: IpAddress,
        port: int,
        now: float,
        *,
        group_drop: str,
        open_flow: Callable[[IpAddress], Flow[H] | None],
    ) -> Flow[H] | None:
        """A flow for the guest's first packet to ``dst``, or None if it got none.

        Group destinations are dropped silently (RFC 1812 §4.3.2.7: no ICMP
        error about them), counted under ``group_drop``; the host itself is
        refused as a router's filter would (``_prohibited``, rate-limited);
        so is a flow with no room left (``_refuse``). ``open_flow(target)``
        opens the flow toward the policy's route, or returns None if its
        socket fails.
        """
        target = self._destinations.policy.route(dst)
        if target is Refusal.GROUP:
            self.drops[group_drop] += 1
            return None
        if isinstance(target, Refusal):
            self.drops["refused"] += 1
            if self._destinations.refuse(self.kind, ip.src, dst, port, target, now):
                self._prohibited(ip)
            return None
        try:
            return open_flow(target)
        except FlowLimitReached as exc:  # table full or no descriptor left
            self._refuse(ip, exc, now)
            return None

    def _prohibited(self, ip: IpPacket) -> None:
        """Answer a refused packet as a router's filter would: ICMP(v6)
        destination unreachable, administratively prohibited, from the gateway."""
        src = gateway_of(self._link, ip.version) or ip.dst
        proto, message = build_admin_prohibited(ip, src)
        self._guest.send_ip(src, ip.src, proto, message)

    @staticmethod
    def _close_socket(handle: SocketHandle) -> None:
        handle.closed = True
        handle.scope.cancel()
        trio.lowlevel.notify_closing(handle.sock)
        handle.sock.close()

    def _adopt(
        self, key: FlowKey, handle: H, sock: socket.socket, port: int | None, state: str, now: float
    ) -> Flow[H] | None:
        """A flow for ``key`` on ``handle``, whose socket ``sock`` a migration handed over
        (ferryd.migration.handover); made non-blocking, as every socket of the data path.

        It must be connected to ``port`` where this ferryd's own rules send the
        flow (AdoptionRefused if not: the caller keeps the socket). ``port``
        None: a ping socket, whose peer cannot be read back (getpeername() says
        ENOTCONN for a peer port of 0, inet_getname), is connected there again
        instead: it sends where this ferryd's rules say, whatever the source had.
        None, and the socket closed, when the table has no room (the flow is
        dropped, as a restore that cannot open it).
        """
        target = self._destinations.policy.route(key.remote_addr)
        if isinstance(target, Refusal):
            raise AdoptionRefused(f"{self.kind} flow to {key.remote_addr}: {target.value}")
        what = f"{self.kind} flow to {key.remote_addr}: the socket handed over"
        try:
            sock.setblocking(False)
            if port is None:
                sock.connect(sockaddr(target, 0))
            else:
                peer = sock.getpeername()
                if strip_scope(peer[0]) != target or peer[1] != port:
                    raise AdoptionRefused(
                        f"{what} is connected to {peer[0]} port {peer[1]}, not {target} port {port}"
                    )
            local = sock.getsockname()
        except OSError as exc:
            raise AdoptionRefused(f"{what}: {exc}") from None
        try:
            return self.table.add(
                key, handle, now, state=state, host_addr=strip_scope(local[0]), host_port=local[1]
            )
        except FlowLimitReached as exc:
            self._log.info("%s flow %s not taken over: %s", self.kind, key, exc)
            sock.close()
            return None

    def _new_socket(self, family: int, proto: int = 0) -> socket.socket:
        """A datagram socket for a new flow (see :func:`open_flow_socket`)."""
        return open_flow_socket(socket.socket, self._budget, family, socket.SOCK_DGRAM, proto)

    def _refuse(self, ip: IpPacket, exc: FlowLimitReached, now: float) -> None:
        """No room for the guest's new flow: tell it as a router would (ICMP)."""
        self.drops["no descriptor" if isinstance(exc, DescriptorsSpent) else "flow limit"] += 1
        self._throttle.warning(
            "limit", now, "%s: refusing a new flow to %s: %s", self.kind, ip.dst, exc
        )
        if self._destinations.may_answer(now):
            self._prohibited(ip)

    def _contain(self, flow: Flow[H] | None, exc: Exception, now: float) -> None:
        """Handling ``flow`` (None: a listener's datagram) raised: close it, count, log."""
        self.counters.flow_errors += 1
        what = "a datagram dropped" if flow is None else f"flow {flow.key} closed"
        self._throttle.warning(
            "bug", now, "%s: %s, ferryd bug: %s", self.kind, what, describe_bug(exc)
        )
        if flow is not None and self.table.get(flow.key) is flow:
            self._close_flow(flow)

    def _close_flow(self, flow: Flow[H]) -> None:
        raise NotImplementedError

    def snapshot(self) -> list[dict[str, object]]:
        return self.table.snapshot()

    def count(self) -> int:
        """Flows in the table now."""
        return len(self.table)

    def close(self) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        """Close every flow and listener, and stay usable: a target discarding what a
        migration restored (a source rolling back keeps its own)."""
        self.close()
        self._closed = False

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
