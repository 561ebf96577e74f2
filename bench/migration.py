"""Migration downtime through real ferryds, by number of connections.

Run as root: ``python -m bench.migration [--sizes 1 100 1000 5000] [--busy 4]
[--modes precopy plain handover] [--max-queue BYTES] [--no-reference]``.

For each N it builds the two-host bed of the integration tests
(testbed/migrationbed.py: two_host_bed: host A and host B with the same
address and MAC, a peer on a fabric that moves, one guest namespace, one
ferry-repair),
starts a source ferryd in A and an ``--incoming`` one in B, opens N
connections from the guest to the peer (``--busy`` of them streaming both
ways at full speed, the rest idle; testbed/streamtool.py), runs
``ferryctl migrate --json`` and switches the fabric. It prints, per N, the
freeze-to-resume downtime, its split as the daemons report it
(``timings_ms``: the source's stop, freeze + repair ON and dump/stream --
repair ON runs under the dump, so the first is only getting the helper; the
target's restore, from the stream's first byte, overlapping the source's
dump, repair OFF and resume), and the stream's size per
connection. The traffic is then checked byte for byte as in the tests
(a benchmark that moved connections wrongly would measure nothing).
Nothing is asserted about the times.

Each N runs in both modes by default: ``precopy`` (ferryctl's default: the
quiet connections are dumped and restored while the guest runs, the freeze
only confirms them) and ``plain`` (``--no-precopy``: everything is dumped
after the freeze), the reference the pre-copy is measured against. The
``precopy`` column is the source's pre-copy time, outside the downtime;
``unchanged`` counts the connections the freeze only had to confirm.
``--modes ... handover`` adds the migration within one network namespace
(the tests' one-host bed: the TCP sockets themselves go to the target,
daemon/migration/handover.py), printed against ``plain`` of the same N and
traffic when that ran in the same invocation.

``--parallel K`` also migrates K guests at once (each its own namespace,
source in A, target in B, N connections; one ferry-repair per host serves
all of that host's ferryds) next to a solo migration in the same run, and
prints each one's downtime over the solo one. ``--runs R`` repeats every
row; the report ends with issue 12's targets (medians and spread).
With ``--busy``, each N and mode also runs with every connection idle (the
reference; ``--no-reference`` skips it), and the targets print each busy
row's ratio to it. ``--max-queue BYTES`` starts both ferryds with
that option (every socket's buffers capped always: what a migration without
a pre-copy carries is bounded too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, end_on_signals
from testbed.ferryd_process import RUNAS_UID
from testbed.migrationbed import MigrationBed, migrate_argv, one_host_bed, two_host_bed
from testbed.netns import Netns
from testbed.repair import HelperProcess, listening_helper, raise_fd_limit
from testbed.streams import Streams, Tool
from testbed.streamtool import UNLIMITED

SIZES = (1, 100, 1000, 5000)
#: How many migrations a KubeVirt node runs at once (issue 12, item 5).
PARALLEL_DEFAULT = 4
#: A parallel migration's downtime against its solo one (issue 12's target).
PARALLEL_TARGET = 1.5
#: The peer's port, shared by every guest's connections.
PORT = 9800


@contextlib.contextmanager
def _bed(
    guests: int = 1, *, one_host: bool = False
) -> Iterator[tuple[MigrationBed, list[Netns], HelperProcess]]:
    """The two-host bed with *guests* guest namespaces; the target host's helper socket.

    One ferry-repair per host serves all of that host's ferryds, as on a node
    with one socket-activated ferry-repair: the bed's own for host A (the
    sources), a second one for host B (the targets). ``one_host``: the tests'
    one-host bed instead (source and target in one namespace, one helper).
    """
    tmp = Path(tempfile.mkdtemp(prefix="fb-"))
    make_bed = one_host_bed if one_host else two_host_bed
    try:
        with make_bed(tmp) as bed, contextlib.ExitStack() as stack:
            try:
                extra = [stack.enter_context(Netns("guest")) for _ in range(guests - 1)]
                if one_host:
                    yield bed, [bed.guest, *extra], bed.helper
                    return
                repair_b = tmp / "repair-b.sock"
                helper_b = listening_helper(repair_b, "--allow-uid", str(RUNAS_UID))
                yield bed, [bed.guest, *extra], stack.enter_context(helper_b)
            finally:
                bed.stop_ferryds()  # before the extra guests and host B's helper go
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(
    n: int,
    busy: int,
    mode: str = "precopy",
    rate: float = 0,
    parallel: int = 1,
    max_queue: int = 0,
) -> list[dict[str, Any]]:
    """*parallel* migrations of n connections each, started at the same moment.

    One ferryctl summary per migration, plus the traffic check of its guest.
    """
    busy = min(busy, n)
    busy_spec = f"busy:{busy}" + (f":{UNLIMITED}:{UNLIMITED}:{rate * 1e6:.0f}" if rate else "")
    specs = [busy_spec] + ([f"idle:{n - busy}"] if n > busy else [])
    limit = ("--max-flows", str(n + 100), *(["--max-queue", str(max_queue)] if max_queue else []))
    one_host = mode == "handover"
    with (
        _bed(parallel, one_host=one_host) as (bed, guests, helper_b),
        contextlib.ExitStack() as stack,
    ):
        repair_b = helper_b.argv[helper_b.argv.index("--listen") + 1]
        pairs = [
            (
                bed.start_ferryd(bed.host_a, *limit, config_net=True, guest=guest),
                bed.start_ferryd(
                    bed.host_b, *limit, "--repair-socket", repair_b, incoming=True, guest=guest
                ),
            )
            for guest in guests
        ]
        # One server, one port for every guest: the sources (one host namespace)
        # then get distinct local ports from connect(), as on distinct nodes.
        # With a port per guest, connect() gives two ferryds the same local
        # port toward different peers, and a target's restore can meet its
        # sibling's socket between repair OFF and SO_REUSEADDR (EADDRINUSE:
        # retried for restore.BIND_PATIENCE).
        server = Tool(bed.peer, "server", "::", str(PORT))
        stack.callback(server.stop)
        server.wait_line(lambda line: "listening" in line, "listening")
        streams = []
        for i, guest in enumerate(guests):
            seeds = f"seeds:{i * n}"
            one = Streams(bed.peer, guest, "::", bed.peer_v4, PORT, seeds, *specs, server=server)
            stack.callback(one.close)
            streams.append(one)
        if busy:
            for one in streams:
                one.wait_flowing("busy", 1 << 20)
            time.sleep(0.5)  # the busy streams' queues at their steady size
        no_precopy = ["--no-precopy"] if mode == "plain" else []
        pids = {
            "helper A": [bed.helper.pid],
            "helper B": [] if one_host else [helper_b.pid],
            "ferryds": [f.pid for pair in pairs for f in pair],
        }
        cpu_before = {k: sum(map(cpu_seconds, v)) for k, v in pids.items()}
        ctls = [
            subprocess.Popen(
                migrate_argv(source, target, *no_precopy),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for source, target in pairs
        ]
        results = [(*ctl.communicate(timeout=300), ctl.returncode) for ctl in ctls]
        # CPU time over the whole migrations (pre-copy included), all of them.
        cpu_ms = {k: 1e3 * (sum(map(cpu_seconds, v)) - cpu_before[k]) for k, v in pids.items()}
        bed.switch_fabric()
        summaries: list[dict[str, Any]] = []
        for (out, err, rc), one in zip(results, streams, strict=True):
            if rc != 0:
                summaries.append({"n": n, "mode": mode, "busy": busy, "error": err.strip()})
                continue
            summary: dict[str, Any] = json.loads(out)
            try:
                one.finish(timeout=300)
                summary["checked"] = "ok"
            except AssertionError as exc:
                summary["checked"] = f"FAILED: {str(exc)[-1500:]}"
            summary.update(n=n, mode=mode, busy=busy, cpu_ms=cpu_ms)
            summaries.append(summary)
        return summaries


def _ms(timings: dict[str, Any], key: str) -> str:
    value = timings.get(key)
    return f"{value:.1f}" if isinstance(value, (int, float)) else "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "run", "N", "busy", "mode", "K", "#", "downtime", "precopy", "unchanged", "src stop",
        "freeze+rep", "dump/stream", "tgt restore", "repair off", "resume", "B/conn", "check",
    )  # fmt: skip
    lines = [header]
    for row in rows:
        where = (str(row.get("run", 1)), str(row["n"]), str(row.get("busy", 0)), row["mode"])
        index = (str(row.get("parallel", 1)), str(row.get("index", 0)))
        if "error" in row:
            lines.append((*where, *index, "error: " + row["error"][:80], *[""] * 10))
            continue
        src, tgt = row["source_timings_ms"], row["target_timings_ms"]
        downtime = row.get("downtime_ms")
        per_conn = (row.get("stream_bytes") or 0) / max(1, row["n"])
        lines.append(
            (
                *where,
                *index,
                f"{downtime:.1f}" if isinstance(downtime, (int, float)) else "-",
                _ms(src, "precopy"),
                str(row.get("flows", {}).get("unchanged", 0)),
                _ms(src, "stop"),
                _ms(src, "freeze_repair_on"),
                _ms(src, "dump_stream"),
                _ms(tgt, "restore"),
                _ms(tgt, "repair_off"),
                _ms(tgt, "resume"),
                f"{per_conn:,.0f}",
                row.get("checked", "?"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return (
        "times in ms (timings_ms reported by the daemons); K: migrations at once, #: which\n"
        + "\n".join(out)
        + "\n"
    )


def target_of(n: int, mode: str, busy: int, rate: float) -> tuple[str, float] | None:
    """Issue 12's downtime target for this row, in ms, if it has one."""
    if n == 1000 and mode == "plain" and busy == 0:
        return "plain migration, 1,000 idle", 50.0
    if n == 1000 and mode == "precopy" and busy == 4 and rate == 10:
        return "pre-copy migration, 1,000 (4 at 10 MB/s)", 15.0
    if n == 1000 and busy == 4 and rate == 0:
        return f"{mode} migration, 1,000 with 4 at full speed both ways", 60.0
    if n == 16384 and mode == "precopy":
        return "16,384 connections, pre-copy", 150.0
    return None


