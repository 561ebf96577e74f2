"""Restoring flows from migration records: the target's job, and a rollback's.

:class:`Restorer` takes records as the stream delivers them. TCP sockets are
created as their records arrive and restored in batches of BATCH (one
ferry-repair message turns repair ON for a whole batch; REFERENCE.md gives
the per-socket order), so the target's work overlaps the source's dump;
given a nursery, the helper turns a batch's repair ON while ferryd restores
the batch before it (Restorer._batch).
Every restored socket stays in repair mode — invisible to the peer, and
closable without a FIN or RST — until :meth:`Restorer.resume`: then repair
goes OFF in batches, migrated unsent bytes are sent, the data path starts
and each guest connection is resynchronised (an ACK with a fresh window,
and everything the guest had not acknowledged sent again).

Pre-copy (ferryd.migration.source): flows that arrive before the
PrecopyEnd record are restored the same way, ahead of the freeze, and
remembered by 4-tuple and record index. After it, a TCP flow with the same
4-tuple replaces its pre-copied connection (closed silently first: its
4-tuple must be free for the new connect()), :meth:`Restorer.gone` drops
the pre-copied connections that ended before the freeze, and the rest stand
as restored. Pre-copied sockets leave repair mode as soon as they are
restored (without the kernel's window probe, so they say nothing: a quiet
connection has nothing in flight and no timer running), which takes their
repair OFF pass out of the downtime; they cannot be reached before the
fabric moves, and a segment that did reach them would be taken in just the
same in repair mode. One that must go (replaced, retired, or the whole
migration discarded) is put back in repair mode first and then closed
silently: closed any other way it would send the peer a FIN or RST for a
connection the source still owns. A connection that stood unchanged
through the freeze has nothing to resynchronise: no unsent tail, nothing
in flight, and the guest already holds its latest ACK and window, so
:meth:`Restorer.resume` only arms it; so does a connection of the plain
(post-freeze) part that was at rest when dumped (flowstate.at_rest).

A handover stream (source and target in one network namespace,
ferryd.migration.handover) brings the sockets themselves: a handed-over
connection is adopted as its record arrives, with nothing to restore or
repair, and resumes as any other (the guest resynchronised; its unsent
bytes never left the socket's send queue). The forwards' listening sockets
and the datagram flows' sockets come the same way, taken in stream order
and adopted by :meth:`Restorer.finish`. Until the resume the source holds
the same sockets: a discard only closes this ferryd's references.

If anything fails before resume, :meth:`Restorer.discard` closes every
socket silently and leaves nothing behind.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import TypeVar

import trio

from ferryd.flows.common import strip_scope
from ferryd.flows.datagram import AdoptionRefused
from ferryd.flows.portspec import PortForward
from ferryd.flows.table import FlowKey
from ferryd.flows.tcp import socket_of
from ferryd.flows.tcp_conn import Endpoints, TcpConn
from ferryd.flows.tcp_host import SocketHost
from ferryd.migration.admission import Admission
from ferryd.migration.errors import MigrationAborted, StreamRejected
from ferryd.migration.flowstate import RestoreTail, at_rest, guest_at_rest, guest_state
from ferryd.migration.handover import HandoverStream
from ferryd.migration.host import MigrationHost
from ferryd.migration.kernel_state import TcpKernelState
from ferryd.migration.ports import LINUX, KernelRepair, RepairPort, RepairSupply
from ferryd.migration.records import (
    FlowRecord,
    IcmpFlowRecord,
    ListenerRecord,
    TcpFlowRecord,
    UdpFlowRecord,
)
from ferryd.migration.repair_client import RepairMode
from ferryd.migration.sockstate import PortInUse, queues_empty
from ferryd.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

log = logging.getLogger("ferryd.migration")

#: Sockets per repair ON pass (one ferry-repair message, at most SCM_MAX_FD).
#: Small, so that the first batch is restored while the source still dumps
#: (it flushes the stream every source.FLUSH_RECORDS records) and the last
#: one, after the stream ended, is short; 1,000 connections take 16 helper
#: messages instead of 4. Constant: a passt-repair connection must never see
#: a batch larger than the one before (repair_client's module doc).
BATCH = 64

#: How long a restored socket's bind() retries a port held by a socket that
#: does not share it, and how often. Every ferry TCP socket shares its port
#: (SO_REUSEADDR), but repair OFF clears that until ferryd sets it again: with
#: several ferryds in one namespace (VMs over vhost-user) a sibling target's
#: connection on the same local port may be in that instant, or in the
#: resume's tail (Restorer._reuse_soon), when this one binds. Past the
#: patience the holder is taken to stay (another program's socket): the
#: migration fails as before and the source resumes.
BIND_PATIENCE = 0.05
BIND_RETRY = 0.001


_S = TypeVar("_S", bound=socket.socket)

_Pending = tuple[SocketHost[TcpConn], TcpKernelState, TcpFlowRecord, Endpoints]
"""A connection's socket (bound, unconnected), its state, its record, its 4-tuple."""


