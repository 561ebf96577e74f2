"""``ferryctl migrate`` against two fake daemons that speak the migration protocol.

Each fake is a real :class:`~daemon.control.ControlServer` in the test's
nursery with handlers that behave like a source or a target ferryd: the
source writes a stream into the pipe end it is handed, the target reads
its end to EOF in the background and only then lets ``migrate-wait``
answer. Every request lands in one shared log, so a test checks the exact
conversation (which commands, in which order, to whom), including what
ferryctl sends when something fails: a refusal, a daemon that dies or
hangs, a failed restore, commit or resume.

The source's ``migrate-out`` answers only after the target has seen the end
of the stream. That holds only if ferryctl closed its own copy of the write
end as soon as it was sent, so every successful run also checks that.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio

from ferryd import ctl
from ferryd.control import ControlError, ControlServer

STREAM = bytes(range(256)) * 1024  # 256 KiB: more than a default pipe holds
HOST_NS = 4026531840


@dataclass
class Fakes:
    """Two fake daemons, the shared request log and the knobs tests turn."""

    source_path: str
    target_path: str
    log: list[tuple[str, str]] = field(default_factory=list)
    source_role: str = "running"
    target_role: str = "incoming"
    source_ns: int = HOST_NS
    target_ns: int = HOST_NS + 1
    #: Per command, what the fake does instead of succeeding: "refuse" (ok: false)
    #: or "die" (stop serving; the request is left unanswered) or "hang", or
    #: "stuck" (a source that failed and could not roll back: ok: false, and
    #: its role turns "rollback-pending").
    fail: dict[str, str] = field(default_factory=dict)
    same_netns_seen: list[object] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    eof_seen: trio.Event = field(default_factory=trio.Event)
    reader_done: trio.Event = field(default_factory=trio.Event)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    precopy_pipe: trio.lowlevel.FdStream | None = None
    precopy_seen: list[object] = field(default_factory=list)

    def commands(self, who: str | None = None) -> list[str]:
        return [cmd for side, cmd in self.log if who is None or side == who]


@pytest.fixture
def paths() -> Iterator[tuple[str, str]]:
    directory = tempfile.mkdtemp(prefix="fm-")
    try:
        yield os.path.join(directory, "src.sock"), os.path.join(directory, "dst.sock")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _responses(fakes: Fakes, who: str) -> dict[str, dict[str, Any]]:
    """The fixed answers of a fake (status is made per request from the knobs)."""
    if who == "source":
        return {"status": {}, "migrate-commit": {}, "migrate-abort": {}}
    return {
        "status": {},
        "migrate-resume": {
            "t_resumed": 100.0425,
            "timings_ms": {"repair_off": 1.5, "resync": 0.5},
        },
        "migrate-abort": {},
    }


async def _misbehave(fakes: Fakes, who: str, cmd: str) -> None:
    """Do what ``fakes.fail`` says for this command, if anything."""
    how = fakes.fail.get(f"{who} {cmd}")
    if how == "refuse":
        raise ControlError(f"{cmd} refused by the fake {who}")
    if how == "die":
        fakes.scopes[who].cancel()
        await trio.sleep_forever()
    if how == "hang":
        await trio.sleep_forever()
    if how == "stuck":  # failed, and could not roll back (its repair helper is gone)
        fakes.source_role = "rollback-pending"
        raise ControlError(f"{cmd} failed; rollback incomplete: the repair helper is gone")


def _make(fakes: Fakes, who: str, path: str, nursery: trio.Nursery) -> ControlServer:
    server = ControlServer(path)
    canned = _responses(fakes, who)

    def simple(cmd: str) -> Any:
        async def handler(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
            fakes.log.append((who, cmd))
            await _misbehave(fakes, who, cmd)
            if cmd == "status":
                role, ns = (
                    (fakes.source_role, fakes.source_ns)
                    if who == "source"
                    else (fakes.target_role, fakes.target_ns)
                )
                return {"ready": True, "role": role, "host_netns": ns}
            return dict(canned[cmd])

        return handler

    for cmd in canned:
        server.register(cmd, simple(cmd))

    if who == "source":

        async def migrate_precopy(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
            fakes.log.append((who, "migrate-precopy"))
            assert len(fds) == 1
            pipe = trio.lowlevel.FdStream(fds.pop())
            await _misbehave(fakes, who, "migrate-precopy")
            await pipe.send_all(STREAM[: len(STREAM) // 2])
            fakes.precopy_pipe = pipe
            return {"precopied": 2, "stream_bytes": len(STREAM) // 2, "timings_ms": {"precopy": 7}}

        async def migrate_out(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
            fakes.log.append((who, "migrate-out"))
            fakes.same_netns_seen.append(req.get("same_netns"))
            await _misbehave(fakes, who, "migrate-out")
            if fakes.precopy_pipe is not None:
                assert not fds
                pipe, rest = fakes.precopy_pipe, STREAM[len(STREAM) // 2 :]
            else:
                assert len(fds) == 1
                pipe, rest = trio.lowlevel.FdStream(fds.pop()), STREAM
            async with pipe:
                try:
                    await pipe.send_all(rest)
                except trio.BrokenResourceError:
                    raise ControlError("the target stopped reading; rolled back") from None
            # The target sees EOF only if no other write end is left open:
            # ferryctl must have closed its copy already.
            with trio.move_on_after(5):
                await fakes.eof_seen.wait()
            if not fakes.eof_seen.is_set():
                raise ControlError("the target never saw the end of the stream")
            return {
                "flows": {"tcp": 3, "udp": 1, "icmp": 0, "listeners": 1},
                "stream_bytes": len(STREAM),
                "t_freeze": 100.0,
                "timings_ms": {"repair_on": 2.0, "dump": 10.25, "write": 3.0},
            }

        server.register("migrate-out", migrate_out)
        server.register("migrate-precopy", migrate_precopy)
    else:

        async def read_stream(fd: int) -> None:
            async with trio.lowlevel.FdStream(fd) as pipe:
                while data := await pipe.receive_some(65536):
                    fakes.received += data
            fakes.eof_seen.set()
            fakes.reader_done.set()

        async def migrate_in(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
            fakes.log.append((who, "migrate-in"))
            fakes.precopy_seen.append(req.get("precopy"))
            assert len(fds) == 1
            await _misbehave(fakes, who, "migrate-in")
            nursery.start_soon(read_stream, fds.pop())
            return {}

        async def migrate_wait(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
            fakes.log.append((who, "migrate-wait"))
            await _misbehave(fakes, who, "migrate-wait")
            await fakes.reader_done.wait()
            if bytes(fakes.received) != STREAM:
                raise ControlError(f"stream of {len(fakes.received)} bytes is not the one sent")
            return {
                "restored": {"tcp": 3, "udp": 1, "icmp": 0, "listeners": 1},
                "timings_ms": {"read": 4.0, "restore": 20.0},
            }

        async def migrate_wait_precopy(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
            fakes.log.append((who, "migrate-wait-precopy"))
            await _misbehave(fakes, who, "migrate-wait-precopy")
            with trio.fail_after(5):
                while len(fakes.received) < len(STREAM) // 2:  # noqa: ASYNC110 (polls a buffer)
                    await trio.sleep(0.001)
            return {"precopied": 2, "timings_ms": {"precopy": 9}}

        server.register("migrate-in", migrate_in)
        server.register("migrate-wait", migrate_wait)
        server.register("migrate-wait-precopy", migrate_wait_precopy)
    return server


async def _serve(fakes: Fakes, who: str, server: ControlServer, task_status: Any) -> None:
    with trio.CancelScope() as scope:
        fakes.scopes[who] = scope
        await server.serve(task_status=task_status)


@pytest.fixture
async def fakes(paths: tuple[str, str], nursery: trio.Nursery) -> AsyncIterator[Fakes]:
    f = Fakes(*paths)
    for who, path in (("source", f.source_path), ("target", f.target_path)):
        await nursery.start(_serve, f, who, _make(f, who, path, nursery))
    yield f


async def migrate(
    capsys: pytest.CaptureFixture[str], fakes: Fakes, *extra: str, precopy: bool = False
) -> tuple[int, str, str]:
    """Run ferryctl migrate; without pre-copy unless asked (test_precopy_* cover it)."""
    argv = ["migrate", "--source", fakes.source_path, "--target", fakes.target_path, *extra]
    if not precopy:
        argv.append("--no-precopy")
    rc = await trio.to_thread.run_sync(partial(ctl.main, argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


HAPPY = [
    ("source", "status"),
    ("target", "status"),
    ("target", "migrate-in"),
    ("source", "migrate-out"),
    ("target", "migrate-wait"),
    ("source", "migrate-commit"),
    ("target", "migrate-resume"),
]


# ---------------------------------------------------------------------------
# success


async def test_migrate_conversation_and_summary(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = await migrate(capsys, fakes)
    assert (rc, err) == (0, "")
    assert fakes.log == HAPPY
    assert bytes(fakes.received) == STREAM
    assert fakes.same_netns_seen == [False]
    lines = out.splitlines()
    assert lines[0] == "migrated:   3 TCP, 1 UDP, 0 ICMP, 1 listeners"
    assert lines[1] == "restored:   3 TCP, 1 UDP, 0 ICMP, 1 listeners"
    assert lines[2] == f"stream:     {len(STREAM):,} bytes"
    assert lines[3].startswith("downtime:   42.5 ms (freeze to resume); ferryctl took ")
    assert lines[4] == "source ms:  repair_on 2.0, dump 10.2, write 3.0"
    assert lines[5] == "target ms:  read 4.0, restore 20.0, repair_off 1.5, resync 0.5"


async def test_migrate_json(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    fakes.target_ns = fakes.source_ns
    rc, out, _ = await migrate(capsys, fakes, "--json")
    assert rc == 0
    summary = json.loads(out)
    assert fakes.same_netns_seen == [True]
    assert summary["flows"] == {"tcp": 3, "udp": 1, "icmp": 0, "listeners": 1}
    assert summary["stream_bytes"] == len(STREAM)
    assert summary["downtime_ms"] == pytest.approx(42.5)
    assert summary["source_timings_ms"]["dump"] == 10.25
    assert summary["target_timings_ms"] == {
        "read": 4.0,
        "restore": 20.0,
        "repair_off": 1.5,
        "resync": 0.5,
    }


async def test_migrate_leaks_no_descriptor(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _open_fds()
    rc, _, _ = await migrate(capsys, fakes)
    assert rc == 0
    await fakes.reader_done.wait()
    # The fakes' own connections close asynchronously; give them a moment.
    for _ in range(500):
        if not _open_fds() - before:
            break
        await trio.sleep(0.01)
    assert _open_fds() - before == set()


async def test_control_option_names_the_source(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--control", fakes.source_path, "migrate", "--target", fakes.target_path]
    rc = await trio.to_thread.run_sync(partial(ctl.main, argv))
    assert rc == 0, capsys.readouterr().err
    assert fakes.log == HAPPY_PRECOPY


HAPPY_PRECOPY = [
    ("source", "status"),
    ("target", "status"),
    ("target", "migrate-in"),
    ("source", "migrate-precopy"),
    ("target", "migrate-wait-precopy"),
    ("source", "migrate-out"),
    ("target", "migrate-wait"),
    ("source", "migrate-commit"),
    ("target", "migrate-resume"),
]


async def test_precopy_conversation(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    """By default the quiet connections are pre-copied: one pipe, two parts, then the freeze."""
    before = _open_fds()
    rc, out, err = await migrate(capsys, fakes, "--json", precopy=True)
    assert (rc, err) == (0, "")
    assert fakes.log == HAPPY_PRECOPY
    assert fakes.precopy_seen == [True]
    assert bytes(fakes.received) == STREAM
    summary = json.loads(out)
    assert summary["precopied"] == 2
    assert summary["source_timings_ms"]["precopy"] == 7
    assert summary["source_timings_ms"]["target_precopy"] == 9
    await fakes.reader_done.wait()
    for _ in range(500):  # the fakes' own connections close asynchronously
        if not _open_fds() - before:
            break
        await trio.sleep(0.01)
    assert _open_fds() - before == set()


async def test_no_precopy_in_one_namespace(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.target_ns = fakes.source_ns
    rc, _, _ = await migrate(capsys, fakes, precopy=True)
    assert rc == 0
    assert fakes.log == HAPPY
    assert fakes.precopy_seen == [None]


@pytest.mark.parametrize("how", ["refuse", "die"])
async def test_precopy_fails(fakes: Fakes, capsys: pytest.CaptureFixture[str], how: str) -> None:
    fakes.fail["source migrate-precopy"] = how
    rc, _, err = await migrate(capsys, fakes, precopy=True)
    assert rc != 0
    assert "migrate-precopy" in err
    assert ("target", "migrate-abort") in fakes.log
    assert ("source", "migrate-out") not in fakes.log


async def test_target_fails_to_restore_the_precopy(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.fail["target migrate-wait-precopy"] = "refuse"
    rc, _, err = await migrate(capsys, fakes, precopy=True)
    assert rc != 0
    assert "pre-copy failed" in err
    assert fakes.commands("source")[-2:] == ["migrate-abort", "status"]
    assert ("source", "migrate-out") not in fakes.log


# ---------------------------------------------------------------------------
# refused before anything changes


@pytest.mark.parametrize(
    ("knob", "role", "message"),
    [
        ("source_role", "migrating", 'source ferryd is "migrating", expected "running"'),
        ("source_role", "incoming", 'source ferryd is "incoming", expected "running"'),
        ("target_role", "running", 'target ferryd is "running", expected "incoming"'),
        ("target_role", "restored", 'target ferryd is "restored", expected "incoming"'),
    ],
)
async def test_wrong_roles_change_nothing(
    fakes: Fakes, capsys: pytest.CaptureFixture[str], knob: str, role: str, message: str
) -> None:
    setattr(fakes, knob, role)
    rc, out, err = await migrate(capsys, fakes)
    assert (rc, out) == (1, "")
    assert message in err
    assert "nothing was changed" in err
    assert fakes.commands() == ["status", "status"]


async def test_target_not_running(
    fakes: Fakes, capsys: pytest.CaptureFixture[str], paths: tuple[str, str]
) -> None:
    argv = ["migrate", "--source", fakes.source_path, "--target", paths[1] + ".missing"]
    rc = await trio.to_thread.run_sync(partial(ctl.main, argv))
    _, err = capsys.readouterr()
    assert rc == 1
    assert err.startswith("ferryctl: target ferryd is not running")
    assert fakes.commands() == ["status"]


async def test_target_refuses_the_pipe(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    fakes.fail["target migrate-in"] = "refuse"
    rc, _, err = await migrate(capsys, fakes)
    assert rc == 1
    assert "migrate-in refused by the fake target" in err
    assert "nothing was changed" in err
    assert fakes.commands("source") == ["status"]


def test_usage_needs_a_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["migrate", "--target", "/nonexistent/t.sock"]) == 1
    assert "no source" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        ctl.main(["migrate", "--source", "/x"])  # --target is required
    assert info.value.code == 2


def test_same_socket_twice(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["migrate", "--source", "/x/a.sock", "--target", "/x/../x/a.sock"]) == 1
    assert "same control socket" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# failures during the migration: what is aborted


async def test_source_refuses_stream(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    """The source failed and rolled back itself: only the target is reset."""
    fakes.fail["source migrate-out"] = "refuse"
    rc, _, err = await migrate(capsys, fakes)
    assert rc == 1
    assert "migrate-out refused by the fake source" in err
    assert "the source rolled back and keeps running" in err
    assert fakes.log[-3:] == [
        ("source", "migrate-out"),
        ("target", "migrate-abort"),
        ("source", "status"),
    ]
    assert ("source", "migrate-abort") not in fakes.log
    # Our copy of the write end was closed: the target saw the (empty) stream end.
    with trio.fail_after(5):
        await fakes.reader_done.wait()
    assert fakes.received == b""


async def test_source_dies_mid_stream(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    """No answer from the source: both sides get an abort (the source's fails too)."""
    fakes.fail["source migrate-out"] = "die"
    rc, _, err = await migrate(capsys, fakes)
    assert rc == 1
    assert "source migrate-out: ferryd at" in err
    assert "closed the connection unanswered" in err
    assert "source migrate-abort also failed" in err
    assert "may still be frozen" in err
    assert fakes.commands("target")[-1] == "migrate-abort"


async def test_source_hangs(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    fakes.fail["source migrate-out"] = "hang"
    rc, _, err = await migrate(capsys, fakes, "--timeout", "0.5")
    assert rc == 1
    assert "no answer from ferryd" in err
    assert "within 0.5 s" in err
    assert fakes.log[-3:] == [
        ("target", "migrate-abort"),
        ("source", "migrate-abort"),
        ("source", "status"),
    ]


async def test_target_dies_during_restore(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    fakes.fail["target migrate-wait"] = "die"
    rc, _, err = await migrate(capsys, fakes)
    assert rc == 1
    assert "restore failed: target migrate-wait" in err
    assert "migration aborted, the source resumed" in err
    assert fakes.log[-2:] == [("source", "migrate-abort"), ("source", "status")]
    assert "migrate-commit" not in fakes.commands("source")


async def test_restore_fails(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    fakes.fail["target migrate-wait"] = "refuse"
    rc, _, err = await migrate(capsys, fakes)
    assert rc == 1
    assert "restore failed: target migrate-wait: migrate-wait refused by the fake target" in err
    assert fakes.log[-3:] == [
        ("target", "migrate-abort"),
        ("source", "migrate-abort"),
        ("source", "status"),
    ]
    assert "migrate-commit" not in fakes.commands("source")


async def test_commit_fails(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    fakes.fail["source migrate-commit"] = "refuse"
    rc, _, err = await migrate(capsys, fakes)
    assert rc == 1
    assert "source migrate-commit: migrate-commit refused" in err
    assert fakes.log[-3:] == [
        ("target", "migrate-abort"),
        ("source", "migrate-abort"),
        ("source", "status"),
    ]
    assert "migrate-resume" not in fakes.commands("target")


async def test_resume_fails(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    fakes.fail["target migrate-resume"] = "refuse"
    rc, out, err = await migrate(capsys, fakes)
    assert (rc, out) == (1, "")
    assert "target migrate-resume: migrate-resume refused by the fake target" in err
    assert "migration aborted, the source resumed" in err
    assert fakes.log[-5:] == [
        ("source", "migrate-commit"),
        ("target", "migrate-resume"),
        ("target", "migrate-abort"),
        ("source", "migrate-abort"),
        ("source", "status"),
    ]


async def test_resume_fails_and_source_abort_fails(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.fail["target migrate-resume"] = "refuse"
    fakes.fail["source migrate-abort"] = "refuse"
    rc, _, err = await migrate(capsys, fakes)
    assert rc == 1
    assert "source migrate-abort also failed: migrate-abort: migrate-abort refused" in err
    assert "check its status" in err


async def test_source_that_could_not_roll_back_is_not_called_running(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    """The source failed and its rollback did not complete: ferryctl asks, and says so."""
    fakes.fail["source migrate-out"] = "stuck"
    rc, _, err = await migrate(capsys, fakes)
    assert rc == 1
    assert "rollback incomplete: the repair helper is gone" in err
    assert "rolled back and keeps running" not in err
    assert "resumed" not in err
    assert "the source did NOT resume (it is rollback-pending)" in err
    assert f"ferryctl --control {fakes.source_path} migrate-abort" in err
    assert fakes.log[-2:] == [("target", "migrate-abort"), ("source", "status")]


async def test_abort_that_cannot_complete_is_reported(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.fail["target migrate-wait"] = "refuse"
    fakes.fail["source migrate-abort"] = "stuck"
    rc, _, err = await migrate(capsys, fakes)
    assert rc == 1
    assert "source migrate-abort also failed" in err
    assert "rollback incomplete" in err
    assert "resumed" not in err


async def test_migrate_abort_command(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    """``ferryctl migrate-abort``: the daemon's answer as JSON, exit 1 when it failed."""
    argv = ["--control", fakes.source_path, "migrate-abort"]
    rc = await trio.to_thread.run_sync(ctl.main, argv)
    out, _ = capsys.readouterr()
    assert (rc, json.loads(out)) == (0, {"ok": True})
    fakes.fail["source migrate-abort"] = "stuck"
    rc = await trio.to_thread.run_sync(ctl.main, argv)
    out, err = capsys.readouterr()
    assert (rc, out) == (1, "")
    assert "migrate-abort failed; rollback incomplete: the repair helper is gone" in err
    assert fakes.commands("source") == ["migrate-abort", "migrate-abort"]


# ---------------------------------------------------------------------------
# the summary (pure)


def test_summary_without_comparable_clocks() -> None:
    summary = ctl.migration_summary(
        {"t_freeze": 50.0, "flows": {"tcp": 1}}, {}, {"t_resumed": 10.0}, 0.2
    )
    assert summary["downtime_ms"] is None
    assert summary["ferryctl_ms"] == 200.0
    text = ctl.format_migration_summary(summary)
    assert "downtime:   unknown; ferryctl took 200.0 ms" in text
    assert "migrated:   1 TCP, 0 UDP, 0 ICMP, 0 listeners" in text
    assert "restored:   0 TCP" in text
    assert "source ms:  (none reported)" in text


def test_summary_keeps_both_sides_timings_apart() -> None:
    summary = ctl.migration_summary(
        {"timings_ms": {"dump": 1}},
        {"timings_ms": {"total": 2}},
        {"timings_ms": {"total": 3}, "t_resumed": 1.0},
        0.0,
    )
    assert summary["target_timings_ms"] == {"total": 2, "resume_total": 3}
    assert summary["stream_bytes"] is None
