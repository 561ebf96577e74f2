"""``ferryd --vhost-user --socket PATH``: the trio adapter over the vhost-user session.

Two lifetimes. QEMU's control connection must be served for as long as
the daemon runs, whatever the data path does: during a migration the data
path is stopped (its generation cancelled) while QEMU goes on talking
(GET_VRING_BASE, SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE, and the rings'
restart on a rollback). So :meth:`VhostUserFrontend.serve` (the listener,
one :class:`~.session.VhostUserSession` per connection, the session's
actions) is a task of the daemon's outer nursery, started once by
ferryd.main; :meth:`VhostUserFrontend.run`, the reader of the transmit
ring, is a task of each data-path generation, as for every frontend.

The socket file is made like the stream frontend's (ferryd.unix_listener:
its mode set before listen(), a stale file replaced, a live one never taken
over, removed at exit only if still ours), but with mode 0660 less the
umask (ferryd.unix_listener.group_mode): under ferryd@.service QEMU runs as
libvirt's user, which reaches the socket through ferryd's group. One QEMU at a time
(ferryd.frontends.one_qemu, shared with the stream frontend): a second
connection while one is served is accepted and closed at once (counted
in ``refused``); QEMU's own reconnect (``reconnect-ms``, or a new QEMU)
comes after the old connection ended and gets a fresh session: the old
one's memory unmapped, its eventfds closed, its rings gone.

Eventfds. The session hands over each ring's kick (QEMU: "the guest
posted buffers") and call ("the device used buffers: interrupt the
guest") descriptors through SetKick / SetCall; the adapter owns them from
then on and closes the one each replaces (a kick being waited on is
announced with trio.lowlevel.notify_closing first, as trio requires).
:meth:`run` waits for the transmit ring's kick (its counter read, so it
can fire again), hands the ring's frames over in bursts
(:meth:`~.device.NetDevice.receive_burst`), and writes the call eventfd
for a burst the guest wants to hear of together with the first interrupt
its answer makes (on_burst_end's frames), or at the burst's end: two
writes back to back, which QEMU's main loop usually reads in one wake-up
(:meth:`_burst`). Frames to the guest
(:meth:`send`) go straight into the receive ring, and the call eventfd is
written with each one the guest wants to hear of. Not once at the end of
the scheduler step: ferryd may take milliseconds to push a guest's whole
window (a dozen 64 KiB frames under TCG), and a guest that drained its
ring would wait for all of them before its first interrupt; interrupted
at the first, it receives while the rest goes in (its NAPI poll sets
VIRTQ_AVAIL_F_NO_INTERRUPT, so the frames after it cost no signal). With
this, a TCG guest's download went from 0.61× to 0.76× passt's
(bench/README.md, qemu_migration). When the guest has no buffer (or the
ring is not running) the frame is dropped and counted, as a full NIC queue
drops it, and :meth:`send` says so: TCP's push stops there, its bytes left
in the socket, and goes on when the guest's kick on the receive ring says
it posted buffers (:meth:`_watch_room` calls ``on_burst_end``). Dropping
and going on, as before, cost a guest whose TCP window is larger than its
ring (Linux's ~1 MiB of buffers; a guest with 1 GiB of RAM lets its receive
buffer grow to 6 MiB, tcp_rmem) its download: go-back-N over a ring that
drops most of it, 0.01 Gbit/s.

A ring's start and the migration. QEMU resumes a source VM after a failed
migration by starting its rings again (the session's DeviceResumed comes
first), and starts a target's rings once it runs there: the handler
(:class:`~.device_state.DeviceStateHandler`, the migration's side) is
awaited on DeviceResumed and on every ring start before the adapter lets
frames flow on that ring, so a rollback thaws and a target resumes before
the guest's first frame is handled. The device-state descriptor goes to
the handler (save / load); CHECK_DEVICE_STATE waits for its verdict; the
end of a connection is reported to it (after a checked SAVE: the target
took over).

Whose fault. A message the session refuses (malformed, oversized, out of
order, addresses outside the guest's memory) ends the connection, logged
(rate-limited, QEMU can reconnect at any pace) and counted in
``protocol_errors``; ferryd keeps listening. A ring the guest's driver
broke (:class:`~.errors.GuestDriverError`) is stopped until QEMU starts it
again, logged and counted in ``ring_errors``; the other ring and the
daemon go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import time
from typing import Any

import trio

from ferryd.frontends.base import OnBurstEnd, OnFrame
from ferryd.frontends.one_qemu import OneQemu
from ferryd.frontends.stream import open_listener
from ferryd.frontends.vhost_user.actions import (
    Action,
    DeviceResumed,
    DeviceSuspended,
    DirtyLogging,
    RingChanged,
    SetCall,
    SetKick,
    TransferDeviceState,
)
from ferryd.frontends.vhost_user.channel import Ended, serve_connection
from ferryd.frontends.vhost_user.device import NOTIFY, NetDevice, VhostUserCounters
from ferryd.frontends.vhost_user.device_state import DeviceStateHandler
from ferryd.frontends.vhost_user.errors import GuestDriverError, VhostUserProtocolError
from ferryd.frontends.vhost_user.features import NUM_QUEUES, RX_QUEUE, TX_QUEUE
from ferryd.frontends.vhost_user.memory import MmapMapper
from ferryd.frontends.vhost_user.messages import TransferDirection
from ferryd.frontends.vhost_user.session import VhostUserSession
from ferryd.logthrottle import LogThrottle
from ferryd.unix_listener import group_mode, unlink_if_ours
from ferryd.wire.checksum import complete_partial

__all__ = ["VhostUserFrontend"]

log = logging.getLogger("ferryd.vhost_user")

#: Frames taken from the transmit ring per burst (then on_burst_end and a checkpoint).
BURST = 64


class VhostUserFrontend:
    """QEMU's vhost-user-net device on a listening Unix socket (see the module docstring).

    Implements :class:`ferryd.frontends.base.Frontend`; :meth:`serve` must
    run too (ferryd.main starts it in the daemon's outer nursery).
    """

    def __init__(
        self,
        listener: socket.socket,
        path: str,
        *,
        bound: os.stat_result | None = None,
        handler: DeviceStateHandler | None = None,
    ) -> None:
        listener.setblocking(False)
        self.path = path
        self._listener: socket.socket | None = listener
        self._bound = bound
        self.handler = handler
        """The migration's side of the device state (ferryd.main sets it before serve)."""
        self.counters = VhostUserCounters()
        self.csum_offload = False
        """VIRTIO_NET_F_GUEST_CSUM acked, read when a ring starts (features are fixed then)."""
        self._session: VhostUserSession | None = None
        self._device: NetDevice | None = None
        self._conn: socket.socket | None = None
        self._kick: list[int | None] = [None] * NUM_QUEUES
        self._call: list[int | None] = [None] * NUM_QUEUES
        self._running = [False] * NUM_QUEUES
        """Ring started and its start applied (the handler heard of it); not broken."""
        self._starting = [False] * NUM_QUEUES
        """A kick came (the ring (re)starts): the handler hears of it before frames flow."""
        self._broken = [False] * NUM_QUEUES
        """The guest's driver broke the ring; it stays stopped until QEMU starts it again."""
        self._waiting: int | None = None
        """The kick the reader waits on, woken (notify_closing) when a ring changes."""
        self._idle: trio.Event | None = None
        """What the reader waits on while the transmit ring is not running."""
        self._room_wanted = False
        """A frame found no receive buffer: the guest's next kick there is awaited."""
        self._room_waiter: trio.Event | None = None
        """What :meth:`_watch_room` waits on while no frame is waiting for room."""
        self._tx_due = False
        """The guest wants an interrupt for the transmit buffers of the last burst (_burst)."""
        self._throttle = LogThrottle(log)
        self._qemu = OneQemu(listener, path, self.counters, self._throttle)

    @property
    def _handler(self) -> DeviceStateHandler:
        handler = self.handler
        assert handler is not None
        return handler

    @classmethod
    def listen(cls, path: str) -> VhostUserFrontend:
        """Listen at ``path`` (raises StreamAddressInUse / StreamSetupError, as --socket does)."""
        listener, bound = open_listener(path, group_mode())
        return cls(listener, path, bound=bound)

    @property
    def first_qemu_ended(self) -> trio.Event:
        """Set once the first QEMU's connection has ended (``ferryd --one-off``)."""
        return self._qemu.first_ended

    def describe(self) -> dict[str, Any]:
        session = self._session
        features = None if session is None else session.features
        return {
            "kind": "vhost-user",
            "path": self.path,
            "connected": self._conn is not None,
            "peer_pid": self._qemu.peer,
            "features": None if features is None else f"{features:#x}",
            "protocol_features": None if session is None else f"{session.protocol_features:#x}",
            "rings": {
                name: self._running[index] for name, index in (("rx", RX_QUEUE), ("tx", TX_QUEUE))
            },
        }

    # --- the control plane (the daemon's whole life) ---------------------------

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve QEMU's connections one after the other, until cancelled."""
        assert self.handler is not None, "a DeviceStateHandler first (ferryd.main)"
        task_status.started()
        while True:
            conn = await self._qemu.accept()
            log.info("QEMU connected on %s (pid %s)", self.path, self._qemu.peer)
            ended: Ended | None = None
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._qemu.refuse_others, conn)
                    ended = await self._serve_one(conn)
                    nursery.cancel_scope.cancel()
            finally:
                # Only QEMU ending the connection tells the migration anything
                # (after a checked SAVE: the target took over); ferryd shutting
                # down (this task cancelled) tells it nothing.
                self._disconnect(qemu_left=ended is not None)
            assert ended is not None
            if ended.fault:
                self.counters.protocol_errors += 1
                self._throttle.warning(
                    "protocol",
                    trio.current_time(),
                    "%s (pid %s on %s); dropped the connection, waiting for QEMU to reconnect",
                    ended.reason,
                    self._qemu.peer,
                    self.path,
                )
            else:
                log.info("%s (pid %s on %s)", ended.reason, self._qemu.peer, self.path)
            self._qemu.peer = None
            self._qemu.ended()

    async def _serve_one(self, conn: socket.socket) -> Ended:
        session = VhostUserSession(MmapMapper())
        self._session = session
        self._device = NetDevice(session, self.counters)
        self._conn = conn
        with conn:
            return await serve_connection(conn, session, self._apply, self._handler.check)

    def _disconnect(self, *, qemu_left: bool) -> None:
        """The connection is over (the session closed itself): drop what it owned, and
        tell the handler if QEMU ended it."""
        for index in range(NUM_QUEUES):
            self._running[index] = self._starting[index] = self._broken[index] = False
            self._set_kick(index, None)
            self._set_call(index, None)
        self._session = self._device = None
        self._conn = None  # closed by _serve_one's with
        self.csum_offload = False
        self._tx_due = False
        self._changed()
        if qemu_left:
            self._handler.disconnected()

    async def _apply(self, action: Action) -> None:
        if isinstance(action, SetKick):
            self._set_kick(action.index, action.fd)
        elif isinstance(action, SetCall):
            self._set_call(action.index, action.fd)
        elif isinstance(action, RingChanged):
            await self._ring_changed(action)
        elif isinstance(action, DeviceResumed):
            await self._handler.resumed()
        elif isinstance(action, DeviceSuspended):
            self._handler.suspended()
        elif isinstance(action, DirtyLogging):
            self._handler.dirty_logging(action.on)
        elif isinstance(action, TransferDeviceState):
            if action.direction is TransferDirection.SAVE:
                self._handler.save(action.fd)
            else:
                self._handler.load(action.fd)
        else:  # SendReply, CloseFds, CheckDeviceState: the channel's own
            raise AssertionError(f"unexpected action {action!r}")

    async def _ring_changed(self, change: RingChanged) -> None:
        index = change.index
        if change.started and self._starting[index]:
            self._starting[index] = False
            device = self._device
            assert device is not None
            self.csum_offload = device.csum_offload  # fixed while a ring runs
            await self._handler.started()
        session = self._session  # what QEMU did meanwhile counts, not what the action said
        self._running[index] = (
            session is not None
            and session.queues[index].started
            and self._kick[index] is not None
            and not self._broken[index]
        )
        self._changed()

    def _set_kick(self, index: int, fd: int | None) -> None:
        if fd is not None:
            _check_eventfd(fd, "SET_VRING_KICK", index)
        old, self._kick[index] = self._kick[index], fd
        if old is not None:
            trio.lowlevel.notify_closing(old)
            if self._waiting == old:
                self._waiting = None  # woken just now: its number must not be woken again
            os.close(old)
        if fd is None:
            self._running[index] = False
        else:
            self._starting[index] = True
            self._broken[index] = False
        self._changed()

    def _set_call(self, index: int, fd: int | None) -> None:
        if fd is not None:
            _check_eventfd(fd, "SET_VRING_CALL", index)
        old, self._call[index] = self._call[index], fd
        if old is not None:
            os.close(old)

    def _changed(self) -> None:
        """Wake the reader to look at the rings again.

        Its wait on the kick is woken as trio wakes a wait on a descriptor about
        to close (the wait raises ClosedResourceError), which the reader takes
        as "look again", whether the kick is closed next or not: no cancel
        scope per wait (entering and leaving one was ~6% of the reader's
        Python time in a guest's download, py-spy).
        """
        if self._waiting is not None:
            trio.lowlevel.notify_closing(self._waiting)
        elif self._idle is not None:
            self._idle.set()

    def _ring_broken(self, index: int, exc: GuestDriverError) -> None:
        """Stop using a ring the guest's driver broke, until QEMU starts it again."""
        self._running[index] = False
        self._broken[index] = True
        self.counters.ring_errors += 1
        self._throttle.warning(
            "ring",
            trio.current_time(),
            "the guest's driver broke ring %d, stopped until QEMU restarts it: %s",
            index,
            exc,
        )

    def _signal(self, index: int) -> None:
        fd = self._call[index]
        if fd is not None:
            with contextlib.suppress(OSError):  # EAGAIN: the counter is full, so it is signalled
                os.eventfd_write(fd, 1)

    # --- frames out -------------------------------------------------------------

    def send(self, frame: bytes | memoryview) -> bool:
        """One frame into the guest's receive ring, or dropped and counted."""
        device = self._device
        if device is None or not self._running[RX_QUEUE]:
            self.counters.dropped_out += 1
            return False
        try:
            sent = device.send(frame)
        except GuestDriverError as exc:
            self.counters.dropped_out += 1
            self._ring_broken(RX_QUEUE, exc)
            return False
        return self._sent(sent)

    def send_partial(
        self, parts: list[bytes | memoryview], csum_start: int, csum_offset: int
    ) -> bool:
        """A frame whose L4 checksum the guest may leave unsummed (GUEST_CSUM acked)."""
        device = self._device
        if device is None or not self._running[RX_QUEUE]:
            self.counters.dropped_out += 1
            return False
        try:
            if self.csum_offload:
                sent = device.send_partial(parts, csum_start, csum_offset)
            else:  # not for a caller that read csum_offload, but the frame stays right
                head = bytes(parts[0])
                payload = b"".join(parts[1:])
                l4 = complete_partial(head[csum_start:], csum_offset, payload)
                sent = device.send(head[:csum_start] + l4 + payload)
        except GuestDriverError as exc:
            self.counters.dropped_out += 1
            self._ring_broken(RX_QUEUE, exc)
            return False
        return self._sent(sent)

    def _sent(self, sent: int) -> bool:
        if sent & NOTIFY:
            self._signal(RX_QUEUE)
            if self._tx_due:  # with it: one wake-up of QEMU for both (see _burst)
                self._signal_tx_due()
        elif not sent and not self._room_wanted:
            # No buffer for it: the sender stops (TCP's push) until the guest
            # posts more, which its kick on the receive ring says (_watch_room).
            self._room_wanted = True
            if self._room_waiter is not None:
                self._room_waiter.set()
        return bool(sent)

    # --- frames in ----------------------------------------------------------------

    async def run(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        """Deliver the guest's frames from the transmit ring, and tell of new receive
        buffers after a frame found none (:meth:`_watch_room`), until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_room, on_burst_end)
            await self._read(on_frame, on_burst_end)

    async def _watch_room(self, on_burst_end: OnBurstEnd) -> None:
        """After a frame found no receive buffer: call ``on_burst_end`` when the guest
        posts more.

        The guest's driver kicks the receive ring when it refills it (Linux:
        try_fill_recv, unless the device set VRING_USED_F_NO_NOTIFY, which
        ferryd never does). ferryd reads that kick only here: its counter is
        cleared first, then ``on_burst_end`` lets the data path try again
        (TcpFlows.flush pushes the connections that stopped for room), so
        buffers posted before the clear are used now and a kick after it
        wakes the wait; if the retry finds no buffer either, the wait is for
        that kick. Without a kick to wait on (the ring stopped), the next
        burst of the guest's frames retries, as every burst does.
        """
        while True:
            if not self._room_wanted:
                self._room_waiter = trio.Event()
                try:
                    await self._room_waiter.wait()
                finally:
                    self._room_waiter = None
            kick = self._kick[RX_QUEUE]
            if kick is not None:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.eventfd_read(kick)
            self._room_wanted = False
            on_burst_end()
            kick = self._kick[RX_QUEUE]
            if kick is None:  # the ring stopped: no kick comes, the next burst retries
                self._room_wanted = False
                continue
            if not self._room_wanted:
                continue
            try:
                await trio.lowlevel.wait_readable(kick)
            except trio.ClosedResourceError:
                pass  # the kick was replaced: read the new one
            except OSError as exc:  # not expected of an eventfd
                self._room_wanted = False
                self._throttle.warning(
                    "kick", trio.current_time(), "cannot wait on QEMU's kick eventfd: %s", exc
                )

    async def _read(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        while True:
            kick = self._kick[TX_QUEUE]
            if kick is not None and self._running[TX_QUEUE]:
                with contextlib.suppress(BlockingIOError, OSError):
                    # Re-armed before the ring is read: no kick is lost. The
                    # counter adds up the guest's kicks since the last read.
                    self.counters.kicks += os.eventfd_read(kick)
                while self._burst(on_frame, BURST):
                    on_burst_end()
                    self._signal_tx_due()
                    await trio.lowlevel.checkpoint()
                on_burst_end()
                self._signal_tx_due()
            # Read again: QEMU may have replaced the kick (and closed the old
            # one) during a burst's checkpoint, when no wait was there to wake.
            kick = self._kick[TX_QUEUE]
            try:
                if kick is not None and self._running[TX_QUEUE]:
                    self._waiting = kick
                    await trio.lowlevel.wait_readable(kick)
                else:
                    self._idle = trio.Event()
                    await self._idle.wait()
            except trio.ClosedResourceError:
                pass  # the kick was replaced or a ring changed: look again
            except OSError as exc:  # not expected of an eventfd; never the daemon's end
                self._running[TX_QUEUE] = False
                self._throttle.warning(
                    "kick", trio.current_time(), "cannot wait on QEMU's kick eventfd: %s", exc
                )
            finally:
                self._waiting = self._idle = None

    def _burst(self, on_frame: OnFrame, limit: int) -> bool:
        """Up to ``limit`` frames; True if the ring may hold more."""
        device = self._device
        if device is None or not self._running[TX_QUEUE]:
            return False
        try:
            more, notify = device.receive_burst(on_frame, limit)
        except GuestDriverError as exc:
            self._ring_broken(TX_QUEUE, exc)
            return False
        if notify:
            # Not yet: the burst's frames usually make the data path answer
            # the guest (an ACK lets a push go), and the interrupt for those
            # frames carries this one along (_sent); else it goes at the
            # burst's end (_signal_tx_due), before the reader awaits. Two
            # eventfd writes back to back usually find QEMU's main loop not
            # yet run and are read in one of its wake-ups; a write before
            # on_burst_end and another in it could each wake it (~25 µs of
            # ferryd's wall time under TCG: on a 2-CPU host the woken loop
            # preempts ferryd). The transmit interrupt only lets the guest
            # free what it sent (virtio-net's TX NAPI): it may wait that
            # long. A TCG guest's upload: 1.16 × (0.70-1.53) the old
            # order's Gbit/s in 11 paired runs, its download 1.01 ×.
            self._tx_due = True
        return more

    def _signal_tx_due(self) -> None:
        """The transmit ring's interrupt owed since the last burst, if no frame took it."""
        if self._tx_due:
            self._tx_due = False
            self._signal(TX_QUEUE)

    def drain(self, on_frame: OnFrame, on_burst_end: OnBurstEnd, budget: float = 0.002) -> None:
        """Deliver, without waiting, what the guest queued already, for about ``budget`` s.

        Never touches guest memory once the device is suspended (QEMU
        stopped every ring before a device-state transfer): a stopped ring
        is not running, and the burst reads nothing.
        """
        session = self._session
        if session is not None and not session.suspended:
            deadline = time.monotonic() + budget
            while self._burst(on_frame, BURST) and time.monotonic() < deadline:
                pass
        on_burst_end()
        self._signal_tx_due()

    # --- the handover ---------------------------------------------------------------

    def hand_over(self) -> None:
        """Nothing to do: QEMU hands the device over.

        In vhost-user the guest's queues move with QEMU: the source QEMU
        stops the rings (GET_VRING_BASE) before the device state is saved,
        and the target QEMU starts them on its own back-end once the VM
        runs there; nothing is left for ferryd to give up or take.
        """

    def take_over(self) -> None:
        """Nothing to do: QEMU starts the rings on this ferryd when the VM runs here."""

    def close(self) -> None:
        for index in range(NUM_QUEUES):
            for fd in (self._kick[index], self._call[index]):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._kick[index] = self._call[index] = None
        if self._session is not None:
            self._session.close()
            self._session = self._device = None
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._bound is not None:
                unlink_if_ours(self.path, self._bound)


def _check_eventfd(fd: int, request: str, index: int) -> None:
    """Refuse (closing it) a descriptor that is not an eventfd, and make it non-blocking.

    QEMU's descriptor is waited on and read (kick) or written (call) in the
    data path: a regular file cannot be waited on (epoll refuses it), a
    full blocking pipe would block the daemon. An eventfd is neither.
    """
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
        ok = kind == "anon_inode:[eventfd]"
    except OSError:  # no /proc: an anonymous inode at least (no file, pipe or socket)
        kind = "?"
        ok = stat.S_IFMT(os.fstat(fd).st_mode) == 0
    if ok:
        os.set_blocking(fd, False)
        return
    os.close(fd)
    raise VhostUserProtocolError(f"{request}: ring {index}: {kind} is not an eventfd")
