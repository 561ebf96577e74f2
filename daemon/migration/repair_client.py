"""ferryd's client of the TCP_REPAIR helper (ferry-repair, or passt's passt-repair).

ferryd holds no capability, so it cannot switch its own sockets into repair
mode; a helper holding CAP_NET_ADMIN does it for it. The protocol is
passt-repair's (see repair_helper/protocol.py): one message per batch of at
most 253 sockets (the kernel's SCM_MAX_FD), carrying the command byte and the
descriptors, answered by the same byte once every socket of the batch is
switched. The helper answers batches in order, and on any error closes the
connection without answering that batch or any later one. ferry-repair adds
three commands of its own (ARM, FREEZE_ARMED, DISARM: repair_helper/armed.py),
sent only to a helper ferryd connected to (``can_arm``).

Two ways to reach a helper, one API:

* ``--repair-socket PATH``: the helper listens (ferry-repair, usually
  socket-activated by systemd); ``await RepairClient.connect(PATH)``.
* ``--repair-listen PATH``: ferryd listens and the helper connects, as passt
  does with passt-repair (``passt-repair PATH`` or ``ferry-repair --connect
  PATH``); ``listener = await RepairListener.bind(PATH)`` at start-up, then
  ``client = await listener.accept()`` when migration needs the helper.

Both check who is on the other end (SO_PEERCRED): by default only root and
ferryd's own uid may act as the helper, since whoever plays that part is
handed ferryd's sockets, i.e. its connections. (passt does not check.)

Then, for any number of sockets::

    await client.set_repair(socks, RepairMode.ON)

splits ``socks`` into batches of at most 253, sends them *pipelined* (the sender runs
ahead of the replies by up to ``max_in_flight`` batches, so the helper never
waits for a round trip; the window also bounds the descriptors in flight,
which the kernel counts against the sending user's RLIMIT_NOFILE, see
net/unix/garbage.c, too_many_unix_fds), and reads the replies as they come.
Every reply must arrive within ``reply_timeout`` seconds of the previous one
(or of the call). On failure it raises a :class:`RepairBatchError` that says
which batch failed and which sockets (indexes into ``socks``) it held:
batches before it were carried out, later ones were not; the failed batch
itself may be partly done (the helper refuses a batch with a non-socket or
non-IPv4/IPv6 descriptor untouched, but when the kernel refuses TCP_REPAIR
on one socket, say a UDP or a listening one, those before it are switched;
the helper's log says which), and after a :class:`RepairTimeout` its state
is unknown. The connection is then closed, since replies still in flight
would be read as answers to the next call. Rolling back the batches that
were carried out is the caller's job: it knows what they were for.

A helper can go away between two calls (ferry-repair restarted by systemd
or by hand, passt-repair exited): the connection ferryd keeps from one
migration to the next is then stale, and its first batch would meet a
closed socket. A client made by :meth:`RepairClient.connect` or
:meth:`RepairListener.accept` knows how to reach a helper again, and
``set_repair`` uses that, so a stale or failed connection never outlives
the call that found it:

* before a call, a connection whose helper hung up since the last call
  (readable while no request is outstanding: end-of-file, or bytes nobody
  asked for) is replaced by a new one;
* a connection that served an earlier call, closed before it answered
  anything in this one (the helper died after the check above, or just
  before it), is replaced once and the call is repeated on the new one.
  Repeating is safe: each batch sets TCP_REPAIR to a value, so setting it
  again is a no-op for sockets already switched.
  A fresh connection that fails, or a second failure, is the caller's error;
* after a failure the next call starts on a new connection (a rollback
  after a failed freeze reaches the helper again instead of reusing the
  connection that just failed).

``reconnects`` counts the connections made after the first.

API::

    RepairMode                                     # ON = 1, OFF = 0, OFF_NO_WINDOW_PROBE = -1
    class RepairClient:
        def __init__(self, sock: trio.socket.SocketType, *,
                     reply_timeout: float = DEFAULT_TIMEOUT,
                     max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                     steady_batches: bool = False,
                     redial: Redial | None = None) -> None
        @classmethod
        async def connect(cls, path: str | os.PathLike[str], *,
                          reply_timeout: float = DEFAULT_TIMEOUT,
                          max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                          helper_uids: Iterable[int] | None = None) -> RepairClient
        async def set_repair(self, socks: Sequence[int | HasFileno],
                             mode: RepairMode, *,
                             progress: Callable[[int], None] | None = None) -> None
        async def aclose(self) -> None             # also: async with client: ...
        reconnects: int                            # connections made after the first
    class RepairListener:
        @classmethod
        async def bind(cls, path: str | os.PathLike[str], *,
                       reply_timeout: float = DEFAULT_TIMEOUT,
                       max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                       helper_uids: Iterable[int] | None = None) -> RepairListener
        async def accept(self) -> RepairClient          # wrap in trio.fail_after()
        def close(self) -> None                    # also: with listener: ...

passt-repair (Debian 13's, 2025-05) reuses its recvmsg() header without
resetting msg_controllen, which the kernel lowers to the size of the control
data it wrote: after a batch of k sockets, a larger batch is silently cut to
k (the kernel closes the rest and sets MSG_CTRUNC, which passt-repair does not
check) and still answered as done. So batch sizes must never grow over a
connection to passt-repair. Batches are therefore split evenly (sizes differ
by one at most, larger first), and a client accepted by a
:class:`RepairListener`, whose peer may be passt-repair, keeps every later
batch no larger than the last one it sent (``steady_batches``); ferry-repair
has no such limit and a connected client ignores it.

Errors, all subclasses of :class:`RepairError` (a
ferryd.migration.errors.MigrationError, translated like the others by whoever
drives the migration): :class:`RepairUnavailable`
(no helper could be reached or accepted: bad config, or the helper is not
running), :class:`RepairRefused` (the helper closed the connection instead of
answering a batch: see its log for why; usually our bug or a socket that went
away), :class:`RepairTimeout` (the helper did not answer in time),
:class:`RepairProtocolError` (the helper answered with a wrong byte: the
helper's bug), and a plain :class:`RepairBatchError` when sending a batch
failed locally (e.g. a closed descriptor: our bug).
"""

