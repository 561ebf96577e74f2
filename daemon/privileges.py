"""Dropping privilege once setup is done.

ferryd needs privilege only to create and configure the guest's tap device
(CAP_NET_ADMIN, and CAP_SYS_ADMIN to enter the namespace; neither when it is
handed a /dev/net/tun descriptor, ferryd.frontends.tap_fd) and to bind
forwarded ports below ``net.ipv4.ip_unprivileged_port_start``
(CAP_NET_BIND_SERVICE). Then, before the first guest frame is read,
:func:`drop_privileges`:

1. leaves the starting user when that is root: ``setgroups([])``, then
   ``setresgid`` and ``setresuid`` to ``--runas USER`` (passt's option and
   default: ``nobody``). A guest that takes over ferryd then holds a uid
   that owns nothing: it cannot write ``kernel.core_pattern`` or anything
   else root owns, nor connect to another ferryd's control socket (those
   stay root's, mode 0600; control/server.py);
2. keeps exactly one capability when it is needed, CAP_NET_BIND_SERVICE, and
   only if a forward (``-t``/``-u``) names a host port below
   ``ip_unprivileged_port_start`` of ferryd's network namespace: a
   migration target binds the forwards and restores the connections
   accepted on them (a bind() in repair mode is checked like any other:
   inet_bind → inet_port_requires_bind_service), and a source whose
   same-host migration failed binds them again on rollback. Keeping the
   capability, rather than binding early and carrying the sockets, keeps
   migration's listener handling as it is; the capability lets ferryd bind
   a low port and nothing else (capabilities(7)). It survives setuid()
   through PR_SET_KEEPCAPS, which is cleared again right after;
3. empties the bounding, inheritable and ambient sets and every other
   capability, sets no_new_privs (no execve() can give any back) and makes
   the process non-dumpable (no core file, no ptrace or /proc/PID/mem by
   the runas user: a second ferryd running as the same user cannot read
   this one's memory; /proc/PID then belongs to root);
4. reads the result back from /proc/self/status and refuses to go on if
   the kernel did not do what was asked (our bug or an unexpected kernel).

Steps 2-4 are ferry-repair's too; the shared moves are in
``ferry_repair.capabilities`` (the helper imports nothing of ferryd's).

The seccomp allow-list (daemon/syscall_filter.py) comes after this.

A non-root caller cannot switch users: ``--runas`` naming anyone but the
caller is a configuration error, as in passt.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import prctl

from ferry_repair.capabilities import (
    capability_problem,
    limit_capabilities,
    lock_down,
    process_status,
    shrink_bounding_set,
)

log = logging.getLogger("ferryd.privileges")

DEFAULT_RUNAS = "nobody"
UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


class PrivilegeError(Exception):
    """ferryd cannot run as asked: a bad ``--runas`` (operator) or a drop that did not stick."""


@dataclass(frozen=True)
class Identity:
    """Who ferryd becomes after setup."""

    uid: int
    gid: int
    name: str


def resolve_runas(spec: str | None) -> Identity | None:
    """The identity for ``--runas`` (USER, UID, USER:GROUP or UID:GID); None: stay as we are.

    Resolved at start-up, before anything is set up, so a typo exits 2
    with a message instead of failing halfway.
    """
    if os.geteuid() != 0:
        if spec is None:
            return None
        who = _lookup(spec)
        if (who.uid, who.gid) != (os.getuid(), os.getgid()):
            raise PrivilegeError(
                f"--runas {spec}: only root can switch users (we run as uid {os.getuid()})"
            )
        return None
    return _lookup(spec if spec is not None else DEFAULT_RUNAS)


def _lookup(spec: str) -> Identity:
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    except KeyError:
        if not user.isdigit():
            raise PrivilegeError(f"--runas {spec}: no user named {user!r}") from None
        if not group:
            raise PrivilegeError(
                f"--runas {spec}: uid {user} has no passwd entry; give UID:GID"
            ) from None
        uid, gid, name = int(user), -1, user
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"--runas {spec}: no group named {group!r}") from None
    return Identity(uid, gid, name)


def needs_bind_service(host_ports: Iterable[int]) -> bool:
    """Whether binding one of ``host_ports`` needs CAP_NET_BIND_SERVICE here.

    The sysctl is per network namespace: read in ours, where ferryd binds.
    Unreadable (systemd's ProcSubset=pid hides /proc/sys): the kernel's
    default, 1024.
    """
    try:
        start = int(UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        start = 1024
    return any(0 < port < start for port in host_ports)


def drop_privileges(identity: Identity | None, *, keep_bind_service: bool) -> None:
    """Become ``identity`` (if given) with no capability but, if asked, CAP_NET_BIND_SERVICE."""
    keep = keep_bind_service and bool(prctl.cap_permitted.net_bind_service)
    kept = (prctl.CAP_NET_BIND_SERVICE,) if keep else ()
    # The bounding set needs CAP_SETPCAP to shrink (capabilities(7)), so first.
    shrink_bounding_set(kept)
    if identity is not None:
        # Without it setuid() from 0 empties the permitted set (capabilities(7),
        # "Effect of user ID changes on capabilities").
        prctl.set_keepcaps(keep)
        os.setgroups([])
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
        prctl.set_keepcaps(False)
    # Holding nothing already (started with no capability, as the ferryd units
    # start it), capset() is not called at all: their filter denies it
    # (@privileged), and it would change nothing.
    if _holds_capabilities():
        limit_capabilities(kept)
    if keep:
        # setresuid() away from 0 emptied the effective set even with KEEPCAPS;
        # raise the one capability again from the permitted set.
        prctl.cap_effective.net_bind_service = True
    lock_down()
    _check(identity, kept)
    _check_other_threads()
    if identity is not None:
        log.info(
            "running as %s (uid %d, gid %d)%s",
            identity.name,
            identity.uid,
            identity.gid,
            ", keeping CAP_NET_BIND_SERVICE for forwarded ports" if keep else "",
        )


def _holds_capabilities() -> bool:
    """Whether this thread has any capability in its permitted, inheritable or ambient set."""
    status = process_status()
    return any(int(status[name], 16) for name in ("CapPrm", "CapInh", "CapAmb"))


def _check(identity: Identity | None, kept: tuple[int, ...]) -> None:
    problem = capability_problem(kept)
    if problem is not None:
        raise PrivilegeError(f"{problem} after dropping privileges")
    if identity is not None:
        status = process_status()
        uids = {int(u) for u in status["Uid"].split()}
        gids = {int(g) for g in status["Gid"].split()}
        if uids != {identity.uid} or gids != {identity.gid} or status["Groups"]:
            raise PrivilegeError(
                f"ids are Uid {status['Uid']} Gid {status['Gid']} Groups {status['Groups']!r}"
                f" after switching to {identity.name}"
            )


def _check_other_threads(grace: float = 1.0) -> None:
    """No other thread kept a capability.

    capset(2) and PR_SET_KEEPCAPS act on the calling thread only, and a
    thread started during setup would keep what it had (trio binds a Unix
    socket path in a worker thread, which is why ferryd.control and the
    repair client bind synchronously). glibc runs setresuid() in every
    thread, and the kernel clears the capabilities of a thread whose uids all
    leave 0 without KEEPCAPS, so after
    a user switch the others hold none; this checks it rather than trusting it
    (and catches a non-root start with capabilities and a second thread). The
    seccomp filter, synchronised to every thread, then sets their no_new_privs.

    glibc's setxid broadcast skips a thread that is already exiting (nptl's
    __nptl_setxid: such a thread runs no more user code), which keeps its old
    credentials for the moment it takes to go: a thread that still holds
    capabilities gets *grace* seconds to disappear before it is an error
    (seen as a start-up failure 2 times in 30 on a loaded machine).
    """
    me = threading.get_native_id()
    deadline = time.monotonic() + grace
    while True:
        holding = _threads_holding_capabilities(me)
        if not holding:
            return
        if time.monotonic() >= deadline:
            tid, status = holding[0]
            raise PrivilegeError(
                f"thread {tid} ({status['Name']}) still holds capabilities"
                f" (CapPrm {status['CapPrm']}) after the drop (our bug)"
            )
        time.sleep(0.01)


def _threads_holding_capabilities(me: int) -> list[tuple[str, dict[str, str]]]:
    holding = []
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == me:
            continue
        try:
            status = process_status(f"self/task/{tid}")
        except (FileNotFoundError, ProcessLookupError):
            # Ended meanwhile: gone before the open (ENOENT), or between the
            # open and the read (ESRCH: proc_pid_status finds no task).
            continue
        if int(status["CapEff"], 16) or int(status["CapPrm"], 16):
            holding.append((tid, status))
    return holding
