"""One line for the operator, a traceback for a bug (ferryd.exits)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ferryd.config import parse_options
from ferryd.exits import StartupError, ensure_parent_dir, exit_on_failure


class Expected(Exception):
    pass


def _fail(exc: BaseException) -> None:
    raise exc


def test_expected_failure_in_nested_groups_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [Expected("port 80: in use")])])
    with pytest.raises(SystemExit) as info:
        exit_on_failure("prog", lambda: _fail(group), {Expected: 1}, verbose=False)
    assert info.value.code == 1
    assert capsys.readouterr().err == "prog: error: port 80: in use\n"


def test_the_highest_status_wins(capsys: pytest.CaptureFixture[str]) -> None:
    group = ExceptionGroup("g", [Expected("a"), StartupError("b")])
    with pytest.raises(SystemExit) as info:
        exit_on_failure("prog", lambda: _fail(group), {Expected: 1, StartupError: 2}, verbose=False)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["prog: error: a", "prog: error: b"]


def test_verbose_adds_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        exit_on_failure("prog", lambda: _fail(Expected("x")), {Expected: 1}, verbose=True)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("prog: error: x\n")


def test_a_bug_shows_its_traceback_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    group = ExceptionGroup("g", [Expected("fine"), KeyError("oops")])
    with pytest.raises(SystemExit) as info:
        exit_on_failure("prog", lambda: _fail(group), {Expected: 2}, verbose=False)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'oops'" in err
    assert err.splitlines()[-1].startswith("prog: internal error (a bug in ferry")


def test_success_and_interrupt() -> None:
    with pytest.raises(SystemExit) as info:
        exit_on_failure("prog", lambda: None, {}, verbose=False)
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        exit_on_failure("prog", lambda: _fail(KeyboardInterrupt()), {}, verbose=False)
    assert info.value.code == 130


def test_parent_directory_is_made_0755(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        ensure_parent_dir(str(tmp_path / "a" / "b" / "x.sock"), "control socket")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o755


def test_a_file_in_the_way_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(StartupError, match=r"control socket .*/f/x.sock: .*/f is not a directory"):
        ensure_parent_dir(str(tmp_path / "f" / "x.sock"), "control socket")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "99999"], "argument -t/--tcp-ports: port spec '99999': port 99999 is not in"),
        (["-u", "5-3"], "argument -u/--udp-ports: port spec '5-3': range '5-3' runs backwards"),
        (["-m", "12"], "argument -m/--mtu: '12': the MTU must be a number from 68"),
    ],
)
def test_option_errors_name_the_option_and_the_rule(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_options(["--netns", "guest", *args])
    assert info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"ferryd: error: {message}")
    assert "invalid" not in last