class _Flight:
    """A batch whose repair ON was sent to the helper: restored by Restorer._settle."""

    __slots__ = ("batch", "closing", "done", "error", "in_precopy")

    def __init__(self, batch: list[_Pending], closing: list[socket.socket], in_precopy: bool):
        self.batch = batch
        self.closing = closing
        """Pre-copied sockets replaced by this batch's: closed silently before it connects."""
        self.in_precopy = in_precopy
        self.done = trio.Event()
        self.error: BaseException | None = None


def ends_of(rec: TcpFlowRecord) -> Endpoints:
    return Endpoints(rec.guest_addr, rec.guest_port, rec.remote_addr, rec.remote_port)


class Restorer:
    def __init__(
        self,
        host: MigrationHost,
        repair: RepairSupply,
        kernel: KernelRepair = LINUX,
        *,
        nursery: trio.Nursery | None = None,
        handover: HandoverStream | None = None,
    ) -> None:
        """``nursery``: where the helper's repair ON runs while the next batch is
        restored (see _batch); None: one batch after the other. ``handover``: the
        stream the handed-over sockets come with (None: a pipe, none can)."""
        self.d = host
        self.handover = handover
        self._nursery = nursery
        self._flights: list[_Flight] = []
        """Batches whose repair ON was sent, oldest first, not restored yet."""
        self._repair = repair
        self._helper: RepairPort | None = None
        self.kernel = kernel
        self.pending: list[_Pending] = []
        self.restored: dict[
            Endpoints, tuple[TcpConn, TcpKernelState | None, TcpFlowRecord, bool]
        ] = {}
        """By 4-tuple: the connection, its socket's state (None: handed over), its record,
        and whether it was at rest (flowstate.at_rest) in the plain part: resume() only
        arms those."""
        self._admission = Admission()
        """Handed-over sockets' remotes against this ferryd's rules (admission.py)."""
        self.handed: dict[int, socket.socket] = {}
        """Sockets handed over (the source holds them too), by id(): discard() closes
        this ferryd's reference only."""
        self.in_repair: dict[int, socket.socket] = {}
        """Sockets in repair mode, by id(): closed silently by discard()."""
        self.in_precopy = False
        self.precopied: dict[int, Endpoints] = {}
        """Pre-copied connections still standing, by record index."""
        self.standing: set[Endpoints] = set()
        """Pre-copied connections the source has not replaced or retired (yet)."""
        self.replaced = 0
        self.live: dict[int, socket.socket] = {}
        """Pre-copied sockets already out of repair mode, by id()."""
        self.to_close: list[socket.socket] = []
        """Pre-copied sockets to put back in repair mode and close (next _batch)."""
        self.resets: list[TcpFlowRecord] = []
        self.listeners: list[ListenerRecord] = []
        self.listening: dict[int, list[socket.socket]] = {}
        """Listening sockets handed over, by the index of their record in listeners."""
        self.udp: list[tuple[UdpFlowRecord, socket.socket | None]] = []
        self.icmp: list[tuple[IcmpFlowRecord, socket.socket | None]] = []
        """Datagram flows, with the socket handed over for each (None: bound anew)."""
        self.counts = {"tcp": 0, "udp": 0, "icmp": 0, "listeners": 0, "reset": 0}
        self.repair_passes = 0
        self.bind_retries = 0
        """Binds tried again because their port was held for a moment (_new_socket)."""

    async def _client(self) -> RepairPort:
        """The helper, asked for once: every batch of this restore goes to the same one."""
        if self._helper is None:
            self._helper = await self._repair.get()
        return self._helper

    async def add(self, rec: FlowRecord, index: int = -1) -> None:
        if isinstance(rec, TcpFlowRecord):
            ends = ends_of(rec)
            if ends in self.restored:
                if self.in_precopy or not self._drop(ends):
                    raise StreamRejected(
                        f"the stream names TCP {ends.guest_addr}:{ends.guest_port} -> "
                        f"{ends.remote_addr}:{ends.remote_port} twice"
                    )
                self.replaced += 1
            if rec.handed_over:
                self._adopt_handed(rec, ends)
                return
            if rec.kernel is None:
                self.resets.append(rec)
                return
            if self.in_precopy:
                self.precopied[index] = ends
            state = rec.kernel
            self.pending.append((await self._new_socket(state), state, rec, ends))
            if len(self.pending) >= BATCH:
                await self._batch()
        elif isinstance(rec, ListenerRecord):
            if rec.handed_over:
                # Taken now, in stream order (their descriptors came with the record).
                tcp = rec.proto == IPPROTO_TCP
                what = f"{'TCP' if tcp else 'UDP'} listener on port {rec.host_port}"
                self.listening[len(self.listeners)] = [
                    self._take(what) if tcp else self._take_datagram(what, IPPROTO_UDP)
                    for _ in range(rec.handed_over)
                ]
            self.listeners.append(rec)  # created by finish(), after every connection
        elif isinstance(rec, UdpFlowRecord):
            what = f"UDP flow {rec.guest_addr}:{rec.guest_port}"
            sock = self._take_datagram(what, IPPROTO_UDP) if rec.handed_over else None
            self.udp.append((rec, sock))
        else:
            proto = IPPROTO_ICMP if rec.remote_addr.version == 4 else IPPROTO_ICMPV6
            what = f"ICMP echo flow {rec.guest_addr} id {rec.echo_id}"
            sock = self._take_datagram(what, proto) if rec.handed_over else None
            self.icmp.append((rec, sock))

    def _adopt_handed(self, rec: TcpFlowRecord, ends: Endpoints) -> None:
        """A connection whose socket came beside the stream: adopted as it is.

        Its timestamp clock is read from the socket (no dump carried it); a
        FIN its peer sent is the live socket's to report, as on the source.
        """
        try:
            sock = self._take()
        except StreamRejected as exc:
            e = ends
            what = f"TCP {e.guest_addr}:{e.guest_port} -> {e.remote_addr}:{e.remote_port}"
            raise StreamRejected(f"{what}: {exc}") from None
        try:
            peer = sock.getpeername()
        except OSError:
            pass  # reset meanwhile: connected to nothing, its flow ends in the data path
        else:
            # The target's own destination rules, as for a record's kernel state.
            self._admission.check_connected(self.d.policy, rec, strip_scope(peer[0]), peer[1])
        try:
            timestamp = sock.timestamp()
        except OSError:  # (a socket that failed: its flow ends in the data path)
            timestamp = 0
        conn = self.d.tcp.adopt(
            ends,
            sock,
            6 if sock.family == socket.AF_INET6 else 4,
            guest_state(rec),
            sock_timestamp=timestamp,
            fin_received=False,
            now=trio.current_time(),
        )
        # At rest (flowstate.at_rest, the socket's half read live): armed now,
        # nothing to resynchronise at resume.
        rest = guest_at_rest(rec) and queues_empty(sock)
        self.restored[ends] = (conn, None, rec, rest)
        self.counts["tcp"] += 1
        if rest:
            self.d.tcp.prearm([conn], trio.current_time())

    def _take(self, what: str = "") -> SocketHost[TcpConn]:
        """The next socket handed over, a TCP one (kept in :attr:`handed` until adopted,
        resumed or discarded); StreamRejected, prefixed with ``what`` if given, when
        there is none fit."""
        return self._next_handed(what, HandoverStream.take)

    def _take_datagram(self, what: str, proto: int) -> socket.socket:
        """The next socket handed over, a UDP or ping one (``proto``), as :meth:`_take`."""
        return self._next_handed(what, lambda stream: stream.take_datagram(proto))

    def _next_handed(self, what: str, take: Callable[[HandoverStream], _S]) -> _S:
        try:
            if self.handover is None:
                raise StreamRejected("handed over, but the stream carries no sockets")
            sock = take(self.handover)
        except StreamRejected as exc:
            if what:
                raise StreamRejected(f"{what}: {exc}") from None
            raise
        self.handed[id(sock)] = sock
        return sock

    async def _new_socket(self, state: TcpKernelState) -> SocketHost[TcpConn]:
        """A socket bound to the connection's port; a port held for a moment
        is tried again for up to BIND_PATIENCE (see there)."""
        give_up = None
        while True:
            try:
                return self.kernel.new_socket_for(state, SocketHost)
            except PortInUse:
                now = trio.current_time()
                if give_up is None:
                    give_up = now + BIND_PATIENCE
                elif now >= give_up:
                    raise
                self.bind_retries += 1
            await trio.sleep(BIND_RETRY)

    def _drop(self, ends: Endpoints) -> bool:
        """Forget a pre-copied connection, its socket to be closed silently by the next
        _batch() (before a replacement connects the same 4-tuple); False if it was not one."""
        if ends not in self.standing:
            return False
        conn = self.restored.pop(ends)[0]
        self.standing.discard(ends)
        self.d.tcp.forget(conn)  # before the close: the fd number is reused at once
        handle = id(socket_of(conn))
        sock = self.live.pop(handle, None) or self.in_repair.pop(handle)
        self.to_close.append(sock)
        self.counts["tcp"] -= 1
        return True

    async def precopy_end(self) -> None:
        """The pre-copy part ended: restore its last batch; what follows may replace it."""
        await self._drain()
        await self._off_early()
        self.d.tcp.prearm([entry[0] for entry in self.restored.values()], trio.current_time())
        self.standing = set(self.restored)
        self.in_precopy = False

    def gone(self, indexes: tuple[int, ...]) -> None:
        """Pre-copied connections that ended on the source before the freeze."""
        for index in indexes:
            ends = self.precopied.pop(index, None)
            if ends is not None and ends in self.restored:
                self._drop(ends)

    async def _off_early(self) -> None:
        """Pre-copy: take what was restored so far out of repair mode, silently."""
        socks = list(self.in_repair.values())
        if not socks:
            return
        await (await self._client()).set_repair(socks, RepairMode.OFF_NO_WINDOW_PROBE)
        self.in_repair.clear()
        # The stream's listeners and later connections on the same port are
        # bound next to these.
        self.kernel.reuse_after_repair_off(socks)
        for sock in socks:
            self.live[id(sock)] = sock

    async def _batch(self) -> None:
        """Repair ON for the pending sockets; restore them (and the batch before) once it is on.

        With a nursery the helper turns a batch's repair on in the background
        while this restores the batch before it and the stream's next records
        are decoded and bound: ferry-repair's ~6 µs a socket, in its own
        process, no longer waits on ferryd's own work nor ferryd on it. At
        most one batch is in flight besides the one being restored
        (RepairClient serves calls one after the other anyway).
        """
        batch, self.pending = self.pending, []
        closing, self.to_close = self.to_close, []
        if batch or closing:
            repair = await self._client()
            flight = _Flight(batch, closing, self.in_precopy)
            if self._nursery is None:
                await self._turn_on(repair, flight, None)
            else:
                after = self._flights[-1] if self._flights else None
                self._nursery.start_soon(self._turn_on, repair, flight, after)
            self._flights.append(flight)
        while len(self._flights) > (0 if self._nursery is None else 1):
            await self._settle(self._flights.pop(0))

    async def _drain(self) -> None:
        """Restore every batch: the pending one, and those whose repair ON is in flight."""
        await self._batch()
        while self._flights:
            await self._settle(self._flights.pop(0))

    @staticmethod
    async def _turn_on(repair: RepairPort, flight: _Flight, after: _Flight | None) -> None:
        """Repair ON for ``flight``, once the batch ``after`` had its answer: in stream
        order, whatever order trio starts the tasks in (a passt-repair connection must
        never see a batch larger than the one before: repair_client's module doc)."""
        try:
            if after is not None:
                await after.done.wait()
                if after.error is not None:
                    raise MigrationAborted("repair ON not asked: an earlier batch failed")
            await repair.set_repair(
                flight.closing + [entry[0] for entry in flight.batch], RepairMode.ON
            )
        except Exception as exc:
            flight.error = exc  # _settle() raises it, or discard() cleans up after it
        except BaseException:
            # Cancelled with ferryd's nursery: nothing restores this batch now.
            flight.error = MigrationAborted("repair ON of a batch cancelled")
            raise
        finally:
            flight.done.set()

    async def _settle(self, flight: _Flight) -> None:
        """Restore a batch whose repair ON was sent: close its replaced sockets, then
        restore and adopt its connections (its error, if the helper refused)."""
        await flight.done.wait()
        batch, closing = flight.batch, flight.closing
        sock: socket.socket
        if flight.error is not None:
            for sock, *_ in batch:
                sock.close()  # unconnected: closing sends nothing
            self.to_close = closing + self.to_close  # discard() tries again
            raise flight.error
        for sock in closing:
            self.kernel.close_silently(sock)
        self.repair_passes += 1
        for sock, *_ in batch:
            self.in_repair[id(sock)] = sock
        now = trio.current_time()
        quiet: list[TcpConn] = []
        restore_in_repair, adopt = self.kernel.restore_in_repair, self.d.tcp.adopt
        plain = not flight.in_precopy
        for sock, state, rec, ends in batch:
            restore_in_repair(sock, state)
            # Peeks past what the guest was sent but has not acknowledged,
            # which heads the restored receive queue (flowstate's module doc).
            conn = adopt(
                ends,
                sock,
                state.family,
                guest_state(rec),
                sock_timestamp=state.timestamp,
                fin_received=state.fin_received,
                now=now,
            )
            rest = plain and at_rest(rec)
            self.restored[ends] = (conn, state, rec, rest)
            self.counts["tcp" if not rec.handshake else "reset"] += 1
            if rest:
                quiet.append(conn)
        if quiet:
            # resume() has nothing to do for these (at rest): armed now, while
            # the stream still arrives, not in the downtime's tail (attach()
            # leaves prearmed connections be). The pre-copy part is armed at
            # its end (precopy_end).
            self.d.tcp.prearm(quiet, now)

    async def finish(self) -> None:
        """The stream ended: restore the last batch, the forwarding listeners, the datagram flows.

        The listeners come after every TCP connection is bound: a restored
        inbound connection has its listener's port, and binding it next to a
        socket in LISTEN fails even with SO_REUSEADDR on both
        (inet_bind_conflict), while a listener binds next to connections
        that reuse the address (in repair mode, or pre-copied ones that
        _off_early gave SO_REUSEADDR back).
        """
        await self._drain()
        if self.handover is not None and (extra := self.handover.left()):
            raise StreamRejected(f"{extra} sockets came with the stream that no record named")
        for index, listener in enumerate(self.listeners):
            fwd = PortForward(listener.bind_addr, listener.host_port, listener.guest_port)
            flows = self.d.tcp if listener.proto == IPPROTO_TCP else self.d.udp
            handed = self.listening.get(index)
            if handed is not None:
                flows.adopt_forward(fwd, handed)
                self._adopted(handed)  # the flow table's now (close_listeners)
            else:
                await flows.add_forward(fwd)
            self.counts["listeners"] += 1
        now = trio.current_time()
        try:
            for rec, sock in self.udp:
                key = FlowKey(
                    IPPROTO_UDP, rec.guest_addr, rec.guest_port, rec.remote_addr, rec.remote_port
                )
                if sock is not None:
                    self.d.udp.adopt_outbound(key, sock, now)
                    self._adopted([sock])
                elif rec.listener_port is not None:
                    self.d.udp.restore_inbound(key, rec.listener_port, now)
                else:
                    self.d.udp.restore_outbound(key, rec.host_addr, rec.host_port, now)
                self.counts["udp"] += 1
            for rec_icmp, sock in self.icmp:
                proto = IPPROTO_ICMP if rec_icmp.guest_addr.version == 4 else IPPROTO_ICMPV6
                key = FlowKey(proto, rec_icmp.guest_addr, rec_icmp.echo_id, rec_icmp.remote_addr, 0)
                if sock is not None:
                    self.d.icmp.adopt(key, sock, now)
                    self._adopted([sock])
                else:
                    self.d.icmp.restore(key, now)
                self.counts["icmp"] += 1
        except AdoptionRefused as exc:  # (the socket stays in self.handed: discard() closes it)
            raise StreamRejected(str(exc)) from None
        self.counts["reset"] += len(self.resets)

    def _adopted(self, socks: list[socket.socket]) -> None:
        """Handed-over sockets now a flow table's: its close is theirs from here on."""
        for sock in socks:
            del self.handed[id(sock)]

    async def resume(self) -> float:
        """Repair OFF, start the data path, resync the guest. Returns ms spent in repair OFF."""
        standing = self.standing
        # Unchanged through the freeze, or at rest: nothing to finish or resynchronise.
        moving = [
            (conn, state, rec)
            for ends, (conn, state, rec, rest) in self.restored.items()
            if not rest and not (standing and ends in standing)
        ]
        # (Pre-copied ones went out of repair mode already.) One at rest has
        # nothing in flight and no timer running: out of repair mode without
        # the kernel's window probe, as a pre-copied one, so it says nothing.
        moving_socks = {id(socket_of(conn)) for conn, _, _ in moving}
        quiet = [sock for key, sock in self.in_repair.items() if key not in moving_socks]
        socks = [sock for key, sock in self.in_repair.items() if key in moving_socks]
        t0 = trio.current_time()
        if quiet or socks:
            repair = await self._client()
            if quiet:
                await repair.set_repair(quiet, RepairMode.OFF_NO_WINDOW_PROBE)
            if socks:
                await repair.set_repair(socks, RepairMode.OFF)
        t_off = (trio.current_time() - t0) * 1e3
        self.in_repair.clear()
        for conn, state, _ in moving:
            if state is None:
                continue  # handed over: its unsent bytes never left its send queue
            sock = socket_of(conn)
            sent = self.kernel.finish_restore(sock, state)
            if sent < state.unsent:
                conn.resume_tail(RestoreTail(sock, state, sent))
        await self.d.start()
        now = trio.current_time()
        for conn, _, rec in moving:  # the others: the guest has its ACK and window
            if conn.closed:
                # Ended by the data path already: start() lets its
                # tasks run, and the guest's first frames may close a flow.
                continue
            if rec.handshake:
                conn.abort(now, rst_guest=True, rst_peer=True)  # documented: reset
                continue
            self.d.tcp.resume(conn, now)  # ACK, window, what it lets go; re-armed
        for rec in self.resets:
            self.d.tcp.send_reset(ends_of(rec), rec.seq_to_guest, rec.seq_from_guest)
        # Arm every connection now (the reactor would in its first round):
        # resumed means every connection is listened to again.
        self.d.tcp.flush(now)
        self.restored.clear()
        self.handed.clear()
        self.listening.clear()
        self.live.clear()
        if quiet or socks:
            # Repair OFF took their SO_REUSEADDR (sockstate.reuse_after_repair_off):
            # given back after the resume, out of the downtime, so that the next
            # migration into this namespace (another VM's ferryd, or this one's
            # own way back) can bind its connections' ports next to these.
            if self._nursery is None:
                self._reuse([*quiet, *socks])
            else:
                self._nursery.start_soon(self._reuse_soon, [*quiet, *socks])
        return t_off

    def _reuse(self, socks: list[socket.socket]) -> None:
        # (Closed meanwhile: the data path runs, and a peer may have reset one.)
        try:
            self.kernel.reuse_after_repair_off([sock for sock in socks if sock.fileno() >= 0])
        except OSError as exc:  # never seen; in the session's nursery it would end ferryd
            log.warning("giving restored sockets their address reuse back: %s", exc)

    async def _reuse_soon(self, socks: list[socket.socket]) -> None:
        for start in range(0, len(socks), BATCH):
            await trio.lowlevel.checkpoint()
            self._reuse(socks[start : start + BATCH])

    async def discard(self) -> None:
        """Undo everything: no socket survives, and none says a word to a peer."""
        for conn, *_ in self.restored.values():
            # Out of the flow table (and the epoll) before the socket goes: a
            # rollback on the source adopts the same 4-tuple again.
            self.d.tcp.forget(conn)
        flights, self._flights = self._flights, []
        for flight in flights:
            # Its repair ON ends (answered, refused or timed out) before its
            # sockets go: those replaced are closed silently with the rest.
            await flight.done.wait()
            self.pending.extend(flight.batch)
            self.to_close.extend(flight.closing)
        sock: socket.socket
        for sock, *_ in self.pending:
            sock.close()  # unconnected: closing sends nothing
        self.pending.clear()
        live = [*self.live.values(), *self.to_close]
        self.live.clear()
        self.to_close = []
        if live:
            try:
                with trio.fail_after(10):
                    await (await self._client()).set_repair(live, RepairMode.ON)
            except Exception as exc:
                # Closed out of repair mode they would FIN or RST the peer of a
                # connection the source still owns: keep them (open, unused).
                log.error(
                    "cannot put %d pre-copied sockets back in repair mode (%s): keeping them"
                    " open rather than resetting the source's connections",
                    len(live),
                    exc,
                )
                self.d.stranded.extend(live)
            else:
                for sock in live:
                    self.in_repair[id(sock)] = sock
        for sock in self.in_repair.values():
            if sock.fileno() >= 0:
                try:
                    self.kernel.close_silently(sock)
                except Exception as exc:  # not in repair mode after all: plain close
                    log.warning("closing a restored socket: %s", exc)
                    sock.close()
        self.in_repair.clear()
        for sock in self.handed.values():
            sock.close()  # this ferryd's reference: the source still holds the socket
        self.handed.clear()
        self.listening.clear()
        self.restored.clear()
        # The forwards and datagram flows restored so far (their ports are the
        # source's; in one namespace their sockets too, and this closes only
        # this ferryd's references). The tables stay usable: a target may take
        # a migration again.
        if self.listeners:
            self.d.tcp.close_listeners()
        self.d.udp.clear()
        self.d.icmp.clear()
