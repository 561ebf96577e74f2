"""The process conventions a supervisor such as libvirt expects of passt: ``--daemonize``,
``--pid FILE`` and ``--log-file FILE``.

libvirt starts passt and waits for that process to end (virCommandRun in
qemu_passt.c): exit status 0 means the back-end is set up and its socket
listens, so QEMU may connect; anything else is a failed start. Then it
reads the daemon's pid from the ``--pid`` file, to put the daemon into the
VM's cgroup and, when the VM stops, to kill it (SIGTERM, then SIGKILL).
passt does this by forking once set up: the parent writes the child's pid
to the file and exits 0 (``__daemon()``, passt's util.c), the child
detaches (setsid) and points its standard streams at /dev/null.

ferryd cannot fork once set up: the last steps of its start-up run inside
trio (the control socket, QEMU's vhost-user server, the privilege drop,
the seccomp filter, which allows no fork), and forking a running trio
loop is undefined. So the order is turned around: ferryd forks *first*,
before any work, and the parent only waits on a pipe.

- The child detaches (setsid) and does the whole start-up. Once it
  serves, it writes its own pid to the file, writes one byte to the pipe,
  and points standard input and output (and standard error, unless
  ``--log-file`` took it) at /dev/null, so a caller that reads its output
  (virCommand's error buffer, subprocess.run) sees the end of it.
- The parent exits 0 on that byte. On end-of-file instead (the child
  failed before it was ready, and its one-line error went to the standard
  error it still shared with the caller) it waits for the child and exits
  with the child's status: 2 for a usage error, 1 for a runtime one.

Files are opened when ferryd starts, before the privilege drop and the
seccomp filter (which forbids opening a file for writing): the pid file
(created or truncated, mode 0644; its contents are written only once
ferryd is ready, as passt's are) and /dev/null. The pid file is removed
at exit if it is still the one ferryd made (the same inode: a newer
ferryd may have taken the name over) and ferryd may still remove it (a
``--runas`` user may not in a root-owned directory; passt never removes
its pid file, and libvirt removes it itself). ``--log-file`` becomes
ferryd's standard error at once (file descriptor 2, appended to, created
with mode 0600 as passt creates its log), so every line goes there: the
log handler's, and a start-up failure's.
"""

from __future__ import annotations

import logging
import os
import sys

from ferryd.exits import StartupError

__all__ = ["Background"]

log = logging.getLogger("ferryd.background")

_READY = b"R"


class Background:
    """This ferryd's pid file and readiness pipe; :meth:`start` makes it (and forks)."""

    def __init__(
        self,
        pid_file: str | None,
        pid_fd: int | None,
        notify_fd: int | None,
        devnull_fd: int | None,
        keep_stderr: bool,
    ) -> None:
        self._pid_file = pid_file
        self._pid_fd = pid_fd
        self._pid_inode = None if pid_fd is None else _inode(os.fstat(pid_fd))
        self._notify_fd = notify_fd
        self._devnull_fd = devnull_fd
        self._keep_stderr = keep_stderr

    @classmethod
    def start(cls, pid_file: str | None, daemonize: bool, log_file: str | None) -> Background:
        """Open the files; with ``daemonize``, fork: only the child returns.

        Raises StartupError (a file that cannot be opened, a failed fork).
        """
        if log_file is not None:
            _redirect_stderr(log_file)
        pid_fd = _open(pid_file, "--pid", 0o644, os.O_TRUNC) if pid_file else None
        if not daemonize:
            return cls(pid_file, pid_fd, None, None, keep_stderr=True)
        try:
            devnull_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise StartupError(f"--daemonize: cannot open {os.devnull}: {exc.strerror}") from exc
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            child = os.fork()
        except OSError as exc:
            raise StartupError(f"--daemonize: cannot fork: {exc.strerror}") from exc
        if child:
            os.close(write_end)
            _wait_for_child(read_end, child)  # exits
        os.close(read_end)
        os.setsid()
        return cls(pid_file, pid_fd, write_end, devnull_fd, keep_stderr=log_file is not None)

    def ready(self) -> None:
        """ferryd serves: write the pid file, release the waiting parent and the caller's
        standard streams (nothing here opens a file: the seccomp filter is in place)."""
        if self._pid_fd is not None:
            os.write(self._pid_fd, f"{os.getpid()}\n".encode())
            os.close(self._pid_fd)
            self._pid_fd = None
        if self._notify_fd is not None:
            os.write(self._notify_fd, _READY)
            os.close(self._notify_fd)
            self._notify_fd = None
        if self._devnull_fd is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            # dup3 (inheritable=False), not dup2: the seccomp filter allows only the former.
            for fd in (0, 1) if self._keep_stderr else (0, 1, 2):
                os.dup2(self._devnull_fd, fd, inheritable=False)
            os.close(self._devnull_fd)
            self._devnull_fd = None

    def close(self) -> None:
        """At exit: remove the pid file if it is still ours."""
        if self._pid_fd is not None:
            os.close(self._pid_fd)
            self._pid_fd = None
        if self._pid_file is None or self._pid_inode is None:
            return
        try:
            if _inode(os.stat(self._pid_file)) == self._pid_inode:
                os.unlink(self._pid_file)
        except OSError as exc:
            log.debug("--pid %s: not removed: %s", self._pid_file, exc.strerror or exc)


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _open(path: str, what: str, mode: int, flags: int) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | flags, mode)
    except OSError as exc:
        raise StartupError(f"{what} {path}: {exc.strerror}") from exc


def _redirect_stderr(path: str) -> None:
    fd = _open(path, "--log-file", 0o600, os.O_APPEND)
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)


def _wait_for_child(read_end: int, child: int) -> None:
    """The parent: exit 0 once the child is ready, or with its status if it ended first."""
    ready = os.read(read_end, 1) == _READY
    if ready:
        os._exit(0)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    # A child killed by a signal: the shell's convention, 128 + the signal.
    os._exit(code if code >= 0 else 128 - code)
