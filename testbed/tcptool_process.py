"""tcptool processes in a namespace, driven from the test: started, told, read, awaited.

testbed/tcptool.py runs inside the namespace; this is its other end. A
server prints ``listening`` when it is ready, and clients print one JSON
line with what they checked. Output is read by a thread into a queue
(:class:`Lines`), so that every read has a deadline and a test never
hangs on a process that went quiet.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any

from testbed.netns import Netns
from testbed.paths import TCPTOOL

__all__ = ["Lines", "Tool", "client", "server", "spawn"]

PY = sys.executable


class Lines:
    """A process's stdout as a queue of lines, so a test can wait with a deadline."""

    def __init__(self, stdout: IO[bytes]) -> None:
        self._queue: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, args=(stdout,), daemon=True).start()

    def _pump(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            self._queue.put(line)
        self._queue.put(b"")

    def next(self, timeout: float = 30, what: str = "a line") -> bytes:
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output after {timeout:g} s waiting for {what}") from None
        assert line, f"process ended while waiting for {what}"
        return line

    def json(self, timeout: float = 30, what: str = "a result") -> dict[str, Any]:
        return dict(json.loads(self.next(timeout, what)))


@dataclass
class Tool:
    """A tcptool process running in a namespace, with its stdin and stdout."""

    proc: subprocess.Popen[bytes]
    out: Lines

    def tell(self, line: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)


def spawn(ns: Netns, *args: object) -> Tool:
    proc = ns.popen(
        [PY, TCPTOOL, *(str(a) for a in args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    return Tool(proc, Lines(proc.stdout))


def server(ns: Netns, *args: object) -> Tool:
    """Start a tcptool server and wait until it listens."""
    tool = spawn(ns, *args)
    assert tool.out.next(what=f"tcptool {args[0]} to listen") == b"listening\n"
    return tool


def client(ns: Netns, *args: object, timeout: float = 120) -> dict[str, Any]:
    """Run a tcptool client to completion; fail with its output unless it exits 0."""
    result = ns.run([PY, TCPTOOL, *(str(a) for a in args)], check=False, timeout=timeout)
    assert result.returncode == 0, f"tcptool {args}: {result.stdout} {result.stderr}"
    return dict(json.loads(result.stdout.splitlines()[-1]))
