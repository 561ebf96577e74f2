"""What migration needs from the rest of ferryd: the one interface it drives.

The migration layer (source, target, restorer, controller) sees the data
path only through :class:`MigrationHost`; ferryd.datapath.DataPath
implements it. It never sees the frontend (a tap today), the control
socket, or the daemon that composes them: those depend on migration, never
the other way round, and a test drives migration with an in-memory host.

What a migration needs, and why:

- the guest's link (the stream's header) and, on a target, a fresh stack
  and empty tables for the link the header names (:meth:`rebuild`);
- the flow tables themselves (ferryd.flows): their connections are what
  is dumped and restored;
- the freeze and the thaw (:meth:`stop`, :meth:`start`);
- the handover of the guest's frames (:meth:`hand_over`, :meth:`take_over`),
  whatever the frontend does to move them;
- the destination rules a target checks each record against
  (:attr:`policy`), and a place for sockets that could not be closed
  silently (:attr:`stranded`).
"""

from __future__ import annotations

import socket
from typing import Protocol

from ferryd.flows.destinations import DestinationPolicy
from ferryd.flows.icmp import IcmpFlows
from ferryd.flows.tcp import TcpFlows
from ferryd.flows.udp import UdpFlows
from ferryd.link import LinkConfig
from ferryd.wire.ip import IpAddress


class MigrationHost(Protocol):
    @property
    def link(self) -> LinkConfig: ...

    @property
    def tcp(self) -> TcpFlows: ...

    @property
    def udp(self) -> UdpFlows: ...

    @property
    def icmp(self) -> IcmpFlows: ...

    @property
    def guest_mac(self) -> bytes | None:
        """The guest's MAC as last seen (None before its first frame)."""
        ...

    @guest_mac.setter
    def guest_mac(self, mac: bytes | None) -> None: ...

    @property
    def policy(self) -> DestinationPolicy:
        """Where the guest may send: a target admits a record only within it."""
        ...

    @property
    def stranded(self) -> list[socket.socket]:
        """Sockets a failed migration could not close silently: kept open, unused."""
        ...

    def rebuild(self, link: LinkConfig, now: float) -> None:
        """A fresh stack and empty flow tables for ``link`` (stopped)."""
        ...

    async def start(self) -> None:
        """Handle frames and socket events (again): a rollback's or a resume's last step."""
        ...

    async def stop(self) -> None:
        """Freeze: no frame from the guest and no socket event is handled after this."""
        ...

    def hand_over(self, *, drain: bool) -> None:
        """Give the guest's frames up to the other ferryd (``drain``: handle the queued first)."""
        ...

    def take_over(self) -> None:
        """Take the guest's frames from now on, held unread until :meth:`start`."""
        ...

    def send_ip(self, src: IpAddress, dst: IpAddress, proto: int, l4: bytes) -> None:
        """Send one IP packet to the guest (a restored handshake's reset)."""
        ...
