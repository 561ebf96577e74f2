"""Stream frontend: the guest is a VM whose QEMU connects to ferryd's Unix socket.

``ferryd --socket PATH`` listens on PATH; QEMU connects to it with
``-netdev stream,id=n0,server=off,addr.type=unix,addr.path=PATH`` and
carries the guest's frames over that one connection, each behind its
length (ferryd.frontends.stream_framing). This is passt's default mode.
There is no namespace to enter and no device to create: ferryd needs no
privilege at all, and its host sockets live in the namespace it runs in.

The socket file. Made with mode 0600 before ``listen()`` (so no client ever
connects through a wider umask-derived mode), owned by whoever started
ferryd: QEMU must run as that user (or root). A socket file left by a
ferryd that died is replaced; one that a live process answers on is not
(:class:`StreamAddressInUse`), nor is a path that is not a socket.

One QEMU at a time. The first connection is served until it ends; another
that arrives meanwhile is accepted and closed at once (counted in
``refused``, logged at most every 10 s), unless the one served has already
hung up (POLLRDHUP): then the newcomer stays in the backlog and is served
as soon as the reader has seen the end. So a QEMU that reconnects
(``reconnect-ms``, or a restarted QEMU) is served again, and the guest's
flows live on meanwhile: frames for it are dropped while nobody is
connected, and TCP retransmits them.

Reading. The connection is non-blocking; the reader waits for readability
once and then reads into the framing parser's buffer until EAGAIN, many
frames per read, in bursts (one ``on_burst_end`` each, then a checkpoint so
a guest that never pauses cannot starve the host sockets). A frame handed
to the stack is a view of that buffer, valid only for the call: ferryd
keeps no payload. A length no frame can have breaks the stream for good
(the boundaries are lost): ferryd logs it as QEMU's fault, drops that
connection (counted in ``framing_errors``) and waits for the next. The
longest frame allowed follows ferryd's MTU (``--mtu``, plus an Ethernet
header and a VLAN tag); a migration target, whose link comes from the
stream, allows the longest any link has.

Writing never blocks the data path. A frame goes out in one ``sendmsg``
with its length; when QEMU's side is full (it reads the socket only as
fast as the guest takes frames) the frame is dropped and counted in
``dropped_out``, as a full NIC queue would drop it; the sender hears of it
(``send`` returns False: TCP's push stops there) and ``on_burst_end`` is
called once QEMU's side has room again. A write that takes only
part of a frame cannot be undone, and the stream must never carry half a
frame followed by another: the rest is kept (one frame at most) and
finished as soon as the socket is writable, before any later frame; later
frames are dropped until it is. Frames are complete: the stream has no
checksum offload (``csum_offload`` is False, so the stack sums every
segment itself), and the guest's frames are verified like any other.

Migration. The handover needs nothing of QEMU's connection: each ferryd has
its own socket, and each QEMU (the source's, the target's started with
``-incoming``) connects to its own ferryd. :meth:`StreamFrontend.hand_over`
(the source at its freeze, after a :meth:`~StreamFrontend.drain`) stops
reading and sending, keeping the connection for a rollback. A target
started with ``--incoming`` listens at once, but its data path starts only
on resume: the target QEMU's connection waits in the listen backlog and
its frames in the socket, unread, as a tap's queue would hold them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import trio

from ferryd.exits import StartupError, ensure_parent_dir
from ferryd.frontends.base import FrontendCounters, OnBurstEnd, OnFrame
from ferryd.frontends.one_qemu import OneQemu
from ferryd.frontends.stream_framing import (
    MAX_FRAME,
    FrameReader,
    StreamFramingError,
    frame_parts,
    max_frame_for_mtu,
    unsent_tail,
)
from ferryd.logthrottle import LogThrottle
from ferryd.unix_listener import ListenError, ListenFailure, listen_at, unlink_if_ours
from ferryd.wire.checksum import complete_partial

__all__ = [
    "StreamAddressInUse",
    "StreamCounters",
    "StreamFrontend",
    "StreamSetupError",
    "open_listener",
]

log = logging.getLogger("ferryd.stream")

#: Reads per burst: each read may hold many frames (up to the parser's buffer).
_BURST = 8
#: Asked of SO_SNDBUF: the kernel caps it at net.core.wmem_max (doubled).
_SNDBUF = 4 << 20


class StreamSetupError(Exception):
    """The socket cannot be made at its path (the operator's to fix)."""


class StreamAddressInUse(StreamSetupError):
    """The path is a live process's socket, or not a socket at all (bad configuration)."""


@dataclass
class StreamCounters(FrontendCounters):
    """The frontend's counters, and QEMU's connections."""

    connections: int = 0
    """Connections served (QEMU's first, and every reconnect)."""
    refused: int = 0
    """Connections closed at once: another QEMU was being served."""
    framing_errors: int = 0
    """Connections dropped because QEMU's side broke the framing."""


class _Ended(Exception):
    """The connection served is over (QEMU hung up, or broke the framing)."""

    def __init__(self, reason: str, fault: bool = False) -> None:
        super().__init__(reason)
        self.fault = fault


def open_listener(path: str, mode: int = 0o600) -> tuple[socket.socket, os.stat_result]:
    """The listening socket at ``path`` (``mode``) and what it is on disk
    (ferryd.unix_listener: made before the privilege drop, no worker thread)."""
    try:
        ensure_parent_dir(path, "--socket")
    except StartupError as exc:
        raise StreamSetupError(str(exc)) from exc
    try:
        return listen_at(path, 8, mode)
    except ListenError as exc:
        if exc.failure is ListenFailure.LIVE:
            raise StreamAddressInUse(
                f"--socket {path}: another process (a live ferryd?) already listens there"
            ) from exc
        if exc.failure is ListenFailure.NOT_SOCKET:
            raise StreamAddressInUse(
                f"--socket {path} exists and is not a socket; refusing to replace it"
            ) from exc
        if exc.failure is ListenFailure.PROBE:
            raise StreamSetupError(
                f"--socket {path}: cannot tell whether it is in use: {exc.error}"
            ) from exc
        assert exc.error is not None
        raise StreamSetupError(f"--socket {path}: {exc.error.strerror}") from exc


class StreamFrontend:
    """QEMU's stream netdev on a listening Unix socket (see the module docstring).

    Implements :class:`ferryd.frontends.base.Frontend`.
    """

    #: The stream carries complete frames: no checksum left to the guest.
    csum_offload = False

    def __init__(
        self,
        listener: socket.socket,
        path: str,
        *,
        max_frame: int = MAX_FRAME,
        serving: bool = True,
        bound: os.stat_result | None = None,
    ) -> None:
        listener.setblocking(False)
        self.path = path
        self._listener: socket.socket | None = listener
        self._bound = bound
        self.serving = serving
        """Whether frames go in and out (not between a hand_over and a take_over)."""
        self.counters = StreamCounters()
        self._reader = FrameReader(max_frame)
        self._conn: socket.socket | None = None
        self._unsent = b""
        """The rest of a frame a write took only part of (see the module docstring)."""
        self._unsent_waiting = trio.Event()
        self._room_wanted = False
        """A frame was refused for want of room (see :meth:`_want_room`)."""
        self._throttle = LogThrottle(log)
        self._qemu = OneQemu(listener, path, self.counters, self._throttle)

    @classmethod
    def listen(cls, path: str, mtu: int, incoming: bool = False) -> StreamFrontend:
        """Listen at ``path`` for a QEMU whose guest link has ``mtu``.

        A migration target (``incoming``) allows the longest frame of any
        link, since the link it will serve comes from the stream.
        """
        listener, bound = open_listener(path)
        max_frame = MAX_FRAME if incoming else max_frame_for_mtu(mtu)
        return cls(listener, path, max_frame=max_frame, serving=not incoming, bound=bound)

    @property
    def first_qemu_ended(self) -> trio.Event:
        """Set once the first QEMU's connection has ended (``ferryd --one-off``)."""
        return self._qemu.first_ended

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "path": self.path,
            "connected": self._conn is not None,
            "peer_pid": self._qemu.peer,
        }

    # --- frames out ---------------------------------------------------------

    def send(self, frame: bytes) -> bool:
        """Write one complete frame; drop it (and count it) if QEMU cannot take it now."""
        return self._write([frame])

    def send_partial(
        self, parts: list[bytes | memoryview], csum_start: int, csum_offset: int
    ) -> bool:
        """Complete the L4 checksum (the stream has no offload) and write the frame.

        The stack does this itself for a frontend without ``csum_offload``;
        this is here so that the frame is right whoever calls it.
        """
        head = bytes(parts[0])
        rest = parts[1:]
        payload = rest[0] if len(rest) == 1 else b"".join(rest)
        l4 = complete_partial(head[csum_start:], csum_offset, payload)
        return self._write([head[:csum_start] + l4, *rest])

    def _write(self, parts: list[bytes | memoryview]) -> bool:
        conn = self._conn
        if conn is None or not self.serving:
            self.counters.dropped_out += 1
            return False
        if self._unsent and not self._flush(conn):
            self.counters.dropped_out += 1
            self._want_room()
            return False
        out, size = frame_parts(parts)
        try:
            sent = conn.sendmsg(out, (), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:  # QEMU's side is full: the frame is lost
            self.counters.dropped_out += 1
            self._want_room()
            return False
        except OSError:  # EPIPE/ECONNRESET: QEMU is gone, and the reader will see the end
            self.counters.dropped_out += 1
            return False
        self.counters.frames_out += 1
        if sent < size:
            self._unsent = unsent_tail(out, sent)
            self._unsent_waiting.set()
        return True

    def _want_room(self) -> None:
        """A frame was refused for want of room: tell the data path when there is some
        (:meth:`_finish_unsent`), so that the push that stopped there goes on."""
        self._room_wanted = True
        self._unsent_waiting.set()

    def _flush(self, conn: socket.socket) -> bool:
        """Write what is left of a partly written frame; True once none is."""
        try:
            sent = conn.send(self._unsent, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return False
        except OSError:  # QEMU is gone (the reader will see the end): so is the frame
            self._unsent = b""
            return False
        self._unsent = self._unsent[sent:]
        return not self._unsent

    async def _finish_unsent(self, conn: socket.socket, on_burst_end: OnBurstEnd) -> None:
        """Finish a partly written frame as soon as QEMU's side has room; after a frame
        was refused, call ``on_burst_end`` once there is room (TcpFlows.flush pushes
        the connections that stopped for it)."""
        while True:
            await self._unsent_waiting.wait()
            self._unsent_waiting = trio.Event()
            while self._unsent and not self._flush(conn):
                await trio.lowlevel.wait_writable(conn)
            if self._room_wanted:
                await trio.lowlevel.wait_writable(conn)
                self._room_wanted = False
                on_burst_end()

    # --- frames in ------------------------------------------------------------

    async def run(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        """Serve QEMU's connections one after the other, until cancelled."""
        while True:
            if self._conn is None:
                await self._accept()
            conn = self._conn
            assert conn is not None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._qemu.refuse_others, conn)
                nursery.start_soon(self._finish_unsent, conn, on_burst_end)
                if self._unsent or self._room_wanted:
                    self._unsent_waiting.set()  # a new QEMU: finish it, and push again
                end = await self._read(conn, on_frame, on_burst_end)
                nursery.cancel_scope.cancel()
            self._disconnect(end)

    async def _accept(self) -> None:
        conn = await self._qemu.accept()
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        self._conn = conn
        self._reader.reset()
        self._unsent = b""
        log.info("QEMU connected on %s (pid %s)", self.path, self._qemu.peer)

    async def _read(
        self, conn: socket.socket, on_frame: OnFrame, on_burst_end: OnBurstEnd
    ) -> _Ended:
        """Deliver QEMU's frames until the connection is over; why it is."""
        while True:
            await trio.lowlevel.wait_readable(conn)
            try:
                while self._burst(conn, on_frame, _BURST):  # a full burst: more may be queued
                    on_burst_end()
                    await trio.lowlevel.checkpoint()
            except _Ended as end:
                on_burst_end()  # for the frames before the end
                return end
            on_burst_end()

    def _burst(self, conn: socket.socket, on_frame: OnFrame, reads: int) -> bool:
        """Up to ``reads`` reads' worth of frames; True unless the socket ran dry."""
        reader, counters = self._reader, self.counters
        for _ in range(reads):
            try:
                n = conn.recv_into(reader.space())
            except BlockingIOError:
                return False
            except OSError as exc:
                raise _Ended(f"read failed: {exc.strerror}") from exc
            if n == 0:
                raise _Ended("QEMU closed the connection")
            try:
                frames = reader.received_untrusted(n)
            except StreamFramingError as exc:
                counters.framing_errors += 1
                raise _Ended(f"QEMU broke the stream's framing: {exc}", fault=True) from exc
            for frame in frames:
                counters.frames_in += 1
                on_frame(frame, False)
        return True

    def _disconnect(self, end: _Ended) -> None:
        if self._conn is not None:
            self._conn.close()
        peer, self._conn, self._qemu.peer = self._qemu.peer, None, None
        self._qemu.ended()
        self._reader.reset()
        self._unsent = b""
        if end.fault:
            self._throttle.warning(
                "framing",
                trio.current_time(),
                "%s (pid %s on %s); dropped the connection, waiting for QEMU to reconnect",
                end,
                peer,
                self.path,
            )
        else:
            log.info("%s (pid %s on %s); waiting for QEMU to reconnect", end, peer, self.path)

    def drain(self, on_frame: OnFrame, on_burst_end: OnBurstEnd, budget: float = 0.002) -> None:
        """Deliver, without waiting, the frames QEMU has sent already, for about ``budget`` s.

        A migration's source calls it right before :meth:`hand_over`: what
        is left in the socket then is never read (as a tap's queue, see
        TapFrontend.drain), and the guest resends it.
        """
        conn = self._conn
        if conn is not None and self.serving:
            deadline = time.monotonic() + budget
            try:
                while self._burst(conn, on_frame, 1) and time.monotonic() < deadline:
                    pass
            except _Ended as end:
                self._disconnect(end)
        on_burst_end()

    # --- the handover -----------------------------------------------------------

    def hand_over(self) -> None:
        """Stop reading and sending: the other ferryd's QEMU has the guest now.

        The connection is kept: a rollback serves the same QEMU again.
        """
        self.serving = False

    def take_over(self) -> None:
        """Read and send from the next :meth:`run` on."""
        self.serving = True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink_if_ours()

    def _unlink_if_ours(self) -> None:
        """Remove the socket file unless another ferryd has made its own there since."""
        if self._bound is not None:
            unlink_if_ours(self.path, self._bound)
