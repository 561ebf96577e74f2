"""Bulk TCP throughput and request/response latency: ferryd against its references.

Run as root: ``python -m bench.throughput [--seconds 5] [--repeat 1]
[--requests 5000] [--only veth,pasta,pasta-new,slirp4netns,ferryd]`` (bench/README.md).

Every variant gets fresh namespaces of one shape (testbed/topology.py:
build_topology), and only the middle differs::

    guest ns  ──(thing under test)──  host ns  ──veth, MTU 65520──  peer ns
                                      10.77.0.1/24                   10.77.0.2/24
                                      default via .2                 iperf3 -s, echo server

* **veth** (the ceiling): a second veth pair, guest 10.78.0.2/24 ↔ host
  10.78.0.1/24, with IPv4 forwarding on in the host namespace. The
  reference therefore crosses one forwarding hop, as every user-mode
  forwarder's traffic crosses the host's stack once more; a bare veth
  between guest and peer would flatter it.
* **pasta** (Debian 12's passt package), run in the host namespace with
  ``--config-net --no-map-gw``: the guest takes the host's address. It
  stalls in the guest→host direction and has corrupted data there
  (REFERENCE.md), so it is measured peer→guest only, and it has no latency
  row (its request path is guest→host).
* **pasta-new**: the newest pasta, the same command line; the passt binary
  that bench/passt_build.py builds from Debian's newest source package into
  .venv/cache/passt/ (shared with bench.qemu_migration), run through a
  symlink named ``pasta`` (passt is pasta when so named). Measured both ways,
  with its latency; a build failure fails this variant only.
* **slirp4netns** 1.2 in the host namespace, ``--configure --mtu=65520
  --disable-host-loopback``, joining the guest namespace by its path
  (``--netns-type=path``, equivalent to the PID of a process inside it):
  the guest is 10.0.2.100 behind slirp's gateway 10.0.2.2.
* **ferryd**: ``ferryd --netns GUEST --tap tap0 --config-net --control
  SOCK`` in the host namespace, ready once ``ferryctl status --wait``
  says so; the guest takes the host's address, as with pasta.

In each: a one-byte request/response probe checks that the guest reaches
the peer over TCP (a variant that cannot is reported failed with the
reason, and the run carries on); then ``iperf3 -c 10.77.0.2`` from the
guest, single stream, ``--seconds`` long, in each direction (``-R`` for
peer→guest), ``--repeat`` times (the median is shown), goodput as the
receiver saw it; where both directions work, one ``iperf3 --bidir`` run
(a stream each way at once: how the two share the forwarder); then
``--requests`` one-byte
round trips over one TCP connection (bench/common.py: rr_client), mean and
p99. For the forwarding process (pasta, slirp4netns, ferryd) the CPU it
used during each iperf3 run (utime+stime from /proc/PID/stat, all threads)
is divided by the gigabytes delivered, and during the round trips by their
number (CPU µs/rt), as are its voluntary context switches (sleeps/rt: how
many times per exchange it blocked and had to be woken).

The report ends with issue 12's targets, each as ferryd's ratio to its
reference next to the bound, met, not met or not measured: 1-byte RR mean
≤ 1.0× slirp4netns; peer→guest ≥ 1.0× the newest pasta; guest→peer ≥ 1.5×
slirp4netns; CPU s/GB peer→guest ≤ 1.0× the newest pasta; with --bidir the
smaller direction ≥ 0.5× the larger and the total ≥ 1.5× slirp4netns'. It
is a benchmark: nothing is asserted and the exit status is 0 unless the benchmark itself
could not run (not root, a tool missing). Namespaces and processes are
removed on every exit path, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.common import (
    IperfResult,
    RrResult,
    cpu_seconds,
    cpu_times,
    end_on_signals,
    iperf3,
    iperf3_bidir,
    rr_probe,
    sleeps,
    start_echo_server,
    wait_listening,
)
from bench.passt_build import PasstBuildError, build_passt
from testbed.netns import Netns
from testbed.paths import FERRYCTL, FERRYD
from testbed.topology import Topology, build_topology, veth
from testbed.wait import wait_for

PEER = "10.77.0.2"
IPERF_PORT = 5201
ECHO_PORT = 7777
MTU = 65520
READY_TIMEOUT = 15.0
BUSY_TIMEOUT = 20.0
BUSY_POLL = 0.2
#: Round trips before the timed ones (rr_probe's warm-up), counted in CPU µs/rt.
RR_WARMUP = 200
R = TypeVar("R")

NEWEST_PASTA = "pasta-new"
G2P = "guest→peer"
P2G = "peer→guest"
BOTH = (G2P, P2G)


class VariantFailed(Exception):
    """A variant could not be set up or could not reach the peer; the message says why."""


@dataclass(frozen=True)
class Variant:
    name: str
    #: Starts the thing under test between guest and host; yields the PID of
    #: the forwarding process (None for the kernel's veth).
    attach: Callable[[Topology, Path], contextlib.AbstractContextManager[int | None]]
    directions: tuple[str, ...] = BOTH
    latency: bool = True
    #: Programs it needs; a missing one fails the variant, not the run.
    needs: tuple[str, ...] = ()


@dataclass
class Outcome:
    """What one variant measured, or why it failed."""

    variant: Variant
    failure: str | None = None
    throughput: dict[str, IperfResult] = field(default_factory=dict)
    cpu_per_gb: dict[str, float] = field(default_factory=dict)
    #: Every run's Gbit/s per direction (the row shows the median).
    runs: dict[str, list[float]] = field(default_factory=dict)
    latency: RrResult | None = None
    rr_cpu_us: float | None = None
    """The forwarder's CPU per round trip (warm-up included), µs."""
    rr_kernel_us: float | None = None
    """The part of rr_cpu_us spent in the kernel (stime): its system calls and the
    packet work they do in its context (the guest's and the peer's TCP receive)."""
    rr_sleeps: float | None = None
    """The forwarder's voluntary context switches per round trip: its wake-ups per exchange."""
    bidir: tuple[float, float] | str | None = None
    """iperf3 --bidir: (up, down) Gbit/s, or why not."""

    def gbps(self, direction: str) -> float | None:
        result = self.throughput.get(direction)
        return result.gbps if result is not None else None