def _downtime(row: dict[str, Any]) -> float | None:
    value = row.get("downtime_ms")
    if isinstance(value, (int, float)) and row.get("checked") == "ok":
        return float(value)
    return None


def _spread(values: list[float], unit: str = "") -> str:
    if not values:
        return "not measured"
    text = f"median {statistics.median(values):.1f}{unit}"
    if len(values) > 1:
        text += f" (runs {min(values):.1f}-{max(values):.1f}{unit}, {len(values)} values)"
    return text


def format_targets(rows: list[dict[str, Any]], rate: float) -> str:
    """Each measured row against its target: medians and spread over the runs.

    A busy row also prints its ratio to the idle row of the same N and mode
    (same invocation). A parallel row's ratio is each migration's downtime
    over the solo one of the same run (same N, mode and traffic, alone on
    its hosts).
    """
    out = ["targets (issue 12):"]
    keys = sorted({(r["n"], r["mode"], r["busy"]) for r in rows})

    def solo_times(n: int, mode: str, busy: int) -> list[float]:
        key = (n, mode, busy, 1)
        solo = [r for r in rows if (r["n"], r["mode"], r["busy"], r["parallel"]) == key]
        return [t for t in map(_downtime, solo) if t is not None]

    for n, mode, busy in keys:
        key = (n, mode, busy)
        solo = [r for r in rows if (r["n"], r["mode"], r["busy"]) == key and r["parallel"] == 1]
        times = solo_times(n, mode, busy)
        target = target_of(n, mode, min(busy, n), rate if busy else 0)
        name = target[0] if target else f"{mode}, {n:,} connections, {busy} busy"
        verdict = ""
        if target and times:
            verdict = " met" if statistics.median(times) <= target[1] else " not met"
        limit = f"target <= {target[1]:.0f} ms:" if target else "no target:"
        idle = solo_times(n, mode, 0) if busy else []
        against = (
            f" ({statistics.median(times) / statistics.median(idle):.2f} x the idle"
            f" {statistics.median(idle):.1f} ms)"
            if times and idle
            else ""
        )
        if mode == "handover" and times and (plain := solo_times(n, "plain", busy)):
            against += (
                f" ({statistics.median(times) / statistics.median(plain):.2f} x plain's"
                f" {statistics.median(plain):.1f} ms between two hosts)"
            )
        out.append(f"  {name}: {_spread(times, ' ms')}{against}; {limit}{verdict}")
        group = [r for r in rows if (r["n"], r["mode"], r["busy"]) == key and r["parallel"] > 1]
        if not group:
            continue
        ratios, worst = [], []
        for run in sorted({r["run"] for r in group}):
            base = [_downtime(r) for r in solo if r["run"] == run]
            if not base or base[0] is None:
                continue
            mine = [_downtime(r) for r in group if r["run"] == run]
            if any(t is None for t in mine):
                continue  # a failed or unchecked migration: no ratio
            run_ratios = [t / base[0] for t in mine if t is not None]
            ratios.extend(run_ratios)
            worst.append(max(run_ratios))
            cpu = [
                " ".join(
                    f"{who} {ms:.0f}"
                    for who, ms in next(r for r in rs if r["run"] == run)["cpu_ms"].items()
                )
                for rs in (solo, group)
            ]
            out.append(
                f"    run {run}: CPU ms, whole migrations (pre-copy included): solo: {cpu[0]};"
                f" {len(mine)} at once: {cpu[1]}"
            )
            out.append(
                f"    run {run}: solo {base[0]:.1f} ms; {len(mine)} at once: "
                + ", ".join(
                    f"{t:.1f} ms ({q:.2f} x)" for t, q in zip(mine, run_ratios, strict=True)
                )
            )
        k = max(r["parallel"] for r in group)
        verdict = ""
        if worst:
            verdict = " met" if statistics.median(worst) <= PARALLEL_TARGET else " not met"
        out.append(
            f"  {k} parallel migrations x {n:,} ({mode}): each/solo {_spread(ratios, ' x')};"
            f" worst per run {_spread(worst, ' x')}; target each <= {PARALLEL_TARGET} x solo:"
            f"{verdict}"
        )
    return "\n".join(out) + "\n"


