"""Migration when ferry-repair goes away: restarted, stopped, or refusing mid-freeze.

Issue 9, item 8. ferryd keeps its connection to the repair helper from one
migration to the next. Here the helper is a real process the test owns
(ferry-repair, or a stand-in that refuses), killed and restarted on the
same socket path between and during migrations, as systemd or an operator
would. The source must then either migrate, or roll back with every
connection intact, or say exactly that it could not and stay visibly
``rollback-pending`` until the helper is back (then ``ferryctl
migrate-abort``, or its own retry, finishes the rollback). Never a source
stuck ``migrating`` with the guest offline while ferryctl says it rolled
back.

Traffic is streamtool's (testbed/streams.py: Streams): every byte each
way is checked, so a connection lost or corrupted by a rollback fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferryd.control import ControlClientError
from testbed.ferryd_process import RUNAS_UID, FerrydProcess
from testbed.migrationbed import MigrationBed
from testbed.paths import FERRYCTL
from testbed.repair import HELPER, HelperProcess
from testbed.streams import Streams
from testbed.wait import wait_for

#: A stand-in helper that refuses: it reads one batch (closing the descriptors
#: it got) and closes the connection without a reply, on every connection.
REFUSER = r"""
import array, os, socket, sys, threading
path = sys.argv[1]
lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
lst.bind(path)
os.chmod(path, 0o666)  # ferryd connects as its runas user, as to ferry-repair
lst.listen(16)
print("refuser serving", file=sys.stderr, flush=True)

def refuse(conn):
    data, anc, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(253 * 4))
    for _, _, payload in anc:
        fds = array.array("i")
        fds.frombytes(payload[: len(payload) - len(payload) % 4])
        for fd in fds:
            socket.close(fd)
    print(f"refused a batch of {data!r}", file=sys.stderr, flush=True)
    conn.close()

# Each connection on its own, as ferry-repair serves them: a target ferryd
# connects as its restore starts, and asks nothing until it has a batch.
while True:
    conn, _ = lst.accept()
    threading.Thread(target=refuse, args=(conn,), daemon=True).start()
"""


class Helper:
    """The repair helper on one socket path, (re)started and stopped by the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: HelperProcess | None = None
        self.log: list[str] = []

    def start(self) -> None:
        self.stop()
        allow = ("--allow-uid", str(RUNAS_UID))  # ferryd's user after setup
        self.proc = HelperProcess([*HELPER, "--listen", str(self.path), *allow])
        self.proc.wait_for_line("serving")

    def start_refuser(self) -> None:
        self.stop()
        self.proc = HelperProcess([sys.executable, "-c", REFUSER, str(self.path)])
        self.proc.wait_for_line("serving")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.log += self.proc.lines
            self.proc = None
        self.path.unlink(missing_ok=True)  # the refuser leaves its socket file


@pytest.fixture
def helper(two_hosts: MigrationBed) -> Iterator[Helper]:
    own = Helper(two_hosts.tmp / "own-repair.sock")
    own.start()
    try:
        yield own
    finally:
        own.stop()
        print("--- own repair helper's log ---\n" + "\n".join(own.log[-40:]))


def _start_pair(
    bed: MigrationBed, helper: Helper, *args: str
) -> tuple[FerrydProcess, FerrydProcess]:
    # The last --repair-socket wins: ours, not the bed's shared helper.
    use = ("--repair-socket", str(helper.path))
    return bed.start_source(*args, *use), bed.start_target(*use)


def _role(ferryd: FerrydProcess) -> str:
    return str(ferryd.request("status")["role"])


def _ctl(ferryd: FerrydProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FERRYCTL), "--control", ferryd.control, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _freeze_and_abort(source: FerrydProcess) -> None:
    """Use the helper once (freeze into a pipe we drain, then abort): ferryd keeps the
    connection to it for the next migration."""
    rfd, wfd = os.pipe()

    def drain() -> None:
        with os.fdopen(rfd, "rb") as reader:
            reader.read()

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        source.request("migrate-out", fds=[wfd], same_netns=False, timeout=60)
    finally:
        os.close(wfd)
        reader.join(60)
    assert source.request("migrate-abort", timeout=60)["role"] == "running"


