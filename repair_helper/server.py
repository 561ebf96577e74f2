"""The helper's event loop: many clients, one thread, nobody waits for anybody.

ferry-repair serves every ferryd on the host (one per VM) at once, from one
thread, with a plain epoll loop (selectors): each batch is a few hundred
syscalls that never block, so there is nothing to gain from threads or an
async framework, and a small loop is easier to confine with seccomp.

Per connection:

1. accept, read SO_PEERCRED, refuse (close) a caller the policy does not
   allow, otherwise log one line;
2. on each readable event, receive messages (MSG_DONTWAIT) one at a time, and
   for each: parse, carry out, queue the one-byte reply. A turn ends after
   one full batch's worth of descriptors (:data:`DESCRIPTORS_PER_TURN`, or
   :data:`MESSAGES_PER_WAKEUP` small messages): the loop then serves every
   other ready client before coming back, so four ferryds pipelining 64
   batches each get one batch answered per round each, and none waits
   behind another's whole run;
3. replies are sent with MSG_DONTWAIT. A client that pipelines batches but
   does not read its replies eventually fills its socket; then the helper
   stops reading from that client until its replies drain (backpressure),
   without blocking anyone else;
4. on a refusal, log one line (rate-limited, throttle.py: a flood of
   refusals costs a line per interval) and close. The client's later
   batches are never carried out, and the client reads the replies already
   sent, then ECONNRESET or end-of-file: it knows exactly which batch was
   refused.

Closing never waits for a client (issue 9, item 6). The loop closes no
descriptor a client handed over, nor a client's connection: close() of
either may block for as long as the client likes (closer.py: a lingering TCP
socket; the descriptors still queued on a connection, which the kernel
releases when the connection goes; a file on the client's FUSE mount). A
batch (carried out or refused; but see below for one put in repair mode)
and a connection we are done with (after a shutdown(), so that the client
can queue nothing more) go to the closer thread, which closes them one after
the other. A batch switched to repair ON is the exception: the loop closes
it itself before replying (in repair mode tcp_close() goes straight to
tcp_disconnect(), no linger), so that a caller who closes its own copy next
finds the socket gone. The same holds for a caller
refused at accept, which may have queued batches before we accepted it.
If the closer falls behind by more than :data:`~ferry_repair.closer.MAX_BACKLOG`
descriptors (stuck in a close()), the loop stops accepting and reading
(replies wait too) and checks again every :data:`CLOSER_POLL_SECONDS`
until the backlog is under the bound.

When accept() fails for want of descriptors or memory (EMFILE, ENFILE,
ENOBUFS, ENOMEM), the listener stays readable (the connection waits in the
backlog: accept4 gets the descriptor before it dequeues one), so the loop
pauses it instead of spinning, and tries again as soon as the closer has
freed something, or else after a backoff that doubles from
:data:`ACCEPT_RETRY_SECONDS` up to :data:`ACCEPT_RETRY_MAX_SECONDS`: with no
connection open the closer may never free anything, while the shortage is
another process's (ENFILE) or a limit that was raised again.

The helper keeps no descriptor it was handed beyond the batch that carried
it (and the closer's queue). The one state that may survive a connection
is the keys of sockets it armed and froze (armed.py): those stay frozen.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import time
from dataclasses import dataclass, field

from ferry_repair.armed import (
    DROP,
    MAX_KEYS_PER_CONNECTION,
    ArmedFilter,
    ArmedFilterError,
    ArmedKeys,
)
from ferry_repair.closer import MAX_BACKLOG, Closer, close_batch
from ferry_repair.peer import CallerPolicy, PeerCredentials, peer_credentials
from ferry_repair.protocol import (
    ANCILLARY_BUFFER_SIZE,
    DATA_BUFFER_SIZE,
    SCM_MAX_FD,
    RepairCommand,
    Request,
    RequestRefused,
    fds_in,
    parse_request_untrusted,
)
from ferry_repair.repair import CallerRules, carry_out_untrusted
from ferry_repair.throttle import Throttle

log = logging.getLogger("ferry-repair")

#: Messages handled per readable event before the loop looks at other clients.
MESSAGES_PER_WAKEUP = 16
#: Descriptors handled per readable event (one full batch) before the others' turn.
DESCRIPTORS_PER_TURN = SCM_MAX_FD
#: Connections accepted per readable event on the listener.
ACCEPTS_PER_WAKEUP = 16
#: While the closer is behind (module docstring), or the listener paused for
#: want of descriptors, how often the loop looks again.
CLOSER_POLL_SECONDS = 0.05
#: A listener paused for want of descriptors tries again after this long, then
#: after twice as long each time it fails again, up to the maximum (module
#: docstring); ferryd's own accept loops wait ACCEPT_BACKOFF (0.1 s) likewise.
ACCEPT_RETRY_SECONDS = 0.1
ACCEPT_RETRY_MAX_SECONDS = 2.0

_RECV_FLAGS = socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
# accept() failures that say "out of resources", not "this caller is bad".
_ACCEPT_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: PeerCredentials
    rules: CallerRules
    replies: bytearray = field(default_factory=bytearray)
    armed: ArmedKeys = field(default_factory=ArmedKeys)
    """The cookies of the sockets this connection armed (armed.py), until DISARM."""
    frozen: bool = False
    """FREEZE_ARMED came (and no DISARM since): those sockets hear nothing."""


class Server:
    """Serves a listening socket, connected sockets, or both, until none is left.

    Call :meth:`start_closer` after dropping capabilities (a thread keeps the
    capabilities it was created with: capset() changes only the calling
    thread's) and before the seccomp filter (clone() is not allowed then).
    """

    def __init__(self, policy: CallerPolicy, *, forced_reuse: bool = False) -> None:
        self._policy = policy
        self._forced_reuse = forced_reuse
        self.armed: ArmedFilter | None = None
        """The armed filter (armed.py), if it could be loaded; set before :meth:`run`."""
        self._selector = selectors.DefaultSelector()
        self._idle = selectors.DefaultSelector()  # nothing registered: a sleep
        self._closer = Closer()
        self._closer_behind = False
        self._listener: socket.socket | None = None
        self._listener_paused = False
        self._closed_at_pause = 0  # the closer's count when the listener was paused
        self._retry_at = 0.0  # when a paused listener tries again anyway
        self._retry_after = ACCEPT_RETRY_SECONDS  # the next pause's length
        self._connections: dict[int, _Connection] = {}
        self.refusals = 0
        self._refused_callers = Throttle()
        self._refused_requests = Throttle()
        # Allowed callers are logged the same way: an allowed caller is what a
        # guest that took over a ferryd would be, and it may connect in a loop.
        self._connected = Throttle()

    def start_closer(self) -> None:
        """Start the closer thread (class docstring: when)."""
        self._closer.start()

    def add_listener(self, listener: socket.socket) -> None:
        """Accept and serve clients on ``listener`` (a listening Unix stream socket)."""
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)

    def add_connection(self, sock: socket.socket) -> None:
        """Serve an already connected client (``--connect`` mode)."""
        self._admit(sock)

    def run(self) -> None:
        """Serve until there is no listener and no connection left."""
        while self._listener is not None or self._connections:
            if self._wait_for_closer():
                continue
            self._maybe_resume_listener()
            for key, events in self._selector.select(self._timeout()):
                if key.fileobj is self._listener:
                    self._accept()
                    continue
                conn = self._connections.get(key.fd)
                if conn is None:
                    continue
                if events & selectors.EVENT_WRITE:
                    self._flush(conn)
                elif events & selectors.EVENT_READ:
                    self._serve(conn)
            self._summarise(time.monotonic())

    def _wait_for_closer(self) -> bool:
        """While the closer is behind, wait a little instead of serving; True if it is."""
        if self._closer.backlog <= MAX_BACKLOG:
            if self._closer_behind:
                self._closer_behind = False
                log.warning("closing descriptors caught up; serving again")
            return False
        if not self._closer_behind:
            self._closer_behind = True
            log.warning(
                "closing descriptors is stuck (%d waiting, a client's close() blocks):"
                " not accepting or reading until it catches up",
                self._closer.backlog,
            )
        self._idle.select(CLOSER_POLL_SECONDS)
        self._summarise(time.monotonic())
        return True

    def _maybe_resume_listener(self) -> None:
        """Accept again once the closer has freed a descriptor since accept() ran
        out, or the backoff is over (module docstring)."""
        if (
            self._listener_paused
            and self._listener is not None
            and (self._closer.closed > self._closed_at_pause or time.monotonic() >= self._retry_at)
        ):
            self._listener_paused = False
            self._selector.register(self._listener, selectors.EVENT_READ)

    def _timeout(self) -> float | None:
        """Until the next refusal summary is due, or the next look at a paused
        listener; None (wait for events) if neither is."""
        now = time.monotonic()
        due = [
            t
            for t in (
                self._refused_callers.next_timer(),
                self._refused_requests.next_timer(),
                self._connected.next_timer(),
                now + CLOSER_POLL_SECONDS if self._listener_paused else None,
            )
            if t is not None
        ]
        return max(0.0, min(due) - now) if due else None

    def _summarise(self, now: float) -> None:
        callers = self._refused_callers.handle_timer(now)
        if callers:
            log.warning("refused %d more clients whose uid and gid are not allowed", callers)
        requests = self._refused_requests.handle_timer(now)
        if requests:
            log.warning("refused %d more batches (and dropped their clients)", requests)
        connected = self._connected.handle_timer(now)
        if connected:
            log.info("%d more clients connected", connected)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(ACCEPTS_PER_WAKEUP):
            if self._closer.backlog > MAX_BACKLOG:
                return  # run() waits for the closer
            closed = self._closer.closed  # before: the closer may free some meanwhile
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRNOS:
                    self._pause_listener(exc, closed)
                return
            if self._retry_after > ACCEPT_RETRY_SECONDS:
                log.warning("accepting clients again")
                self._retry_after = ACCEPT_RETRY_SECONDS
            self._admit(sock)

    def _pause_listener(self, exc: OSError, closed: int) -> None:
        """Out of descriptors or memory: stop accepting until the closer has
        closed something (a batch, a connection) or the backoff is over,
        instead of spinning on a listener that stays readable."""
        assert self._listener is not None
        if self._retry_after == ACCEPT_RETRY_SECONDS:  # once per shortage, not per retry
            log.error("cannot accept clients for now: %s", exc.strerror)
        self._selector.unregister(self._listener)
        self._listener_paused = True
        self._closed_at_pause = closed
        self._retry_at = time.monotonic() + self._retry_after
        self._retry_after = min(2 * self._retry_after, ACCEPT_RETRY_MAX_SECONDS)

    def _admit(self, sock: socket.socket) -> None:
        try:
            peer = peer_credentials(sock)
        except OSError as exc:
            log.warning("dropped a client whose credentials cannot be read: %s", exc.strerror)
            self._close_client(sock)
            return
        if not self._policy.allows(peer):
            # The cheap path: one getsockopt() decided; no log line in a flood.
            self.refusals += 1
            if self._refused_callers.admit(time.monotonic()):
                log.warning("refused client %s: uid and gid not allowed (%s)", peer, self._policy)
            self._close_client(sock)
            return
        if self._connected.admit(time.monotonic()):
            log.info("client %s connected", peer)
        rules = CallerRules.for_caller(peer.uid, forced_reuse=self._forced_reuse)
        self._connections[sock.fileno()] = _Connection(sock, peer, rules)
        self._selector.register(sock, selectors.EVENT_READ)

    def _serve(self, conn: _Connection) -> None:
        budget = DESCRIPTORS_PER_TURN
        for _ in range(MESSAGES_PER_WAKEUP):
            if self._closer.backlog > MAX_BACKLOG:
                return  # still readable; run() waits for the closer first
            try:
                data, ancdata, flags, _ = conn.sock.recvmsg(
                    DATA_BUFFER_SIZE, ANCILLARY_BUFFER_SIZE, _RECV_FLAGS
                )
            except BlockingIOError:
                return
            except OSError as exc:
                # ECONNRESET: the client closed with replies unread; its business.
                if exc.errno != errno.ECONNRESET:
                    log.warning("lost client %s: %s", conn.peer, exc.strerror)
                self._drop(conn)
                return
            if not data and not ancdata:
                self._drop(conn)  # end of file: the client is done
                return
            fds = fds_in(ancdata)
            try:
                request = parse_request_untrusted(data, ancdata, flags)
                if request.command.takes_descriptors:
                    if request.command is RepairCommand.ARM:
                        _check_can_arm_untrusted(conn, len(request.fds))
                    carry_out_untrusted(request, conn.rules, self.armed, conn.armed)
                else:
                    self._armed_command_untrusted(conn, request)
            except RequestRefused as exc:
                self._closer.close_later(fds)  # never closed here (module docstring)
                self.refusals += 1
                if self._refused_requests.admit(time.monotonic()):
                    log.warning("refused client %s: %s", conn.peer, exc)
                self._drop(conn)
                return
            if request.command == RepairCommand.ON:
                # Every one a TCP socket in repair mode now: close() cannot wait
                # (__tcp_close → disconnect, then nothing to linger for), and it
                # must be done before the reply. The caller may close its own copy
                # next and expect the socket gone: a same-host target connect()s
                # the same 4-tuple (EADDRNOTAVAIL while any copy is open).
                close_batch(fds)
            else:
                self._closer.close_later(fds)
            conn.replies += request.command.to_byte()
            if not self._flush(conn):
                return
            budget -= len(request.fds)
            if budget <= 0:
                return  # the others' turn; the rest is still readable next round

    def _flush(self, conn: _Connection) -> bool:
        """Send queued replies; False if the connection is gone or cannot take more now."""
        try:
            sent = conn.sock.send(conn.replies, _SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.warning("lost client %s: %s", conn.peer, exc.strerror)
            self._drop(conn)
            return False
        del conn.replies[:sent]
        # Backpressure: while replies wait, read nothing more from this client.
        wanted = selectors.EVENT_WRITE if conn.replies else selectors.EVENT_READ
        if self._selector.get_key(conn.sock).events != wanted:
            self._selector.modify(conn.sock, wanted)
        return not conn.replies

    def _armed_command_untrusted(self, conn: _Connection, request: Request) -> None:
        """FREEZE_ARMED or DISARM, on this connection's armed sockets only (armed.py)."""
        armed = self.armed
        if armed is None:
            raise RequestRefused(
                f"{request.command.name}: this helper has no armed filter (no CAP_BPF at start-up)"
            )
        if request.command is RepairCommand.FREEZE_ARMED:
            if request.count != len(conn.armed):
                # (a new connection after a lost one holds none: the caller
                # must not take its sockets for frozen)
                raise RequestRefused(
                    f"FREEZE_ARMED of {request.count} sockets, but this connection armed"
                    f" {len(conn.armed)}"
                )
            try:
                armed.set_all(conn.armed, DROP)
            except ArmedFilterError as exc:
                raise RequestRefused(f"FREEZE_ARMED: {exc}") from None
            conn.frozen = True
            return
        self._disarm(conn)

    def _disarm(self, conn: _Connection) -> None:
        """Every socket ``conn`` armed passes again; its keys leave the map."""
        assert self.armed is not None
        try:
            self.armed.remove_all(conn.armed)
        except ArmedFilterError:
            # A key gone already (the same socket armed over another
            # connection too, and released there): one by one, past those.
            try:
                self.armed.remove_each(conn.armed)
            except ArmedFilterError as exc:  # never seen: a key stays, passing or not
                log.error("client %s: cannot remove its armed keys: %s", conn.peer, exc)
        conn.armed.clear()
        conn.frozen = False

    def _drop(self, conn: _Connection) -> None:
        if conn.armed:
            if conn.frozen:
                # Left frozen: they may be moving to another host (armed.py).
                log.info("client %s left %d armed sockets frozen", conn.peer, len(conn.armed))
            else:
                self._disarm(conn)
        del self._connections[conn.sock.fileno()]
        self._selector.unregister(conn.sock)
        self._close_client(conn.sock)  # the closer frees it: see _maybe_resume_listener

    def _close_client(self, sock: socket.socket) -> None:
        """Hand a client's connection to the closer; the loop never closes one (module doc)."""
        # From now on its sendmsg() fails (EPIPE): nothing more can be queued.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        self._closer.close_later([sock.detach()])


def _check_can_arm_untrusted(conn: _Connection, count: int) -> None:
    if conn.frozen:
        raise RequestRefused("ARM after FREEZE_ARMED: DISARM first")
    if len(conn.armed) + count > MAX_KEYS_PER_CONNECTION:
        raise RequestRefused(
            f"ARM: at most {MAX_KEYS_PER_CONNECTION} armed sockets per connection"
            f" ({len(conn.armed)} already)"
        )
