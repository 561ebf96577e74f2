"""The ports the TCP core (:mod:`ferryd.flows.tcp_conn`) is driven through.

The core is sans-IO: it owns no socket, reads no clock and draws no random
number of its own. Three things still come from outside while it handles an
event, because the answer is needed in the middle of it:

- :class:`HostSocket`, the host socket's kernel: how much a non-blocking
  send() took, what a peek past the bytes in flight finds, how full the
  send buffer is. One synchronous call per kernel operation, nothing queued:
  the adapter (:mod:`ferryd.flows.tcp`) gives each connection a
  :class:`SocketHost` on its real socket; the tests give it an in-memory
  kernel.
- :class:`UnsentTail`, a migrated socket's bytes that must reach the socket
  before any new byte of the guest's (the migration layer implements it:
  the flows layer knows nothing of repair mode).
- :class:`Entropy`, where initial sequence numbers and RTO jitter come from:
  :data:`SYSTEM_ENTROPY` in the daemon, a seeded ``random.Random`` in tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import random
import secrets
import socket
import struct
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from ferryd.linux import SIOCOUTQ, SO_BUF_LOCK, SO_PEEK_OFF, TCP_TIMESTAMP

_INT = struct.Struct("i")
_LINGER_ABORT = struct.pack("ii", 1, 0)
# The flags as plain ints, combined once: ``|`` on the socket module's
# MsgFlag members runs enum.Flag.__or__ in Python, about a microsecond and a
# half per call, on every send, peek and discard of the data path.
_SEND_FLAGS = int(socket.MSG_DONTWAIT) | int(socket.MSG_NOSIGNAL)
_PEEK_FLAGS = int(socket.MSG_PEEK) | int(socket.MSG_DONTWAIT)
_DISCARD_FLAGS = int(socket.MSG_TRUNC) | int(socket.MSG_DONTWAIT)


class HostSocket(Protocol):
    """What the TCP core asks of its host socket's kernel, one call per operation.

    Errors are the kernel's: :class:`BlockingIOError` where a non-blocking
    socket call would block, another :class:`OSError` when the socket failed
    (reset by its peer, say).
    """

    def fileno(self) -> int:
        """The descriptor the adapter waits on (-1 once closed)."""
        ...

    def write(self, data: memoryview) -> int:
        """Non-blocking send: how many bytes of ``data`` the kernel took."""
        ...

    def peek(self, buf: memoryview, n: int) -> int:
        """Copy up to ``n`` bytes from the peek offset into ``buf``, advancing it.

        0 at end of file; :class:`BlockingIOError` when no byte is there.
        """
        ...

    def discard(self, n: int) -> None:
        """Drop ``n`` bytes from the head of the receive queue (acknowledged by the guest)."""
        ...

    def set_peek_offset(self, offset: int) -> None: ...

    def set_rcvlowat(self, n: int) -> None: ...

    def sndbuf(self) -> int:
        """The send buffer's size (SO_SNDBUF)."""
        ...

    def outq(self) -> int:
        """Bytes in the send queue, sent or not (SIOCOUTQ)."""
        ...

    def shutdown_write(self) -> None: ...

    def connect_error(self) -> int:
        """The outcome of a non-blocking connect() (SO_ERROR): 0 or an errno."""
        ...

    def timestamp(self) -> int:
        """The socket's TCP timestamp clock (TCP_TIMESTAMP), in ms, mod 2**32."""
        ...

    def hang_up(self, *, abort: bool) -> None:
        """Close the socket; ``abort``: with a RST to the peer (SO_LINGER {1, 0})."""
        ...


class TailError(Exception):
    """A migrated socket's unsent bytes could not be written; the message says where and why."""


class UnsentTail(Protocol):
    def send_more(self) -> bool:
        """Write what the socket takes of the tail without blocking; True once all went.

        Raises :class:`TailError` if the socket failed.
        """
        ...


class Entropy(Protocol):
    def getrandbits(self, k: int, /) -> int: ...

    def random(self) -> float: ...


class _SystemEntropy:
    """Initial sequence numbers from the CSPRNG (RFC 6528: off-path guessing);
    jitter, drawn on every ACK, from the fast PRNG."""

    getrandbits = staticmethod(secrets.randbits)
    random = staticmethod(random.random)


SYSTEM_ENTROPY: Entropy = _SystemEntropy()