from __future__ import annotations

import array
import errno
import logging
import math
import os
import select
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import trio

from ferry_repair.protocol import SCM_MAX_FD
from ferry_repair.protocol import RepairCommand as RepairMode
from ferryd.migration.errors import MigrationError
from ferryd.unix_listener import ListenError, ListenFailure, listen_at, unlink_if_ours

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_TIMEOUT",
    "HasFileno",
    "Redial",
    "RepairBatchError",
    "RepairClient",
    "RepairError",
    "RepairListener",
    "RepairMode",
    "RepairProtocolError",
    "RepairRefused",
    "RepairTimeout",
    "RepairUnavailable",
]

log = logging.getLogger(__name__)

#: Seconds the helper may take to answer one batch.
DEFAULT_TIMEOUT = 10.0
#: Batches sent ahead of their replies: 64 x 253 descriptors in flight at most.
DEFAULT_MAX_IN_FLIGHT = 64

_UCRED = struct.Struct("=iII")
_SEND_FLAGS = socket.MSG_NOSIGNAL
#: poll() bits saying an idle connection is no longer in step: the helper hung
#: up (end-of-file, POLLRDHUP, POLLHUP) or sent bytes nobody asked for (POLLIN).
_HUNG_UP = select.POLLIN | select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0x2000)

#: How a client reaches a helper again: a new connection, already checked
#: (SO_PEERCRED), or RepairUnavailable.
Redial = Callable[[], Awaitable[trio.socket.SocketType]]


class HasFileno(Protocol):
    """Anything with a descriptor: a stdlib or trio socket."""

    def fileno(self) -> int: ...


class RepairError(MigrationError):
    """Setting TCP_REPAIR through the helper failed."""


class RepairUnavailable(RepairError):
    """No helper to talk to (bad config, or the helper is not running)."""


