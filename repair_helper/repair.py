"""Carry out one batch: check the descriptors, set TCP_REPAIR on each, close our copies.

The cost model decides the shape. On these machines a syscall costs about a
microsecond, and a direct setsockopt(TCP_REPAIR) is one syscall, so every
extra syscall per socket is a large share of the helper's overhead (the
target is at most twice the direct cost). Per descriptor the helper makes
exactly two: the getsockname() that CPython makes when wrapping a
descriptor in a socket object (it cannot be avoided, and it tells us the
address family for free), and the setsockopt() itself. Our copies are then
closed with one close_range(2) per batch when the kernel installed them as a
contiguous range, which it usually does since it hands out the lowest free
numbers (fs/file.c); otherwise one by one.

Checks, in two steps:

1. Before anything is changed, every descriptor must be a socket
   (getsockname() fails with ENOTSOCK otherwise) of family AF_INET or
   AF_INET6: pipes, files, Unix or netlink sockets refuse the whole batch
   untouched.
2. setsockopt(IPPROTO_TCP, TCP_REPAIR) is answered only by TCP (net/ipv4/
   tcp.c, do_tcp_setsockopt); UDP, raw (even opened with IPPROTO_TCP), ping,
   SCTP and MPTCP sockets answer ENOPROTOOPT or EOPNOTSUPP. The kernel also
   refuses a listening socket, or a socket of a network namespace over
   which we hold no CAP_NET_ADMIN (EPERM, tcp_can_repair_sock). Either way
   the batch is refused, but the sockets before the failing one have been
   switched: the client, which gets no reply for the batch, knows which
   sockets it held and rolls back. Checking the protocol up front would
   cost a third syscall per socket on every batch for the sake of a client
   bug.

Freezing intake. A socket in repair mode still receives and ACKs what the
peer sends (REFERENCE.md, checked): bytes that arrive after the dump would be
acknowledged by the source and exist nowhere else. So with repair ON the
helper first attaches a drop-all socket filter (the eBPF program of
dropall.py, loaded once at start-up; the classic one-instruction program
BPF_RET|BPF_K 0 where that cannot be loaded): segments are dropped before TCP sees them,
nothing is ACKed, and the peer retransmits to whoever owns the connection
next. With repair OFF it detaches the filter first (so the answer to the
kernel's window probe gets in), then clears TCP_REPAIR. The rule is simple:
a socket in repair mode hears nothing. Attaching a filter needs
CAP_NET_ADMIN on these kernels (checked: it fails with EPERM for a process
without capabilities, which ferryd is), so it belongs here. passt-repair
does not do this; ferryd says so when it finds itself talking to it.

Socket objects are only handles for setsockopt() and are detached, never
trusted for anything else.
"""

from __future__ import annotations

import _socket
import ctypes
import errno
import os
import socket
import struct

from repair_helper.dropall import SO_ATTACH_BPF
from repair_helper.protocol import TCP_REPAIR, Request, RequestRefused, close_fds

_INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
# struct sock_fprog {len = 1, filter = &{BPF_RET|BPF_K (0x06), 0, 0, k = 0}}:
# the kernel copies the program during setsockopt(), the buffer lives on.
_DROP_ALL_INSN = ctypes.create_string_buffer(struct.pack("=HBBI", 0x06, 0, 0, 0), 8)
DROP_ALL_FPROG = struct.pack("@HP", 1, ctypes.addressof(_DROP_ALL_INSN))
_NOT_TCP_ERRNOS = (errno.ENOPROTOOPT, errno.EOPNOTSUPP)


_drop_all_bpf: int | None = None
"""The eBPF drop-all program's fd (dropall.py), once loaded; else the classic one is used."""


def use_drop_all_program(fd: int | None) -> None:
    """Attach the loaded eBPF program (see dropall.py) instead of compiling a classic one."""
    global _drop_all_bpf
    _drop_all_bpf = fd


def _freeze_intake(handle: _socket.socket) -> None:
    if _drop_all_bpf is not None:
        handle.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, _drop_all_bpf)
    else:
        handle.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, DROP_ALL_FPROG)


def carry_out_untrusted(request: Request) -> None:
    """Set TCP_REPAIR to ``request.command`` on every descriptor, then close them all.

    Raises :class:`RequestRefused` (the client's fault) if a descriptor is not
    an IPv4/IPv6 socket, before any socket is changed, or if the kernel
    refuses the option on one of them (not TCP, listening, not ours to
    repair). The descriptors are closed in every case.
    """
    handles: list[_socket.socket] = []
    try:
        for index, fd in enumerate(request.fds):
            handles.append(_inet_handle_untrusted(fd, index))
        value = int(request.command)
        for index, handle in enumerate(handles):
            try:
                if value == 1:
                    _freeze_intake(handle)
                    try:
                        handle.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, value)
                    except OSError:
                        _detach_filter(handle)  # a refused socket is left as it was
                        raise
                else:
                    _detach_filter(handle)
                    handle.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, value)
            except OSError as exc:
                raise _kernel_refusal(exc, index, value) from None
    finally:
        for handle in handles:
            handle.detach()
        _close_batch(request.fds)


def _detach_filter(handle: _socket.socket) -> None:
    try:
        handle.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: no filter attached
            raise


def _inet_handle_untrusted(fd: int, index: int) -> _socket.socket:
    """A detachable handle on ``fd``, which must be an IPv4 or IPv6 socket."""
    try:
        # Family -1: CPython takes it from the getsockname() it makes anyway.
        handle = _socket.socket(-1, socket.SOCK_STREAM, 0, fd)
    except OSError:
        raise RequestRefused(f"descriptor {index} of the batch is not a socket") from None
    if handle.family not in _INET_FAMILIES:
        handle.detach()
        raise RequestRefused(f"descriptor {index} of the batch is not a TCP socket")
    return handle


def _kernel_refusal(exc: OSError, index: int, value: int) -> RequestRefused:
    done = f"; descriptors 0..{index - 1} were switched" if index else ""
    if exc.errno in _NOT_TCP_ERRNOS:
        return RequestRefused(f"descriptor {index} of the batch is not a TCP socket{done}")
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    hint = (
        " (listening, or in a network namespace we hold no CAP_NET_ADMIN over?)"
        if exc.errno == errno.EPERM
        else ""
    )
    return RequestRefused(
        f"the kernel refused TCP_REPAIR={value} on descriptor {index} of the batch:"
        f" {name} {exc.strerror}{hint}{done}"
    )


def _close_batch(fds: tuple[int, ...]) -> None:
    low, high = min(fds), max(fds)
    if high - low + 1 == len(fds) == len(set(fds)):
        os.closerange(low, high + 1)
    else:
        close_fds(fds)