Owner = TypeVar("Owner")


#: What discard() receives into. MSG_TRUNC copies nothing for TCP, but
#: recv_into() wants a buffer as long as what it drops: an anonymous mapping
#: that nothing ever writes stays unbacked, address space and no memory.
_DISCARD = memoryview(mmap.mmap(-1, 1 << 20))


class SocketHost(socket.socket, Generic[Owner]):
    """The real :class:`HostSocket`: a non-blocking TCP socket of the host, itself.

    A socket rather than an object holding one: the two were 176 bytes of
    pymalloc a connection, this is 112 (bench.memory). The port's own names
    (``write``, ``hang_up``) leave the socket's ``send`` and ``close`` as
    they are, for the migration's kernel calls. ``before_close(owner)``
    runs just before :meth:`hang_up` closes it, so that the adapter takes
    the descriptor out of its epoll while the number is still this
    socket's (the kernel reuses it at once). One callable shared by every
    connection and the owner it is called with, rather than a closure per
    connection: a closure and its two cells cost ~270 bytes a flow, a tenth
    of an idle flow's memory (bench.memory).
    """

    __slots__ = ("before_close", "owner")

    def __init__(
        self, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None
    ) -> None:
        super().__init__(family, type, proto, fileno)
        self.before_close: Callable[[Owner], None] | None = None
        self.owner: Owner | None = None

    @classmethod
    def taking(cls, sock: socket.socket) -> SocketHost[Owner]:
        """A SocketHost on ``sock``'s descriptor, which ``sock`` gives up (detach)."""
        return cls(sock.family, sock.type, sock.proto, sock.detach())

    def write(self, data: memoryview) -> int:
        return self.send(data, _SEND_FLAGS)

    def peek(self, buf: memoryview, n: int) -> int:
        return self.recv_into(buf, n, _PEEK_FLAGS)

    def discard(self, n: int) -> None:
        # For TCP, MSG_TRUNC discards instead of copying (tcp_recvmsg); the
        # buffer is only there to satisfy the API (recv(n) would allocate n
        # bytes per call, which for megabytes means an mmap and page faults).
        # Discarding moves the peek offset back as much (sk_peek_offset_bwd).
        buf = _DISCARD
        while n > 0:
            got = self.recv_into(buf, min(n, len(buf)), _DISCARD_FLAGS)
            if got <= 0:
                break
            n -= got

    def set_peek_offset(self, offset: int) -> None:
        self.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, offset)

    def set_rcvlowat(self, n: int) -> None:
        self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)

    def sndbuf(self) -> int:
        return self.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def outq(self) -> int:
        value: int = _INT.unpack(fcntl.ioctl(self.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
        return value

    def shutdown_write(self) -> None:
        self.shutdown(socket.SHUT_WR)

    def connect_error(self) -> int:
        return self.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def timestamp(self) -> int:
        return self.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF

    def hang_up(self, *, abort: bool) -> None:
        if abort:
            with contextlib.suppress(OSError):
                self.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        if self.before_close is not None and self.owner is not None:
            self.before_close(self.owner)
        self.close()


def bound_queues(sock: socket.socket, limit: int | None) -> None:
    """Cap ``sock``'s receive and send buffers at ``limit`` bytes each, or (None) undo it.

    Why: what a busy connection holds in its kernel queues crosses in a
    migration's downtime. Smaller buffers make the peer's window (receive)
    and the one ferryd offers the guest (free send space, TcpConn) close, so
    the queues drain to what the limit allows while the guest still runs.
    socket(7): SO_RCVBUF and SO_SNDBUF double the value they are given
    (bookkeeping overhead): ``limit // 2`` gives sk_rcvbuf and sk_sndbuf of
    ``limit``; they also lock the sizes (no autotuning). A buffer made
    smaller than what is queued drops nothing: the excess drains and must
    still migrate byte-exact. Undone with SO_BUF_LOCK 0 (Linux 5.14): the
    kernel's autotuning grows the buffers again as traffic needs
    (tcp_rcv_space_adjust, tcp_sndbuf_expand); ferryd never locks them
    otherwise, and the sizes they had may exceed what SO_RCVBUF may set
    without CAP_NET_ADMIN (net.core.rmem_max).
    """
    if limit is None:
        sock.setsockopt(socket.SOL_SOCKET, SO_BUF_LOCK, 0)
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limit // 2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, limit // 2)
