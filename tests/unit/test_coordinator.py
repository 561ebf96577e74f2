"""The migration coordinator (ferryd.coordinator) against two fake daemons, without root.

The fakes (migration_fakes.py) are real control servers on real Unix
sockets with stub handlers; the coordinator runs in a worker thread, as it
blocks. Each test checks the exact conversation, what is returned or which
error is raised, and that the error says whether the source resumed.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio

from ferryd.coordinator import (
    MigrationAborted,
    MigrationError,
    MigrationRefused,
    migrate,
    migration_summary,
)
from tests.unit.migration_fakes import (
    HAPPY,
    HAPPY_PRECOPY,
    STREAM,
    Fakes,
    open_fds,
    settle_fds,
)


async def run(fakes: Fakes, *, precopy: bool = False, limit: float = 60.0) -> dict[str, Any]:
    """migrate() from the fake source to the fake target, off the trio thread."""
    return await trio.to_thread.run_sync(
        partial(migrate, fakes.source_path, fakes.target_path, timeout=limit, precopy=precopy)
    )


async def fails(fakes: Fakes, **kwargs: Any) -> MigrationError:
    with pytest.raises(MigrationError) as info:
        await run(fakes, **kwargs)
    return info.value


# ---------------------------------------------------------------------------
# success


async def test_conversation_and_summary(fakes: Fakes) -> None:
    before = open_fds()
    summary = await run(fakes)
    assert fakes.log == HAPPY
    assert bytes(fakes.received) == STREAM
    assert fakes.same_netns_seen == [False]
    assert fakes.stream_kinds == ["pipe"]
    assert summary["flows"] == {"tcp": 3, "udp": 1, "icmp": 0, "listeners": 1}
    assert summary["restored"] == {"tcp": 3, "udp": 1, "icmp": 0, "listeners": 1}
    assert summary["stream_bytes"] == len(STREAM)
    assert summary["downtime_ms"] == pytest.approx(42.5)
    assert summary["source_timings_ms"] == {"repair_on": 2.0, "dump": 10.25, "write": 3.0}
    assert summary["target_timings_ms"] == {
        "read": 4.0,
        "restore": 20.0,
        "repair_off": 1.5,
        "resync": 0.5,
    }
    await fakes.reader_done.wait()
    assert await settle_fds(before) == set(), "the coordinator leaked a descriptor"


async def test_one_namespace_tells_the_source_and_skips_precopy(fakes: Fakes) -> None:
    fakes.target_ns = fakes.source_ns
    await run(fakes, precopy=True)
    assert fakes.log == HAPPY
    assert fakes.same_netns_seen == [True]
    assert fakes.stream_kinds == ["socket"]  # it carries the TCP sockets themselves
    assert fakes.precopy_seen == [None]


async def test_precopy_conversation(fakes: Fakes) -> None:
    """Quiet connections are pre-copied: one pipe, two parts, then the freeze."""
    before = open_fds()
    summary = await run(fakes, precopy=True)
    assert fakes.log == HAPPY_PRECOPY
    assert fakes.precopy_seen == [True]
    assert bytes(fakes.received) == STREAM
    assert summary["precopied"] == 2
    assert summary["source_timings_ms"]["precopy"] == 7
    assert summary["source_timings_ms"]["target_precopy"] == 9
    await fakes.reader_done.wait()
    assert await settle_fds(before) == set()


# ---------------------------------------------------------------------------
# refused: nothing was changed


@pytest.mark.parametrize(
    ("knob", "role", "message"),
    [
        ("source_role", "migrating", 'source ferryd is "migrating", expected "running"'),
        ("source_role", "incoming", 'source ferryd is "incoming", expected "running"'),
        ("target_role", "running", 'target ferryd is "running", expected "incoming"'),
        ("target_role", "restored", 'target ferryd is "restored", expected "incoming"'),
    ],
)
async def test_wrong_roles_change_nothing(fakes: Fakes, knob: str, role: str, message: str) -> None:
    setattr(fakes, knob, role)
    error = await fails(fakes)
    assert isinstance(error, MigrationRefused)
    assert message in str(error)
    assert "nothing was changed" in str(error)
    assert fakes.commands() == ["status", "status"]


async def test_target_not_running(fakes: Fakes) -> None:
    with pytest.raises(MigrationRefused, match=r"^target ferryd is not running"):
        await trio.to_thread.run_sync(migrate, fakes.source_path, fakes.target_path + ".missing")
    assert fakes.commands() == ["status"]


async def test_target_refuses_the_pipe(fakes: Fakes) -> None:
    fakes.fail["target migrate-in"] = "refuse"
    error = await fails(fakes)
    assert isinstance(error, MigrationRefused)
    assert "migrate-in refused by the fake target" in str(error)
    assert "nothing was changed" in str(error)
    assert fakes.commands("source") == ["status"]


def test_same_socket_twice() -> None:
    with pytest.raises(MigrationRefused, match="same control socket"):
        migrate("/x/a.sock", "/x/../x/a.sock")


# ---------------------------------------------------------------------------
# failures during the migration: what is aborted, and whether the source resumed


@pytest.mark.parametrize("how", ["refuse", "die"])
async def test_precopy_fails(fakes: Fakes, how: str) -> None:
    fakes.fail["source migrate-precopy"] = how
    error = await fails(fakes, precopy=True)
    assert isinstance(error, MigrationAborted)
    assert "migrate-precopy" in str(error)
    assert ("target", "migrate-abort") in fakes.log
    assert ("source", "migrate-out") not in fakes.log


async def test_target_fails_to_restore_the_precopy(fakes: Fakes) -> None:
    fakes.fail["target migrate-wait-precopy"] = "refuse"
    error = await fails(fakes, precopy=True)
    assert isinstance(error, MigrationAborted) and error.source_resumed
    assert "pre-copy failed" in str(error)
    assert fakes.commands("source")[-2:] == ["migrate-abort", "status"]
    assert ("source", "migrate-out") not in fakes.log


async def test_source_refuses_stream(fakes: Fakes) -> None:
    """The source failed and rolled back itself: only the target is reset."""
    fakes.fail["source migrate-out"] = "refuse"
    error = await fails(fakes)
    assert isinstance(error, MigrationAborted) and error.source_resumed
    assert "migrate-out refused by the fake source" in str(error)
    assert "the source rolled back and keeps running" in str(error)
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


async def test_source_dies_mid_stream(fakes: Fakes) -> None:
    """No answer from the source: both sides get an abort (the source's fails too)."""
    fakes.fail["source migrate-out"] = "die"
    error = await fails(fakes)
    assert isinstance(error, MigrationAborted) and not error.source_resumed
    assert "source migrate-out: ferryd at" in str(error)
    assert "closed the connection unanswered" in str(error)
    assert "source migrate-abort also failed" in str(error)
    assert "may still be frozen" in str(error)
    assert fakes.commands("target")[-1] == "migrate-abort"


async def test_source_hangs(fakes: Fakes) -> None:
    fakes.fail["source migrate-out"] = "hang"
    error = await fails(fakes, limit=0.5)
    assert "no answer from ferryd" in str(error)
    assert "within 0.5 s" in str(error)
    assert fakes.log[-3:] == [
        ("target", "migrate-abort"),
        ("source", "migrate-abort"),
        ("source", "status"),
    ]


async def test_target_dies_during_restore(fakes: Fakes) -> None:
    fakes.fail["target migrate-wait"] = "die"
    error = await fails(fakes)
    assert isinstance(error, MigrationAborted) and error.source_resumed
    assert "restore failed: target migrate-wait" in str(error)
    assert "migration aborted, the source resumed" in str(error)
    assert fakes.log[-2:] == [("source", "migrate-abort"), ("source", "status")]
    assert "migrate-commit" not in fakes.commands("source")


async def test_restore_fails(fakes: Fakes) -> None:
    fakes.fail["target migrate-wait"] = "refuse"
    error = await fails(fakes)
    assert "restore failed: target migrate-wait: migrate-wait refused by the fake target" in str(
        error
    )
    assert fakes.log[-3:] == [
        ("target", "migrate-abort"),
        ("source", "migrate-abort"),
        ("source", "status"),
    ]
    assert "migrate-commit" not in fakes.commands("source")


async def test_commit_fails(fakes: Fakes) -> None:
    fakes.fail["source migrate-commit"] = "refuse"
    error = await fails(fakes)
    assert "source migrate-commit: migrate-commit refused" in str(error)
    assert fakes.log[-3:] == [
        ("target", "migrate-abort"),
        ("source", "migrate-abort"),
        ("source", "status"),
    ]
    assert "migrate-resume" not in fakes.commands("target")


async def test_resume_fails(fakes: Fakes) -> None:
    fakes.fail["target migrate-resume"] = "refuse"
    error = await fails(fakes)
    assert isinstance(error, MigrationAborted) and error.source_resumed
    assert "target migrate-resume: migrate-resume refused by the fake target" in str(error)
    assert "migration aborted, the source resumed" in str(error)
    assert fakes.log[-5:] == [
        ("source", "migrate-commit"),
        ("target", "migrate-resume"),
        ("target", "migrate-abort"),
        ("source", "migrate-abort"),
        ("source", "status"),
    ]


async def test_resume_fails_and_source_abort_fails(fakes: Fakes) -> None:
    fakes.fail["target migrate-resume"] = "refuse"
    fakes.fail["source migrate-abort"] = "refuse"
    error = await fails(fakes)
    assert isinstance(error, MigrationAborted) and not error.source_resumed
    assert "source migrate-abort also failed: migrate-abort: migrate-abort refused" in str(error)
    assert "check its status" in str(error)


async def test_source_that_could_not_roll_back_is_not_called_running(fakes: Fakes) -> None:
    """The source failed and its rollback did not complete: the coordinator asks, and says so."""
    fakes.fail["source migrate-out"] = "stuck"
    error = await fails(fakes)
    assert isinstance(error, MigrationAborted) and not error.source_resumed
    text = str(error)
    assert "rollback incomplete: the repair helper is gone" in text
    assert "rolled back and keeps running" not in text
    assert "resumed" not in text
    assert "the source did NOT resume (it is rollback-pending)" in text
    assert f"ferryctl --control {fakes.source_path} migrate-abort" in text
    assert fakes.log[-2:] == [("target", "migrate-abort"), ("source", "status")]


async def test_abort_that_cannot_complete_is_reported(fakes: Fakes) -> None:
    fakes.fail["target migrate-wait"] = "refuse"
    fakes.fail["source migrate-abort"] = "stuck"
    error = await fails(fakes)
    assert isinstance(error, MigrationAborted) and not error.source_resumed
    assert "source migrate-abort also failed" in str(error)
    assert "rollback incomplete" in str(error)
    assert "resumed" not in str(error)


# ---------------------------------------------------------------------------
# the summary (pure)


def test_summary_without_comparable_clocks() -> None:
    summary = migration_summary(
        {"t_freeze": 50.0, "flows": {"tcp": 1}}, {}, {"t_resumed": 10.0}, 0.2
    )
    assert summary["downtime_ms"] is None
    assert summary["ferryctl_ms"] == 200.0
    assert summary["flows"] == {"tcp": 1}
    assert summary["restored"] == {}
    assert summary["source_timings_ms"] == {}


def test_summary_keeps_both_sides_timings_apart() -> None:
    summary = migration_summary(
        {"timings_ms": {"dump": 1}},
        {"timings_ms": {"total": 2}},
        {"timings_ms": {"total": 3}, "t_resumed": 1.0},
        0.0,
    )
    assert summary["target_timings_ms"] == {"total": 2, "resume_total": 3}
    assert summary["stream_bytes"] is None