class RepairBatchError(RepairError):
    """A batch failed; ``batch`` (0-based) of ``batches`` held ``socks[sockets]``."""

    def __init__(self, reason: str, *, batch: int, batches: int, sockets: range) -> None:
        super().__init__(
            f"TCP_REPAIR batch {batch + 1} of {batches} (sockets {sockets.start}"
            f"..{sockets.stop - 1}) failed: {reason}"
        )
        self.reason = reason
        self.batch = batch
        self.batches = batches
        self.sockets = sockets


class RepairRefused(RepairBatchError):
    """The helper closed the connection instead of answering the batch (see its log)."""


class RepairTimeout(RepairBatchError):
    """The helper did not answer the batch in time; its state is unknown."""


class RepairProtocolError(RepairBatchError):
    """The helper answered with something else than the command byte (helper's bug)."""


def _check_helper(sock: trio.socket.SocketType, helper_uids: frozenset[int]) -> int:
    """The helper's uid, if it is one we accept as the helper; else RepairUnavailable."""
    creds: bytes = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _ = _UCRED.unpack(creds)
    if uid not in helper_uids:
        raise RepairUnavailable(
            f"the peer (pid {pid}, uid {uid}) is not an allowed repair helper"
            f" (uids {sorted(helper_uids)}); it would be handed our sockets"
        )
    return int(uid)


def _helper_uids(helper_uids: Iterable[int] | None) -> frozenset[int]:
    return frozenset({0, os.getuid()} if helper_uids is None else helper_uids)


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """True if an idle connection is out of step: the helper closed it, or wrote unasked.

    Between calls the helper owes us nothing, so any readiness at all means
    the connection cannot serve the next call (unix_poll() reports
    POLLRDHUP/POLLHUP once the peer is gone, POLLIN for end-of-file or data).
    """
    poller = select.poll()
    poller.register(sock.fileno(), _HUNG_UP)
    return bool(poller.poll(0))


