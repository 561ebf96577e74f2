"""Containing ferryd's own bugs so that the guest cannot turn one into an outage.

The rule (issue 9): nothing a guest sends stops the daemon. Parsers of guest
input raise :class:`~ferryd.wire.errors.MalformedPacket` for what the guest
got wrong; anything else escaping the handling of one frame, or of one
flow's socket event, is a bug of ours that the guest happened to reach.
Each such place catches ``Exception`` (never ``BaseException``: trio's
``Cancelled``, ``KeyboardInterrupt`` and ``SystemExit`` must go through),
drops the one frame or resets the one flow, counts it, and logs a line that
still shows the bug (:func:`describe_bug`), rate-limited since a guest can
trigger it at line rate.
"""

import traceback
from pathlib import Path

__all__ = ["describe_bug"]


def describe_bug(exc: Exception) -> str:
    """One line: the exception and the innermost place it was raised at.

    A full traceback per event would let a guest flood the log; the type,
    message and innermost frame are enough to find the bug.
    """
    what = "".join(traceback.format_exception_only(exc)).strip().replace("\n", " ")
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return what
    last = frames[-1]
    return f"{what} (at {Path(last.filename).name}:{last.lineno} in {last.name})"
