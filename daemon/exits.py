"""How ferryd and ferryctl end when they fail: one line for the operator, a traceback for a bug.

A start-up failure is nearly always the operator's to fix (a directory that
does not exist, a port already taken, a namespace that is not there), and a
60-line trio ExceptionGroup traceback hides the one fact that matters. So
every failure whose cause is known is printed as one line naming the option
or path and the cause, and the process exits with a documented status:

- 2 (``EXIT_USAGE``): the command line or configuration cannot work as
  given (argparse's own status for usage errors);
- 1 (``EXIT_RUNTIME``): it was valid but something it needs failed (a
  socket could not be bound, a directory could not be made).

Anything else is a bug in ferry: its traceback is printed, followed by a
line that says so. ``-v`` shows the traceback of expected failures too.
When stderr is the journal (ferryd.logformat) these lines carry the
error priority ``<3>``, as ferryd's log lines carry theirs.
Exceptions raised inside trio arrive in (nested) exception groups; the
group is flattened and judged leaf by leaf: one unexpected leaf makes the
whole failure a bug.
"""

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import NoReturn

from ferryd.logformat import stderr_is_journal

__all__ = [
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "StartupError",
    "ensure_parent_dir",
    "exit_on_failure",
    "leaves",
]

EXIT_RUNTIME = 1
EXIT_USAGE = 2

ExpectedErrors = dict[type[BaseException], int]


class StartupError(Exception):
    """Start-up failed for a reason the operator can fix (runtime: exit 1)."""


def ensure_parent_dir(path: str, what: str) -> None:
    """Create the directory that will hold ``path`` (mode 0755, as systemd's
    RuntimeDirectory= would), or raise StartupError naming ``what``."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise StartupError(f"{what} {path}: {parent} is not a directory")
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise StartupError(
            f"{what} {path}: cannot create directory {parent}: {exc.strerror}"
        ) from exc


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The non-group exceptions inside ``exc`` (itself if it is no group)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def _status_of(exc: BaseException, expected: ExpectedErrors) -> int | None:
    for kind, status in expected.items():
        if isinstance(exc, kind):
            return status
    return None


def exit_on_failure(
    prog: str, run: Callable[[], int | None], expected: ExpectedErrors, *, verbose: bool
) -> NoReturn:
    """Run ``run()`` and exit with its status, or report its failure and exit.

    ``expected`` maps exception types whose message is the whole story to
    their exit status. KeyboardInterrupt exits 130 (the shell's convention).
    """
    try:
        status = run()
    except SystemExit:
        raise
    except BaseException as exc:
        found = list(leaves(exc))
        if any(isinstance(e, KeyboardInterrupt) for e in found):
            sys.exit(130)
        statuses = [_status_of(e, expected) for e in found]
        err = "<3>" if stderr_is_journal(os.environ) else ""
        if all(s is not None for s in statuses):
            if verbose:
                traceback.print_exception(exc)
            for e in found:
                print(f"{err}{prog}: error: {_one_line(e)}", file=sys.stderr)
            sys.exit(max(s for s in statuses if s is not None))
        traceback.print_exception(exc)
        print(
            f"{err}{prog}: internal error (a bug in ferry; please report it with the traceback"
            " above)",
            file=sys.stderr,
        )
        sys.exit(EXIT_RUNTIME)
    sys.exit(status or 0)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
