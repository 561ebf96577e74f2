"""One QEMU at a time on a listening Unix socket (the stream and vhost-user frontends).

Both of ferryd's QEMU frontends serve a single QEMU: the first connection
is served until it ends; another that arrives meanwhile is accepted and
closed at once (counted in ``refused``, logged at most every 10 s), unless
the one served has already hung up (POLLRDHUP): then the newcomer (most
likely QEMU's own reconnect) stays in the backlog and is accepted once the
frontend has seen the end. An accept that fails for want of descriptors
(EMFILE, ENFILE: ferryd.descriptors) is retried after a pause, since the
listener stays readable and an immediate retry would spin; QEMU waits in
the backlog meanwhile.
"""

from __future__ import annotations

import select
import socket
from typing import Protocol

import trio

from ferry_repair.peer import peer_credentials
from ferryd.descriptors import ACCEPT_BACKOFF, is_exhaustion
from ferryd.logthrottle import LogThrottle

__all__ = ["ConnectionCounters", "OneQemu"]

#: The peer hung up (unix_poll(): RCV_SHUTDOWN gives EPOLLRDHUP, both ways EPOLLHUP).
_HUNG_UP = select.POLLHUP | select.POLLRDHUP


class ConnectionCounters(Protocol):
    connections: int
    """QEMU connections accepted and served."""
    refused: int
    """Connections closed at once because a QEMU was being served."""


class OneQemu:
    """Accepts QEMU on ``listener`` (non-blocking) and refuses the others while it is served."""

    def __init__(
        self,
        listener: socket.socket,
        path: str,
        counters: ConnectionCounters,
        throttle: LogThrottle,
    ) -> None:
        self._listener = listener
        self._path = path
        self._counters = counters
        self._throttle = throttle
        self.peer: int | None = None
        """The served QEMU's pid (SO_PEERCRED), None between connections or if unknown."""
        self.first_ended = trio.Event()
        """Set once the first QEMU's connection has ended (``--one-off``)."""

    def ended(self) -> None:
        """The frontend saw the served connection end (QEMU hung up, or was dropped)."""
        self.first_ended.set()

    async def accept(self) -> socket.socket:
        """The next QEMU's connection, non-blocking; :attr:`peer` is its pid."""
        listener = self._listener
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if not is_exhaustion(exc):
                    raise
                self._throttle.warning(
                    "accept", trio.current_time(), "cannot accept QEMU on %s: %s", self._path, exc
                )
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            conn.setblocking(False)
            self.peer = _peer_pid(conn)
            self._counters.connections += 1
            return conn

    async def refuse_others(self, conn: socket.socket) -> None:
        """Close every other connection while ``conn`` is served, until cancelled."""
        listener = self._listener
        while True:
            await trio.lowlevel.wait_readable(listener)
            if _hung_up(conn):
                # The served QEMU is gone: the newcomer waits in the backlog
                # until the frontend has seen the end and accepts it.
                await trio.sleep_forever()
            try:
                extra, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if not is_exhaustion(exc):
                    raise
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            pid = _peer_pid(extra)
            extra.close()
            self._counters.refused += 1
            self._throttle.warning(
                "refused",
                trio.current_time(),
                "refused a second connection on %s (pid %s): QEMU pid %s is being served",
                self._path,
                pid,
                self.peer,
            )


def _peer_pid(conn: socket.socket) -> int | None:
    try:
        return peer_credentials(conn).pid
    except OSError:
        return None


def _hung_up(conn: socket.socket) -> bool:
    poller = select.poll()
    poller.register(conn.fileno(), _HUNG_UP)
    return any(events & _HUNG_UP for _, events in poller.poll(0))
