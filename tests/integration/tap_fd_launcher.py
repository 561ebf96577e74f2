"""Open /dev/net/tun inside a network namespace, then exec a command in ours with it as fd 3.

Usage: ``python -m tests.integration.tap_fd_launcher NETNS_PATH [--explicit] -- COMMAND...``

What a root launcher (or a service manager) does for a ferryd that holds no
capability: the tun file binds to the namespace it is opened in
(tun_chr_open() keeps the opener's namespace; TUNSETIFF looks the tap up
there), so only the open() happens in the guest's namespace. The calling
thread enters it with setns(2) and comes back before exec, so the command
runs in the namespace this launcher started in (ferryd's host side).
The descriptor becomes 3 and, unless ``--explicit`` (then the command is
expected to carry ``--tap-fd 3`` itself), LISTEN_FDS=1 and LISTEN_PID name
the exec'd process (same pid), as sd_listen_fds(3) expects.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_tun_in(netns: str) -> int:
    """/dev/net/tun opened inside ``netns``, the thread back in its own namespace."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            return os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def main(argv: list[str]) -> None:
    netns, *rest = argv
    explicit = rest[:1] == ["--explicit"]
    if explicit:
        rest = rest[1:]
    if rest[:1] != ["--"] or len(rest) < 2:
        raise SystemExit(__doc__)
    fd = open_tun_in(netns)
    if fd != 3:
        os.dup2(fd, 3)  # dup2 leaves the new descriptor inheritable
        os.close(fd)
    else:
        os.set_inheritable(fd, True)
    if not explicit:
        os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="tap")
    os.execvp(rest[1], rest[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
