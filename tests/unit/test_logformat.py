"""ferryd's log lines (ferryd.logformat): a priority prefix only on the journal's stream."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ferryd.logformat import (
    JournalFormatter,
    PlainFormatter,
    configure,
    stderr_is_journal,
    syslog_priority,
)


def _record(level: int, message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("ferryd.migration", level, __file__, 1, message, (), exc_info)


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (5, 7),
    ],
)
def test_levels_are_syslog_priorities(level: int, priority: int) -> None:
    """sd-daemon(3): <3> error, <4> warning, <6> info, <7> debug."""
    assert syslog_priority(level) == priority


def test_journal_line_has_the_priority_and_no_timestamp() -> None:
    line = JournalFormatter().format(_record(logging.WARNING, "pre-copy failed: x"))
    assert line == "<4>ferryd.migration: pre-copy failed: x"


def test_journal_traceback_keeps_the_priority_on_every_line() -> None:
    lines = JournalFormatter().format(_record(logging.ERROR, "handler failed", exc=True))
    assert lines.splitlines()[0] == "<3>ferryd.migration: handler failed"
    assert len(lines.splitlines()) > 2
    assert all(line.startswith("<3>") for line in lines.splitlines())


def test_plain_line() -> None:
    line = PlainFormatter().format(_record(logging.INFO, "ready"))
    assert line == "INFO ferryd.migration: ready"


def test_journal_stream_must_name_stderr_itself() -> None:
    """systemd.exec(5): JOURNAL_STREAM is DEVICE:INODE of the stream; inherited elsewhere."""
    with tempfile.TemporaryFile() as f:
        st = os.fstat(f.fileno())
        ours = f"{st.st_dev}:{st.st_ino}"
        assert stderr_is_journal({"JOURNAL_STREAM": ours}, f.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno())
        assert not stderr_is_journal({}, f.fileno())
        for garbage in ("", ":", "x:y", f"{st.st_dev}", f"-1:{st.st_ino}"):
            assert not stderr_is_journal({"JOURNAL_STREAM": garbage}, f.fileno())
    assert not stderr_is_journal({"JOURNAL_STREAM": ours}, 12345)  # not open


@pytest.mark.parametrize("journal", [True, False])
def test_a_process_picks_its_format_from_its_stderr(journal: bool, tmp_path: Path) -> None:
    """A real child whose stderr is a file, with JOURNAL_STREAM naming it or another file."""
    log = tmp_path / "stderr"
    other = tmp_path / "other"
    other.touch()
    with log.open("w") as stderr:
        st = os.fstat(stderr.fileno()) if journal else os.stat(other)
        code = (
            "import logging; from ferryd.logformat import configure; configure(logging.INFO);"
            "logging.getLogger('ferryd').info('ready'); logging.getLogger('ferryd.x').error('bad')"
        )
        subprocess.run(
            [sys.executable, "-c", code],
            stderr=stderr,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            check=True,
        )
    expected = (
        ["<6>ferryd: ready", "<3>ferryd.x: bad"]
        if journal
        else ["INFO ferryd: ready", "ERROR ferryd.x: bad"]
    )
    assert log.read_text().splitlines() == expected


def test_configure_a_stream_that_has_no_descriptor() -> None:
    import io

    stream = io.StringIO()
    handler = configure(logging.INFO, {"JOURNAL_STREAM": "1:1"}, stream)
    try:
        logging.getLogger("ferryd.test").info("hello")
    finally:
        logging.getLogger().removeHandler(handler)
    assert stream.getvalue() == "INFO ferryd.test: hello\n"