async def _dial(path: str, helper_uids: frozenset[int]) -> trio.socket.SocketType:
    """A checked connection to the helper listening on ``path``, or RepairUnavailable."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
        _check_helper(sock, helper_uids)
    except OSError as exc:
        sock.close()
        raise RepairUnavailable(
            f"cannot connect to the repair helper at {path}: {exc.strerror}"
            " (is ferry-repair.socket running?)"
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


class RepairClient:
    """A connection to a repair helper; see the module docstring."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        reply_timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        steady_batches: bool = False,
        redial: Redial | None = None,
        can_arm: bool = False,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._steady_batches = steady_batches
        self._batch_limit = SCM_MAX_FD
        self._sock: trio.socket.SocketType | None = sock
        self._timeout = reply_timeout
        self._max_in_flight = max_in_flight
        self._lock = trio.Lock()
        self._redial = redial
        self._closed_by_us = False
        self._served = False
        """The connection answered a call before (so it may have gone stale since)."""
        self.reconnects = 0
        self.can_arm = can_arm
        """Whether to send ferry-repair's own commands (ARM, FREEZE_ARMED, DISARM:
        repair_helper/armed.py): only to a helper we connected to, and only until
        one refused them (an older ferry-repair); never to one that connected to us,
        which may be passt-repair."""

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        reply_timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        helper_uids: Iterable[int] | None = None,
    ) -> RepairClient:
        """Connect to a helper listening on ``path`` (``--repair-socket``).

        The client connects there again when the helper went away (see the
        module docstring).
        """
        where, uids = os.fspath(path), _helper_uids(helper_uids)

        async def redial() -> trio.socket.SocketType:
            return await _dial(where, uids)

        return cls(
            await redial(),
            reply_timeout=reply_timeout,
            max_in_flight=max_in_flight,
            redial=redial,
            can_arm=True,
        )

    async def __aenter__(self) -> RepairClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection for good; the helper sees end-of-file."""
        self._closed_by_us = True
        self._drop()
        await trio.lowlevel.checkpoint()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def closed(self) -> bool:
        """True once unusable: closed by :meth:`aclose`, or failed with no way to redial."""
        return self._closed_by_us or (self._sock is None and self._redial is None)

    async def _connection(self) -> tuple[trio.socket.SocketType, bool]:
        """A connection in step with the helper, and whether it served an earlier call."""
        if self._closed_by_us:
            raise RepairError("repair helper client is closed")
        sock = self._sock
        if sock is not None and _hung_up(sock):
            log.info("the repair helper hung up since the last request (restarted?): reconnecting")
            self._drop()
            sock = None
        if sock is not None:
            return sock, self._served
        return await self._new_connection(), False

    async def _new_connection(self) -> trio.socket.SocketType:
        self._drop()
        if self._redial is None:
            raise RepairError(
                "repair helper connection is closed (after an earlier failure, reconnect)"
            )
        sock = self._sock = await self._redial()
        self._served = False
        self._batch_limit = SCM_MAX_FD  # a new peer: nothing learnt about it yet
        self.reconnects += 1
        return sock

    async def set_repair(
        self,
        socks: Sequence[int | HasFileno],
        mode: RepairMode,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Set TCP_REPAIR to ``mode`` on every socket of ``socks``; see the module docstring.

        The caller must keep the sockets open until this returns. Calls on one
        client are served one after the other. ``progress(n)`` is called as
        answers arrive: ``socks[:n]`` are switched (a migration source dumps
        those while the helper works on the rest).
        """
        mode = RepairMode(mode)
        fds = [s if isinstance(s, int) else s.fileno() for s in socks]
        if not fds:
            await trio.lowlevel.checkpoint()
            return
        async with self._lock:
            sock, reused = await self._connection()
            try:
                await self._exchange(sock, fds, mode, progress)
            except RepairRefused as exc:
                if not (reused and exc.batch == 0 and self._redial is not None):
                    raise
                # Closed before answering anything, on a connection that served
                # an earlier call: the helper went away meanwhile. Once more, anew.
                log.warning("%s; the helper went away since the last request: reconnecting", exc)
                try:
                    await self._exchange(await self._new_connection(), fds, mode, progress)
                except RepairError as then:
                    # Maybe it had refused the batch after all: say both.
                    raise _after(exc, then) from exc

    async def freeze_armed(self, count: int) -> None:
        """Stop the intake of every socket this connection armed, ``count`` of them.

        Only on the connection that armed them: if it is gone, the helper has
        released them (or will refuse the count), and this raises RepairError,
        as when the helper refuses; the caller then freezes them one by one.
        """
        await self._command(RepairMode.FREEZE_ARMED, count.to_bytes(4, "little"))

    async def disarm(self) -> None:
        """Let every socket this connection armed hear again (and forget them).

        Nothing to do if the connection is gone: the helper released them
        then, or left them frozen, which repair OFF undoes.
        """
        await self._command(RepairMode.DISARM, b"")

    async def _command(self, mode: RepairMode, tail: bytes) -> None:
        """One of the commands without descriptors, on the current connection only."""
        async with self._lock:
            sock = self._sock
            if sock is None or _hung_up(sock):
                self._drop()
                if mode is RepairMode.DISARM:
                    await trio.lowlevel.checkpoint()
                    return
                raise RepairError(f"{mode.name}: the helper connection that armed them is gone")
            byte = mode.to_byte()
            try:
                with trio.fail_after(self._timeout):
                    await sock.sendmsg([byte + tail], [], _SEND_FLAGS)
                    reply = await sock.recv(1)
            except (OSError, trio.TooSlowError) as exc:
                self._drop()
                why = "no answer in time" if isinstance(exc, trio.TooSlowError) else exc.strerror
                raise RepairError(f"{mode.name}: the repair helper failed: {why}") from None
            if reply != byte:
                self._drop()
                if not reply:
                    raise RepairError(
                        f"{mode.name}: the repair helper closed the connection instead of"
                        " answering (its log says why)"
                    )
                raise RepairError(f"{mode.name}: the repair helper answered {reply!r}")
            self._served = True

    async def _exchange(
        self,
        sock: trio.socket.SocketType,
        fds: list[int],
        mode: RepairMode,
        progress: Callable[[int], None] | None,
    ) -> None:
        exchange = _Exchange(
            sock, fds, mode, self._timeout, self._max_in_flight, self._batch_limit, progress
        )
        try:
            await exchange.run()
        except BaseException:
            # Replies may still be in flight: this connection is out of step.
            self._drop()
            raise
        self._served = True
        if self._steady_batches:
            self._batch_limit = exchange.last_batch_size


