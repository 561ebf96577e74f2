"""Where clients come from: a socket we listen on, or one a daemon listens on.

``--listen PATH`` binds a Unix stream socket. The file is made writable by
everyone on purpose: the filesystem is not the gate, SO_PEERCRED is (see
peer.py), so a caller that is not allowed reaches the helper and is refused
with a log line instead of failing silently at connect(). A stale socket left
by a helper that died is replaced; one a live helper answers on is not.

``--connect PATH`` is passt-repair's mode: the daemon listens (passt on
``<socket>.repair``) and the helper connects. PATH may be a directory: the
helper then waits, with inotify, for a socket whose name ends in ``.repair``
to be created in it (one already there counts too), and retries connect()
while it is refused, since the daemon binds the path a moment before it
listens on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import stat
import struct
import time

REPAIR_SUFFIX = ".repair"
#: How long connect() keeps being retried on ECONNREFUSED for a socket that
#: appeared in a watched directory (bound, not yet listening).
CONNECT_RETRY_SECONDS = 10.0

# include/uapi/linux/inotify.h
_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
_INOTIFY_EVENT = struct.Struct("=iIII")  # wd, mask, cookie, len; then len bytes of name


class EndpointError(Exception):
    """The socket path given on the command line cannot be used (bad config)."""


def bind_listener(path: str) -> socket.socket:
    """A listening Unix stream socket at ``path``, replacing a stale one.

    A missing directory is created (mode 0755, like a systemd
    RuntimeDirectory), so ``--listen /run/ferry/repair.sock`` works on a
    fresh machine.
    """
    _remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        listener.bind(path)
        os.chmod(path, 0o666)
        listener.listen(socket.SOMAXCONN)
    except OSError as exc:
        listener.close()
        raise EndpointError(f"cannot listen on {path}: {exc.strerror}") from None
    return listener


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise EndpointError(f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise EndpointError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        # Nobody listens: left by a helper that died.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise EndpointError(f"another process already listens on {path}")


def connect_to_daemon(path: str) -> socket.socket:
    """Connect to the daemon's socket at ``path``, or in directory ``path`` once it appears."""
    try:
        is_directory = stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as exc:
        raise EndpointError(f"cannot use {path}: {exc.strerror}") from None
    if not is_directory:
        return _connect(path, retry_refused=False)
    return _connect(_wait_for_repair_socket(path), retry_refused=True)


def _connect(path: str, *, retry_refused: bool) -> socket.socket:
    deadline = time.monotonic() + CONNECT_RETRY_SECONDS
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            if retry_refused and exc.errno == errno.ECONNREFUSED and time.monotonic() < deadline:
                time.sleep(0.01)  # bound, not listening yet: the daemon is starting
                continue
            raise EndpointError(f"cannot connect to {path}: {exc.strerror}") from None
        return sock


def _wait_for_repair_socket(directory: str) -> str:
    """Path of a ``*.repair`` socket in ``directory``, waiting for one to be created."""
    libc = ctypes.CDLL(None, use_errno=True)
    inotify: int = libc.inotify_init1(os.O_CLOEXEC)
    if inotify < 0:
        raise EndpointError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
    try:
        # Watch first, then look: a socket created in between is seen either way.
        if libc.inotify_add_watch(inotify, os.fsencode(directory), _IN_CREATE | _IN_MOVED_TO) < 0:
            raise EndpointError(f"cannot watch {directory}: {os.strerror(ctypes.get_errno())}")
        for name in sorted(os.listdir(directory)):
            found = _repair_socket(directory, name)
            if found is not None:
                return found
        while True:
            events = os.read(inotify, 64 * 1024)
            offset = 0
            while offset + _INOTIFY_EVENT.size <= len(events):
                _, _, _, length = _INOTIFY_EVENT.unpack_from(events, offset)
                start = offset + _INOTIFY_EVENT.size
                raw_name = events[start : start + length].split(b"\0", 1)[0]
                offset = start + length
                found = _repair_socket(directory, os.fsdecode(raw_name))
                if found is not None:
                    return found
    finally:
        os.close(inotify)


def _repair_socket(directory: str, name: str) -> str | None:
    if not name.endswith(REPAIR_SUFFIX):
        return None
    path = os.path.join(directory, name)
    try:
        return path if stat.S_ISSOCK(os.lstat(path).st_mode) else None
    except OSError:
        return None  # gone again
