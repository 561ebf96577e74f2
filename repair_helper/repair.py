"""Carry out one batch: check the descriptors, set TCP_REPAIR on each.

The cost model decides the shape. On these machines a syscall costs about a
microsecond, and a direct setsockopt(TCP_REPAIR) is one syscall, so every
extra syscall per socket is a large share of the helper's overhead. Per
descriptor the helper makes: the getsockname() that CPython makes when
wrapping a descriptor in a socket object (it cannot be avoided, and it tells
us the address family for free), the fstat() of the owner check (not for a
root caller), the filter and TCP_REPAIR setsockopt()s, and, for repair ON,
the two getsockname() and the SO_REUSEADDR that keep a caller from binding
over other users' ports (below). Our copies are closed afterwards by the
server (closer.py, or the loop for a repair-ON batch), not here.

Checks, in two steps:

1. Before anything is changed, every descriptor must be a socket
   (getsockname() fails with ENOTSOCK otherwise) of family AF_INET or
   AF_INET6, owned by the caller, and for repair ON bound: pipes, files,
   Unix or netlink sockets, other users' or unbound sockets refuse the
   whole batch untouched.
2. setsockopt(IPPROTO_TCP, TCP_REPAIR) is answered only by TCP (net/ipv4/
   tcp.c, do_tcp_setsockopt); UDP, raw (even opened with IPPROTO_TCP), ping,
   SCTP and MPTCP sockets answer ENOPROTOOPT or EOPNOTSUPP. The kernel also
   refuses a listening socket, or a socket of a network namespace over
   which we hold no CAP_NET_ADMIN (EPERM, tcp_can_repair_sock). Either way
   the batch is refused, but the sockets before the failing one have been
   switched: the client, which gets no reply for the batch, knows which
   sockets it held and rolls back. Checking the protocol up front would
   cost another syscall per socket on every batch for the sake of a client
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

What an allowed caller gets, and what it does not (issue 9, item 5).
TCP_REPAIR=1 also sets the socket's sk_reuse to SK_FORCE_REUSE
(do_tcp_setsockopt), and a socket so marked may bind() any port whatever is
bound there, another user's listener included (inet_csk_get_port): a caller
could bind its repair-mode socket to root's service port, listen, and take
root's clients. Requiring the socket to be bound already is not enough on
its own (a connected socket whose port the kernel chose loses it again on
connect(AF_UNSPEC), tcp_disconnect → inet_put_port, and is unbound in repair
mode). So, unless ``--allow-forced-reuse`` (passt compatibility) says
otherwise:

* every descriptor must belong to the caller: the socket inode's owner
  (fstat's st_uid, the creator's fsuid, sock_alloc) must be the caller's uid
  from SO_PEERCRED. A root caller is spared: uid 0 owns the system's files
  and can subvert it whatever capabilities it lacks, so the rule would
  protect nothing from it;
* repair ON only for a socket bound to a non-zero port (getsockname), so no
  bind() of the caller can come after it: a second bind() fails with EINVAL
  (inet_bind: inet_num is set). The migration target binds before asking;
* right after TCP_REPAIR=1 the helper sets SO_REUSEADDR=1, which replaces
  SK_FORCE_REUSE by SK_CAN_REUSE (sk_setsockopt): the socket keeps only the
  address reuse any unprivileged process may ask for. Repair OFF sets
  SK_NO_REUSE anyway (do_tcp_setsockopt);
* the caller holds the same socket and may race the helper between those two
  setsockopt() calls (disconnect, bind, listen in a few microseconds). So the
  socket's address is read again at the end: if it moved, the caller raced
  us, and the helper undoes what it can (shutdown() stops a listener,
  tcp_disconnect → inet_csk_listen_stop; repair OFF clears the reuse) and
  refuses the batch.

A listener is never repaired: the kernel refuses TCP_REPAIR on a socket in
LISTEN (tcp_can_repair_sock), both ways. What a caller keeps is what repair
mode gives on its own sockets: queues and sequence numbers to read and set,
a connect() without handshake from an address it could bind anyway.

Closing without blocking (item 6). Nothing here closes a descriptor: the
server hands every batch to the closer thread (closer.py), except one just
put in repair mode, which it closes itself (server.py says why). close()
of a caller's descriptor can wait as long as the caller likes: a TCP
socket with SO_LINGER on and unsent data waits up to the linger time
(inet_release → tcp_close → sk_stream_wait_close), a Unix socket
releases what is queued on it (lingering sockets included), a file on a
FUSE mount waits for the FUSE server's flush (filp_close → f_op->flush).
Switching SO_LINGER off here first would not help either: the caller may
switch it on again before the close. In the closer thread such a close
holds up only the closer, never the serving loop.

Socket objects are only handles for setsockopt() and are detached, never
trusted for anything else.
"""

from __future__ import annotations

import _socket
import contextlib
import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass

