"""Shared pieces of the benchmarks: iperf3 runs, a request/response probe, CPU accounting.

Benchmarks here compare ferryd with references measured in the same run
(DESIGN.md, Tests). What they share:

* :func:`iperf3` runs one single-stream ``iperf3 -c`` inside a namespace and
  returns what ``--json`` reported, or why it failed (a failed run is a
  result to print, never an exception: a benchmark reports and carries on);
* a request/response probe: :func:`echo_server` (one byte back for every
  byte) and :func:`rr_client` (N one-byte round trips over one TCP
  connection, timed one by one), run in namespaces as
  ``python -m bench.common echo-server|rr-client ...``; iperf3 cannot
  measure this;
* :func:`cpu_seconds`: a process's user+system CPU time from
  ``/proc/PID/stat``, to charge a forwarder for the bytes it moved
  (:func:`cpu_times`: the two apart);
* :func:`wait_listening`: wait until a TCP port listens in a namespace.

The helpers never sleep a fixed time; they poll with deadlines
(testbed/wait.py: wait_for).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from testbed.netns import Netns
from testbed.paths import REPO
from testbed.wait import WaitTimeout, wait_for

__all__ = [
    "PYTHON",
    "REPO",
    "IperfResult",
    "RrResult",
    "cpu_seconds",
    "cpu_times",
    "echo_server",
    "iperf3",
    "percentile",
    "rr_client",
    "rr_probe",
    "start_echo_server",
    "wait_listening",
]

#: The interpreter running the benchmark (the venv's), also used inside namespaces.
PYTHON = sys.executable
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process *pid* (all its threads), in seconds."""
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of process *pid* (all its threads), in seconds.

    Fields 14 and 15 of /proc/PID/stat, counted after the ``comm`` field,
    which is parenthesised and may itself contain spaces. The kernel splits
    them by sampling at each tick (proc(5): "measured in clock ticks"), so
    the split of a short run is approximate: a few ticks either way.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state), so utime (14) and stime (15) are 11 and 12.
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def sleeps(pid: int) -> int:
    """How often process *pid* went to sleep: voluntary context switches, all threads.

    Per request/response round trip this counts the forwarder's wake-ups
    per exchange (it blocks, then an event wakes it); a preemption is an
    involuntary switch and is not counted (proc(5), /proc/PID/task/TID/status).
    """
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def wait_listening(ns: Netns, port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on TCP *port* in *ns* (``ss``, no connection made)."""

    def listening() -> bool:
        out = ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        return bool(out.strip())

    wait_for(listening, timeout=timeout, what=f"TCP port {port} to listen in {ns.name}")


# -- iperf3


@dataclass(frozen=True)
class IperfResult:
    """One iperf3 run: goodput at the receiver, or the reason it failed."""

    gbps: float | None = None
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None


def iperf3_bidir(
    ns: Netns, server: str, *, seconds: float, port: int = 5201
) -> tuple[float, float] | str:
    """``iperf3 --bidir`` from *ns*: (up, down) goodput in Gbit/s at each receiver, or an error.

    Up is the client's stream (received by the server: ``sum_received``),
    down the reverse one (``sum_received_bidir_reverse``).
    """
    argv = ["iperf3", "-c", server, "-p", str(port), "-t", f"{seconds:g}", "--bidir", "--json"]
    try:
        result = ns.run(argv, check=False, timeout=seconds + 30)
        end = json.loads(result.stdout)["end"]
        up = end["sum_received"]["bits_per_second"] / 1e9
        down = end["sum_received_bidir_reverse"]["bits_per_second"] / 1e9
    except Exception as exc:  # no result, no JSON, an old iperf3 without --bidir
        return f"iperf3 --bidir gave no result ({type(exc).__name__}: {exc})"
    return up, down


def iperf3(
    ns: Netns, server: str, *, seconds: float, reverse: bool, port: int = 5201
) -> IperfResult:
    """Run ``iperf3 -c SERVER`` (single stream, ``-R`` if *reverse*) in *ns*.

    Goodput is taken at the receiving end (``end.sum_received``): what was
    delivered, not what was queued. A run that fails or hangs (a forwarder
    that stalls makes iperf3 wait forever) is returned with ``error`` set.
    """
    argv = [
        "iperf3",
        "-c",
        server,
        "-p",
        str(port),
        "-t",
        f"{seconds:g}",
        "--connect-timeout",
        "5000",
        "--json",
        *(["-R"] if reverse else []),
    ]
    limit = seconds + 30
    try:
        result = ns.run(argv, check=False, timeout=limit)
    except Exception as exc:  # NetnsError on timeout
        return IperfResult(error=f"iperf3 gave no result within {limit:g} s ({exc})")
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return IperfResult(error=f"iperf3 exit {result.returncode}: {tail[0]}")
    if "error" in report:
        return IperfResult(error=f"iperf3: {report['error']}")
    received = report["end"]["sum_received"]
    if received["bytes"] == 0:
        return IperfResult(error="iperf3: no data arrived")
    return IperfResult(
        gbps=received["bits_per_second"] / 1e9,
        bytes=int(received["bytes"]),
        seconds=float(received["seconds"]),
    )


# -- request/response latency


@dataclass(frozen=True)
class RrResult:
    """N one-byte round trips over one connection: mean and tail, in microseconds."""

    mean_us: float | None = None
    p50_us: float = 0.0
    p99_us: float = 0.0
    count: int = 0
    error: str | None = None


def echo_server(address: str, port: int) -> None:
    """Serve connections one after another, echoing every byte back at once.

    Prints ``ready`` once listening. Used as the peer of :func:`rr_client`.
    """
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                conn.sendall(data)


def _connect(address: str, port: int, deadline: float) -> socket.socket:
    """Connect, retrying failed attempts until *deadline* (a forwarder warming up)."""
    while True:
        try:
            return socket.create_connection((address, port), timeout=5)
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def rr_client(address: str, port: int, count: int, warmup: int, connect_timeout: float) -> None:
    """*count* one-byte request/response round trips after *warmup*; prints JSON.

    Output: ``{"mean_us", "p50_us", "p99_us", "count"}``, or ``{"error"}``.
    Each round trip is timed alone (perf_counter_ns), so the tail is real,
    not an average of batches.
    """
    try:
        sock = _connect(address, port, time.monotonic() + connect_timeout)
    except OSError as exc:
        print(json.dumps({"error": f"connect to {address}:{port}: {exc}"}))
        return
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)
        one = b"x"
        samples: list[float] = []
        try:
            for i in range(warmup + count):
                start = time.perf_counter_ns()
                sock.sendall(one)
                if not sock.recv(1):
                    raise ConnectionError("echo server closed the connection")
                if i >= warmup:
                    samples.append((time.perf_counter_ns() - start) / 1000)
        except OSError as exc:
            print(json.dumps({"error": f"after {len(samples)} round trips: {exc}"}))
            return
    samples.sort()
    print(
        json.dumps(
            {
                "mean_us": sum(samples) / len(samples),
                "p50_us": percentile(samples, 0.50),
                "p99_us": percentile(samples, 0.99),
                "count": len(samples),
            }
        )
    )


def rr_probe(
    ns: Netns,
    server: str,
    port: int,
    *,
    count: int,
    warmup: int = 200,
    connect_timeout: float = 10.0,
) -> RrResult:
    """Run :func:`rr_client` in *ns* against an :func:`echo_server` and parse its report."""
    argv = [
        PYTHON,
        "-m",
        "bench.common",
        "rr-client",
        server,
        str(port),
        "--count",
        str(count),
        "--warmup",
        str(warmup),
        "--connect-timeout",
        f"{connect_timeout:g}",
    ]
    limit = connect_timeout + 60 + count * 0.01
    try:
        result = subprocess.run(
            [*ns.exec_prefix(), *argv],
            capture_output=True,
            text=True,
            timeout=limit,
            cwd=REPO,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return RrResult(error=f"no result within {limit:g} s")
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return RrResult(error=f"client exit {result.returncode}: {tail[0]}")
    if "error" in report:
        return RrResult(error=str(report["error"]))
    return RrResult(
        mean_us=float(report["mean_us"]),
        p50_us=float(report["p50_us"]),
        p99_us=float(report["p99_us"]),
        count=int(report["count"]),
    )


def start_echo_server(ns: Netns, address: str, port: int, timeout: float = 10.0) -> None:
    """Start :func:`echo_server` in *ns* (reaped by *ns* at exit); return once it listens."""
    proc = ns.popen(
        [PYTHON, "-m", "bench.common", "echo-server", address, str(port)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise WaitTimeout(f"echo server in {ns.name} did not start (exit {proc.poll()})")


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.common", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    server = sub.add_parser("echo-server", help="echo every byte back, one connection at a time")
    server.add_argument("address")
    server.add_argument("port", type=int)
    client = sub.add_parser("rr-client", help="time one-byte round trips, print JSON")
    client.add_argument("address")
    client.add_argument("port", type=int)
    client.add_argument("--count", type=int, default=5000)
    client.add_argument("--warmup", type=int, default=200)
    client.add_argument("--connect-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.cmd == "echo-server":
        echo_server(args.address, args.port)
    else:
        rr_client(args.address, args.port, args.count, args.warmup, args.connect_timeout)


if __name__ == "__main__":
    _main()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def end_on_signals() -> None:
    """SIGTERM and SIGHUP end a bench as Ctrl-C does, so that every ``with`` cleans up.

    SIGINT too when the bench was started with it ignored (a background job
    of a script): namespaces and processes are removed on every exit path.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
