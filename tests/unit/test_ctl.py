"""ferryctl's status and flows (ferryd.ctl) against a real ControlServer with test handlers.

ferryctl's main() runs in a worker thread and as the installed console
script; the server is control_support.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from ferryd import ctl
from ferryd.control import ControlError, ControlServer, DaemonNotRunning, request
from tests.unit.control_support import COUNTERS, FLOWS, Daemon, make_server


async def run_ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await trio.to_thread.run_sync(partial(ctl.main, list(argv)))
    out, err = capsys.readouterr()
    return rc, out, err


async def test_ctl_status(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run_ctl(capsys, "--control", daemon.path, "status", "--json")
    assert (rc, err) == (0, "")
    assert json.loads(out) == {"ok": True, "ready": True, "version": "test"}
    assert out.startswith("{\n  "), "status JSON should be pretty-printed"


async def test_ctl_status_human(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    """Labelled lines; what this (old or new) daemon did not answer shows as '?'."""
    rc, out, err = await run_ctl(capsys, "--control", daemon.path, "status")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["role:", "?", "(ready)"]
    assert lines[1].split() == ["frontend:", "?"]
    assert "IPv4:         off" in out


def test_format_status_of_a_daemon() -> None:
    status = {
        "ready": False,
        "role": "incoming",
        "frontend": {"kind": "tap", "name": "tap0", "rings": {"rx": True}, "f": ["a", "b"]},
        "link": {
            "mac": "9a:55:9a:55:9a:55",
            "mtu": 1500,
            "ipv4": {"address": "10.0.0.2/24", "gateway": "10.0.0.1", "dns": ["10.0.0.53"]},
        },
        "guest_mac": None,
        "flows": {"tcp": 3, "udp": 1, "icmp": 0},
        "descriptors": {"in_use": 4, "for_flows": 900},
        "migration": {"rollback_error": "helper gone"},
    }
    assert ctl.format_status(status).splitlines() == [
        "role:         incoming (not ready)",
        "frontend:     tap: name tap0, rings rx=True, f a,b",
        "link:         MAC 9a:55:9a:55:9a:55, MTU 1500",
        "guest MAC:    not seen yet",
        "IPv4:         10.0.0.2/24 via 10.0.0.1, DNS 10.0.0.53",
        "IPv6:         off",
        "flows:        3 TCP, 1 UDP, 0 ICMP",
        "descriptors:  4 in use of 900 for flows",
        "rollback:     pending: helper gone",
        "(ferryctl counters: what it counted; history: its migrations)",
    ]


async def test_ctl_status_not_running(sock_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run_ctl(capsys, "--control", sock_path, "status")
    assert rc == 1
    assert out == ""
    assert err == f"ferryctl: ferryd is not running (no one listens on {sock_path})\n"


async def test_ctl_status_wait_until_ready(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.ready_after = 3
    rc, out, _ = await run_ctl(capsys, "--control", daemon.path, "status", "--wait", "10", "--json")
    assert rc == 0
    assert json.loads(out)["ready"] is True
    assert daemon.status_calls == 4


async def test_ctl_status_wait_for_socket(
    sock_path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ferryctl started before the daemon: it retries until the daemon is up."""
    refused = threading.Event()

    def counting_request(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return request(*args, **kwargs)
        except DaemonNotRunning:
            refused.set()
            raise

    monkeypatch.setattr(ctl, "request", counting_request)
    d = make_server(sock_path)
    async with trio.open_nursery() as nursery:
        ctl_done = trio.Event()
        result: list[tuple[int, str, str]] = []

        async def ctl_task() -> None:
            argv = ("--control", sock_path, "status", "--wait", "10", "--json")
            result.append(await run_ctl(capsys, *argv))
            ctl_done.set()

        nursery.start_soon(ctl_task)
        # Start the server only once ferryctl has been refused at least once.
        assert await trio.to_thread.run_sync(refused.wait, 5), "ferryctl never tried"
        await nursery.start(d.server.serve)
        with trio.fail_after(10):
            await ctl_done.wait()
        nursery.cancel_scope.cancel()
    assert result[0][0] == 0, result
    assert json.loads(result[0][1])["ready"] is True


async def test_ctl_status_wait_times_out(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.ready_after = 10**9
    rc, out, err = await run_ctl(capsys, "--control", daemon.path, "status", "--wait", "0.3")
    assert rc == 1
    assert out == ""
    assert "not ready after 0.3 s (daemon answered but is not ready)" in err


async def test_ctl_flows_table(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run_ctl(capsys, "--control", daemon.path, "flows")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == [
        "PROTO",
        "GUEST",
        "REMOTE",
        "HOST",
        "STATE",
        "TO_GUEST",
        "FROM_GUEST",
    ]
    assert lines[1].split() == [
        "tcp",
        "10.77.0.1:40000",
        "192.0.2.7:443",
        "10.77.0.2:80",
        "ESTABLISHED",
        "123456",
        "78",
    ]
    assert lines[2].split()[1:4] == ["[fd00:77::1]:5353", "[2001:db8::53]:53", "[fd00:77::3]:53"]
    # Aligned: every column starts at the same offset on every line.
    for column in ("GUEST", "REMOTE", "HOST", "STATE"):
        start = lines[0].index(column)
        assert all(line[start - 2 : start] == "  " for line in lines)
    # Byte counts are right-aligned on the header's right edge.
    assert len({len(line) for line in lines}) == 1


async def test_ctl_flows_json(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = await run_ctl(capsys, "--control", daemon.path, "flows", "--json")
    assert rc == 0
    assert json.loads(out) == FLOWS


async def test_ctl_counters_table(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run_ctl(capsys, "--control", daemon.path, "counters")
    assert (rc, err) == (0, "")
    assert out == (
        "GROUP     COUNTER       VALUE\n"
        "stack     frames_in   1234567\n"
        "stack     frames_out       12\n"
        "stack     malformed         0\n"
        "refusals  tcp               3\n"
        "refusals  unanswered        0\n"
    )


async def test_ctl_counters_json(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = await run_ctl(capsys, "--control", daemon.path, "counters", "--json")
    assert rc == 0
    assert json.loads(out) == COUNTERS


async def test_ctl_error_response(sock_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    server = ControlServer(sock_path)

    async def status(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        raise ControlError("shutting down")

    server.register("status", status)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        rc, out, err = await run_ctl(capsys, "--control", sock_path, "status", "--wait", "5")
        assert (rc, out) == (1, "")
        assert err == "ferryctl: status: shutting down\n"
        rc, _, err = await run_ctl(capsys, "--control", sock_path, "flows")
        assert rc == 1
        assert "unknown command 'flows'" in err
        nursery.cancel_scope.cancel()


async def test_ctl_console_script(daemon: Daemon) -> None:
    """The installed entry point works (runs in a real subprocess)."""
    script = Path(sys.executable).parent / "ferryctl"
    if not script.exists():
        pytest.skip(f"ferryctl console script not installed next to {sys.executable}")
    result = await trio.run_process(
        [str(script), "--control", daemon.path, "status", "--wait", "5", "--json"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ready"] is True


def test_ctl_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ctl.main(["status"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        ctl.main(["--control", "/x", "status", "--wait", "-1"])
    assert "zero or more seconds" in capsys.readouterr().err


def test_format_flow_table_tolerates_missing_fields() -> None:
    text = ctl.format_flow_table([{"proto": "icmp", "guest_addr": "10.0.0.1"}])
    assert text.splitlines()[1].split() == ["icmp", "10.0.0.1", "?", "?", "?", "?", "?"]


HISTORY = [
    {
        "seq": 1,
        "direction": "out",
        "outcome": "rolled-back",
        "finished_at": 1.7e9,
        "downtime_ms": 12.5,
        "flows": {"tcp": 0, "udp": 0, "icmp": 0, "listeners": 0},
        "error": "migration failed: target gone",
    },
    {
        "seq": 2,
        "direction": "out",
        "outcome": "completed",
        "finished_at": 1.7e9 + 60,
        "downtime_ms": 3.25,
        "flows": {"tcp": 7, "udp": 1, "icmp": 0, "listeners": 2},
        "error": None,
    },
]


@pytest.fixture
async def ops_daemon(sock_path: str) -> Any:
    """A control server answering history and metrics as ferryd does (max_fds=0)."""
    server = ControlServer(sock_path)

    async def history(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"history": HISTORY}

    async def metrics(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"text": "# HELP ferry_ready x\n# TYPE ferry_ready gauge\nferry_ready 1.0\n"}

    server.register("history", history, max_fds=0)
    server.register("metrics", metrics, max_fds=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield sock_path
        nursery.cancel_scope.cancel()


async def test_ctl_history(ops_daemon: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run_ctl(capsys, "--control", ops_daemon, "history")
    assert (rc, err) == (0, "")
    header, first, second = out.splitlines()
    assert header.split() == ["SEQ", "FINISHED", "DIR", "OUTCOME", "DOWNTIME_MS", "FLOWS", "ERROR"]
    assert " out  rolled-back " in first and first.endswith("migration failed: target gone")
    assert " completed " in second and "3.2" in second
    assert "7 TCP, 1 UDP, 0 ICMP, 2 listeners" in second
    rc, out, err = await run_ctl(capsys, "--control", ops_daemon, "history", "--json")
    assert (rc, err, json.loads(out)) == (0, "", HISTORY)


def test_format_history_empty() -> None:
    assert ctl.format_history([]) == "no migration yet\n"


async def test_ctl_metrics_is_the_text(ops_daemon: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The exposition as ferryd made it, and no --json (a format of its own)."""
    rc, out, err = await run_ctl(capsys, "--control", ops_daemon, "metrics")
    assert (rc, err) == (0, "")
    assert out == "# HELP ferry_ready x\n# TYPE ferry_ready gauge\nferry_ready 1.0\n"
    with pytest.raises(SystemExit) as info:
        ctl.main(["--control", ops_daemon, "metrics", "--json"])
    assert info.value.code == 2


def test_every_command_but_metrics_offers_json() -> None:
    """One option, from one parent parser: each subcommand's help lists it."""
    parser = ctl.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    offered = {
        name
        for name, command in sub.choices.items()
        if any("--json" in a.option_strings for a in command._actions)
    }
    assert offered == set(sub.choices) - {"metrics"}
    assert set(sub.choices) >= {"status", "flows", "counters", "history", "migrate"}
