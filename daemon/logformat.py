"""ferryd's log lines: one line per event, with its level, readable by journald and by eye.

Where the lines go decides their shape:

* **stderr is the journal** (systemd connected it: ``JOURNAL_STREAM`` is
  set to ``DEVICE:INODE`` and names the very file stderr is, as
  systemd.exec(5) documents; a child whose stderr was redirected inherits
  the variable, so the comparison matters): each line starts with its
  syslog priority, ``<3>`` for an error, ``<4>`` a warning, ``<6>``
  information, ``<7>`` debugging (sd-daemon(3)), which journald strips and
  stores as the entry's PRIORITY, so ``journalctl -p warning`` filters by
  it. No timestamp and no pid: journald records both.
* **anything else** (a terminal, a file, a test's pipe): ``LEVEL name:
  message`` (``WARNING ferryd.migration: ...``), the logger's name saying
  which component spoke. No timestamp either: ``--log-file`` or a
  supervisor adds its own, and the lines stay comparable between runs.

An event is one line. A record that carries a traceback (a contained bug,
``-v``) continues on further lines; under the journal each of them gets the
record's priority, so journald keeps them at the event's level.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TextIO

__all__ = ["JournalFormatter", "PlainFormatter", "configure", "stderr_is_journal"]

#: Python's levels as syslog priorities (RFC 5424 §6.2.1; sd-daemon(3)'s SD_ERR...).
_PRIORITY = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a Python log level (anything below INFO is debugging)."""
    for level, priority in _PRIORITY:
        if levelno >= level:
            return priority
    return _DEBUG_PRIORITY


def stderr_is_journal(environ: Mapping[str, str], stderr_fd: int = 2) -> bool:
    """Whether ``stderr_fd`` is the journal stream systemd named in ``JOURNAL_STREAM``.

    The variable is ``DEVICE:INODE`` in decimal (systemd.exec(5)); it is
    checked against fstat() of the descriptor, since it is inherited by
    whatever the service starts with its stderr redirected elsewhere.
    """
    value = environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stderr_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """``<PRIORITY>name: message``, the priority on every line of the record."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class PlainFormatter(logging.Formatter):
    """``LEVEL name: message``."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")


def configure(
    level: int, environ: Mapping[str, str] | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr),
    shaped as above: journald's form only when that stream is the journal."""
    environ = os.environ if environ is None else environ
    try:
        fd = 2 if stream is None else stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO and the like
        fd = -1
    journal = fd >= 0 and stderr_is_journal(environ, fd)
    # Without a stream: sys.stderr, looked up at each record (pytest swaps it).
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if journal else PlainFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