from ferry_repair.armed import ArmedFilter, ArmedFilterError, ArmedKeys, socket_cookie
from ferry_repair.dropall import SO_ATTACH_BPF
from ferry_repair.protocol import TCP_REPAIR, RepairCommand, Request, RequestRefused

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


@dataclass(frozen=True)
class CallerRules:
    """What one caller may have done to its sockets (see the module docstring)."""

    owner_uid: int | None
    """Every descriptor must be owned by this uid; None: any owner (a root caller)."""
    forced_reuse: bool = False
    """passt compatibility: unbound sockets accepted, the kernel's forced reuse left on."""

    @classmethod
    def for_caller(cls, uid: int, *, forced_reuse: bool = False) -> CallerRules:
        return cls(None if uid == 0 else uid, forced_reuse)


def carry_out_untrusted(
    request: Request,
    rules: CallerRules,
    armed: ArmedFilter | None = None,
    keys: ArmedKeys | None = None,
) -> None:
    """Set TCP_REPAIR to ``request.command`` on every descriptor; for ARM, attach
    ``armed``'s program instead of detaching the filter, each key added to the map
    (passing) and to ``keys`` as it goes, so that a batch refused half-way leaves
    none in the map that its connection does not know of (server.py removes them).

    Raises :class:`RequestRefused` (the client's fault) if a descriptor is not
    an IPv4/IPv6 socket of the caller's (or, for repair ON, is not bound),
    before any socket is changed; or if the kernel refuses the option on one
    of them (not TCP, listening, not ours to repair); or if the caller moved
    a socket while it was being switched; or, for ARM, if there is no armed
    filter or its map is full. The descriptors stay open, in every case: the
    caller hands them to the closer thread (closer.py).
    """
    handles: list[_socket.socket] = []
    arm = request.command is RepairCommand.ARM
    if arm and (armed is None or keys is None):
        raise RequestRefused("ARM: this helper has no armed filter (no CAP_BPF at start-up)")
    value = request.command.repair_value
    guard = value == 1 and not rules.forced_reuse
    try:
        for index, fd in enumerate(request.fds):
            handles.append(_inet_handle_untrusted(fd, index))
        if rules.owner_uid is not None:
            for index, fd in enumerate(request.fds):
                _check_owner_untrusted(fd, index, rules.owner_uid)
        addresses = [_bound_address_untrusted(h, i) for i, h in enumerate(handles)] if guard else []
        for index, handle in enumerate(handles):
            try:
                if value == 1:
                    _freeze_intake(handle)
                    try:
                        handle.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, value)
                    except OSError:
                        _detach_filter(handle)  # a refused socket is left as it was
                        raise
                    if guard:
                        _drop_forced_reuse_untrusted(handle, index, addresses[index])
                elif arm:
                    assert armed is not None and keys is not None
                    cookie = socket_cookie(handle)
                    try:
                        armed.add(cookie)
                    except ArmedFilterError as exc:
                        raise RequestRefused(f"cannot arm descriptor {index}: {exc}") from None
                    keys.add(cookie)
                    # Replaces the drop-all filter: the armed one passes until frozen.
                    handle.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, armed.program_fd)
                    handle.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, value)
                else:
                    _detach_filter(handle)
                    handle.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, value)
            except OSError as exc:
                raise _kernel_refusal(exc, index, value) from None
    finally:
        for handle in handles:
            handle.detach()


def _check_owner_untrusted(fd: int, index: int, uid: int) -> None:
    owner = os.fstat(fd).st_uid
    if owner != uid:
        raise RequestRefused(
            f"descriptor {index} of the batch is owned by uid {owner}, not by the caller"
            f" (uid {uid}): a caller may only repair its own sockets"
        )


def _bound_address_untrusted(handle: _socket.socket, index: int) -> object:
    address = handle.getsockname()
    if address[1] == 0:
        raise RequestRefused(
            f"descriptor {index} of the batch is not bound: repair ON needs a socket bound"
            " to its port first (bind() in repair mode would ignore other users' sockets)"
        )
    return address


def _drop_forced_reuse_untrusted(handle: _socket.socket, index: int, address: object) -> None:
    """SK_FORCE_REUSE → SK_CAN_REUSE; refuse, and undo, if the caller rebound the socket."""
    try:
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if handle.getsockname() == address:
            return
    except OSError as exc:  # never seen; but forced reuse must not stay on
        reason = f"kept the kernel's forced address reuse ({exc.strerror})"
    else:
        # Bound elsewhere between TCP_REPAIR=1 and now, maybe listening there:
        # shutdown() stops a listener (tcp_disconnect → inet_csk_listen_stop).
        reason = "was rebound by the caller while repair went on"
        with contextlib.suppress(OSError):
            handle.shutdown(socket.SHUT_RDWR)
    # Repair OFF clears the forced reuse. Best effort: the batch is refused anyway.
    with contextlib.suppress(OSError):
        handle.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    with contextlib.suppress(OSError):
        _detach_filter(handle)
    raise RequestRefused(f"descriptor {index} of the batch {reason}")


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