def _still_flowing(streams: Streams, what: str) -> None:
    mark = streams.report()["busy"]
    streams.wait_more("busy", mark, 4 << 20, what)


def _occupy(bed: MigrationBed, port: int) -> subprocess.Popen[str]:
    """A listener on host B's *port*: a target restoring a forward of it must fail."""
    proc = bed.host_b.popen(
        [
            sys.executable,
            "-c",
            "import socket, sys\n"
            "s = socket.socket()\n"
            f"s.bind(('0.0.0.0', {port}))\n"
            "s.listen()\n"
            "print('listening', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"
    return proc


def test_helper_restarted_then_target_fails(two_hosts: MigrationBed, helper: Helper) -> None:
    """The issue's case: a stale helper connection at the freeze, then a failing target.

    The stale connection is replaced at the freeze; the target's failure
    then rolls the source back, ferryctl says so, and it is true.
    """
    bed = two_hosts
    source, target = _start_pair(bed, helper, "-t", "8080")
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9700, "busy:2", "idle:20")
    blocker: subprocess.Popen[str] | None = None
    try:
        streams.wait_flowing("busy", 1 << 20)
        _freeze_and_abort(source)
        _still_flowing(streams, "after the first rollback")
        helper.start()  # killed and started again on the same path
        blocker = _occupy(bed, 8080)
        result = bed.migrate(source, target, "--no-precopy")
        print("ferryctl:", result.stderr)
        assert result.returncode == 1
        # The target fails when it binds the forwarded port (after the
        # connections, so as not to conflict with them); ferryctl aborts the
        # source, asks its role, and only then says it resumed.
        assert "the source resumed" in result.stderr or "rolled back" in result.stderr
        assert "did NOT resume" not in result.stderr
        assert _role(source) == "running"
        _still_flowing(streams, "on the source after the failed migration")
        streams.finish()
    finally:
        if blocker is not None:
            blocker.kill()
            blocker.wait()
        streams.close()


def test_migration_after_helper_restart_succeeds(two_hosts: MigrationBed, helper: Helper) -> None:
    """The stale connection is retried (reconnected) once: the migration simply works."""
    bed = two_hosts
    source, target = _start_pair(bed, helper)
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v6, 9710, "busy:2", "idle:20")
    try:
        streams.wait_flowing("busy", 1 << 20)
        _freeze_and_abort(source)
        helper.start()
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["tcp"] == 22
        assert [_role(source), _role(target)] == ["migrated", "running"]
        _still_flowing(streams, "on host B")
        streams.finish()
    finally:
        streams.close()


@pytest.mark.parametrize("finish", ["migrate-abort", "retry"])
def test_helper_down_during_rollback(two_hosts: MigrationBed, helper: Helper, finish: str) -> None:
    """Frozen, the helper stops, the migration is aborted: the rollback cannot complete.

    The source says so (exit 1, "rollback incomplete"), shows it in status,
    serves the guest meanwhile but for the frozen connections (a new one
    flows), and once the helper is back a migrate-abort (or its own retry)
    finishes the rollback with every connection intact.
    """
    bed = two_hosts
    source, target = _start_pair(bed, helper)
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9720, "busy:2", "idle:20")
    try:
        streams.wait_flowing("busy", 1 << 20)
        rfd, wfd = os.pipe()
        target.request("migrate-in", fds=[rfd])
        os.close(rfd)
        try:
            source.request("migrate-out", fds=[wfd], same_netns=False, timeout=60)
        finally:
            os.close(wfd)
        target.request("migrate-wait", timeout=60)
        assert _role(source) == "frozen"
        helper.stop()
        target.request("migrate-abort", timeout=60)
        aborted = _ctl(source, "migrate-abort")
        print("ferryctl migrate-abort:", aborted.stderr)
        assert aborted.returncode == 1
        assert "rollback incomplete" in aborted.stderr
        assert "cannot connect to the repair helper" in aborted.stderr
        status = source.request("status")
        assert status["role"] == "rollback-pending"
        assert "repair helper" in status["migration"]["rollback_error"]
        # Meanwhile the guest is served, but for its frozen connections: a new one flows.
        fresh = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9721, "busy:1")
        try:
            fresh.wait_flowing("busy", 1 << 20, "while the rollback waits for the helper")
            fresh.finish()
        finally:
            fresh.close()
        helper.start()
        if finish == "migrate-abort":
            again = _ctl(source, "migrate-abort")
            assert again.returncode == 0, again.stderr
        else:
            wait_for(lambda: _role(source) == "running", timeout=30, what="the retried rollback")
        assert _role(source) == "running"
        assert source.request("status")["migration"]["rollback_error"] is None
        _still_flowing(streams, "after the rollback finished")
        streams.finish()
    finally:
        streams.close()