# -- the variants


@contextlib.contextmanager
def attach_veth(topo: Topology, workdir: Path) -> Iterator[int | None]:
    veth(topo.guest, "eth0", topo.host, "gw0", mtu=MTU)
    topo.host.add_addr("gw0", "10.78.0.1/24")
    topo.host.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    topo.guest.add_addr("eth0", "10.78.0.2/24")
    topo.guest.add_route("default", "10.78.0.1")
    yield None


def _has_default_route(ns: Netns) -> bool:
    return bool(ns.run(["ip", "-4", "route", "show", "default"], check=False).stdout.strip())


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM by PID, then SIGKILL; the namespace's own cleanup is the last resort."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "no log"
    return " | ".join(text[-lines:]) or "empty log"


@contextlib.contextmanager
def _forwarder(
    ns: Netns, argv: Sequence[str], log_path: Path, ready: Callable[[], bool], what: str
) -> Iterator[int]:
    """Run a forwarder in *ns* in the foreground, wait until *ready*, stop it by PID at exit."""
    with log_path.open("wb") as log_file:
        proc: subprocess.Popen[bytes] = ns.popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        try:
            wait_for(
                lambda: proc.poll() is not None or ready(),
                timeout=READY_TIMEOUT,
                what=f"{what} to be ready",
            )
        except AssertionError as exc:
            raise VariantFailed(f"{exc}; log: {_log_tail(log_path)}") from None
        if proc.poll() is not None:
            raise VariantFailed(
                f"{what} exited with status {proc.returncode}: {_log_tail(log_path)}"
            )
        yield proc.pid
    finally:
        _stop(proc)


@contextlib.contextmanager
def attach_pasta(topo: Topology, workdir: Path) -> Iterator[int | None]:
    with _pasta(topo, workdir, "pasta", "pasta") as pid:
        yield pid


@contextlib.contextmanager
def attach_newest_pasta(topo: Topology, workdir: Path) -> Iterator[int | None]:
    """The newest pasta: the passt binary bench.qemu_migration builds from Debian's
    source package (bench/passt_build.py), run under the name ``pasta``, which is
    how passt tells which of the two it is to be (passt.c: the program name)."""
    try:
        binaries = build_passt()
    except PasstBuildError as exc:
        raise VariantFailed(f"the newest passt could not be built: {exc}") from None
    program = workdir / "pasta"
    program.symlink_to(binaries.passt)
    with _pasta(topo, workdir, str(program), f"pasta {binaries.version}") as pid:
        yield pid


