"""Two fake daemons that speak the migration protocol, for the coordinator and ferryctl tests.

Each fake is a real :class:`~ferryd.control.ControlServer` in the test's
nursery with handlers that behave like a source or a target ferryd: the
source writes a stream into the pipe end it is handed, the target reads
its end to EOF in the background and only then lets ``migrate-wait``
answer. Every request lands in one shared log, so a test checks the exact
conversation (which commands, in which order, to whom), including what is
sent when something fails: a refusal, a daemon that dies or hangs, a
failed restore, commit or resume.

The source's ``migrate-out`` answers only after the target has seen the end
of the stream. That holds only if the coordinator closed its own copy of
the write end as soon as it was sent, so every successful run also checks
that.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from ferryd.control import ControlError, ControlServer
from testbed.wait import until

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
    stream_kinds: list[str] = field(default_factory=list)
    """What the source's stream was, per migrate-out with one ("pipe" or "socket")."""
    received: bytearray = field(default_factory=bytearray)
    eof_seen: trio.Event = field(default_factory=trio.Event)
    reader_done: trio.Event = field(default_factory=trio.Event)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    precopy_pipe: trio.lowlevel.FdStream | None = None
    precopy_seen: list[object] = field(default_factory=list)

    def commands(self, who: str | None = None) -> list[str]:
        return [cmd for side, cmd in self.log if who is None or side == who]


@pytest.fixture
def fake_paths() -> Iterator[tuple[str, str]]:
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
            fakes.stream_kinds.append(
                "socket" if fds and stat.S_ISSOCK(os.fstat(fds[0]).st_mode) else "pipe"
            )
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
            await until(lambda: len(fakes.received) >= len(STREAM) // 2, what="the pre-copy")
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
async def fakes(fake_paths: tuple[str, str], nursery: trio.Nursery) -> AsyncIterator[Fakes]:
    f = Fakes(*fake_paths)
    for who, path in (("source", f.source_path), ("target", f.target_path)):
        await nursery.start(_serve, f, who, _make(f, who, path, nursery))
    yield f


def open_fds() -> set[str]:
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


async def settle_fds(before: set[str]) -> set[str]:
    """Descriptors opened since *before* once the fakes' own connections closed.

    The fakes close their side asynchronously: wait until they are gone.
    """
    for _ in range(500):
        if not open_fds() - before:
            break
        await trio.sleep(0.01)
    return open_fds() - before
