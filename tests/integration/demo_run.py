"""Running ``python -m scripts.demo`` as the README's ``make demo`` does, and reading its output.

Shared by tests/integration/test_demo.py and tests/integration/vm/test_vm_demo.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from testbed.netns import ip

REPO = Path(__file__).resolve().parents[2]


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The demo with *args*, its stdout a pipe (progress lines as they come), stderr merged."""
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.demo", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def table_row(output: str, key: str) -> str:
    """The value of the summary table's row *key*."""
    match = re.search(rf"^\| {re.escape(key)} +\| (.*?) +\|$", output, re.M)
    assert match is not None, f"no summary row {key!r} in:\n{output}"
    return match.group(1)


def assert_left_nothing(output: str) -> None:
    """The namespaces and processes the demo named in its progress lines are gone."""
    match = re.search(r"namespaces (\S+), (\S+), (\S+), (\S+);", output)
    assert match is not None, output
    left = set(ip("netns", "list").stdout.split()) & set(match.groups())
    assert not left, f"the demo left namespaces behind: {left}"
    for pid in {int(p) for p in re.findall(r"\bpid (\d+)", output)}:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        # A reused number is not a leak; one of the demo's programs still running is.
        assert not re.search(rb"ferry|qemu", cmdline), f"pid {pid} still runs: {cmdline!r}"
    workdir = re.search(r"sockets and logs in (\S+)$", output, re.M)
    assert workdir is not None, output
    assert not Path(workdir.group(1)).exists(), f"the demo left {workdir.group(1)} behind"
