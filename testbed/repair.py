"""ferry-repair as a process of the bed: started, its log read line by line, stopped.

The helper runs as a real subprocess; its stderr is read by a thread into a
list of lines, so a caller can wait for a log line (the helper logs one per
connection and per refusal) instead of sleeping. It is killed by PID when
its context exits, whatever the caller did.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from testbed.paths import REPO

__all__ = ["HELPER", "WAIT_SECONDS", "HelperProcess", "listening_helper", "raise_fd_limit"]

#: ferry-repair from this checkout, by module (any uid can run it).
HELPER = [sys.executable, "-m", "ferry_repair.main"]
WAIT_SECONDS = 30.0  # upper bound on waits for a condition; never a timing assertion


class HelperProcess:
    """A running ferry-repair (or passt-repair) whose log lines are collected."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        preexec_fn: Callable[[], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
            preexec_fn=preexec_fn,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, needle: str, *, count: int = 1) -> str:
        """Wait until ``count`` log lines contain ``needle``; return the last one."""

        def matching() -> list[str]:
            return [line for line in self.lines if needle in line]

        with self._changed:
            done = self._changed.wait_for(
                lambda: len(matching()) >= count or not self._reader.is_alive(),
                timeout=WAIT_SECONDS,
            )
            found = matching()
        if not done or len(found) < count:
            raise AssertionError(f"helper never logged {needle!r} x{count}; log: {self.lines}")
        return found[count - 1]

    def count(self, needle: str) -> int:
        with self._changed:
            return sum(needle in line for line in self.lines)

    def wait_exit(self) -> int:
        rc = self.proc.wait(timeout=WAIT_SECONDS)
        self._reader.join(timeout=WAIT_SECONDS)
        return rc

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def status(self) -> dict[str, str]:
        with open(f"/proc/{self.pid}/status") as f:
            return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=WAIT_SECONDS)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> HelperProcess:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def listening_helper(
    path: Path, *extra: str, prefix: Sequence[str] = ()
) -> Iterator[HelperProcess]:
    """ferry-repair --listen PATH, once it serves."""
    with HelperProcess([*prefix, *HELPER, "--listen", str(path), *extra]) as helper:
        helper.wait_for_line("serving")
        yield helper


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
