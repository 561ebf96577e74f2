"""Carry out one batch: check every descriptor, set TCP_REPAIR on all, close our copies.

A batch is all-or-nothing as far as the helper can make it so: every
descriptor is checked *before* any is touched, so a batch holding one
descriptor that is not a TCP socket is refused whole and changes nothing.
Only a failure of the setsockopt() itself (say EPERM: the socket lives in a
network namespace where we lack CAP_NET_ADMIN) can leave a batch half done;
the helper then refuses it, and the client, which knows the batch, rolls back.

The check asks the TCP layer itself: getsockopt(IPPROTO_TCP, TCP_REPAIR).
Only a TCP socket answers it (net/ipv4/tcp.c, do_tcp_getsockopt); UDP, raw
(even one opened with protocol IPPROTO_TCP, which SO_PROTOCOL would pass),
MPTCP and Unix sockets answer EOPNOTSUPP, and anything that is not a socket
ENOTSOCK. Two syscalls per descriptor in all, which matters: the helper's whole
overhead over a direct setsockopt() is a handful of syscalls per socket.

Socket objects are built with an explicit family, type and protocol so that
Python does not query the kernel for them (it still checks with one
getsockname() that the descriptor is a socket at all); they are only
handles for getsockopt()/setsockopt() and are detached, never trusted for
anything else. Our copies are then closed, with one close_range(2) when the
kernel installed the batch as a contiguous range of descriptors, which it
usually does since it hands out the lowest free numbers (fs/file.c).
"""

from __future__ import annotations

import _socket
import errno
import os
import socket

from repair_helper.protocol import TCP_REPAIR, Request, RequestRefused, close_fds


def carry_out_untrusted(request: Request) -> None:
    """Set TCP_REPAIR to ``request.command`` on every descriptor, then close them all.

    Raises :class:`RequestRefused` (the client's fault) if a descriptor is not
    a TCP socket, before any socket is changed, or if the kernel refuses the
    option on one of them. The descriptors are closed in every case.
    """
    handles: list[_socket.socket] = []
    try:
        for index, fd in enumerate(request.fds):
            handles.append(_tcp_handle_untrusted(fd, index))
        value = int(request.command)
        for index, handle in enumerate(handles):
            try:
                handle.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, value)
            except OSError as exc:
                raise RequestRefused(
                    f"the kernel refused TCP_REPAIR={value} on descriptor {index} of the batch"
                    f" ({errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror})"
                    + (
                        " (a listening socket, or a network namespace we hold no CAP_NET_ADMIN in?)"
                        if exc.errno == errno.EPERM
                        else ""
                    )
                ) from None
    finally:
        for handle in handles:
            handle.detach()
        _close_batch(request.fds)


def _tcp_handle_untrusted(fd: int, index: int) -> _socket.socket:
    """A detachable handle on ``fd``, which must be a TCP socket."""
    try:
        # Python checks with getsockname() that fd is a socket (ENOTSOCK).
        handle = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    except OSError:
        raise RequestRefused(f"descriptor {index} of the batch is not a socket") from None
    try:
        handle.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR)
    except OSError:
        handle.detach()
        raise RequestRefused(f"descriptor {index} of the batch is not a TCP socket") from None
    return handle


def _close_batch(fds: tuple[int, ...]) -> None:
    low, high = min(fds), max(fds)
    if high - low + 1 == len(fds) == len(set(fds)):
        os.closerange(low, high + 1)
    else:
        close_fds(fds)