def _after(first: RepairError, then: RepairError) -> RepairError:
    """``then`` (same type and attributes, for the caller), its message naming ``first`` first."""
    err = type(then).__new__(type(then), f"{first}; then, on a new connection: {then}")
    err.__dict__.update(then.__dict__)
    return err


def split_batches(n: int, limit: int = SCM_MAX_FD) -> list[range]:
    """Split ``n`` sockets into the fewest batches of at most ``limit``, sizes never growing.

    The sizes differ by at most one, larger first, so the last batch is the
    smallest (see "passt-repair" in the module docstring).
    """
    if n == 0:
        return []
    count = math.ceil(n / limit)
    base, extra = divmod(n, count)
    bounds: list[range] = []
    start = 0
    for index in range(count):
        size = base + (1 if index < extra else 0)
        bounds.append(range(start, start + size))
        start += size
    return bounds


class _Exchange:
    """One set_repair() call: a sender task and a reply reader, sharing a window
    (a single batch: sent, then its answer read, in the caller's task)."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        fds: list[int],
        mode: RepairMode,
        timeout: float,
        max_in_flight: int,
        batch_limit: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._sock = sock
        self._fds = fds
        self._progress = progress
        self._byte = mode.to_byte()
        self._timeout = timeout
        self._bounds = split_batches(len(fds), batch_limit)
        self._batches = len(self._bounds)
        self._window = trio.Semaphore(max_in_flight)
        self._answered = 0
        self._failure: RepairBatchError | None = None

    @property
    def last_batch_size(self) -> int:
        return len(self._bounds[-1])

    def _error(self, kind: type[RepairBatchError], batch: int, reason: str) -> RepairBatchError:
        return kind(reason, batch=batch, batches=self._batches, sockets=self._bounds[batch])

    async def run(self) -> None:
        with trio.CancelScope() as deadline:
            deadline.deadline = trio.current_time() + self._timeout
            if self._batches == 1:
                # One batch (up to 253 sockets: most VMs' whole freeze) is sent
                # and answered in this task: a sender task and its nursery cost
                # 0.1-0.3 ms of scheduling per call here (repair ON of 1 socket,
                # median of 300, three alternated runs: 407-665 us with them,
                # 264-369 without; of 100 sockets 1,222-1,421 and 1,008-1,127),
                # and QEMU's freeze makes this call with the VM stopped.
                try:
                    await self._send_all(deadline)
                    if self._failure is None:
                        await self._read_replies(deadline)
                except RepairBatchError as exc:
                    self._failure = self._failure or exc
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_all, nursery.cancel_scope)
                    try:
                        await self._read_replies(deadline)
                    except RepairBatchError as exc:
                        self._failure = self._failure or exc
                    nursery.cancel_scope.cancel()  # all answered, or failed: stop sending
        if self._failure is not None:
            # Raised bare, not in an exception group: the caller wants the batch.
            raise self._failure
        if deadline.cancelled_caught:
            raise self._error(
                RepairTimeout,
                self._answered,
                f"the repair helper did not answer within {self._timeout} s",
            )

    async def _send_all(self, exchange: trio.CancelScope) -> None:
        for batch in range(self._batches):
            await self._window.acquire()
            bounds = self._bounds[batch]
            chunk = self._fds[bounds.start : bounds.stop]
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", chunk))]
            try:
                await self._sock.sendmsg([self._byte], rights, _SEND_FLAGS)
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    # The helper closed the connection: it refused an earlier
                    # batch, which the reply reader will name. Stop sending.
                    return
                reason = f"cannot send it to the repair helper: {exc.strerror}"
                if exc.errno == errno.ETOOMANYREFS:
                    reason += " (too many descriptors in flight: lower max_in_flight)"
                self._failure = self._failure or self._error(RepairBatchError, batch, reason)
                exchange.cancel()
                return

    async def _read_replies(self, deadline: trio.CancelScope) -> None:
        while self._answered < self._batches:
            try:
                replies = await self._sock.recv(self._batches - self._answered)
            except OSError as exc:
                if exc.errno != errno.ECONNRESET:
                    raise self._error(
                        RepairRefused, self._answered, f"connection lost: {exc.strerror}"
                    ) from None
                replies = b""
            if not replies:
                raise self._error(
                    RepairRefused,
                    self._answered,
                    "the repair helper closed the connection instead of answering"
                    " (its log says why)",
                )
            for reply in replies:
                if reply != self._byte[0]:
                    raise self._error(
                        RepairProtocolError,
                        self._answered,
                        f"the repair helper answered {reply:#04x}, not {self._byte[0]:#04x}",
                    )
                self._answered += 1
                self._window.release()
            if self._progress is not None:
                self._progress(self._bounds[self._answered - 1].stop)
            deadline.deadline = trio.current_time() + self._timeout


class RepairListener:
    """A socket a connecting helper reaches us on (``--repair-listen``, passt style)."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        path: str,
        bound: os.stat_result,
        *,
        reply_timeout: float,
        max_in_flight: int,
        helper_uids: frozenset[int],
    ) -> None:
        self._sock = sock
        self.path = path
        self._bound = bound
        self._timeout = reply_timeout
        self._max_in_flight = max_in_flight
        self._helper_uids = helper_uids

    @classmethod
    async def bind(
        cls,
        path: str | os.PathLike[str],
        *,
        reply_timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        helper_uids: Iterable[int] | None = None,
    ) -> RepairListener:
        """Listen on ``path`` (mode 0600: only our uid and root may connect).

        A socket file a dead process left there is replaced; a live
        listener, or anything that is not a socket, is never taken over
        (ferryd.unix_listener, bound synchronously: no worker thread).
        """
        path = os.fspath(path)
        where = f"cannot listen for the repair helper on {path}"
        try:
            raw, bound = listen_at(path, 1)
        except ListenError as exc:
            if exc.failure is ListenFailure.LIVE:
                raise RepairUnavailable(
                    f"{where}: another process (a live ferryd?) listens there"
                ) from None
            if exc.failure is ListenFailure.NOT_SOCKET:
                raise RepairUnavailable(
                    f"{where}: it exists and is not a socket; not replacing it"
                ) from None
            if exc.failure is ListenFailure.PROBE:
                raise RepairUnavailable(
                    f"{where}: cannot tell whether it is in use: {exc.error}"
                ) from None
            assert exc.error is not None
            raise RepairUnavailable(f"{where}: {exc.error.strerror}") from None
        await trio.lowlevel.checkpoint()
        return cls(
            trio.socket.from_stdlib_socket(raw),
            path,
            bound,
            reply_timeout=reply_timeout,
            max_in_flight=max_in_flight,
            helper_uids=_helper_uids(helper_uids),
        )

    def __enter__(self) -> RepairListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening and remove the socket file, if it is still ours."""
        self._sock.close()
        unlink_if_ours(self.path, self._bound)

    async def accept(self) -> RepairClient:
        """Wait for an allowed helper to connect (others are turned away and logged).

        Waits as long as it takes: bound it with ``trio.fail_after()``. The
        client waits here again, for at most ``reply_timeout``, when its
        helper went away (a new passt-repair must be started meanwhile).
        """

        async def redial() -> trio.socket.SocketType:
            with trio.move_on_after(self._timeout):
                return await self._accept_checked()
            raise RepairUnavailable(
                f"no repair helper connected to {self.path} within {self._timeout:g} s"
                " (start passt-repair or ferry-repair --connect again)"
            )

        # The connecting helper may be passt-repair: keep batches steady.
        return RepairClient(
            await self._accept_checked(),
            reply_timeout=self._timeout,
            max_in_flight=self._max_in_flight,
            steady_batches=True,
            redial=redial,
        )

    async def _accept_checked(self) -> trio.socket.SocketType:
        while True:
            sock, _ = await self._sock.accept()
            try:
                _check_helper(sock, self._helper_uids)
            except (RepairUnavailable, OSError) as exc:
                log.warning("turned away a would-be repair helper on %s: %s", self.path, exc)
                sock.close()
                continue
            return sock
