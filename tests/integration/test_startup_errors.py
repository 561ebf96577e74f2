"""ferryd and ferry-repair at start-up: paths they make, and failures as one clear line.

Each case runs the real program as a user would and checks its whole
stderr: one line naming the option or path and the cause, and the exit
status ``--help`` documents (2 usage or configuration, 1 runtime).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.netns import Netns
from testbed.paths import FERRYCTL, FERRYD, VENV_BIN
from testbed.wait import wait_for

HELPER = VENV_BIN / "ferry-repair"
#: Who ferryd runs as after its privilege drop (run as root, no --runas).
NOBODY = 65534


@pytest.fixture
def guest() -> Iterator[Netns]:
    with Netns("start") as ns:
        yield ns


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=30, check=False
    )


def test_control_directory_is_created(guest: Netns, short_tmp: Path) -> None:
    control = short_tmp / "new" / "dir" / "g.sock"
    proc = subprocess.Popen(
        [FERRYD, "--netns", guest.path, "--tap", "tap0", "--control", control],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        status = run(FERRYCTL, "--control", control, "status", "--wait", "15", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["ready"] is True
        assert stat.S_IMODE((short_tmp / "new" / "dir").stat().st_mode) == 0o755
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_control_directory_that_cannot_exist_is_one_line(guest: Netns, short_tmp: Path) -> None:
    (short_tmp / "file").write_text("")
    control = short_tmp / "file" / "g.sock"
    result = run(FERRYD, "--netns", guest.path, "--tap", "tap0", "--control", control)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"ferryd: error: control socket {control}: {short_tmp / 'file'} is not a directory"
    ]


def test_control_socket_in_use_is_one_line(guest: Netns, short_tmp: Path) -> None:
    control = short_tmp / "g.sock"
    first = subprocess.Popen(
        [FERRYD, "--netns", guest.path, "--tap", "tap0", "--control", control],
        stderr=subprocess.DEVNULL,
    )
    try:
        assert run(FERRYCTL, "--control", control, "status", "--wait", "15").returncode == 0
        result = run(FERRYD, "--netns", guest.path, "--tap", "tap1", "--control", control)
    finally:
        first.terminate()
        first.wait(timeout=10)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"ferryd: error: another daemon is already listening on control socket {control}"
    ]


def test_missing_namespace_is_one_line() -> None:
    result = run(FERRYD, "--netns", "ft-no-such-namespace", "--tap", "tap0")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "ferryd: error: network namespace /run/netns/ft-no-such-namespace does not exist"
    ]


def test_verbose_shows_the_traceback(short_tmp: Path) -> None:
    result = run(FERRYD, "-v", "--netns", "ft-no-such-namespace", "--tap", "tap0")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("ferryd: error: network namespace")


def test_bad_port_spec_names_the_spec_and_rule() -> None:
    result = run(FERRYD, "--netns", "x", "-t", "99999")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "ferryd: error: argument -t/--tcp-ports: port spec '99999': port 99999 is not in 1-65535"
    )


def test_repair_socket_nobody_listens_on_is_a_warning(guest: Netns, short_tmp: Path) -> None:
    control = short_tmp / "g.sock"
    missing = short_tmp / "repair.sock"
    proc = subprocess.Popen(
        [FERRYD, "--netns", guest.path, "--tap", "tap0", "--control", control,
         "--repair-socket", missing],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert run(FERRYCTL, "--control", control, "status", "--wait", "15").returncode == 0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    warnings = [line for line in err.splitlines() if "--repair-socket" in line]
    assert len(warnings) == 1
    assert f"--repair-socket {missing}: nothing listens there yet" in warnings[0]


def test_repair_helper_start_failure_is_one_line(short_tmp: Path) -> None:
    (short_tmp / "file").write_text("")
    result = run(HELPER, "--listen", short_tmp / "file" / "repair.sock")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferry-repair: cannot")
    assert "Not a directory" in lines[0]


def test_repair_helper_makes_its_directory(short_tmp: Path) -> None:
    path = short_tmp / "run" / "repair.sock"
    proc = subprocess.Popen([HELPER, "--listen", path], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(path.exists, timeout=10, what="ferry-repair's socket")
        assert stat.S_ISSOCK(path.stat().st_mode)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_repair_listen_socket_is_removed_at_exit(guest: Netns, short_tmp: Path) -> None:
    """--repair-listen's socket file lives as long as ferryd: gone after SIGTERM.

    In a directory the unprivileged ferryd (nobody, after the drop) may
    remove files from, as a service's runtime directory is.
    """
    short_tmp.chmod(0o711)  # nobody may reach run/, not read short_tmp
    run_dir = short_tmp / "run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, NOBODY, NOBODY)
    control, listen = run_dir / "g.sock", run_dir / "repair.sock"
    proc = subprocess.Popen(
        [FERRYD, "--netns", guest.path, "--tap", "tap0", "--control", control,
         "--repair-listen", listen],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        status = run(FERRYCTL, "--control", control, "status", "--wait", "15")
        assert status.returncode == 0, status.stderr
        assert stat.S_ISSOCK(listen.lstat().st_mode)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert not listen.exists() and not control.exists(), err