@contextlib.contextmanager
def _pasta(topo: Topology, workdir: Path, program: str, what: str) -> Iterator[int]:
    argv = [
        program,
        "--foreground",
        "--runas",
        "0:0",
        "--config-net",
        "--no-map-gw",
        "-t",
        "none",
        "-u",
        "none",
        "-T",
        "none",
        "-U",
        "none",
        "--netns",
        topo.guest.path,
    ]
    with _forwarder(
        topo.host, argv, workdir / "pasta.log", lambda: _has_default_route(topo.guest), what
    ) as pid:
        yield pid


@contextlib.contextmanager
def attach_slirp4netns(topo: Topology, workdir: Path) -> Iterator[int | None]:
    argv = [
        "slirp4netns",
        "--configure",
        f"--mtu={MTU}",
        "--disable-host-loopback",
        "--netns-type=path",
        topo.guest.path,
        "tap0",
    ]
    with _forwarder(
        topo.host,
        argv,
        workdir / "slirp4netns.log",
        lambda: _has_default_route(topo.guest),
        "slirp4netns",
    ) as pid:
        yield pid


@contextlib.contextmanager
def attach_ferryd(topo: Topology, workdir: Path) -> Iterator[int | None]:
    if not FERRYD.exists():
        raise VariantFailed(f"{FERRYD} not found (run scripts/bootstrap.sh)")
    control = workdir / "ferryd.sock"
    argv = [
        str(FERRYD),
        "--netns",
        topo.guest.path,
        "--tap",
        "tap0",
        "--config-net",
        "--control",
        str(control),
    ]

    def ready() -> bool:
        if not control.exists():
            return False
        status = subprocess.run(
            [str(FERRYCTL), "--control", str(control), "status", "--wait", "1"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return status.returncode == 0

    with _forwarder(topo.host, argv, workdir / "ferryd.log", ready, "ferryd") as pid:
        yield pid


VARIANTS = (
    Variant("veth", attach_veth),
    Variant("pasta", attach_pasta, directions=(P2G,), latency=False, needs=("pasta",)),
    Variant(NEWEST_PASTA, attach_newest_pasta),
    Variant("slirp4netns", attach_slirp4netns, needs=("slirp4netns",)),
    Variant("ferryd", attach_ferryd),
)


# -- measuring


def measure(variant: Variant, seconds: float, repeat: int, requests: int) -> Outcome:
    """Build the topology, attach *variant*, measure; any setup failure becomes the outcome."""
    outcome = Outcome(variant)
    missing = [tool for tool in variant.needs if shutil.which(tool) is None]
    if missing:
        outcome.failure = f"{', '.join(missing)} not installed"
        return outcome
    try:
        with (
            tempfile.TemporaryDirectory(prefix="fb-") as tmp,
            build_topology() as topo,
        ):
            topo.peer.popen(
                ["iperf3", "-s", "-B", PEER, "-p", str(IPERF_PORT)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            start_echo_server(topo.peer, PEER, ECHO_PORT)
            wait_listening(topo.peer, IPERF_PORT)
            with variant.attach(topo, Path(tmp)) as pid:
                _measure_attached(outcome, topo.guest, pid, seconds, repeat, requests)
    except VariantFailed as exc:
        outcome.failure = str(exc)
    except Exception as exc:  # a broken environment: report it, keep going
        outcome.failure = f"{type(exc).__name__}: {exc}"
    return outcome


def _measure_attached(
    outcome: Outcome, guest: Netns, pid: int | None, seconds: float, repeat: int, requests: int
) -> None:
    probe = rr_probe(guest, PEER, ECHO_PORT, count=10, warmup=0)
    if probe.error is not None:
        raise VariantFailed(f"no TCP connection from the guest to the peer: {probe.error}")
    for direction in outcome.variant.directions:
        runs: list[IperfResult] = []
        cpu = 0.0
        for _ in range(repeat):
            before = cpu_seconds(pid) if pid is not None else 0.0
            result = _when_free(
                functools.partial(
                    iperf3, guest, PEER, seconds=seconds, reverse=direction == P2G, port=IPERF_PORT
                ),
                lambda r: r.error,
            )
            if pid is not None:
                cpu += cpu_seconds(pid) - before
            runs.append(result)
            if result.gbps is None:
                break
        failed = [r for r in runs if r.gbps is None]
        if failed:
            outcome.throughput[direction] = failed[0]
            continue
        runs.sort(key=lambda r: r.gbps or 0.0)
        outcome.runs[direction] = [r.gbps or 0.0 for r in runs]
        outcome.throughput[direction] = runs[(len(runs) - 1) // 2]
        if pid is not None:
            outcome.cpu_per_gb[direction] = cpu / (sum(r.bytes for r in runs) / 1e9)
    if outcome.variant.directions == BOTH:
        outcome.bidir = _when_free(
            functools.partial(iperf3_bidir, guest, PEER, seconds=seconds, port=IPERF_PORT),
            _bidir_error,
        )
    if outcome.variant.latency:
        user, system = cpu_times(pid) if pid is not None else (0.0, 0.0)
        before_sleeps = sleeps(pid) if pid is not None else 0
        outcome.latency = rr_probe(guest, PEER, ECHO_PORT, count=requests, warmup=RR_WARMUP)
        if pid is not None:
            trips = requests + RR_WARMUP
            user_after, system_after = cpu_times(pid)
            outcome.rr_cpu_us = (user_after + system_after - user - system) / trips * 1e6
            outcome.rr_kernel_us = (system_after - system) / trips * 1e6
            outcome.rr_sleeps = (sleeps(pid) - before_sleeps) / trips


def _bidir_error(result: tuple[float, float] | str) -> str | None:
    return result if isinstance(result, str) else None


def _when_free(run: Callable[[], R], error: Callable[[R], str | None]) -> R:
    """``run()`` again while iperf3's server still serves the previous test.

    ``iperf3 -s`` takes one test at a time and may still be closing the last
    one when the next client arrives ("the server is busy running a test");
    that is no measurement of the forwarder, so it is polled until free, for
    up to ``BUSY_TIMEOUT`` seconds.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        result = run()
        why = error(result)
        if why is None or "busy" not in why or time.monotonic() >= deadline:
            return result
        time.sleep(BUSY_POLL)


# -- reporting


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}×"


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _spread(runs: Sequence[float]) -> str:
    return f"  (runs {min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""


def _find(outcomes: Sequence[Outcome], name: str) -> Outcome | None:
    return next((o for o in outcomes if o.variant.name == name), None)


def _gbps(outcomes: Sequence[Outcome], name: str, direction: str) -> float | None:
    outcome = _find(outcomes, name)
    return outcome.gbps(direction) if outcome is not None else None


def report(outcomes: Sequence[Outcome], seconds: float, repeat: int, requests: int) -> str:
    runs = f"median of {repeat} runs" if repeat > 1 else "one run"
    lines = [
        f"bulk TCP, one iperf3 stream, {seconds:g} s per run, {runs} per row, MTU {MTU}",
        "(Gbit/s: goodput at the receiver; CPU s/GB: the forwarding process's"
        " utime+stime per GB delivered, over all runs)",
        "",
        f"{'variant':<12} {'direction':<11} {'Gbit/s':>7} {'×veth':>6} {'×pasta':>7}"
        f" {'×p-new':>7} {'×slirp':>7} {'CPU s/GB':>9}",
    ]
    for outcome in outcomes:
        name = outcome.variant.name
        if outcome.failure is not None:
            lines.append(f"{name:<12} failed ({outcome.failure})")
            continue
        for direction in outcome.variant.directions:
            result = outcome.throughput[direction]
            if result.gbps is None:
                lines.append(f"{name:<12} {direction:<11} failed ({result.error})")
                continue
            pasta = _gbps(outcomes, "pasta", P2G) if direction == P2G else None
            cpu = outcome.cpu_per_gb.get(direction)
            lines.append(
                f"{name:<12} {direction:<11} {result.gbps:>7.2f}"
                f" {_ratio(result.gbps, _gbps(outcomes, 'veth', direction)):>6}"
                f" {_ratio(result.gbps, pasta):>7}"
                f" {_ratio(result.gbps, _gbps(outcomes, NEWEST_PASTA, direction)):>7}"
                f" {_ratio(result.gbps, _gbps(outcomes, 'slirp4netns', direction)):>7}"
                f" {'-' if cpu is None else f'{cpu:.2f}':>9}"
                + _spread(outcome.runs.get(direction, []))
            )
    lines += [
        "",
        "both directions at once (iperf3 --bidir, one stream each way, Gbit/s)",
        "",
        f"{'variant':<12} {'up':>7} {'down':>7} {'total':>7}",
    ]
    for outcome in outcomes:
        if outcome.bidir is None:
            continue
        if isinstance(outcome.bidir, str):
            lines.append(f"{outcome.variant.name:<12} failed ({outcome.bidir})")
            continue
        up, down = outcome.bidir
        lines.append(f"{outcome.variant.name:<12} {up:>7.2f} {down:>7.2f} {up + down:>7.2f}")
    lines += [
        "",
        f"request/response, 1 byte each way, {requests} round trips on one TCP connection",
        "",
        f"{'variant':<12} {'mean µs':>8} {'p50 µs':>8} {'p99 µs':>8} {'mean ×veth':>11}"
        f" {'CPU µs/rt':>10} {'kernel':>7} {'sleeps/rt':>10}",
    ]
    veth = _find(outcomes, "veth")
    veth_mean = veth.latency.mean_us if veth is not None and veth.latency is not None else None
    for outcome in outcomes:
        name = outcome.variant.name
        if not outcome.variant.latency:
            lines.append(f"{name:<12} not measured (its guest→host path is unreliable)")
        elif outcome.failure is not None:
            lines.append(f"{name:<12} failed (see above)")
        elif outcome.latency is None or outcome.latency.mean_us is None:
            error = outcome.latency.error if outcome.latency is not None else "not run"
            lines.append(f"{name:<12} failed ({error})")
        else:
            lat = outcome.latency
            lines.append(
                f"{name:<12} {lat.mean_us:>8.1f} {lat.p50_us:>8.1f} {lat.p99_us:>8.1f}"
                f" {_ratio(lat.mean_us, veth_mean):>11}"
                f" {_figure(outcome.rr_cpu_us, '.1f'):>10}"
                f" {_figure(outcome.rr_kernel_us, '.1f'):>7}"
                f" {_figure(outcome.rr_sleeps, '.2f'):>10}"
            )
    lines += ["", "targets:", *targets(outcomes)]
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """One row of issue 12's targets: ferryd's figure over a reference's, and the bound."""

    what: str
    reference: str
    bound: float
    at_most: bool = False
    """The ratio must stay at or below the bound (a cost), not reach it (a rate)."""


#: Each ratio's (ferryd, reference) figures, or why one is missing.
Figures = tuple[float, float] | str

TARGETS = (
    Target("1-byte RR mean", "slirp4netns", 1.0, at_most=True),
    Target(f"{P2G} bulk", NEWEST_PASTA, 1.0),
    Target(f"{G2P} bulk", "slirp4netns", 1.5),
    Target(f"CPU s/GB {P2G}", NEWEST_PASTA, 1.0, at_most=True),
    Target("--bidir smaller direction", "the larger", 0.5),
    Target("--bidir total", "slirp4netns", 1.5),
)


def _bidir(outcome: Outcome | None) -> tuple[float, float] | str:
    if outcome is None:
        return "not run"
    if outcome.failure is not None or outcome.bidir is None:
        return "failed"
    if isinstance(outcome.bidir, str):
        return outcome.bidir
    return outcome.bidir


def _figures(target: Target, ferryd: Outcome, reference: Outcome | None) -> Figures:
    """(ferryd's figure, the reference's) for ``target``, or why there are none."""
    what = target.what
    if what == "1-byte RR mean":
        ours = ferryd.latency.mean_us if ferryd.latency is not None else None
        theirs = reference.latency.mean_us if reference and reference.latency else None
    elif what.endswith(" bulk"):
        direction = what.removesuffix(" bulk")
        ours = ferryd.gbps(direction)
        theirs = reference.gbps(direction) if reference is not None else None
    elif what.startswith("CPU s/GB"):
        ours = ferryd.cpu_per_gb.get(P2G)
        theirs = reference.cpu_per_gb.get(P2G) if reference is not None else None
    else:
        mine = _bidir(ferryd)
        if isinstance(mine, str):
            return f"ferryd's --bidir {mine}"
        if target.reference == "the larger":
            return min(mine), max(mine)
        theirs_bidir = _bidir(reference)
        if isinstance(theirs_bidir, str):
            return f"{target.reference}'s --bidir {theirs_bidir}"
        return sum(mine), sum(theirs_bidir)
    if ours is None:
        return "ferryd failed, see above"
    if theirs is None:
        return f"no {target.reference} result"
    return ours, theirs


def targets(outcomes: Sequence[Outcome]) -> list[str]:
    """issue 12's targets, each as ferryd's ratio to its reference and the bound."""
    ferryd = _find(outcomes, "ferryd")
    lines = []
    for target in TARGETS:
        sign = "≤" if target.at_most else "≥"
        label = f"  {target.what} vs {target.reference}, target {sign} {target.bound:.1f}×:"
        if ferryd is None:
            lines.append(f"{label} not measured (ferryd not run)")
            continue
        figures = _figures(target, ferryd, _find(outcomes, target.reference))
        if isinstance(figures, str):
            lines.append(f"{label} not measured ({figures})")
            continue
        ours, theirs = figures
        ratio = ours / theirs if theirs else float("inf")
        met = ratio <= target.bound if target.at_most else ratio >= target.bound
        lines.append(
            f"{label} {ratio:.2f}× {'met' if met else 'not met'} ({ours:.2f} vs {theirs:.2f})"
        )
        if target.what == "1-byte RR mean":
            lines += _rr_floor(ferryd, _find(outcomes, target.reference))
    return lines


def _rr_floor(ferryd: Outcome, reference: Outcome | None) -> list[str]:
    """What bounds the RR row from below: ferryd's kernel time per round trip.

    A round trip's latency is the CPU work on its path (the forwarder runs
    once per exchange: sleeps/rt), so the forwarder's time in the kernel
    alone (its system calls and the guest's and the peer's packet work they
    run in its context) is a floor under ferryd's share of it, whatever the
    interpreter costs. Set against the reference's whole CPU per round trip.
    """
    if reference is None or ferryd.rr_kernel_us is None or not reference.rr_cpu_us:
        return []
    ours, theirs = ferryd.rr_kernel_us, reference.rr_cpu_us
    return [
        f"    ferryd's kernel time alone: {ours:.1f} µs a round trip,"
        f" {ours / theirs:.2f}× {reference.variant.name}'s whole CPU ({theirs:.1f} µs)"
    ]


def _versions() -> str:
    def first_line(argv: list[str]) -> str:
        if shutil.which(argv[0]) is None:
            return f"{argv[0]} missing"
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]

    return "; ".join(
        [
            f"kernel {os.uname().release}",
            first_line(["iperf3", "--version"]).split(" (")[0],
            _pasta_version(first_line),
            first_line(["slirp4netns", "--version"]),
            f"{os.cpu_count()} CPUs",
        ]
    )


def _pasta_version(first_line: Callable[[list[str]], str]) -> str:
    """pasta's own --version says "unknown version" in Debian 12: ask dpkg then."""
    own = first_line(["pasta", "--version"])
    if "unknown" not in own or shutil.which("dpkg-query") is None:
        return own
    package = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "passt"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"pasta (passt {package})" if package else own


def _parse_only(values: Sequence[str]) -> list[Variant]:
    names = [name for value in values for name in value.split(",") if name]
    known = {v.name: v for v in VARIANTS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [v for v in VARIANTS if v.name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="Bulk TCP throughput and request/response latency of ferryd "
        "against veth, pasta and slirp4netns (run as root).",
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="length of each iperf3 run (default 5)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="iperf3 runs per direction; the median is reported (default 1)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=5000,
        help="request/response round trips for the latency rows (default 5000)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="NAMES",
        help="run only these variants (comma- or space-separated): "
        + ", ".join(v.name for v in VARIANTS),
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.throughput needs root (network namespaces, veth, tap)", file=sys.stderr)
        return 2
    for tool in ("ip", "iperf3", "ss"):
        if shutil.which(tool) is None:
            print(f"bench.throughput needs {tool}", file=sys.stderr)
            return 2
    if args.repeat < 1 or args.seconds <= 0 or args.requests < 1:
        parser.error("--repeat, --seconds and --requests must be positive")
    variants = _parse_only(args.only) if args.only else list(VARIANTS)
    end_on_signals()

    print(_versions(), flush=True)
    outcomes: list[Outcome] = []
    interrupted = False
    try:
        for variant in variants:
            print(f"measuring {variant.name} ...", end=" ", flush=True)
            start = time.monotonic()
            outcome = measure(variant, args.seconds, args.repeat, args.requests)
            outcomes.append(outcome)
            status = "failed" if outcome.failure is not None else "done"
            print(f"{status} ({time.monotonic() - start:.0f} s)", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; namespaces and processes removed", file=sys.stderr)
        interrupted = True
    if outcomes:
        print()
        print(report(outcomes, args.seconds, args.repeat, args.requests))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
