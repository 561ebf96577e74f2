"""Checked traffic that spans a migration: streamtool processes driven from outside.

Used by the migration tests and bench/migration.py. Traffic runs in real
processes inside the namespaces: ``streamtool.py`` (testbed/streamtool.py:
many TCP connections, a checked pattern each way, commands on stdin, JSON
lines on stdout) and its UDP mode.
:class:`Tool` runs one and collects its JSON lines; :class:`Streams` pairs
a server and a client and checks, at the end, that every connection ended
cleanly with every byte checked and that what each end sent is exactly
what the other received.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from testbed.netns import Netns
from testbed.paths import STREAMTOOL
from testbed.wait import WaitTimeout, wait_for

PY = sys.executable
#: Upper bound on any wait for a condition; never a timing assertion.
WAIT_SECONDS = 60.0


class Tool:
    """One streamtool process in a namespace, its JSON output lines collected."""

    def __init__(self, ns: Netns, *args: str, script: str = STREAMTOOL) -> None:
        self.argv = [PY, script, *args]
        self.lines: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._changed = threading.Condition()
        self.proc: subprocess.Popen[str] = ns.popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._threads = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.errors.append(line.rstrip())
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.errors.append(line.rstrip())

    def wait_line(
        self, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = WAIT_SECONDS
    ) -> dict[str, Any]:
        """The first output line (old or new) for which *pred* holds."""
        return self.wait_lines(pred, 1, what, timeout)[0]

    def wait_lines(
        self,
        pred: Callable[[dict[str, Any]], bool],
        count: int,
        what: str,
        timeout: float = WAIT_SECONDS,
    ) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]]:
            return [line for line in self.lines if pred(line)]

        with self._changed:
            self._changed.wait_for(
                lambda: len(found()) >= count or self.proc.poll() is not None, timeout
            )
            lines = found()
        if len(lines) < count:
            raise AssertionError(
                f"{' '.join(self.argv[1:4])}: no {what} after {timeout:g} s "
                f"(exit {self.proc.poll()}); last lines {self.lines[-3:]}; "
                f"stderr {self.errors[-10:]}"
            )
        return lines[:count]

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"{' '.join(self.argv[1:4])} exited ({self.proc.returncode}) before {text!r}; "
                f"last lines {self.lines[-3:]}; stderr {self.errors[-10:]}"
            ) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()


def connection_count(specs: tuple[str, ...]) -> int:
    return sum(int(spec.split(":")[1]) for spec in specs if not spec.startswith("seeds:"))


class Streams:
    """A streamtool server in *server_ns* and a client in *client_ns*.

    ``Streams(peer, guest, "::", "10.88.0.3", 9000, "busy:4")`` serves on the
    peer and connects from the guest (outbound flows); swap the namespaces
    for inbound ones.
    """

    def __init__(
        self,
        server_ns: Netns,
        client_ns: Netns,
        bind: str,
        connect: str,
        port: int,
        *specs: str,
        server: Tool | None = None,
    ) -> None:
        """*server*: a server already listening on *port* that other clients share
        (it is not stopped here); give each client distinct seeds (``seeds:BASE``)."""
        self.count = connection_count(specs)
        self.seeds = range(0, self.count)
        for spec in specs:
            if spec.startswith("seeds:"):
                base = int(spec.split(":")[1])
                self.seeds = range(base, base + self.count)
        self._own_server = server is None
        if server is None:
            server = Tool(server_ns, "server", bind, str(port))
            server.wait_line(lambda line: "listening" in line, "listening")
        self.server = server
        self.client = Tool(client_ns, "client", connect, str(port), *specs)
        self._reports = 0
        self.client.wait_line(lambda line: "connected" in line, "connections", timeout=180)

    def report(self) -> dict[str, dict[str, int]]:
        """The client's byte counts per kind of connection, now."""
        self._reports += 1
        self.client.command("report")
        wanted = self._reports
        lines = self.client.wait_lines(lambda line: "report" in line, wanted, "a report")
        report: dict[str, dict[str, int]] = lines[wanted - 1]["report"]
        return report

    def wait_flowing(
        self, kind: str, at_least: int, what: str = "", *, way: str = "both"
    ) -> dict[str, int]:
        """Wait until every connection of *kind* has moved *at_least* bytes.

        *way*: "received" (peer to client), "sent" (client to peer) or "both".
        """
        keys = {"both": ("min_sent", "min_received"), "sent": ("min_sent",)}.get(
            way, ("min_received",)
        )
        return self._wait_report(kind, lambda e: min(e[k] for k in keys) >= at_least, what)

    def wait_more(
        self, kind: str, before: dict[str, int], more: int, what: str = ""
    ) -> dict[str, int]:
        """Wait until every connection of *kind* moved *more* bytes each way since *before*
        (a report entry): each direction against its own mark, since the two need not
        run at the same rate."""
        return self._wait_report(
            kind,
            lambda e: all(e[k] >= before[k] + more for k in ("min_sent", "min_received")),
            f"{what} (from {before})",
        )

    def _wait_report(
        self, kind: str, done: Callable[[dict[str, int]], bool], what: str
    ) -> dict[str, int]:
        """Ask for reports until *kind*'s entry is *done*; the last one seen goes
        into the failure."""
        last: dict[str, int] = {}

        def entry() -> dict[str, int] | None:
            last.clear()
            last.update(self.report()[kind])
            return dict(last) if done(last) else None

        try:
            return wait_for(
                entry, WAIT_SECONDS, interval=0.05, what=f"{kind} connections flowing {what}"
            )
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; the last report: {last}") from None

    def finish(self, timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        """Stop, wait for every connection to end, and check both ends byte for byte."""
        self.client.command("stop")
        try:
            final = self.client.wait_line(lambda line: "done" in line, "final result", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {self._unfinished()}") from None
        results = self.server.wait_lines(
            lambda line: line.get("seed") in self.seeds, self.count, "server results", timeout
        )
        problems: list[str] = []
        if not final["ok"]:
            problems.append(f"client: {final['bad_count']} bad connections, e.g. {final['bad']}")
        by_seed = {line["seed"]: line for line in results}
        for seed_text, sent in final["sent"].items():
            line = by_seed.get(int(seed_text))
            received = final["received"][seed_text]
            if line is None:
                problems.append(f"connection {seed_text}: no result from the server")
            elif not line["ok"]:
                problems.append(f"connection {seed_text}: server says {line['error']}")
            elif (line["received"], line["sent"]) != (sent, received):
                problems.append(
                    f"connection {seed_text}: client sent {sent}, server received "
                    f"{line['received']}; server sent {line['sent']}, client received {received}"
                )
        assert not problems, "; ".join(problems[:10]) + f" ({len(problems)} problems)"
        return final

    def _unfinished(self) -> str:
        """How far the connections got when the client never finished (a failure's diagnosis):
        the client's counts per kind, and how many the server saw end."""
        ended = len([line for line in self.server.lines if line.get("seed") in self.seeds])
        try:
            counts: object = self.report()
        except AssertionError as exc:  # the client does not answer either
            counts = f"no report ({exc})"
        return (
            f"the server saw {ended} of {self.count} connections end; the client's counts {counts}"
        )

    def close(self) -> None:
        self.client.stop()
        if self._own_server:
            self.server.stop()


class UdpExchange:
    """streamtool's UDP echo on one side and its checking client on the other."""

    def __init__(self, server_ns: Netns, client_ns: Netns, bind: str, connect: str, port: int):
        self.server = Tool(server_ns, "udpecho", bind, str(port))
        self.server.wait_line(lambda line: "listening" in line, "listening")
        self.client = Tool(client_ns, "udp", connect, str(port))
        self._reports = 0

    def sent(self) -> int:
        self._reports += 1
        self.client.command("report")
        lines = self.client.wait_lines(lambda line: "resent" in line, self._reports, "a report")
        sent: int = lines[-1]["sent"]
        return sent

    def finish(self) -> dict[str, Any]:
        self.client.command("stop")
        final = self.client.wait_line(lambda line: "done" in line, "final UDP result")
        assert final["ok"], final
        return final

    def close(self) -> None:
        self.client.stop()
        self.server.stop()


class UdpFlood:
    """Numbered datagrams without resending, counted at the other end (streamtool's
    ``udpflood`` and ``udpcount``): what a migration loses shows as missing.

    ``inbound``: the peer floods ``addr``:``port`` (a forwarded port of the
    host) and the guest counts on ``port``; else the guest says hello to the
    peer at ``addr``:``port`` (an outbound flow) and the peer floods it back.
    """

    def __init__(self, peer_ns: Netns, guest_ns: Netns, addr: str, port: int, *, inbound: bool):
        any_addr = "::" if ":" in addr else "0.0.0.0"
        if inbound:
            self.counter = Tool(guest_ns, "udpcount", "listen", any_addr, str(port))
            self.counter.wait_line(lambda line: "listening" in line, "listening")
            self.flood = Tool(peer_ns, "udpflood", "to", addr, str(port))
        else:
            self.flood = Tool(peer_ns, "udpflood", "reply", any_addr, str(port))
            self.flood.wait_line(lambda line: "listening" in line, "listening")
            self.counter = Tool(guest_ns, "udpcount", "hello", addr, str(port))
        self._reports = 0

    def received(self) -> int:
        got: int = self._report()["received"]
        return got

    def _report(self) -> dict[str, Any]:
        """The counter's count now: received, first, last, missing."""
        self._reports += 1
        self.counter.command("report")
        lines = self.counter.wait_lines(lambda line: "missing" in line, self._reports, "a count")
        report: dict[str, Any] = lines[-1]
        return report

    def wait_more(self, count: int, what: str) -> None:
        mark = self.received()
        wait_for(
            lambda: self.received() >= mark + count,
            timeout=WAIT_SECONDS,
            interval=0.1,
            what=f"{count} more datagrams {what}",
        )

    def finish(self) -> dict[str, Any]:
        """Stop the flood and wait until its last datagram came (10 s at most): the
        flood's count ``sent`` and the counter's final line (first, last, missing)."""
        self.flood.command("stop")
        sent: int = self.flood.wait_line(lambda line: "done" in line, "the flood's end")["sent"]
        deadline = time.monotonic() + 10
        while self._report()["last"] != sent - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.counter.command("stop")
        final = self.counter.wait_line(lambda line: bool(line.get("done")), "the final count")
        return {"sent": sent, **{k: final[k] for k in ("received", "first", "last", "missing")}}

    def close(self) -> None:
        self.flood.stop()
        self.counter.stop()
