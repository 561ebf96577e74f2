"""What the demo shows: a line per step as it goes, and one summary table at the end.

Both modes fill the same :class:`Summary` and print it through
:func:`format_table`, so that ``make demo`` and ``make demo VM=1`` read
alike. Progress goes to stdout line by line (flushed: the demo is watched
live, and its test reads it through a pipe).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DemoFailed", "Summary", "final_line", "format_table", "progress", "step"]


class DemoFailed(Exception):
    """The demo cannot go on: the message says what failed and, where known, whose fault."""


def _bold(text: str) -> str:
    return f"\033[1m{text}\033[0m" if sys.stdout.isatty() else text


def step(text: str) -> None:
    """A step's heading."""
    print(f"\n{_bold(f'== {text}')}", flush=True)


def progress(text: str) -> None:
    """One line of what is going on within a step."""
    print(f"   {text}", flush=True)


@dataclass
class Summary:
    """What one demo run did, as its table shows it."""

    guest: str
    opened: int
    #: How the connections were used: how many streamed both ways, how many sat idle.
    kinds: str
    survived: int
    #: Bytes checked in each direction: guest to peer, peer to guest.
    sent: int
    received: int
    #: The guest's or the connections' pause, and who measured it.
    downtime: str
    migration: str
    #: TCP connections ferryd A streamed out and ferryd B restored (their counters).
    moved_out: int
    moved_in: int
    forwarded: str
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("guest", self.guest),
            ("connections opened", f"{self.opened} ({self.kinds})"),
            ("survived byte-exact", f"{self.survived}/{self.opened}"),
            ("bytes, guest → peer", f"{self.sent:,}"),
            ("bytes, peer → guest", f"{self.received:,}"),
            ("downtime", self.downtime),
            ("total migration time", self.migration),
            ("ferryd A: TCP streamed out", str(self.moved_out)),
            ("ferryd B: TCP restored", str(self.moved_in)),
            ("forwarded port after", self.forwarded),
            ("demo time", f"{self.seconds:.1f} s"),
        ]


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    """Two columns in a box."""
    left = max(len(key) for key, _ in rows)
    right = max(len(value) for _, value in rows)
    rule = f"+{'-' * (left + 2)}+{'-' * (right + 2)}+"
    lines = [rule, *(f"| {key:<{left}} | {value:<{right}} |" for key, value in rows), rule]
    return "\n".join(lines) + "\n"


def final_line(summary: Summary) -> str:
    return f"demo finished: {summary.survived} connections survived the migration byte-exact."
