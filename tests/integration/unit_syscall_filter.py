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
SystemCallErrorNumber=. RestrictAddressFamilies= (an allow-list) and
RestrictNamespaces= (the kinds allowed) are in the same filter, as systemd
puts them in seccomp too: socket() only for the listed families, setns()
only for the allowed kinds, unshare() and clone() only without the others'
flags (clone3 fails with ENOSYS, as under systemd, so libc falls back to
clone).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
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


#: linux/sched.h
NAMESPACE_FLAGS = {
    "cgroup": 0x02000000, "ipc": 0x08000000, "net": 0x40000000, "mnt": 0x00020000,
    "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000,
}  # fmt: skip


def install(unit: Path) -> None:
    code = unit_settings(unit, "SystemCallErrorNumber") or ["EPERM"]
    rules = pyseccomp.SyscallFilter(pyseccomp.ERRNO(getattr(errno, code[-1])))
    allowed = allowed_syscalls(unit)
    conditional: list[tuple[str, list[object]]] = []
    families = unit_settings(unit, "RestrictAddressFamilies")
    if families and "socket" in allowed:
        allowed.discard("socket")
        for family in families[-1].split():
            number = getattr(socket, family)
            conditional.append(("socket", [pyseccomp.Arg(0, pyseccomp.EQ, number)]))
    kinds = unit_settings(unit, "RestrictNamespaces")
    if kinds and kinds[-1] != "no":
        value = kinds[-1]
        if value == "yes":
            permitted: set[str] = set()
        elif value.startswith("~"):
            permitted = set(NAMESPACE_FLAGS) - set(value[1:].split())
        else:
            permitted = set(value.split())
        forbidden = sum(f for k, f in NAMESPACE_FLAGS.items() if k not in permitted)
        if "setns" in allowed:
            allowed.discard("setns")
            # setns(fd, 0) would let the kernel pick the kind: systemd refuses it.
            for kind in permitted:
                flag = NAMESPACE_FLAGS[kind]
                conditional.append(("setns", [pyseccomp.Arg(1, pyseccomp.EQ, flag)]))
        for name, arg in (("unshare", 0), ("clone", 0)):
            if name in allowed:
                allowed.discard(name)
                conditional.append((name, [pyseccomp.Arg(arg, pyseccomp.MASKED_EQ, forbidden, 0)]))
        if "clone3" in allowed:
            allowed.discard("clone3")
            rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    for name in sorted(allowed):
        # OSError: not a syscall of this architecture (systemd skips those too).
        with contextlib.suppress(OSError):
            rules.add_rule(pyseccomp.ALLOW, name)
    for name, args in conditional:
        rules.add_rule(pyseccomp.ALLOW, name, *args)
    rules.load()


def main(argv: list[str]) -> None:
    unit, sep, *command = argv
    if sep != "--" or not command:
        raise SystemExit(__doc__)
    install(Path(unit))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
