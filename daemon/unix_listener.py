"""A Unix listening socket at a path: the control socket's and the stream frontend's.

Both are made the same way, before the privilege drop and without a worker
thread (capset(2) changes the calling thread only, and trio binds a Unix
path in a thread): a socket file a dead process left is replaced, a live
one (or anything that is not a socket) is never taken over, the file's
mode is tightened before listen() so nobody connects earlier, and at exit
the file is removed only if it is still ours. :func:`listen_at` does it
all in that order; its callers (the control socket, the stream and
vhost-user frontends' ``--socket``, ``--repair-listen``) word the errors,
each with its own option and exception, from :class:`ListenError`.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import socket
import stat

__all__ = [
    "ListenError",
    "ListenFailure",
    "PathState",
    "bind_listener",
    "group_mode",
    "listen_at",
    "probe_path",
    "remove_stale",
    "unlink_if_ours",
]

log = logging.getLogger("ferryd.unix_listener")


class PathState(enum.Enum):
    ABSENT = "absent"
    STALE = "stale"
    """A socket file nobody listens on (its process is gone)."""
    LIVE = "live"
    NOT_SOCKET = "not a socket"


def probe_path(path: str) -> PathState:
    """What is at ``path``; raises OSError when that cannot be told.

    The probe never waits: a non-blocking connect() to a listener whose
    backlog is full fails with EAGAIN (unix_wait_for_peer), and that
    listener is very much alive.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return PathState.ABSENT
    if not stat.S_ISSOCK(st.st_mode):
        return PathState.NOT_SOCKET
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return PathState.STALE
    except BlockingIOError:
        return PathState.LIVE
    finally:
        probe.close()
    return PathState.LIVE


def remove_stale(path: str) -> None:
    log.info("removing the stale socket %s", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def bind_listener(
    path: str, backlog: int, mode: int = 0o600
) -> tuple[socket.socket, os.stat_result]:
    """A non-blocking listener at ``path`` (``mode``) and what it is on disk.

    Raises OSError (the socket closed) if it cannot be made.
    """
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        raw.bind(path)
        # Not listening yet, so nobody can connect before the mode is tight.
        os.chmod(path, mode)
        bound = os.lstat(path)
        raw.listen(backlog)
        raw.setblocking(False)
    except BaseException:
        raw.close()
        raise
    return raw, bound


class ListenFailure(enum.Enum):
    """Why :func:`listen_at` made no listener."""

    LIVE = "another process listens there"
    NOT_SOCKET = "it exists and is not a socket"
    PROBE = "cannot tell whether it is in use"
    BIND = "cannot bind"


class ListenError(Exception):
    """No listener at ``path``: :attr:`failure` says why, :attr:`error` the OSError if any."""

    def __init__(self, path: str, failure: ListenFailure, error: OSError | None = None) -> None:
        super().__init__(f"{path}: {failure.value}" + (f": {error}" if error else ""))
        self.path = path
        self.failure = failure
        self.error = error


def listen_at(path: str, backlog: int, mode: int = 0o600) -> tuple[socket.socket, os.stat_result]:
    """:func:`bind_listener` at ``path`` after :func:`probe_path`: a stale socket
    file is replaced (:func:`remove_stale`), a live one or anything not a
    socket never is. Raises :class:`ListenError` (nothing bound)."""
    try:
        state = probe_path(path)
    except OSError as exc:
        raise ListenError(path, ListenFailure.PROBE, exc) from exc
    if state is PathState.LIVE:
        raise ListenError(path, ListenFailure.LIVE)
    if state is PathState.NOT_SOCKET:
        raise ListenError(path, ListenFailure.NOT_SOCKET)
    if state is PathState.STALE:
        remove_stale(path)
    try:
        return bind_listener(path, backlog, mode)
    except OSError as exc:
        raise ListenError(path, ListenFailure.BIND, exc) from exc


def group_mode() -> int:
    """0660 less this process's umask: a socket its group may connect to when the umask allows.

    For the socket another user's process must reach (QEMU's vhost-user
    socket, under ferryd@.service: UMask=0007, and QEMU's user in ferryd's
    group). Started by hand with the usual umask 022 the result, 0640,
    lets only the owner connect (connect() needs write access, unix(7)),
    as 0600 does. Read from /proc (Linux >= 4.7), because umask(2) can
    only read it by changing it.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return 0o660 & ~int(line.split()[1], 8)
    raise OSError(errno.ENOENT, "no Umask: line in /proc/self/status")


def unlink_if_ours(path: str, bound: os.stat_result) -> None:
    """Remove the socket file unless another process has made its own there since."""
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
            os.unlink(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM):
            log.warning("cannot remove %s: %s", path, exc)
