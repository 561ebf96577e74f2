"""The migration coordinator: moves a guest's network state from one ferryd to another.

Both daemons do the work; the coordinator only carries the stream's pipe
and decides commit or abort, one request at a time over their control
sockets (ferryd.control). ``ferryctl migrate`` is its command line; a
libvirt hook or a QEMU frontend can call :func:`migrate` the same way. It
prints nothing and parses no arguments: it returns the summary of a
migration or raises :class:`MigrationError` with a one-line message.

The conversation
----------------
::

  status (both)           source must be "running", target "incoming"
  target migrate-in  [r]  the pipe's read end; the target restores in the
                          background and answers at once
  source migrate-out [w]  the write end; answers once the whole stream is
                          written (the source is then frozen)
  target migrate-wait     answers once every flow is restored (or failed)
  source migrate-commit   the source lets go of the guest, keeps its frozen
                          sockets until --linger ends
  target migrate-resume   the target takes over: the migration is done

With pre-copy (the default when the daemons are in different network
namespaces), ``migrate-precopy [w]`` comes first: the source streams its
quiet connections while the guest runs, ``migrate-wait-precopy`` lets the
target restore them, and only then ``migrate-out`` freezes and sends the
rest through the same pipe (proto/migration.proto, PrecopyEnd).

Any failure before the resume answered ends in migrate-abort: to the
target first (it lets go of the guest and waits for a stream again), then
to the source (it unfreezes and resumes with every connection intact;
still possible after commit). Aborts are best effort: their own failures
are reported, never hidden, but do not stop the other abort. After a
failure the source's role is asked, not assumed: "resumed" is said only
when it answers "running" (a rollback that cannot reach the repair helper
leaves it "rollback-pending"; ``ferryctl migrate-abort`` retries it).

Errors say how far it got: :class:`MigrationRefused` when nothing was
changed (a daemon missing or in the wrong role), :class:`MigrationAborted`
once the daemons were asked to undo it, with whether the source resumed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from ferryd.control import ControlClientError, ControlRequestFailed, request
from ferryd.migration.roles import Role

__all__ = [
    "MIGRATE_TIMEOUT",
    "MigrationAborted",
    "MigrationError",
    "MigrationRefused",
    "migrate",
    "migration_summary",
]

#: Default bound on each request of a migration (a dump of thousands of
#: connections with full queues legitimately takes seconds).
MIGRATE_TIMEOUT = 60.0
#: Pipe capacity asked for (F_SETPIPE_SZ): a larger pipe lets the source dump
#: ahead of the target's restore. 1 MiB is the unprivileged maximum by default.
_PIPE_SIZE = 1 << 20


class MigrationError(Exception):
    """The migration did not happen; the message (one line) says why and what state is left."""


class MigrationRefused(MigrationError):
    """Refused before anything changed: a daemon is missing, busy or in the wrong role."""


class MigrationAborted(MigrationError):
    """It failed after it began; the daemons were asked to abort.

    :attr:`source_resumed` is True only when the source, asked afterwards,
    answered that it is running again; otherwise its connections may be
    frozen and the message says how to retry the rollback.
    """

    def __init__(self, message: str, *, source_resumed: bool) -> None:
        super().__init__(message)
        self.source_resumed = source_resumed


class _StepFailed(Exception):
    """One request of the conversation failed; the message names the side."""


@dataclass(frozen=True)
class _Peers:
    """The two daemons of one migration and the per-request limit."""

    source: str
    target: str
    timeout: float

    def ask(self, who: str, cmd: str, **args: Any) -> dict[str, Any]:
        """One request to *who* ("source" or "target"); a failure names the side."""
        try:
            return request(self._path(who), cmd, timeout=self.timeout, **args)
        except ControlClientError as exc:
            raise _StepFailed(f"{who} {exc}") from None

    def abort(self, who: str) -> str | None:
        """Best-effort migrate-abort; a note saying why it failed, or None."""
        try:
            request(self._path(who), "migrate-abort", timeout=self.timeout)
        except ControlClientError as exc:
            return f"{who} migrate-abort also failed: {exc}"
        return None

    def _path(self, who: str) -> str:
        return self.source if who == "source" else self.target


def migrate(
    source: str, target: str, *, timeout: float = MIGRATE_TIMEOUT, precopy: bool = True
) -> dict[str, Any]:
    """Migrate from the ferryd at control socket *source* to the one at *target*.

    *timeout* bounds each request. With *precopy* the quiet connections are
    streamed while the guest runs (skipped when both daemons share a
    network namespace). Returns :func:`migration_summary`'s summary; raises
    MigrationRefused or MigrationAborted (see the module docstring).
    """
    peers = _Peers(source, target, timeout)
    if os.path.abspath(peers.source) == os.path.abspath(peers.target):
        raise MigrationRefused("migrate: source and target are the same control socket")
    try:
        src_status = peers.ask("source", "status")
        dst_status = peers.ask("target", "status")
    except _StepFailed as exc:
        raise MigrationRefused(str(exc)) from None
    _check_role("source", src_status, Role.RUNNING)
    _check_role("target", dst_status, Role.INCOMING)
    if dst_status.get("ready") is False:
        raise MigrationRefused(f"target at {peers.target} is not ready for a stream yet")
    src_ns, dst_ns = src_status.get("host_netns"), dst_status.get("host_netns")
    same_netns = src_ns is not None and src_ns == dst_ns

    started = time.monotonic()
    if same_netns or not precopy:
        out_resp = _hand_over_pipe(peers, "migrate-out", same_netns=same_netns)
    else:
        out_resp = _precopy_then_freeze(peers)
    wait_resp = _wait_restored(peers)
    try:
        peers.ask("source", "migrate-commit")
        resume_resp = peers.ask("target", "migrate-resume")
    except _StepFailed as exc:
        raise _aborted(peers, f"{exc}") from None
    return migration_summary(out_resp, wait_resp, resume_resp, time.monotonic() - started)


def _check_role(who: str, status: dict[str, Any], wanted: Role) -> None:
    role = status.get("role")
    if role == wanted.status:
        return
    if role is None:
        raise MigrationRefused(f"{who} ferryd does not report a role: it cannot migrate (too old?)")
    hint = " (start it with ferryd --incoming)" if who == "target" else ""
    raise MigrationRefused(
        f'{who} ferryd is "{role}", expected "{wanted}"{hint}; nothing was changed'
    )


def _hand_over_pipe(
    peers: _Peers, source_cmd: str, *, precopy: bool = False, **args: Any
) -> dict[str, Any]:
    """Give the target the read end and the source the write end; the source's answer.

    ``source_cmd`` is migrate-out (the freeze) or migrate-precopy. Our
    copies are closed as soon as each request is sent: the target sees the
    end of the stream when the source closes the last write end. Between
    network namespaces the stream is a pipe; within one (``same_netns``) it
    is a Unix socket pair, which carries the sockets themselves
    (ferryd.migration.handover).
    """
    if args.get("same_netns"):
        rsock, wsock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        rfd, wfd = rsock.detach(), wsock.detach()  # (close-on-exec, as Python makes them)
    else:
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    try:
        try:
            peers.ask("target", "migrate-in", fds=[rfd], **({"precopy": True} if precopy else {}))
        except _StepFailed as exc:
            raise MigrationRefused(f"migrate: {exc}; nothing was changed") from None
        finally:
            os.close(rfd)
            rfd = -1
        fd, wfd = wfd, -1
        return _source_request(peers, source_cmd, fds=[fd], hand_over=True, **args)
    finally:
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)


def _source_request(peers: _Peers, cmd: str, **args: Any) -> dict[str, Any]:
    """A request that makes the source freeze or stream; on failure, the right aborts."""
    try:
        return request(peers.source, cmd, timeout=peers.timeout, **args)
    except ControlRequestFailed as exc:
        # The source refused or failed and has rolled back; the target
        # fails on its own (the stream ended early), the abort resets it.
        raise _aborted(peers, f"source {exc}", abort_source=False) from None
    except ControlClientError as exc:
        # No answer: the source may be frozen or half-way; ask it to roll back.
        raise _aborted(peers, f"source {exc}") from None


def _precopy_then_freeze(peers: _Peers) -> dict[str, Any]:
    """Pre-copy while the guest runs, let the target restore it, then freeze; the source's answer.

    The same pipe carries both parts of the stream (proto/migration.proto,
    PrecopyEnd). The target takes the guest's tap queue when it has
    restored the pre-copy, right before the freeze.
    """
    pre = _hand_over_pipe(peers, "migrate-precopy", precopy=True)
    try:
        pre_wait = peers.ask("target", "migrate-wait-precopy")
    except _StepFailed as exc:
        raise _aborted(peers, f"pre-copy failed: {exc}") from None
    out = _source_request(peers, "migrate-out")
    timings = dict(_timings(out))
    timings["precopy"] = _timings(pre).get("precopy")
    timings["target_precopy"] = _timings(pre_wait).get("precopy")
    return {**out, "precopied": pre.get("precopied"), "timings_ms": timings}


def _wait_restored(peers: _Peers) -> dict[str, Any]:
    try:
        return peers.ask("target", "migrate-wait")
    except _StepFailed as exc:
        raise _aborted(peers, f"restore failed: {exc}") from None


def _aborted(peers: _Peers, what: str, *, abort_source: bool = True) -> MigrationAborted:
    """Abort the target, then (unless told not to) the source; the failure to report.

    The target's answer to the abort is not reported: after a failed
    restore it has already cleaned up and may say there is nothing to abort.
    The source's is: if its abort fails, its connections may still be frozen.
    Whether the source resumed is then asked, never assumed: a source whose
    rollback could not reach the repair helper is not running (its role says
    ``rollback-pending``), and saying otherwise would hide a guest that is
    offline.
    """
    peers.abort("target")
    problem = peers.abort("source") if abort_source else None
    if problem:
        return MigrationAborted(
            f"migrate: {what}; {problem}: the source may still be frozen, check its status",
            source_resumed=False,
        )
    role = _source_role(peers)
    if role == Role.RUNNING.status:
        done = (
            "migration aborted, the source resumed"
            if abort_source
            else "the source rolled back and keeps running"
        )
        return MigrationAborted(f"migrate: {what}; {done}", source_resumed=True)
    return MigrationAborted(
        f"migrate: {what}; the source did NOT resume (it is {role or 'not answering'}): its"
        f" connections may be frozen; `ferryctl --control {peers.source} status` says why,"
        f" `ferryctl --control {peers.source} migrate-abort` retries the rollback",
        source_resumed=False,
    )


def _source_role(peers: _Peers) -> str | None:
    """The source's role as it answers now; None if it does not answer."""
    try:
        role = request(peers.source, "status", timeout=peers.timeout).get("role")
    except ControlClientError:
        return None
    return str(role)


