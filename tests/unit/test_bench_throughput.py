"""bench.throughput's targets (issue 12): each row is ferryd's figure over its reference.

The bench needs root, namespaces and minutes; the ratios it prints from
measured outcomes are a pure function, checked here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import IperfResult, RrResult, cpu_seconds, cpu_times, sleeps
from bench.throughput import G2P, NEWEST_PASTA, P2G, VARIANTS, Outcome, report, targets
from testbed.wait import wait_for


def _outcome(name: str, **kw: object) -> Outcome:
    variant = next(v for v in VARIANTS if v.name == name)
    return Outcome(variant, **kw)  # type: ignore[arg-type]


def _measured() -> list[Outcome]:
    return [
        _outcome(
            NEWEST_PASTA,
            throughput={P2G: IperfResult(gbps=6.0), G2P: IperfResult(gbps=1.0)},
            cpu_per_gb={P2G: 0.8},
        ),
        _outcome(
            "slirp4netns",
            throughput={P2G: IperfResult(gbps=4.0), G2P: IperfResult(gbps=2.0)},
            latency=RrResult(mean_us=80.0),
            bidir=(1.0, 3.0),
            rr_cpu_us=40.0,
        ),
        _outcome(
            "ferryd",
            throughput={P2G: IperfResult(gbps=5.4), G2P: IperfResult(gbps=3.2)},
            cpu_per_gb={P2G: 1.2},
            latency=RrResult(mean_us=240.0, p50_us=230.0, p99_us=400.0),
            bidir=(1.0, 4.0),
            rr_cpu_us=150.0,
            rr_kernel_us=50.0,
            rr_sleeps=1.07,
        ),
    ]


def test_every_issue_12_row_prints_its_ratio_and_verdict() -> None:
    lines = targets(_measured())
    assert lines == [
        "  1-byte RR mean vs slirp4netns, target ≤ 1.0×: 3.00× not met (240.00 vs 80.00)",
        "    ferryd's kernel time alone: 50.0 µs a round trip, 1.25× slirp4netns's whole CPU"
        " (40.0 µs)",
        "  peer→guest bulk vs pasta-new, target ≥ 1.0×: 0.90× not met (5.40 vs 6.00)",
        "  guest→peer bulk vs slirp4netns, target ≥ 1.5×: 1.60× met (3.20 vs 2.00)",
        "  CPU s/GB peer→guest vs pasta-new, target ≤ 1.0×: 1.50× not met (1.20 vs 0.80)",
        "  --bidir smaller direction vs the larger, target ≥ 0.5×: 0.25× not met (1.00 vs 4.00)",
        "  --bidir total vs slirp4netns, target ≥ 1.5×: 1.25× not met (5.00 vs 4.00)",
    ]


def test_a_missing_reference_is_not_measured_rather_than_a_ratio() -> None:
    outcomes = [o for o in _measured() if o.variant.name != NEWEST_PASTA]
    outcomes[0].bidir = "iperf3 --bidir timed out"
    lines = targets(outcomes)
    assert lines[2].endswith("not measured (no pasta-new result)")
    assert lines[4].endswith("not measured (no pasta-new result)")
    assert lines[6].endswith("not measured (slirp4netns's --bidir iperf3 --bidir timed out)")
    assert "3.00× not met" in lines[0]


def test_without_ferryd_nothing_is_measured() -> None:
    lines = targets(_measured()[:2])
    assert all(line.endswith("not measured (ferryd not run)") for line in lines)
    assert len(lines) == 6


def test_the_rr_floor_needs_ferryds_kernel_time_and_the_references_cpu() -> None:
    outcomes = _measured()
    outcomes[1].rr_cpu_us = None
    assert "kernel time alone" not in "\n".join(targets(outcomes))
    outcomes = _measured()
    outcomes[2].rr_kernel_us = None
    assert len(targets(outcomes)) == 6


def test_the_rr_row_shows_the_forwarders_cpu_kernel_part_and_sleeps_per_round_trip() -> None:
    lines = report(_measured(), seconds=5, repeat=1, requests=5000).splitlines()
    ferryd = [line for line in lines if line.startswith("ferryd ") and "240.0" in line]
    assert ferryd == [
        "ferryd          240.0    230.0    400.0           -      150.0    50.0       1.07"
    ]
    slirp = [line for line in lines if line.startswith("slirp4netns ") and "80.0" in line]
    assert slirp[0].endswith("-       40.0       -          -")


def test_sleeps_counts_each_time_a_process_blocked_for_an_event() -> None:
    """A child echoing bytes one at a time, each sent once it blocks on the pipe:
    one sleep per byte (a byte sent before it blocks would not make it sleep)."""
    echo = "import os\nwhile b := os.read(0, 1):\n    os.write(1, b)\n"
    child = subprocess.Popen(
        [sys.executable, "-c", echo], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    assert child.stdin is not None and child.stdout is not None

    def blocked() -> bool:
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "S"

    try:
        child.stdin.write(b"x")
        assert child.stdout.read(1) == b"x"  # started
        wait_for(blocked, what="the child blocked reading")
        before = sleeps(child.pid)
        for _ in range(20):
            wait_for(blocked, what="the child blocked reading")
            child.stdin.write(b"x")
            assert child.stdout.read(1) == b"x"
        wait_for(blocked, what="the child blocked reading")
        assert sleeps(child.pid) - before >= 20
    finally:
        child.stdin.close()
        child.wait()
        child.stdout.close()


def test_cpu_times_splits_a_process_cpu_into_user_and_kernel_time() -> None:
    """A child copying from /dev/zero spends its CPU in the kernel (each read
    clears a MiB of its memory there), one adding numbers in user space: each
    shows up on its side of the split."""
    kernel = (
        "import os\nfd = os.open('/dev/zero', os.O_RDONLY)\nbuf = bytearray(1 << 20)\n"
        "for _ in range(10000):\n    os.readv(fd, [buf])\n"
    )
    user = "x = 0\nfor i in range(3_000_000):\n    x += i\n"
    split = {}
    for name, work in (("kernel", kernel), ("user", user)):
        code = work + "import os, sys\nos.write(1, b'x')\nsys.stdin.read()\n"
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            assert child.stdout.read(1) == b"x"  # its work is done; it waits for us
            split[name] = cpu_times(child.pid)
            assert cpu_seconds(child.pid) == sum(split[name])
        finally:
            child.stdin.close()
            child.wait()
            child.stdout.close()
    assert split["kernel"][1] > split["kernel"][0]
    assert split["user"][0] > split["user"][1]
