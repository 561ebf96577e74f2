"""Giving up capabilities for good: the steps ferry-repair and ferryd share.

Both processes end up holding at most one capability (ferry-repair
CAP_NET_ADMIN for TCP_REPAIR, sandbox.py; ferryd CAP_NET_BIND_SERVICE when a
forward needs a low port, or nothing, ferryd.privileges) and make the same
moves to get there. They live here, in the helper, because the helper
imports nothing of ferryd's while ferryd may import the helper's small
modules (as it does activation.py and protocol.py):

1. :func:`shrink_bounding_set`: every other capability leaves the bounding
   set. That needs CAP_SETPCAP (capabilities(7)), which root holds; without
   it the set stays, and no_new_privs (step 3) makes it moot anyway: no
   execve() can grant anything;
2. :func:`limit_capabilities`: the inheritable set is emptied, which also
   empties the ambient set (the kernel keeps an ambient capability only
   while it is both permitted and inheritable, security/commoncap.c), then
   the effective and permitted sets are cut down to the kept ones, effective
   first: capset(2) refuses an effective set that is not a subset of the
   permitted one (EPERM);
3. :func:`lock_down`: no_new_privs and non-dumpable (no core file, no ptrace
   or /proc/PID/mem by processes of the same uid);
4. :func:`capability_problem` reads the result back from /proc/self/status:
   the caller refuses to go on, with its own error, if the kernel did not do
   what was asked.

Between steps 1 and 2 ferryd may switch users (privileges.py says why and
how the kept capability survives it).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

import prctl

__all__ = [
    "capability_problem",
    "limit_capabilities",
    "lock_down",
    "process_status",
    "shrink_bounding_set",
]


def shrink_bounding_set(kept: Collection[int]) -> None:
    """Drop every capability but ``kept`` (prctl.CAP_* numbers) from the bounding set, if we may."""
    if prctl.cap_effective.setpcap:
        for cap in prctl.ALL_CAPS:
            if cap not in kept and prctl.capbset_read(cap):
                prctl.capbset_drop(cap)


def limit_capabilities(kept: Collection[int]) -> None:
    """Empty the inheritable and ambient sets; effective and permitted become ``kept``."""
    prctl.cap_inheritable.limit()
    prctl.cap_effective.limit(*kept)
    prctl.cap_permitted.limit(*kept)


def lock_down() -> None:
    """Set no_new_privs and make the process non-dumpable; neither can be undone."""
    prctl.set_no_new_privs(True)
    prctl.set_dumpable(False)


def capability_problem(kept: Collection[int]) -> str | None:
    """What differs from ``kept`` alone and no_new_privs in /proc/self/status; None: nothing."""
    status = process_status()
    mask = sum(1 << cap for cap in set(kept))
    wanted = {"CapEff": mask, "CapPrm": mask, "CapInh": 0, "CapAmb": 0}
    for name, value in wanted.items():
        if int(status[name], 16) != value:
            return f"{name} is {status[name]}"
    if status["NoNewPrivs"] != "1":
        return "no_new_privs did not stick"
    return None


def process_status(pid: int | str = "self") -> dict[str, str]:
    """The fields of /proc/PID/status (Uid, CapEff, NoNewPrivs, Seccomp...)."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        m = re.match(r"(\w+):\s*(.*)", line)
        if m:
            fields[m.group(1)] = m.group(2).strip()
    return fields
