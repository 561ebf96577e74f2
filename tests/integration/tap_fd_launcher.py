"""Open /dev/net/tun inside a network namespace, then exec a command in ours with it as fd 3.

Usage: ``python -m tests.integration.tap_fd_launcher (--netns PATH | --fd N) [--explicit]
-- COMMAND...``

What a root launcher (or a service manager) does for a ferryd that holds no
capability: the tun file binds to the namespace it is opened in
(tun_chr_open() keeps the opener's namespace; TUNSETIFF looks the tap up
there), so only the open() happens in the guest's namespace. The calling
thread enters it with setns(2) and comes back before exec, so the command
runs in the namespace this launcher started in (ferryd's host side).
The descriptor becomes 3 and, unless ``--explicit`` (then the command is
expected to carry ``--tap-fd 3`` itself), LISTEN_FDS=1 and LISTEN_PID name
the exec'd process (same pid), as sd_listen_fds(3) expects. ``--fd N``
passes an inherited descriptor instead, as systemd passes a stored one.
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(prog="tap_fd_launcher")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--netns", help="open /dev/net/tun in this namespace")
    source.add_argument("--fd", type=int, help="pass this inherited descriptor")
    parser.add_argument("--explicit", action="store_true", help="no LISTEN_* variables")
    parser.add_argument("command", nargs="+")
    opts = parser.parse_args(argv)
    fd = open_tun_in(opts.netns) if opts.netns else opts.fd
    if fd != 3:
        os.dup2(fd, 3)  # dup2 leaves the new descriptor inheritable
        os.close(fd)
    else:
        os.set_inheritable(fd, True)
    if not opts.explicit:
        os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="tap")
    os.execvp(opts.command[0], opts.command)


if __name__ == "__main__":
    main(sys.argv[1:])