def _raise_fd_limit(n: int) -> None:
    """Enough descriptors for n connections in every process, if we may raise the hard limit.

    Each process of the bed (the guest's client, the peer's server, each
    ferryd) holds about n sockets; a container may forbid raising the hard
    limit even to root (no CAP_SYS_RESOURCE): then the hard limit it is.
    """
    raise_fd_limit()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 4096
    if want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError) as exc:
            print(f"open-file limit stays {hard} (cannot raise it: {exc})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.migration", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--busy", type=int, default=4, help="busy connections among the N")
    parser.add_argument(
        "--busy-rate",
        type=float,
        default=0,
        metavar="MB/S",
        help="each busy connection's rate each way, MB/s (default 0: as fast as it goes)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("precopy", "plain", "handover"),
        default=["precopy", "plain"],
        help="precopy: ferryctl's default; plain: --no-precopy; handover: source and target"
        " in one network namespace (the sockets themselves go over), printed against plain",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=0,
        metavar="BYTES",
        help="start both ferryds with --max-queue BYTES (default 0: off)",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="with --busy, skip the idle run of each N and mode the busy one is compared to",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=0,
        metavar="K",
        help="also migrate K guests at once (each N connections, one ferry-repair per host)"
        " and compare each with a solo migration of the same run",
    )
    parser.add_argument("--runs", type=int, default=1, help="repeat every row (medians, spread)")
    parser.add_argument("--json", action="store_true", help="also print the raw summaries")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.migration needs root (network namespaces, taps)", file=sys.stderr)
        return 2
    _raise_fd_limit(max(args.sizes))
    end_on_signals()
    rows = []
    busies = [args.busy] + ([0] if args.busy and not args.no_reference else [])
    for run in range(1, args.runs + 1):
        for n in args.sizes:
            for mode in args.modes:
                ks = [1] + ([args.parallel] if args.parallel > 1 else [])
                if run % 2 == 0:
                    ks.reverse()  # alternate which goes first
                for busy in busies:
                    for k in ks:
                        measured = measure(n, busy, mode, args.busy_rate, k, args.max_queue)
                        for i, row in enumerate(measured):
                            row.update(run=run, parallel=k, index=i)
                            rows.append(row)
                        print(
                            f"run {run} N={n} busy={busy} {mode} x{k}: done",
                            file=sys.stderr,
                            flush=True,
                        )
    sys.stdout.write(format_table(rows))
    sys.stdout.write(format_targets(rows, args.busy_rate))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