def migration_summary(
    out_resp: dict[str, Any],
    wait_resp: dict[str, Any],
    resume_resp: dict[str, Any],
    elapsed: float,
) -> dict[str, Any]:
    """A migration's summary from the daemons' answers (``ferryctl migrate --json``).

    Downtime is the target's resume time minus the source's freeze time.
    Both are CLOCK_MONOTONIC readings, comparable only on one machine (the
    case of namespaces on one host, and of tests); ``downtime_ms`` is None
    when a reading is missing or the difference is negative (two machines).
    ``ferryctl_ms`` is how long the coordinator took (*elapsed*, seconds).
    """
    t_freeze, t_resumed = out_resp.get("t_freeze"), resume_resp.get("t_resumed")
    downtime: float | None = None
    if (
        isinstance(t_freeze, (int, float))
        and isinstance(t_resumed, (int, float))
        and t_resumed >= t_freeze
    ):
        downtime = round((t_resumed - t_freeze) * 1000, 3)
    target_timings = dict(_timings(wait_resp))
    for key, value in _timings(resume_resp).items():
        target_timings[key if key not in target_timings else f"resume_{key}"] = value
    return {
        "flows": out_resp.get("flows", {}),
        "restored": wait_resp.get("restored", {}),
        "stream_bytes": out_resp.get("stream_bytes"),
        "precopied": out_resp.get("precopied", 0),
        "downtime_ms": downtime,
        "ferryctl_ms": round(elapsed * 1000, 3),
        "source_timings_ms": _timings(out_resp),
        "target_timings_ms": target_timings,
    }


def _timings(response: dict[str, Any]) -> dict[str, Any]:
    timings = response.get("timings_ms")
    return dict(timings) if isinstance(timings, dict) else {}
