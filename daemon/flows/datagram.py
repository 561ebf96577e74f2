"""What UDP flows and ICMP echo flows share: one socket per flow, one reader each.

Both adapters keep a :class:`~daemon.flows.table.FlowTable` of handles that
own a datagram socket, read it from a task in the data path's nursery
(None while a migration has it stopped), count what they drop by reason and
close a flow by cancelling its reader and closing its socket. The receive
buffer is shared by all flows of an adapter and only used inside a
synchronous drain, so it never holds a datagram across an await (no-buffer
invariant, DESIGN.md).
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from typing import Generic, Protocol, TypeVar

import trio

from daemon.flows.common import LogThrottle, gateway_of
from daemon.flows.destinations import Destinations
from daemon.flows.table import Flow, FlowTable
from daemon.guest import GuestPort
from daemon.link import LinkConfig
from daemon.wire.icmp import build_admin_prohibited
from daemon.wire.ip import IpPacket

RECV_SIZE = 65536


class SocketHandle(Protocol):
    sock: socket.socket
    scope: trio.CancelScope
    closed: bool


H = TypeVar("H")


class DatagramFlows(Generic[H]):
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
    ) -> None:
        self._guest = guest
        self._link = link
        self._nursery = nursery
        self._destinations = destinations
        self.idle_timeout = idle_timeout
        self.table: FlowTable[H] = FlowTable(limit)
        self.drops: Counter[str] = Counter()
        """Datagrams dropped or ignored, by reason (for status and tests)."""
        self._buf = bytearray(RECV_SIZE)
        self._throttle = LogThrottle(logger)
        self._closed = False

    def _drop(self, flow: Flow[H], reason: str) -> None:
        flow.dropped += 1
        self.drops[reason] += 1

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

    def snapshot(self) -> list[dict[str, object]]:
        return self.table.snapshot()

    def close(self) -> None:
        raise NotImplementedError

    def close_sockets_for_handover(self) -> None:
        """Same-namespace migration: free every port for the target."""
        self.close()
        self._closed = False

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
