"""ferryctl: the command-line client of ferryd's control socket.

Each subcommand is one (or, for status --wait, a few) requests over the
protocol of :mod:`ferryd.control`; ``migrate`` is a conversation with two
daemons, which :mod:`ferryd.coordinator` carries out: this module parses
the arguments and formats what comes back. Output is for humans by
default and JSON where a script needs it. Exit status: 0 on success, 1 when
the daemon is not running, refused the request or is not ready in time, 2
for bad usage (argparse). Errors are one line on stderr, prefixed with
``ferryctl:``, saying whether the daemon is missing or what it answered.

Subcommands are a table (:data:`_COMMANDS`): each has a function adding its
arguments, one asking the daemon (it returns what the daemon answered,
JSON-shaped) and one formatting that for a human, so a new subcommand is
one entry. ``--json`` is the same option on every subcommand (one parent
parser, :func:`_json_option`): it prints what the asking returned,
instead of the human form. ``metrics`` is its own format (Prometheus'
text) and has no ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ferryd.control import ControlClientError, DaemonNotRunning, request
from ferryd.coordinator import MIGRATE_TIMEOUT, MigrationError, migrate

#: Environment variable naming the control socket when --control is not given.
CONTROL_ENV = "FERRY_CONTROL"
#: How often status --wait asks again.
_POLL_INTERVAL = 0.05


class _Failure(Exception):
    """A one-line message for stderr and exit status 1."""


# ---------------------------------------------------------------------------
# status


def _add_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=_seconds,
        metavar="SECONDS",
        default=None,
        help="keep asking until the daemon answers and reports ready, for at most "
        "SECONDS (retries while the socket is missing, the connection is refused "
        'or the daemon answers "ready": false)',
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or more seconds: {text!r}")
    return value


def _run_status(args: argparse.Namespace) -> dict[str, Any]:
    path: str = args.control
    return _request(path, "status") if args.wait is None else _wait_ready(path, args.wait)


def _address(family: object) -> str:
    if not isinstance(family, dict):
        return "off"
    dns = ", ".join(str(d) for d in family.get("dns") or []) or "none"
    return f"{family.get('address', '?')} via {family.get('gateway', '?')}, DNS {dns}"


def format_status(status: dict[str, Any]) -> str:
    """The status in a few labelled lines; ``--json`` has every field.

    Missing fields show as '?' (an older or newer daemon's answer still prints).
    """
    link, frontend, flows, budget = (
        _mapping(status, key) for key in ("link", "frontend", "flows", "descriptors")
    )
    ready = status.get("ready")
    where = ", ".join(
        f"{key} {_words(value)}"
        for key, value in frontend.items()
        if key != "kind" and value is not None
    )
    rows = [
        ("role", f"{status.get('role', '?')} ({'ready' if ready else 'not ready'})"),
        ("frontend", f"{frontend.get('kind', '?')}" + (f": {where}" if where else "")),
        ("link", f"MAC {link.get('mac', '?')}, MTU {link.get('mtu', '?')}"),
        ("guest MAC", str(status.get("guest_mac") or "not seen yet")),
        ("IPv4", _address(link.get("ipv4"))),
        ("IPv6", _address(link.get("ipv6"))),
        ("flows", ", ".join(f"{flows.get(p, '?')} {p.upper()}" for p in ("tcp", "udp", "icmp"))),
        (
            "descriptors",
            f"{budget.get('in_use', '?')} in use of {budget.get('for_flows', '?')} for flows",
        ),
    ]
    migration = status.get("migration")
    if isinstance(migration, dict) and migration.get("rollback_error"):
        rows.append(("rollback", f"pending: {migration['rollback_error']}"))
    return _labelled(rows) + "(ferryctl counters: what it counted; history: its migrations)\n"


def _words(value: object) -> str:
    """A status value in words: a mapping as ``key=value ...``, a list comma-separated."""
    if isinstance(value, dict):
        return " ".join(f"{k}={_words(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(_words(v) for v in value)
    return str(value)


def _mapping(answer: dict[str, Any], key: str) -> dict[str, Any]:
    value = answer.get(key)
    return value if isinstance(value, dict) else {}


def _labelled(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows) + 1
    return "".join(f"{(label + ':').ljust(width)}  {value}\n" for label, value in rows)


def _wait_ready(path: str, wait: float) -> dict[str, Any]:
    """Poll status until ready; any error other than 'not running' ends it at once."""
    deadline = time.monotonic() + wait
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            status = request(path, "status", timeout=max(0.5, min(10.0, left)))
        except DaemonNotRunning as exc:
            last = str(exc)
        except ControlClientError as exc:
            raise _Failure(str(exc)) from None
        else:
            if status.get("ready", True) is not False:
                return status
            last = "daemon answered but is not ready"
        if time.monotonic() + _POLL_INTERVAL > deadline:
            raise _Failure(f"ferryd at {path} not ready after {wait:g} s ({last})")
        time.sleep(_POLL_INTERVAL)


# ---------------------------------------------------------------------------
# flows


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[dict[str, Any]], str]
    right: bool = False


_FLOW_COLUMNS = (
    _Column("PROTO", lambda f: str(f.get("proto", "?"))),
    _Column("GUEST", lambda f: _endpoint(f.get("guest_addr"), f.get("guest_port"))),
    _Column("REMOTE", lambda f: _endpoint(f.get("remote_addr"), f.get("remote_port"))),
    _Column("HOST", lambda f: _endpoint(f.get("host_addr"), f.get("host_port"))),
    _Column("STATE", lambda f: str(f.get("state", "?"))),
    _Column("TO_GUEST", lambda f: str(f.get("bytes_to_guest", "?")), right=True),
    _Column("FROM_GUEST", lambda f: str(f.get("bytes_from_guest", "?")), right=True),
)


def _endpoint(addr: object, port: object) -> str:
    """Format an address and port as a user would type them ([v6]:port)."""
    text = "?" if addr is None else str(addr)
    if port is None:
        return text
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def format_flow_table(flows: Sequence[dict[str, Any]]) -> str:
    """Render flows as an aligned table, one line per flow, header first.

    Missing fields show as '?' rather than failing, so an older or newer
    daemon's answer still prints.
    """
    return _table(_FLOW_COLUMNS, flows)


def _table(columns: Sequence[_Column], items: Sequence[dict[str, Any]]) -> str:
    rows = [[column.header for column in columns]]
    rows += [[column.cell(item) for column in columns] for item in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for row in rows:
        cells = [
            text.rjust(width) if column.right else text.ljust(width)
            for text, width, column in zip(row, widths, columns, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _run_flows(args: argparse.Namespace) -> list[dict[str, Any]]:
    response = _request(args.control, "flows")
    flows = response.get("flows")
    if not isinstance(flows, list) or not all(isinstance(f, dict) for f in flows):
        raise _Failure(f'ferryd at {args.control} answered "flows" without a list of flows')
    return flows


# ---------------------------------------------------------------------------
# counters


def format_counters(groups: dict[str, Any]) -> str:
    """Render the daemon's counters, one per line (group, name, value), header first.

    Groups in the daemon's order (not sorted: related ones stay together);
    a group that is not a mapping (a newer daemon's shape) is skipped.
    """
    rows = [("GROUP", "COUNTER", "VALUE")]
    for group, values in groups.items():
        if isinstance(values, dict):
            rows += [(group, str(name), str(value)) for name, value in values.items()]
    group_width = max(len(row[0]) for row in rows)
    name_width = max(len(row[1]) for row in rows)
    value_width = max(len(row[2]) for row in rows)
    lines = [
        f"{group.ljust(group_width)}  {name.ljust(name_width)}  {value.rjust(value_width)}"
        for group, name, value in rows
    ]
    return "\n".join(lines) + "\n"


def _run_counters(args: argparse.Namespace) -> dict[str, Any]:
    counters = _request(args.control, "counters").get("counters")
    if not isinstance(counters, dict):
        raise _Failure(f'ferryd at {args.control} answered "counters" without counters')
    return counters


# ---------------------------------------------------------------------------
# metrics (Prometheus' text format, made by ferryd: ferryd.metrics)


def _run_metrics(args: argparse.Namespace) -> str:
    text = _request(args.control, "metrics").get("text")
    if not isinstance(text, str):
        raise _Failure(f'ferryd at {args.control} answered "metrics" without the text')
    return text


# ---------------------------------------------------------------------------
# history (the daemon's last migrations: ferryd.migration.history)


def _run_history(args: argparse.Namespace) -> list[dict[str, Any]]:
    history = _request(args.control, "history").get("history")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise _Failure(f'ferryd at {args.control} answered "history" without a list')
    return history


def _finished(record: dict[str, Any]) -> str:
    when = record.get("finished_at")
    if not isinstance(when, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def _downtime(record: dict[str, Any]) -> str:
    downtime = record.get("downtime_ms")
    return f"{downtime:.1f}" if isinstance(downtime, (int, float)) else "-"


_HISTORY_COLUMNS = (
    _Column("SEQ", lambda r: str(r.get("seq", "?")), right=True),
    _Column("FINISHED", _finished),
    _Column("DIR", lambda r: str(r.get("direction", "?"))),
    _Column("OUTCOME", lambda r: str(r.get("outcome", "?"))),
    _Column("DOWNTIME_MS", _downtime, right=True),
    _Column("FLOWS", lambda r: _counts(r.get("flows"))),
    _Column("ERROR", lambda r: str(r.get("error") or "")),
)


def format_history(history: Sequence[dict[str, Any]]) -> str:
    """The migrations, oldest first, one per line; downtime is this side's part."""
    if not history:
        return "no migration yet\n"
    return _table(_HISTORY_COLUMNS, history)


# ---------------------------------------------------------------------------
# migrate (the conversation is ferryd.coordinator's; here: arguments and output)


def _add_migrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        metavar="PATH",
        default=None,
        help="control socket of the running ferryd to migrate from (default: --control)",
    )
    parser.add_argument(
        "--target",
        metavar="PATH",
        required=True,
        help="control socket of the ferryd started with --incoming to migrate to",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        default=MIGRATE_TIMEOUT,
        help=f"limit for each request of the migration (default {MIGRATE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--no-precopy",
        action="store_true",
        help="dump every connection after the freeze instead of pre-copying the quiet ones"
        " while the guest runs (when both daemons share a network namespace nothing is"
        " dumped: the sockets themselves are handed over)",
    )


def _run_migrate(args: argparse.Namespace) -> dict[str, Any]:
    source: str | None = args.source or args.control
    if not source:
        raise _Failure("migrate: no source: pass --source PATH (or --control PATH)")
    try:
        return migrate(source, args.target, timeout=args.timeout, precopy=not args.no_precopy)
    except MigrationError as exc:
        raise _Failure(str(exc)) from None


_FLOW_KINDS = (("tcp", "TCP"), ("udp", "UDP"), ("icmp", "ICMP"), ("listeners", "listeners"))


def _counts(counts: object) -> str:
    if not isinstance(counts, dict):
        return "?"
    parts = [f"{counts.get(key, 0)} {label}" for key, label in _FLOW_KINDS]
    parts += [f"{value} {key}" for key, value in counts.items() if key not in dict(_FLOW_KINDS)]
    return ", ".join(parts)


def _splits(timings: dict[str, Any]) -> str:
    if not timings:
        return "(none reported)"
    return ", ".join(
        f"{key} {value:.1f}" if isinstance(value, (int, float)) else f"{key} {value}"
        for key, value in timings.items()
    )


def format_migration_summary(summary: dict[str, Any]) -> str:
    """The human-readable summary: flows, bytes, downtime and each side's timing splits."""
    downtime = summary["downtime_ms"]
    stream_bytes = summary["stream_bytes"]
    lines = [
        f"migrated:   {_counts(summary['flows'])}",
        f"restored:   {_counts(summary['restored'])}",
        "stream:     "
        + (f"{stream_bytes:,} bytes" if isinstance(stream_bytes, int) else "? bytes"),
        "downtime:   "
        + (f"{downtime:.1f} ms (freeze to resume)" if downtime is not None else "unknown")
        + f"; ferryctl took {summary['ferryctl_ms']:.1f} ms",
        f"source ms:  {_splits(summary['source_timings_ms'])}",
        f"target ms:  {_splits(summary['target_timings_ms'])}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# migrate-abort


def _add_abort(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        default=MIGRATE_TIMEOUT,
        help=f"limit for the request (default {MIGRATE_TIMEOUT:g}; a rollback of thousands"
        " of connections takes a while)",
    )


def _run_abort(args: argparse.Namespace) -> dict[str, Any]:
    """Undo the daemon's migration, whatever state it is in; answer the role reached."""
    try:
        return request(args.control, "migrate-abort", timeout=args.timeout)
    except ControlClientError as exc:
        raise _Failure(str(exc)) from None


def format_abort(answer: dict[str, Any]) -> str:
    note = answer.get("note")
    return f"role: {answer.get('role', '?')}" + (f" ({note})" if note else "") + "\n"


# ---------------------------------------------------------------------------
# plumbing


@dataclass(frozen=True)
class _Command:
    help: str
    run: Callable[[argparse.Namespace], Any]
    """Ask the daemon(s); the answer, JSON-shaped (what --json prints)."""
    human: Callable[[Any], str]
    """The answer for a human (the default output)."""
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    json: bool = True
    """Whether --json is offered (not for metrics: a format of its own)."""


_COMMANDS: dict[str, _Command] = {
    "status": _Command(
        "print the daemon's role, link, addresses, flows and descriptors (exit 0 if it"
        " answered; --json: every field)",
        _run_status,
        format_status,
        _add_status,
    ),
    "flows": _Command(
        "list the daemon's flows (connections), one per line",
        _run_flows,
        format_flow_table,
    ),
    "counters": _Command(
        "print what the daemon counted (frames, drops, refusals, errors), by component",
        _run_counters,
        format_counters,
    ),
    "history": _Command(
        "list the daemon's last migrations, in or out: outcome, downtime, flows moved",
        _run_history,
        format_history,
    ),
    "metrics": _Command(
        "print the counters, flow gauges and migration history in Prometheus' text format"
        " (what ferryd --metrics serves over HTTP)",
        _run_metrics,
        str,
        json=False,
    ),
    "migrate": _Command(
        "move the guest's network state (every connection) from a running ferryd "
        "to one started with --incoming",
        _run_migrate,
        format_migration_summary,
        _add_migrate,
    ),
    "migrate-abort": _Command(
        "undo a migration on this daemon in whatever state it is: stop a pre-copy or a "
        "freeze in progress, roll back a frozen source (retrying a rollback that could not "
        "reach the repair helper), reset a target; exit 1 if it could not be done",
        _run_abort,
        format_abort,
        _add_abort,
    ),
}

#: Subcommands that name their daemons themselves (--control is optional for them).
_OWN_SOCKETS = frozenset({"migrate"})


def _request(path: str, cmd: str) -> dict[str, Any]:
    try:
        return request(path, cmd)
    except ControlClientError as exc:
        raise _Failure(str(exc)) from None


def _print_json(obj: object, out: TextIO) -> None:
    json.dump(obj, out, indent=2, sort_keys=True, ensure_ascii=False)
    out.write("\n")


def _json_option() -> argparse.ArgumentParser:
    """The parent parser of every subcommand that offers ``--json``."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--json",
        action="store_true",
        help="print the daemon's answer as JSON (for scripts) instead of the human form",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ferryctl (public for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="ferryctl",
        description="Query and control a running ferryd through its control socket.",
        epilog="Exit status: 0 success; 1 daemon not running, request refused or not "
        "ready in time; 2 usage error.",
    )
    parser.add_argument(
        "--control",
        metavar="PATH",
        default=os.environ.get(CONTROL_ENV),
        help=f"ferryd's control socket (the --control given to ferryd; default: ${CONTROL_ENV})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    json_option = _json_option()
    for name, command in _COMMANDS.items():
        parents = [json_option] if command.json else []
        command.add_arguments(
            sub.add_parser(name, help=command.help, description=command.help, parents=parents)
        )
    return parser


def _output(command: _Command, args: argparse.Namespace, out: TextIO) -> None:
    answer = command.run(args)
    if getattr(args, "json", False):
        _print_json(answer, out)
    else:
        out.write(command.human(answer))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ferryctl`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.control and args.command not in _OWN_SOCKETS:
        parser.error(f"no control socket: pass --control PATH or set ${CONTROL_ENV}")
    try:
        _output(_COMMANDS[args.command], args, sys.stdout)
        sys.stdout.flush()
    except _Failure as exc:
        print(f"ferryctl: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `ferryctl flows | head`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        print(
            "ferryctl: internal error (a bug in ferry; please report it with the traceback above)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
