"""Run a command under the SystemCallFilter= of a systemd unit, as systemd would.

Usage: ``python -m tests.integration.unit_syscall_filter UNIT -- COMMAND...``

There is no running systemd on the test machines, so the units' sandboxing
is reproduced piece by piece: ``setpriv`` for CapabilityBoundingSet=,
AmbientCapabilities=, User= and NoNewPrivileges=, ``unshare`` for
PrivateNetwork=, and this for the system call filter, which decides
whether ferry-repair may call bpf() and ferryd seccomp(). The unit's
SystemCallFilter= lines are read with systemd's semantics (systemd.exec(5)):
the first line, an allow-list, starts the set; a later ``~`` line removes
from it and a later plain line adds to it. Groups (``@system-service``) are
expanded by ``systemd-analyze syscall-filter``, recursively, so the filter
is the one systemd would build. Denied calls fail with the unit's
SystemCallErrorNumber=. Not reproduced: RestrictNamespaces= and
RestrictAddressFamilies=, which systemd also implements with seccomp.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pyseccomp  # type: ignore[import-untyped]


def unit_settings(unit: Path, key: str) -> list[str]:
    """Every value of ``key=`` in the unit, in order."""
    prefix = key + "="
    return [
        line[len(prefix) :].strip()
        for line in unit.read_text().splitlines()
        if line.startswith(prefix)
    ]


def expand(name: str, seen: set[str] | None = None) -> set[str]:
    """A syscall name, or every syscall of a ``@group`` (nested groups too)."""
    if not name.startswith("@"):
        return {name}
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            names |= expand(entry, seen)
    return names


def allowed_syscalls(unit: Path) -> set[str]:
    allowed: set[str] = set()
    for n, value in enumerate(unit_settings(unit, "SystemCallFilter")):
        deny = value.startswith("~")
        names = set().union(*(expand(word) for word in value.lstrip("~").split()))
        if n == 0 and deny:
            raise SystemExit("a deny-list first line is not reproduced here")
        allowed = allowed - names if deny else allowed | names
    return allowed


def install(unit: Path) -> None:
    code = unit_settings(unit, "SystemCallErrorNumber") or ["EPERM"]
    rules = pyseccomp.SyscallFilter(pyseccomp.ERRNO(getattr(errno, code[-1])))
    for name in sorted(allowed_syscalls(unit)):
        # OSError: not a syscall of this architecture (systemd skips those too).
        with contextlib.suppress(OSError):
            rules.add_rule(pyseccomp.ALLOW, name)
    rules.load()


def main(argv: list[str]) -> None:
    unit, sep, *command = argv
    if sep != "--" or not command:
        raise SystemExit(__doc__)
    install(Path(unit))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
