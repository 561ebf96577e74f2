"""What migration needs from the rest of ferryd: the one interface it drives.

The migration layer (source, target, restorer, controller) sees the data
path only through :class:`MigrationHost`; ferryd.datapath.DataPath
implements it. It never sees the frontend (a tap today), the control
socket, or the daemon that composes them: those depend on migration, never
the other way round, and a test drives migration with an in-memory host.

What a migration needs, and why:

- the guest's link (the stream's header) and, on a target, a fresh stack
  and empty tables for the link the header names (:meth:`rebuild`);
- the flows (ferryd.flows), each through a small protocol of its own
  (:class:`MigratingTcp`, :class:`MigratingUdp`, :class:`MigratingEchoes`):
  what a dump reads, a pre-copy holds, a restore adds and a handover
  gives and adopts; never their tables, tasks or sockets' tuning;
- the freeze and the thaw (:meth:`stop`, :meth:`start`);
- the handover of the guest's frames (:meth:`hand_over`, :meth:`take_over`),
  whatever the frontend does to move them;
- the destination rules a target checks each record against
  (:attr:`policy`), and a place for sockets that could not be closed
  silently (:attr:`stranded`).

A TCP connection itself is a :class:`~ferryd.flows.tcp_conn.TcpConn`, the
sans-IO core: migration reads it through ``guest_state()`` and builds one
with ``TcpFlows.adopt`` (``TcpConn.restored``), and reaches its socket with
``ferryd.flows.tcp.socket_of`` to dump or hand it over.
"""

from __future__ import annotations

import socket
from typing import Protocol

from ferryd.flows.destinations import DestinationPolicy
from ferryd.flows.icmp import EchoEntry
from ferryd.flows.portspec import PortForward
from ferryd.flows.table import FlowKey
from ferryd.flows.tcp_conn import Endpoints, TcpConn, TcpGuestState
from ferryd.flows.tcp_host import SocketHost
from ferryd.flows.udp import UdpEntry
from ferryd.link import LinkConfig
from ferryd.wire.ip import IpAddress


class MigratingTcp(Protocol):
    """The TCP flows as a migration drives them: ferryd.flows.tcp.TcpFlows."""

    def connections(self) -> list[TcpConn]:
        """Every connection, closed ones included."""
        ...

    def count(self) -> int: ...

    def hold(self, conns: list[TcpConn]) -> None:
        """Leave ``conns`` alone (a pre-copy dumps them in repair mode) until release()."""
        ...

    def release(self, conns: list[TcpConn], now: float) -> None: ...

    def bound_queues(self, limit: int | None) -> None:
        """Cap every connection's kernel queues at ``limit`` bytes each way (None: undo),
        so that what busy connections must carry across the freeze is bounded."""
        ...

    def forget(self, conn: TcpConn) -> None:
        """Out of the table and the epoll, BEFORE its socket is closed or handed over."""
        ...

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
        """A restored connection on ``sock`` (tuned here), in the table, armed when started."""
        ...

    def prearm(self, conns: list[TcpConn], now: float) -> None:
        """Arm restored connections while stopped (out of the downtime)."""
        ...

    def resume(self, conn: TcpConn, now: float) -> None:
        """Resynchronise a restored connection with the guest, and re-arm it."""
        ...

    def flush(self, now: float) -> None: ...

    def send_reset(self, ends: Endpoints, seq: int, ack: int) -> None:
        """Reset the guest's side of a connection no socket stands for."""
        ...

    def listeners(self) -> list[tuple[PortForward, IpAddress, int]]: ...

    def close_listeners(self) -> None: ...

    async def add_forward(self, fwd: PortForward) -> None: ...

    def listening_sockets(self, fwd: PortForward) -> list[socket.socket]:
        """A forward's listening sockets (one namespace: they are handed over)."""
        ...

    def adopt_forward(self, fwd: PortForward, socks: list[socket.socket]) -> None:
        """Forward with listening sockets a source handed over (ForwardError if unfit)."""
        ...


class MigratingUdp(Protocol):
    """The UDP flows as a migration drives them: ferryd.flows.udp.UdpFlows."""

    def count(self) -> int: ...

    def entries(self, now: float) -> list[UdpEntry]: ...

    def listeners(self) -> list[tuple[PortForward, IpAddress, int]]: ...

    async def add_forward(self, fwd: PortForward) -> None: ...

    def restore_inbound(self, key: FlowKey, listener_port: int, now: float) -> None: ...

    def restore_outbound(
        self, key: FlowKey, host_addr: IpAddress | None, host_port: int | None, now: float
    ) -> None: ...

    def flow_socket(self, key: FlowKey) -> socket.socket | None:
        """An outbound flow's socket (one namespace: handed over); None: inbound."""
        ...

    def adopt_outbound(self, key: FlowKey, sock: socket.socket, now: float) -> None:
        """An outbound flow on a socket a source handed over (AdoptionRefused if unfit)."""
        ...

    def listening_sockets(self, fwd: PortForward) -> list[socket.socket]: ...

    def adopt_forward(self, fwd: PortForward, socks: list[socket.socket]) -> None: ...

    def clear(self) -> None:
        """Close every flow and listener; the table stays usable (a discarded restore)."""
        ...


class MigratingEchoes(Protocol):
    """The ICMP echo flows as a migration drives them: ferryd.flows.icmp.IcmpFlows."""

    def count(self) -> int: ...

    def entries(self, now: float) -> list[EchoEntry]: ...

    def restore(self, key: FlowKey, now: float) -> None: ...

    def flow_socket(self, key: FlowKey) -> socket.socket | None: ...

    def adopt(self, key: FlowKey, sock: socket.socket, now: float) -> None: ...

    def clear(self) -> None: ...


class MigrationHost(Protocol):
    @property
    def link(self) -> LinkConfig: ...

    @property
    def tcp(self) -> MigratingTcp: ...

    @property
    def udp(self) -> MigratingUdp: ...

    @property
    def icmp(self) -> MigratingEchoes: ...

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
        """A fresh stack and empty flow tables for ``link`` (stopped); the old tables'
        listeners and sockets closed (the stream's listeners bind the same ports)."""
        ...

    async def reset(self, now: float) -> None:
        """The data path as this ferryd started (stopped): a fresh stack for its
        configured link, empty tables, its configured forwards bound again.

        For a target whose migration was given up and whose next guest is a
        new one (MigrationController.reopen): :meth:`rebuild` left the
        stream's link and closed the forwards. A forward that cannot be
        bound again (its port taken meanwhile) is logged and left out.
        """
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
