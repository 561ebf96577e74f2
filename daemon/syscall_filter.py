"""ferryd's seccomp allow-list, installed once setup is done.

After the privilege drop (privileges.py) ferryd only moves bytes between a
tap, host sockets, its control socket and the repair helper. The filter
(libseccomp through pyseccomp, as ferry-repair's sandbox.py) allows the
syscalls that work needs and nothing else: no execve, no fork, no ptrace,
no mount, no bpf, no kill of another process, no file opened for writing
(unlink stays, for its own sockets at exit: the runas user owns nothing
else), no prctl, no namespace change. The list was collected, not guessed: the
integration suite (migrations both ways, rollbacks, forwards, UDP, ICMP,
DHCP, NDP) ran with a logging default action and every syscall the kernel
logged for ferryd is here (then: unlink at exit, and TCGETS).

Arguments are checked where a call has one dangerous use:

* ``openat`` only without write access, creation or truncation: CPython
  still imports lazily after setup (the migration modules, codecs), which
  must keep working; writing a file is never ferryd's business.
* ``ioctl`` only with the requests ferryd makes: queue lengths (SIOCINQ,
  SIOCOUTQ, SIOCOUTQNSD), the tap's queue switch (TUNSETQUEUE), FIONBIO,
  FIOCLEX and TCGETS (isatty). Not TIOCSTI, which would type into the
  terminal ferryd's stderr may be.
* ``prlimit64`` only on ferryd itself (pid 0).
* ``clone``/``clone3`` are not allowed at all: ferryd starts no thread and
  no process after setup.

A call outside the list fails with EPERM, and the filter carries
SECCOMP_FILTER_FLAG_LOG, so the kernel logs each refusal (``audit: type=1326
... syscall=N``, kernel.seccomp.actions_logged includes errno by default):
visible, but not fatal. Killing the process (SECCOMP_RET_KILL_PROCESS) would
be stricter, but then a rare path nobody exercised (a traceback formatter
opening a source file with an unusual flag, a new libc using a new syscall
for an old function) would take the guest's network down, and any such path
a guest can reach would let it stop the daemon, which item 2 of the hardening
rules out. EPERM denies the call just as firmly; the caller sees an OSError
that the frame and flow handlers already contain.

Only the native architecture's table is allowed (libseccomp kills on any
other, e.g. i386 syscalls through int 0x80). The filter is synchronised to
every thread (TSYNC; there is one).
"""

from __future__ import annotations

import errno
import os

from ferry_repair.seccomp_bindings import (
    ALLOW,
    CTL_LOG,
    CTL_TSYNC,
    EQ,
    MASKED_EQ,
    errno_action,
    new_filter,
    syscall_arg,
)
from ferryd.frontends.tap import TUNSETQUEUE
from ferryd.linux import SIOCINQ, SIOCOUTQ, SIOCOUTQNSD

#: What ferryd calls once set up (collected over the integration suite).
ALLOWED_SYSCALLS = (
    # trio's loop and wake-ups
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "poll", "ppoll",
    "eventfd2", "pipe2", "pipe",
    # descriptors and bytes
    "read", "readv", "write", "writev", "close", "close_range", "dup", "dup3", "fcntl",
    "lseek",
    # sockets: flows, listeners, control, repair helper, SCM_RIGHTS
    "socket", "bind", "listen", "connect", "accept", "accept4", "getsockname",
    "getpeername", "getsockopt", "setsockopt", "shutdown", "sendto", "recvfrom",
    "sendmsg", "recvmsg",
    # lazy imports (openat is checked below); unlink: its own sockets at exit
    "unlink", "newfstatat", "fstat", "stat", "lstat", "statx", "getdents64", "readlink", "getcwd",
    # CPython itself: memory, threads' locks, time, signals, exit
    "brk", "mmap", "munmap", "mremap", "madvise", "mprotect", "futex", "getpid",
    "gettid", "getuid", "geteuid", "getgid", "getegid", "getrandom", "clock_gettime",
    "clock_nanosleep", "nanosleep", "gettimeofday", "rt_sigaction", "rt_sigprocmask",
    "rt_sigreturn", "sigaltstack", "sched_yield", "exit", "exit_group",
    # A stop (SIGSTOP, a debugger, the cgroup freezer) during a timed poll(),
    # nanosleep or futex wait resumes it through restart_syscall
    # (-ERESTART_RESTARTBLOCK). ferryd's loop waits in epoll_wait, which
    # returns EINTR instead, so nothing needs it today; denied, the next such
    # wait would fail with EPERM after a stop (ferry-repair's GIL wait did and
    # glibc aborted it: ferry_repair.sandbox). It only resumes an allowed call.
    "restart_syscall",
)  # fmt: skip

# asm-generic/ioctls.h (the queue lengths and TUNSETQUEUE come from where they are used)
FIONBIO = 0x5421
FIOCLEX = 0x5451
TCGETS = 0x5401  # isatty(): io.open() asks, for every file a lazy import reads
ALLOWED_IOCTLS = (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD, FIONBIO, FIOCLEX, TUNSETQUEUE, TCGETS)

#: openat(2) flags that write, create or truncate (O_ACCMODE's write bits too).
_WRITING = (
    os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_TMPFILE", 0)
)


def install_syscall_filter() -> None:
    """Allow only ferryd's syscalls from now on, irrevocably, in every thread."""
    rules = new_filter(errno_action(errno.EPERM))
    rules.set_attr(CTL_LOG, 1)
    rules.set_attr(CTL_TSYNC, 1)
    for name in ALLOWED_SYSCALLS:
        rules.add_rule(ALLOW, name)
    rules.add_rule(ALLOW, "openat", syscall_arg(2, MASKED_EQ, _WRITING, 0))
    # getrlimit() (glibc: prlimit64 on ourselves): the descriptor budget may
    # be looked at again later; another process's limits never.
    rules.add_rule(ALLOW, "prlimit64", syscall_arg(0, EQ, 0))
    for request in ALLOWED_IOCTLS:
        rules.add_rule(ALLOW, "ioctl", syscall_arg(1, EQ, request))
    rules.load()
