"""ferryd --pid without --daemonize: the file's life (the fork itself: tests/integration/
test_passt_compat.py, which starts ferry-passt as libvirt does)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ferryd.background import Background
from ferryd.exits import StartupError


def test_the_pid_file_is_empty_until_ready_then_removed_at_exit(tmp_path: Path) -> None:
    pid_file = tmp_path / "ferryd.pid"
    pid_file.write_text("stale\n")
    background = Background.start(str(pid_file), daemonize=False, log_file=None)
    assert pid_file.read_text() == ""  # truncated at start: nobody reads a stale pid
    background.ready()
    assert pid_file.read_text() == f"{os.getpid()}\n"
    background.close()
    assert not pid_file.exists()


def test_a_pid_file_another_process_took_over_is_left(tmp_path: Path) -> None:
    pid_file = tmp_path / "ferryd.pid"
    background = Background.start(str(pid_file), daemonize=False, log_file=None)
    background.ready()
    newer = tmp_path / "newer.pid"
    newer.write_text("4242\n")
    newer.replace(pid_file)  # a newer ferryd's, made while ours still existed
    background.close()
    assert pid_file.read_text() == "4242\n"


def test_a_pid_file_that_cannot_be_made_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"^--pid .*/missing/ferryd.pid: No such file"):
        Background.start(str(tmp_path / "missing" / "ferryd.pid"), False, None)
