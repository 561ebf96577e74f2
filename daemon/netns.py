"""Run a function inside another network namespace, from one thread.

Python 3.11 has no ``os.setns`` (3.12 does), so libc's setns(2) is called
through ctypes. setns(CLONE_NEWNET) changes only the calling thread's
namespace (setns(2): "the calling thread"), so the work runs in a fresh
thread that is discarded afterwards: the rest of ferryd, and trio's own
threads, never leave the host namespace. File descriptors opened there keep
pointing into the target namespace (a tap device, a netlink socket), which
is the point.

Needs CAP_SYS_ADMIN over the target namespace's user namespace, so it runs
during setup, before ferryd drops its capabilities.
"""

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Call ``fn()`` in the network namespace at ``path`` and return its result."""
    result: list[T] = []
    error: list[BaseException] = []

    def worker() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            error.append(exc)
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                error.append(OSError(err, f"setns({path}): {os.strerror(err)}"))
                return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=worker, name="ferry-netns")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
