"""A small synchronous QMP client: the tests drive QEMU the way a management layer does.

QMP (docs/interop/qmp-spec.rst) is JSON objects over a Unix socket, one per
line. On connect QEMU sends a greeting ``{"QMP": {...}}``; the client must
send ``qmp_capabilities`` before any other command. Each command
``{"execute": NAME, "arguments": {...}, "id": ID}`` gets exactly one answer
carrying the same id, ``{"return": ...}`` or ``{"error": {"class", "desc"}}``;
asynchronous events ``{"event": NAME, ...}`` may arrive in between and are
kept in :attr:`Qmp.events`.

Everything waits with a deadline (the socket's timeout): a QEMU that went
quiet fails the test with :class:`QmpError`, it never hangs it. What QEMU
sends is parsed as untrusted input: a line that is not a JSON object is a
:class:`QmpError` naming QEMU, and the connection is not used again.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Qmp", "QmpCommandError", "QmpError", "QmpEventTimeout"]

#: QMP answers come within milliseconds; the deadline is for a stuck QEMU.
DEFAULT_TIMEOUT = 30.0


class QmpError(AssertionError):
    """QEMU's QMP connection broke, went quiet or sent something that is not QMP.

    An AssertionError, so that pytest reports a failed test, not an error in it.
    """


class QmpCommandError(QmpError):
    """QEMU answered a command with an error (QMP's error class and description)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpEventTimeout(QmpError):
    """The event waited for did not come in time; the connection is still usable."""


class Qmp:
    """One QMP connection, ready for commands once constructed (capabilities negotiated)."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        self._broken = False
        #: Events received so far, in order (``{"event": ..., "data": ..., "timestamp": ...}``).
        self.events: list[dict[str, Any]] = []
        self._waited = 0
        """events[:_waited] were looked at by :meth:`wait_event` already."""
        self._timeout = timeout
        try:
            try:
                self._sock.connect(path)
            except OSError as e:
                raise QmpError(f"cannot connect to QEMU's QMP socket {path}: {e}") from e
            greeting = self._receive_untrusted()
            if "QMP" not in greeting:
                raise QmpError(f"QEMU's QMP greeting has no QMP member: {greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run *command* and return its ``return`` value; QmpCommandError if QEMU refuses it."""
        return self.answer(self.send(command, **arguments))

    def send(self, command: str, **arguments: Any) -> tuple[int, str]:
        """Send *command* without waiting for its answer; what :meth:`answer` takes.

        For a command whose answer does not matter yet (the bench's
        migrate-continue: QEMU acts on it when it reads it, and the bench
        has other work meanwhile). No other command may be sent before
        its answer was read.
        """
        if self._broken:
            raise QmpError("the QMP connection broke earlier; not sending " + command)
        request_id = next(self._ids)
        message: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as e:
            self._broken = True
            raise QmpError(f"QMP: sending {command} failed: {e}") from e
        return request_id, command

    def answer(self, sent: tuple[int, str]) -> Any:
        """The ``return`` value of a command :meth:`send` sent; QmpCommandError if refused."""
        request_id, command = sent
        while True:
            answer = self._receive_untrusted()
            if "event" in answer:
                self.events.append(answer)
                continue
            if answer.get("id") != request_id:
                self._broken = True
                raise QmpError(f"QMP answer for another command while running {command}: {answer}")
            if "error" in answer:
                error = answer["error"]
                if not isinstance(error, dict):
                    raise QmpError(f"QMP error that is not an object: {answer}")
                raise QmpCommandError(
                    command, str(error.get("class", "?")), str(error.get("desc", "?"))
                )
            if "return" not in answer:
                self._broken = True
                raise QmpError(f"QMP answer to {command} with neither return nor error: {answer}")
            return answer["return"]

    def wait_event(
        self, name: str, accept: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """The next event *name* whose ``data`` *accept* takes: already received or still to come.

        Every event up to it is passed over for later waits (still in
        :attr:`events`). Waiting on an event costs no command: QEMU sends it
        the moment its state changes, where polling with a command finds the
        change up to one interval late and makes QEMU answer all along.
        :class:`QmpEventTimeout` if it does not come within *timeout*
        seconds (the connection stays usable).
        """
        if self._broken:
            raise QmpError(f"the QMP connection broke earlier; not waiting for {name}")
        deadline = time.monotonic() + timeout
        try:
            while True:
                while self._waited < len(self.events):
                    event = self.events[self._waited]
                    self._waited += 1
                    data = event.get("data", {})
                    if event.get("event") == name and isinstance(data, dict) and accept(data):
                        return data
                message = self._receive_untrusted(deadline)
                if "event" not in message:
                    self._broken = True
                    raise QmpError(f"QMP answer while no command was sent: {message}")
                self.events.append(message)
        finally:
            with contextlib.suppress(OSError):
                self._sock.settimeout(self._timeout)

    # The commands the tests use, typed.

    def query_status(self) -> str:
        """The VM's run state: ``running``, ``paused``, ``inmigrate``, ``postmigrate``..."""
        return str(self.execute("query-status")["status"])

    def stop(self) -> None:
        self.execute("stop")

    def cont(self) -> None:
        self.execute("cont")

    def migrate(self, uri: str) -> None:
        """Start migrating to *uri* (``unix:PATH``, ``tcp:HOST:PORT``); returns at once."""
        self.execute("migrate", uri=uri)

    def query_migrate(self) -> dict[str, Any]:
        """``status`` (active, completed, failed...), ``downtime`` and ``total-time`` in ms."""
        return dict(self.execute("query-migrate"))

    def migrate_cancel(self) -> None:
        self.execute("migrate_cancel")

    def set_downtime_limit(self, milliseconds: int) -> None:
        """The most QEMU may pause the guest for the final pass (its default is 300 ms)."""
        self.execute("migrate-set-parameters", **{"downtime-limit": milliseconds})

    def quit(self) -> None:
        """Ask QEMU to exit. It may close the socket before (or instead of) answering."""
        with contextlib.suppress(QmpError):
            self.execute("quit")

    def _receive_untrusted(self, deadline: float | None = None) -> dict[str, Any]:
        """The next JSON object from QEMU; QmpError for anything else or for silence.

        With a *deadline* (time.monotonic()), QmpEventTimeout once it passed
        (a part of a line already read is kept for the next call).
        """
        while b"\n" not in self._buffer:
            try:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise QmpEventTimeout("the event waited for did not come in time")
                    self._sock.settimeout(min(left, self._timeout))
                data = self._sock.recv(65536)
            except TimeoutError as e:
                if deadline is not None:
                    continue  # the deadline is checked above (the socket's may be shorter)
                self._broken = True
                raise QmpError("QEMU sent nothing on QMP before the deadline") from e
            except OSError as e:
                self._broken = True
                raise QmpError(f"QMP connection failed: {e}") from e
            if not data:
                self._broken = True
                raise QmpError("QEMU closed the QMP connection")
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        try:
            message = json.loads(line)
        except (UnicodeDecodeError, ValueError) as e:
            self._broken = True
            raise QmpError(f"QEMU sent a QMP line that is not JSON: {line[:200]!r}") from e
        if not isinstance(message, dict):
            self._broken = True
            raise QmpError(f"QEMU sent a QMP message that is not an object: {line[:200]!r}")
        return message
