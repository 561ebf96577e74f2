"""``ferryctl migrate`` and ``migrate-abort``: arguments, output and exit status.

The conversation itself is the coordinator's (test_coordinator.py); here
the same fake daemons (migration_fakes.py) check what ferryctl makes of
it: the summary it prints (table or JSON), one line on stderr and exit 1
when the coordinator fails, and the usage errors.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import trio

from ferryd import ctl
from ferryd.coordinator import migration_summary
from tests.unit.migration_fakes import HAPPY, HAPPY_PRECOPY, STREAM, Fakes


async def migrate(
    capsys: pytest.CaptureFixture[str], fakes: Fakes, *extra: str, precopy: bool = False
) -> tuple[int, str, str]:
    """Run ferryctl migrate; without pre-copy unless asked."""
    argv = ["migrate", "--source", fakes.source_path, "--target", fakes.target_path, *extra]
    if not precopy:
        argv.append("--no-precopy")
    rc = await trio.to_thread.run_sync(partial(ctl.main, argv))
    out, err = capsys.readouterr()
    return rc, out, err


async def test_migrate_prints_the_summary(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await migrate(capsys, fakes)
    assert (rc, err) == (0, "")
    assert fakes.log == HAPPY
    lines = out.splitlines()
    assert lines[0] == "migrated:   3 TCP, 1 UDP, 0 ICMP, 1 listeners"
    assert lines[1] == "restored:   3 TCP, 1 UDP, 0 ICMP, 1 listeners"
    assert lines[2] == f"stream:     {len(STREAM):,} bytes"
    assert lines[3].startswith("downtime:   42.5 ms (freeze to resume); ferryctl took ")
    assert lines[4] == "source ms:  repair_on 2.0, dump 10.2, write 3.0"
    assert lines[5] == "target ms:  read 4.0, restore 20.0, repair_off 1.5, resync 0.5"


async def test_migrate_json(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = await migrate(capsys, fakes, "--json")
    assert rc == 0
    summary = json.loads(out)
    assert summary["flows"] == {"tcp": 3, "udp": 1, "icmp": 0, "listeners": 1}
    assert summary["stream_bytes"] == len(STREAM)
    assert summary["downtime_ms"] == pytest.approx(42.5)
    assert summary["source_timings_ms"]["dump"] == 10.25


async def test_control_option_names_the_source_and_precopy_is_the_default(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--control", fakes.source_path, "migrate", "--target", fakes.target_path]
    rc = await trio.to_thread.run_sync(partial(ctl.main, argv))
    assert rc == 0, capsys.readouterr().err
    assert fakes.log == HAPPY_PRECOPY


async def test_failure_is_one_line_and_exit_1(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.fail["target migrate-resume"] = "refuse"
    rc, out, err = await migrate(capsys, fakes)
    assert (rc, out) == (1, "")
    assert err == (
        "ferryctl: migrate: target migrate-resume: migrate-resume refused by the fake target;"
        " migration aborted, the source resumed\n"
    )


async def test_target_not_running(
    fakes: Fakes, capsys: pytest.CaptureFixture[str], fake_paths: tuple[str, str]
) -> None:
    argv = ["migrate", "--source", fakes.source_path, "--target", fake_paths[1] + ".missing"]
    rc = await trio.to_thread.run_sync(partial(ctl.main, argv))
    _, err = capsys.readouterr()
    assert rc == 1
    assert err.startswith("ferryctl: target ferryd is not running")
    assert fakes.commands() == ["status"]


def test_usage_needs_a_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["migrate", "--target", "/nonexistent/t.sock"]) == 1
    assert "no source" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        ctl.main(["migrate", "--source", "/x"])  # --target is required
    assert info.value.code == 2


def test_same_socket_twice(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["migrate", "--source", "/x/a.sock", "--target", "/x/../x/a.sock"]) == 1
    assert "same control socket" in capsys.readouterr().err


async def test_migrate_abort_command(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    """``ferryctl migrate-abort``: the role reached (JSON with --json), exit 1 when it failed."""
    argv = ["--control", fakes.source_path, "migrate-abort"]
    rc = await trio.to_thread.run_sync(ctl.main, [*argv, "--json"])
    out, _ = capsys.readouterr()
    assert (rc, json.loads(out)) == (0, {"ok": True})
    assert ctl.format_abort({"role": "running", "note": "rolled back, nothing lost"}) == (
        "role: running (rolled back, nothing lost)\n"
    )
    fakes.fail["source migrate-abort"] = "stuck"
    rc = await trio.to_thread.run_sync(ctl.main, argv)
    out, err = capsys.readouterr()
    assert (rc, out) == (1, "")
    assert "migrate-abort failed; rollback incomplete: the repair helper is gone" in err
    assert fakes.commands("source") == ["migrate-abort", "migrate-abort"]
    rc = await trio.to_thread.run_sync(ctl.main, argv)
    out, _ = capsys.readouterr()
    assert (rc, out) == (1, "")


def test_summary_text_without_comparable_clocks() -> None:
    summary = migration_summary(
        {"t_freeze": 50.0, "flows": {"tcp": 1}}, {}, {"t_resumed": 10.0}, 0.2
    )
    text = ctl.format_migration_summary(summary)
    assert "downtime:   unknown; ferryctl took 200.0 ms" in text
    assert "migrated:   1 TCP, 0 UDP, 0 ICMP, 0 listeners" in text
    assert "restored:   0 TCP" in text
    assert "source ms:  (none reported)" in text