def test_helper_refuses_mid_freeze(two_hosts: MigrationBed, helper: Helper) -> None:
    """A helper that closes without a reply at the freeze, and at the rollback too.

    The migration fails; the source is not left ``migrating``: it says the
    rollback is incomplete, and a real helper then lets it finish.
    """
    bed = two_hosts
    source, target = _start_pair(bed, helper)
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9730, "busy:2", "idle:20")
    try:
        streams.wait_flowing("busy", 1 << 20)
        helper.start_refuser()
        result = bed.migrate(source, target, "--no-precopy")
        print("ferryctl:", result.stderr)
        assert result.returncode == 1
        assert "closed the connection instead of answering" in result.stderr
        assert "rolled back and keeps running" not in result.stderr
        assert "rollback incomplete" in result.stderr
        assert _role(source) == "rollback-pending"
        helper.start()
        again = _ctl(source, "migrate-abort")
        assert again.returncode == 0, again.stderr
        assert _role(source) == "running"
        _still_flowing(streams, "after the rollback finished")
        # The history has the pending rollback, then its completion (ferryd.migration.history).
        history = source.request("history")["history"]
        assert [(h["direction"], h["outcome"]) for h in history] == [
            ("out", "rollback-pending"),
            ("out", "rolled-back"),
        ]
        assert "closed the connection instead of answering" in history[0]["error"]
        assert history[1]["downtime_ms"] > history[0]["downtime_ms"] > 0
        streams.finish()
    finally:
        streams.close()


@pytest.mark.parametrize(
    ("cmd", "busy_role"), [("migrate-out", "migrating"), ("migrate-precopy", "precopying")]
)
def test_abort_a_migration_stuck_on_its_stream(
    two_hosts: MigrationBed, helper: Helper, cmd: str, busy_role: str
) -> None:
    """A freeze (or pre-copy) whose stream nobody reads never ends by itself: abort ends it.

    The stream is a pipe that is already full and kept open: the source's
    first write blocks for good, as with a target that hangs without
    closing its end. migrate-abort must stop it (the freeze then rolls
    back) and answer; the stalled request answers that it was aborted.
    """
    bed = two_hosts
    source = bed.start_source("--repair-socket", str(helper.path))
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9740, "busy:2", "idle:20")
    rfd, wfd = os.pipe()
    answer: dict[str, str] = {}
    caller: threading.Thread | None = None
    try:
        streams.wait_flowing("busy", 1 << 20)
        os.set_blocking(wfd, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(wfd, bytes(65536))

        def call() -> None:
            try:
                source.request(cmd, fds=[wfd], same_netns=False, timeout=120)
                answer["ok"] = "answered"
            except ControlClientError as exc:
                answer["error"] = str(exc)

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(lambda: _role(source) == busy_role, timeout=30, what=f"the source {busy_role}")
        aborted = _ctl(source, "migrate-abort")
        print("ferryctl migrate-abort:", aborted.stdout, aborted.stderr)
        assert aborted.returncode == 0, aborted.stderr
        caller.join(60)
        assert "aborted by migrate-abort" in answer.get("error", ""), answer
        assert _role(source) == "running"
        _still_flowing(streams, "after the abort")
        streams.finish()
    finally:
        if caller is not None:
            caller.join(60)
        os.close(rfd)
        os.close(wfd)
        streams.close()
