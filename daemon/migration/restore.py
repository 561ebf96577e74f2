"""Restoring flows from migration records: the target's job, and a rollback's.

:class:`Restorer` takes records as the stream delivers them. TCP sockets are
created as their records arrive and restored in batches of up to 253 (one
ferry-repair message turns repair ON for a whole batch; REFERENCE.md gives
the per-socket order), so the target's work overlaps the source's dump.
Every restored socket stays in repair mode — invisible to the peer, and
closable without a FIN or RST — until :meth:`Restorer.resume`: then repair
goes OFF in batches, migrated unsent bytes are sent, the data path starts
and each guest connection is resynchronised (an ACK with a fresh window,
and everything the guest had not acknowledged sent again).

If anything fails before resume, :meth:`Restorer.discard` closes every
socket silently and leaves nothing behind.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import trio

from daemon.control import ControlError
from daemon.flows.portspec import PortForward
from daemon.flows.table import FlowKey
from daemon.flows.tcp_conn import SO_PEEK_OFF, Endpoints, TcpConn
from daemon.migration.flowstate import apply_guest_state, socket_state
from daemon.migration.records import (
    FlowRecord,
    IcmpFlowRecord,
    ListenerRecord,
    TcpFlowRecord,
    UdpFlowRecord,
)
from daemon.migration.repair_client import RepairClient, RepairListener, RepairMode
from daemon.migration.sockstate import (
    TcpSocketState,
    close_silently,
    finish_restore,
    new_socket_for,
    restore_in_repair,
)
from daemon.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from daemon.wire.tcp import ACK, RST, build_tcp

if TYPE_CHECKING:
    from daemon.main import Daemon

log = logging.getLogger("ferryd.migration")

BATCH = 253  # SCM_MAX_FD: one ferry-repair message


class RepairSource:
    """Where this ferryd gets its repair helper from (--repair-socket/--repair-listen)."""

    def __init__(self, connect: str | None, listen: str | None) -> None:
        self.connect_path = connect
        self.listen_path = listen
        self._listener: RepairListener | None = None
        self._client: RepairClient | None = None

    async def setup(self) -> None:
        if self.listen_path:
            self._listener = await RepairListener.bind(self.listen_path)

    async def get(self) -> RepairClient:
        if self._client is not None and not self._client.closed:
            return self._client
        if self.connect_path:
            self._client = await RepairClient.connect(self.connect_path)
        elif self._listener is not None:
            with trio.move_on_after(10) as scope:
                self._client = await self._listener.accept()
            if scope.cancelled_caught:
                raise ControlError(f"no repair helper connected to {self.listen_path} within 10 s")
        else:
            raise ControlError(
                "migrating TCP connections needs the repair helper: start ferryd with "
                "--repair-socket PATH (ferry-repair --listen PATH) or --repair-listen PATH"
            )
        assert self._client is not None
        return self._client


def ends_of(rec: TcpFlowRecord) -> Endpoints:
    return Endpoints(rec.guest_addr, rec.guest_port, rec.remote_addr, rec.remote_port)


class Restorer:
    def __init__(self, daemon: Daemon, repair: RepairClient | RepairSource | None) -> None:
        self.d = daemon
        self._repair = repair
        self.pending: list[tuple[socket.socket, TcpSocketState, TcpFlowRecord]] = []
        self.restored: list[tuple[TcpConn, TcpSocketState, TcpFlowRecord]] = []
        self.in_repair: list[socket.socket] = []
        self.resets: list[TcpFlowRecord] = []
        self.udp: list[UdpFlowRecord] = []
        self.icmp: list[IcmpFlowRecord] = []
        self.counts = {"tcp": 0, "udp": 0, "icmp": 0, "listeners": 0, "reset": 0}
        self.repair_passes = 0

    async def _client(self) -> RepairClient:
        if isinstance(self._repair, RepairSource):
            self._repair = await self._repair.get()
        if self._repair is None:
            raise ControlError("no repair helper for restoring TCP connections")
        return self._repair

    async def add(self, rec: FlowRecord) -> None:
        if isinstance(rec, TcpFlowRecord):
            if rec.kernel is None:
                self.resets.append(rec)
                return
            state = socket_state(rec.kernel)
            state.check()
            self.pending.append((new_socket_for(state), state, rec))
            if len(self.pending) >= BATCH:
                await self._batch()
        elif isinstance(rec, ListenerRecord):
            fwd = PortForward(rec.bind_addr, rec.host_port, rec.guest_port)
            flows = self.d.tcp if rec.proto == IPPROTO_TCP else self.d.udp
            await flows.add_forward(fwd)
            self.counts["listeners"] += 1
        elif isinstance(rec, UdpFlowRecord):
            self.udp.append(rec)
        else:
            self.icmp.append(rec)

    async def _batch(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        repair = await self._client()
        socks = [sock for sock, _, _ in batch]
        try:
            await repair.set_repair(socks, RepairMode.ON)
        except BaseException:
            for sock in socks:
                sock.close()  # unconnected: closing sends nothing
            raise
        self.repair_passes += 1
        self.in_repair.extend(socks)
        now = trio.current_time()
        for sock, state, rec in batch:
            restore_in_repair(sock, state)
            sock.setblocking(False)
            version = 6 if state.family == 6 else 4
            conn = self.d.tcp.adopt(ends_of(rec), sock, version, now)
            apply_guest_state(conn, rec, state, now)
            self.restored.append((conn, state, rec))
            self.counts["tcp" if not rec.handshake else "reset"] += 1

    async def finish(self) -> None:
        """The stream ended: restore the last batch and the datagram flows."""
        await self._batch()
        now = trio.current_time()
        for rec in self.udp:
            key = FlowKey(
                IPPROTO_UDP, rec.guest_addr, rec.guest_port, rec.remote_addr, rec.remote_port
            )
            if rec.listener_port is not None:
                self.d.udp.restore_inbound(key, rec.listener_port, now)
            else:
                self.d.udp.restore_outbound(key, rec.host_addr, rec.host_port, now)
            self.counts["udp"] += 1
        for rec_icmp in self.icmp:
            proto = IPPROTO_ICMP if rec_icmp.guest_addr.version == 4 else IPPROTO_ICMPV6
            key = FlowKey(proto, rec_icmp.guest_addr, rec_icmp.echo_id, rec_icmp.remote_addr, 0)
            self.d.icmp.restore(key, now)
            self.counts["icmp"] += 1
        self.counts["reset"] += len(self.resets)

    async def resume(self) -> float:
        """Repair OFF, start the data path, resync the guest. Returns ms spent in repair OFF."""
        socks = [conn.sock for conn, _, _ in self.restored]
        t0 = trio.current_time()
        if socks:
            repair = await self._client()
            await repair.set_repair(socks, RepairMode.OFF)
        t_off = (trio.current_time() - t0) * 1e3
        self.in_repair.clear()
        for conn, state, _ in self.restored:
            sent = finish_restore(conn.sock, state)
            if sent < state.unsent:
                conn.restore_tail = (state, sent)
                conn.want_writable = True
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # What the guest was sent but has not acknowledged heads the
            # restored receive queue: peek past it (flowstate's module doc).
            conn.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, conn.data_flight)
        await self.d.start_data_path()
        now = trio.current_time()
        for conn, _, rec in self.restored:
            if rec.handshake:
                conn.abort(now, rst_guest=True, rst_peer=True)  # documented: reset
                continue
            conn.send_ack()
            conn.push(now)
            if conn.flight:  # what was in flight is retransmitted if unacknowledged
                conn.timer = min(conn.timer, now + conn.rto_jittered())
            conn.prepare_wait()
            self.d.tcp.changed(conn)  # the reactor re-arms it (timer set directly)
        for rec in self.resets:
            l4 = build_tcp(
                rec.remote_addr,
                rec.guest_addr,
                rec.remote_port,
                rec.guest_port,
                rec.seq_to_guest,
                rec.seq_from_guest,
                RST | ACK,
                0,
            )
            self.d.stack.send_ip(rec.remote_addr, rec.guest_addr, IPPROTO_TCP, l4)
        self.restored.clear()
        return t_off

    def discard(self) -> None:
        """Undo everything: no socket survives, and none says a word to a peer."""
        for sock, _, _ in self.pending:
            sock.close()
        self.pending.clear()
        for sock in self.in_repair:
            if sock.fileno() >= 0:
                try:
                    close_silently(sock)
                except Exception as exc:  # not in repair mode after all: plain close
                    log.warning("closing a restored socket: %s", exc)
                    sock.close()
        self.in_repair.clear()
        self.restored.clear()
