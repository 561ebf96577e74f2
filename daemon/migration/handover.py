"""A migration stream that carries the sockets themselves: source and target
in one network namespace.

Between hosts a connection travels as its socket's kernel state: dumped in
repair mode on the source, restored into a new socket on the target
(ferryd.migration.sockstate). In one namespace that cannot be done without a
gap: the target's connect() of a 4-tuple fails while the source's socket
exists (EADDRNOTAVAIL), so the source had to close each socket before its
twin was restored, and a peer segment arriving in between was answered with
a RST by the kernel (no socket for it) and the connection was lost.

In one namespace the socket itself can go instead. The coordinator gives the
two daemons the ends of a Unix stream socketpair rather than a pipe, and the
source sends each chunk of records together with the descriptors of the
connections that chunk names (SCM_RIGHTS, unix(7)). Nothing is frozen, dumped
or repaired: the kernel's socket goes on as it was, its queues with it, the
peer's segments land in it throughout, and its ACKs are the kernel's as
always. What the stream carries for such a connection is only ferryd's own
state of the guest's side (TcpFlowRecord.handed_over). Both daemons hold the
socket until the migration ends: a rollback on the source finds it where it
was, and the target's copy goes with a plain close(), which only drops a
reference (the socket ends with the last one).

Ordering: the kernel attaches a sendmsg()'s descriptors to its first bytes,
and a reader gets them with the recvmsg() that reaches those bytes
(unix_stream_read_generic stops after the message that carried them), so
every descriptor is in hand before the first byte of the chunk that names it
is decoded: the n-th handed-over record takes the n-th descriptor.

The datagram sockets go the same way (stream version 4): a UDP forward's
listening sockets, each outbound UDP flow's connected socket and each echo
flow's ping socket. Closed on the source and bound again on the target, as
they were before, a datagram arriving in between met no socket and was lost
(and the kernel answered it with an ICMP port unreachable); handed over,
it waits in the socket's queue for the target's resume.

Hostile input: what arrives is whatever the other end sent. Every
descriptor that is not a socket of the kind its record names (TCP, UDP, or
a ping socket of the record's family) is refused (closed) and fails the
stream; so does a record without a descriptor, descriptors without records
at the end, and a truncated control message (the kernel then closed the
descriptors that did not fit: MSG_CTRUNC).
"""

from __future__ import annotations

import array
import collections
import os
import socket
import stat
from collections.abc import Sequence
from typing import Any, TypeVar

import trio

from ferryd.flows.tcp_host import SocketHost
from ferryd.migration.errors import StreamRejected

#: Descriptors one recvmsg() may bring: SCM_MAX_FD (include/net/scm.h); a
#: source sends at most FLUSH_RECORDS (64) per chunk.
MAX_FDS_PER_MESSAGE = 253
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)

_S = TypeVar("_S", bound=socket.socket)
_INET = (socket.AF_INET, socket.AF_INET6)
#: What a socket handed over for a record of each protocol must be: its
#: families and type (a ping socket is SOCK_DGRAM, icmp(7)).
_KINDS = {
    socket.IPPROTO_TCP: (_INET, socket.SOCK_STREAM),
    socket.IPPROTO_UDP: (_INET, socket.SOCK_DGRAM),
    socket.IPPROTO_ICMP: ((socket.AF_INET,), socket.SOCK_DGRAM),
    socket.IPPROTO_ICMPV6: ((socket.AF_INET6,), socket.SOCK_DGRAM),
}
_NAMES = {
    socket.IPPROTO_TCP: "TCP",
    socket.IPPROTO_UDP: "UDP",
    socket.IPPROTO_ICMP: "ping (ICMP)",
    socket.IPPROTO_ICMPV6: "ping (ICMPv6)",
}


def is_socket(fd: int) -> bool:
    """Whether ``fd`` is a socket (a handover stream) rather than a pipe."""
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


class HandoverStream:
    """The stream of a migration within one namespace: records and the sockets they name.

    Owns ``fd`` (a connected Unix stream socket: :func:`is_socket` tells it from a
    pipe, which can carry no descriptors) and every descriptor received
    and not yet taken. Sends as trio's FdStream does (:meth:`send_all`, with
    descriptors for the chunk) and receives with :meth:`receive_some`,
    keeping the descriptors that came for :meth:`take`.
    """

    def __init__(self, fd: int) -> None:
        self._sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        self._received: collections.deque[int] = collections.deque()

    async def send_all(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``data``, the descriptors ``fds`` (at most MAX_FDS_PER_MESSAGE) with its
        first bytes."""
        view = memoryview(data)
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            view = view[await self._sock.sendmsg([view], ancillary) :]
        while view:
            view = view[await self._sock.send(view) :]

    async def receive_some(self, max_bytes: int) -> bytes:
        """Bytes of the stream (b"" at its end); the descriptors that came with them are kept."""
        data, ancillary, flags, _ = await self._sock.recvmsg(
            max_bytes, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._received.extend(fds)
        if flags & socket.MSG_CTRUNC:
            # (The kernel closed those that did not fit: scm_detach_fds.)
            raise StreamRejected(
                "sockets of the handover stream were lost on the way in: more than"
                f" {MAX_FDS_PER_MESSAGE} in one message, or this ferryd's descriptor limit"
            )
        return data

    def take(self) -> SocketHost[Any]:
        """The next socket received, for the next handed-over TCP record (StreamRejected
        if there is none, or it is not a TCP socket: the caller names the record)."""
        sock: SocketHost[Any] = self._take(SocketHost, socket.IPPROTO_TCP)
        return sock

    def take_datagram(self, proto: int) -> socket.socket:
        """The next socket received, for a handed-over UDP (``proto`` IPPROTO_UDP) or
        echo record (IPPROTO_ICMP or IPPROTO_ICMPV6: a ping socket of that family);
        StreamRejected as :meth:`take`."""
        return self._take(socket.socket, proto)

    def _take(self, cls: type[_S], proto: int) -> _S:
        if not self._received:
            raise StreamRejected("handed over, but no socket came with its record")
        fd = self._received.popleft()
        try:
            sock = cls(fileno=fd)
        except OSError as exc:  # not a socket at all (ENOTSOCK)
            os.close(fd)
            raise StreamRejected("the descriptor handed over is not a socket") from exc
        family, kind = _KINDS[proto]
        if sock.family not in family or sock.type != kind or sock.proto != proto:
            sock.close()
            raise StreamRejected(f"the socket handed over is not a {_NAMES[proto]} socket")
        return sock

    def left(self) -> int:
        """Descriptors received that no record took (closed by :meth:`aclose`)."""
        return len(self._received)

    async def aclose(self) -> None:
        while self._received:
            os.close(self._received.popleft())
        self._sock.close()
        await trio.lowlevel.checkpoint()
