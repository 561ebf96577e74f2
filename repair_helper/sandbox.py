"""Confinement: keep CAP_NET_ADMIN and nothing else, then allow-list syscalls.

ferry-repair is the only privileged process of the system, so it gives up
all it can, in two steps:

1. :func:`drop_capabilities`, at start, before touching any path or socket:
   every capability but CAP_NET_ADMIN leaves the bounding set (if we hold
   CAP_SETPCAP, which root does), then the inheritable set is emptied (which
   also empties the ambient set) and the permitted and effective sets are
   cut down to CAP_NET_ADMIN. TCP_REPAIR needs exactly that one
   (net/ipv4/tcp.c, tcp_can_repair_sock). Then no_new_privs (an execve()
   can grant nothing, so the bounding set no longer matters either) and
   non-dumpable (no core file, no ptrace by same-uid processes). The result
   is read back from /proc/self/status and checked. These moves, shared
   with ferryd's privileges.py, are in capabilities.py.
2. :func:`install_seccomp`, once the listener or the connection exists and
   the closer thread runs (closer.py), in every thread (TSYNC):
   a seccomp filter (libseccomp, through pyseccomp's ctypes bindings) that
   allows only the syscalls the serving loop makes. setsockopt() is allowed
   only for (IPPROTO_TCP, TCP_REPAIR) and the SOL_SOCKET options repair.py
   sets (filters, SO_REUSEADDR, SO_LINGER), getsockopt() only at SOL_SOCKET
   level (SO_PEERCRED, SO_COOKIE); bpf() only for the armed filter's map
   updates (armed.py); no socket(), connect(), open(), execve(), no
   filesystem at all. (Measured: with the filter on, a batch costs about a
   fifth more, mostly the kernel's slower syscall entry for filtered tasks;
   the helper stays within its budget of twice the direct cost.)

Anything else fails with EPERM rather than killing the process: CPython
makes rare calls on paths nobody can test exhaustively (formatting a
traceback opens source files, say), and EPERM denies the call just as
firmly while keeping the helper alive and able to log what went wrong.
Only the native architecture's syscall table is allowed (libseccomp kills
on any other, e.g. i386 syscalls through int 0x80).
"""

from __future__ import annotations

import errno
import socket

import prctl

from ferry_repair.armed import RUNTIME_COMMANDS
from ferry_repair.capabilities import (
    capability_problem,
    limit_capabilities,
    lock_down,
    shrink_bounding_set,
)
from ferry_repair.dropall import SO_ATTACH_BPF
from ferry_repair.protocol import TCP_REPAIR
from ferry_repair.repair import SO_ATTACH_FILTER, SO_DETACH_FILTER
from ferry_repair.seccomp_bindings import (
    ALLOW,
    CTL_TSYNC,
    EQ,
    errno_action,
    new_filter,
    syscall_arg,
)

_AT_EMPTY_PATH = 0x1000  # include/uapi/linux/fcntl.h

#: What the serving loop (server.py, repair.py, logging to stderr) calls,
#: collected with strace over the test suite; arguments are checked below for
#: the socket options.
ALLOWED_SYSCALLS = (
    # the loop: epoll (selectors), accept, messages, replies; the closer thread
    # (closer.py, started before the filter): its queue (futex), close
    "epoll_wait", "epoll_pwait", "epoll_ctl", "accept4", "accept", "recvmsg", "recvfrom",
    "sendmsg", "sendto", "getsockname", "close", "close_range",
    # the batch's checks (repair.py): the owner of each socket (fstat; newfstatat
    # below), undoing a racing caller
    "fstat", "shutdown",
    # CPython itself: memory, signals, time, log lines, exit
    "brk", "mmap", "munmap", "mremap", "madvise", "futex", "getpid", "gettid",
    "rt_sigreturn", "rt_sigprocmask", "clock_gettime", "write", "exit", "exit_group",
    # A stop (SIGSTOP, a debugger, the cgroup freezer) that interrupts a timed
    # wait makes the kernel resume it through restart_syscall
    # (-ERESTART_RESTARTBLOCK, kernel/signal.c): the GIL's timed futex wait
    # while the closer thread runs, say. Denied, that futex call returns
    # EPERM, glibc aborts ("The futex facility returned an unexpected error
    # code"), and with tgkill denied abort() ends on hlt: SIGSEGV, every
    # caller's batch lost (seen: two stops under load). It only resumes a call
    # the filter allowed when it began. writev: glibc's fatal messages.
    "restart_syscall", "writev",
)  # fmt: skip


class SandboxError(Exception):
    """The helper cannot confine itself as required (bad config: missing capability)."""


def drop_capabilities() -> None:
    """Keep only CAP_NET_ADMIN, set no_new_privs and non-dumpable; check the result."""
    if not prctl.cap_permitted.net_admin:
        raise SandboxError(
            "CAP_NET_ADMIN is not in our permitted set: run ferry-repair as root"
            " or with CAP_NET_ADMIN as an ambient capability"
        )
    kept = (prctl.CAP_NET_ADMIN,)
    shrink_bounding_set(kept)
    limit_capabilities(kept)
    lock_down()
    problem = capability_problem(kept)
    if problem is not None:
        raise SandboxError(f"{problem} after dropping capabilities")


def install_seccomp() -> None:
    """Allow only the syscalls of the serving loop, from now on, irrevocably, in every thread."""
    rules = new_filter(errno_action(errno.EPERM))
    # The closer thread (closer.py) exists already: without TSYNC the filter
    # would confine only the calling thread, and the closer would keep every
    # syscall, with CAP_NET_ADMIN.
    rules.set_attr(CTL_TSYNC, 1)
    for name in ALLOWED_SYSCALLS:
        rules.add_rule(ALLOW, name)
    rules.add_rule(
        ALLOW, "setsockopt", syscall_arg(1, EQ, socket.IPPROTO_TCP), syscall_arg(2, EQ, TCP_REPAIR)
    )
    # intake freeze, forced reuse dropped, linger off before close: repair.py
    for option in (
        SO_ATTACH_FILTER,
        SO_ATTACH_BPF,
        SO_DETACH_FILTER,
        socket.SO_REUSEADDR,
        socket.SO_LINGER,
    ):
        rules.add_rule(
            ALLOW, "setsockopt", syscall_arg(1, EQ, socket.SOL_SOCKET), syscall_arg(2, EQ, option)
        )
    rules.add_rule(ALLOW, "getsockopt", syscall_arg(1, EQ, socket.SOL_SOCKET))
    # the armed filter's map (armed.py): updates and deletes only, never a load
    for command in RUNTIME_COMMANDS:
        rules.add_rule(ALLOW, "bpf", syscall_arg(0, EQ, command))
    # glibc's fstat(fd) is newfstatat(fd, "", buf, AT_EMPTY_PATH), which the
    # owner check makes (repair.py). The rule checks only the flags: seccomp
    # cannot read the path (a pointer), and with AT_EMPTY_PATH a non-empty
    # path is still looked up, so newfstatat(AT_FDCWD, "/any/path", buf,
    # AT_EMPTY_PATH) would be allowed. What it keeps out is glibc's stat() and
    # lstat() (flags 0 and AT_SYMLINK_NOFOLLOW), i.e. CPython's os.stat(path);
    # not every stat of a path. Only the helper's own code makes these calls
    # (a caller supplies descriptors, never paths), and stat reveals metadata
    # only: open() and every other path syscall stay denied.
    rules.add_rule(ALLOW, "newfstatat", syscall_arg(3, EQ, _AT_EMPTY_PATH))
    rules.load()
