"""Dropping privilege once setup is done.

ferryd needs privilege only to create and configure the guest's tap device
(CAP_NET_ADMIN, and CAP_SYS_ADMIN to enter the namespace) and to bind
forwarded ports below 1024 (CAP_NET_BIND_SERVICE). All of that happens
before the data path starts. Then every capability is dropped from every set
(effective, permitted, inheritable, ambient, bounding) and no_new_privs is set,
so neither the daemon nor anything it could exec regains privilege
(DESIGN.md: ferryd "runs with no capabilities at all once set up").
"""

import logging
import re
from pathlib import Path

import prctl

log = logging.getLogger("ferryd.privileges")


def drop_all_capabilities() -> None:
    # The bounding set must be cleared while CAP_SETPCAP is still effective
    # (capabilities(7): PR_CAPBSET_DROP needs it), so it goes first.
    if prctl.cap_effective.setpcap:
        prctl.capbset.limit()
    prctl.cap_inheritable.limit()
    # Effective before permitted: capset(2) refuses an effective set that is
    # not a subset of the permitted one. Clearing permitted and inheritable
    # also clears the ambient set (capabilities(7)).
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
    prctl.set_no_new_privs(True)


def current_capabilities() -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of this process, from /proc."""
    caps: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        m = re.match(r"(Cap\w+):\s+([0-9a-f]+)", line)
        if m:
            caps[m.group(1)] = int(m.group(2), 16)
    return caps
