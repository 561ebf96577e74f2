"""ferryd gives up root after setup: checked from outside, on running daemons.

Item 11 of the hardening issue: a ferryd started as root runs guest traffic
as ``nobody`` (or ``--runas``), with no capability, no_new_privs,
non-dumpable and a seccomp filter; a second process as that same user can
neither drive its control socket nor read its memory. Item 9: a forward
below 1024 (``-t 80``) keeps exactly CAP_NET_BIND_SERVICE, so the guest
migrates between hosts with its port-80 connections, and a failed same-host
migration binds port 80 again on rollback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from ferryd.control import ControlRequestFailed
from testbed.ferryd_process import RUNAS_UID, FerrydProcess
from testbed.migrationbed import MigrationBed
from testbed.paths import FERRYCTL, FERRYD
from testbed.streams import Streams
from testbed.topology import Topology
from tests.integration.conftest import StartFerryd

AS_NOBODY = ["setpriv", "--reuid", str(RUNAS_UID), "--regid", str(RUNAS_UID), "--clear-groups"]
CAP_NET_BIND_SERVICE = 1 << 10


def _confinement(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    status = {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return {k: status[k] for k in ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapBnd")} | {
        k: status[k] for k in ("CapInh", "CapAmb", "NoNewPrivs", "Seccomp")
    }


def _expected(caps: int) -> dict[str, str]:
    ids = "\t".join([str(RUNAS_UID)] * 4)
    capset = f"{caps:016x}"
    return {
        "Uid": ids, "Gid": ids, "Groups": "", "CapEff": capset, "CapPrm": capset,
        "CapBnd": capset, "CapInh": "0" * 16, "CapAmb": "0" * 16, "NoNewPrivs": "1",
        "Seccomp": "2",
    }  # fmt: skip


def test_ferryd_runs_as_nobody_confined(
    topology: Topology, start_ferryd: StartFerryd, short_tmp: Path
) -> None:
    """Started as root: nobody, no capability, no_new_privs, seccomp, non-dumpable."""
    ferryd = start_ferryd(topology, "-t", "8080", config_net=True)
    assert _confinement(ferryd.pid) == _expected(0)
    # Non-dumpable: the kernel hands the task's files in /proc to root.
    assert os.stat(f"/proc/{ferryd.pid}/environ").st_uid == 0
    short_tmp.chmod(0o755)  # so that only the socket's own mode decides
    # A second process as the same user (another guest's ferryd, taken over)
    # can neither read this one's memory nor drive its control socket.
    peek = subprocess.run(
        [*AS_NOBODY, "cat", f"/proc/{ferryd.pid}/environ"], capture_output=True, text=True
    )
    assert peek.returncode != 0 and "Permission denied" in peek.stderr, peek
    drive = subprocess.run(
        [*AS_NOBODY, str(FERRYCTL), "--control", ferryd.control, "status"],
        capture_output=True,
        text=True,
    )
    assert drive.returncode != 0 and "ermission denied" in drive.stderr, drive
    # ... while root, who started it, still does; and the guest's traffic flows.
    assert ferryd.request("status")["ready"] is True
    streams = Streams(topology.guest, topology.peer, "0.0.0.0", topology.host_v4, 8080, "busy:1")
    try:
        streams.wait_flowing("busy", 1 << 20)
        streams.finish()
    finally:
        streams.close()


def test_low_forward_keeps_only_bind_service(topology: Topology, start_ferryd: StartFerryd) -> None:
    ferryd = start_ferryd(topology, "-t", "80", "--runas", "nobody")
    assert _confinement(ferryd.pid) == _expected(CAP_NET_BIND_SERVICE)


def test_forbidden_syscalls_fail_under_ferryds_filter() -> None:
    """execve, ptrace, mount, a file opened for writing, kill: refused (EPERM)."""
    probe = """
import ctypes, errno, os, resource, socket
from ferryd.syscall_filter import install_syscall_filter
install_syscall_filter()
libc = ctypes.CDLL(None, use_errno=True)
def err(fn):
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return 0
def sys_err(*args):
    return 0 if libc.syscall(*args) == 0 else ctypes.get_errno()
print(
    err(lambda: os.execv("/nonexistent", ["x"])),     # ENOENT without the filter
    err(lambda: open("/tmp/ferry-seccomp-probe", "w")),
    sys_err(101, 0, 0, 0, 0),                          # ptrace(PTRACE_TRACEME)
    sys_err(165, 0, 0, 0, 0, 0),                       # mount
    err(lambda: os.kill(os.getppid(), 0)),
    err(lambda: os.fork()),
    err(lambda: socket.socket().close()),              # allowed: 0
    err(lambda: open("/etc/hostname").close()),        # allowed: 0
    err(lambda: resource.getrlimit(resource.RLIMIT_NOFILE)),  # allowed: 0
)
"""
    out = subprocess.run(
        [str(FERRYD.parent / "python"), "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(errno.EPERM)] * 6 + ["0", "0", "0"], out
    assert not Path("/tmp/ferry-seccomp-probe").exists()


def test_runas_needs_root(topology: Topology) -> None:
    """As passt: a non-root caller cannot name another user."""
    result = subprocess.run(
        [*AS_NOBODY, str(FERRYD), "--netns", topology.guest.path, "--runas", "root"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "only root can switch users" in result.stderr


def test_port_80_forward_migrates_between_hosts(two_hosts: MigrationBed) -> None:
    """Item 9: the target binds port 80 and restores the connections accepted on it."""
    bed = two_hosts
    source = bed.start_source("-t", "80,81")
    target = bed.start_target("-t", "80,81")
    inbound = Streams(bed.guest, bed.peer, "0.0.0.0", bed.host_v4, 80, "busy:2")
    later: Streams | None = None
    try:
        inbound.wait_flowing("busy", 1 << 20)
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["tcp"] == 2
        before = inbound.report()["busy"]
        inbound.wait_more("busy", before, 4 << 20, "after the move")
        later = Streams(bed.guest, bed.peer, "0.0.0.0", bed.host_v4, 81, "busy:1")
        later.wait_flowing("busy", 1 << 20, "on a new connection to host B's port 81")
        later.finish()
        inbound.finish()
    finally:
        inbound.close()
        if later is not None:
            later.close()


def _failed_same_host_migration(source: FerrydProcess, target: FerrydProcess) -> None:
    """Stream to the target through a proxy that loses the end (and the sockets handed
    over beside it): it refuses; abort."""
    from_source, to_proxy = socket.socketpair()  # one namespace: the stream is a socket
    from_proxy, to_target = os.pipe()
    target.request("migrate-in", fds=[from_proxy])
    os.close(from_proxy)

    def proxy() -> None:
        data = bytearray()
        with from_source:
            while chunk := from_source.recv(1 << 16):  # (sockets that came: dropped)
                data += chunk
        with contextlib.suppress(BrokenPipeError), os.fdopen(to_target, "wb") as writer:
            writer.write(data[: len(data) // 2])

    thread = threading.Thread(target=proxy)
    thread.start()
    try:
        source.request("migrate-out", fds=[to_proxy.fileno()], same_netns=True, timeout=60)
    finally:
        to_proxy.close()
        thread.join(60)
    with pytest.raises(ControlRequestFailed):
        target.request("migrate-wait", timeout=60)
    source.request("migrate-abort", timeout=60)


def test_failed_same_host_migration_keeps_port_80(one_host: MigrationBed) -> None:
    """Item 9: the source handed its port-80 listeners over with the stream; after the
    failed migration it still serves them, and the privileged port needed no rebinding."""
    bed = one_host
    source = bed.start_source("-t", "80,81")
    target = bed.start_target("-t", "80,81")
    inbound = Streams(bed.guest, bed.peer, "0.0.0.0", bed.host_v4, 80, "busy:2")
    later: Streams | None = None
    try:
        inbound.wait_flowing("busy", 1 << 20)
        _failed_same_host_migration(source, target)
        assert source.request("status")["role"] == "running"
        before = inbound.report()["busy"]
        inbound.wait_more("busy", before, 4 << 20, "on the source after the rollback")
        later = Streams(bed.guest, bed.peer, "0.0.0.0", bed.host_v4, 81, "busy:1")
        later.wait_flowing("busy", 1 << 20, "on a new connection to the source's port 81")
        later.finish()
        inbound.finish()
    finally:
        inbound.close()
        if later is not None:
            later.close()


def test_ferryd_grows_its_descriptor_table_at_start(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    """Grown before any thread exists (ferryd.descriptors.presize_fd_table): a
    target's restore never waits for an RCU grace period per doubling."""
    ferryd = start_ferryd(topology)
    status = Path(f"/proc/{ferryd.pid}/status").read_text()
    fd_size = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("FDSize")))
    limits = Path(f"/proc/{ferryd.pid}/limits").read_text()
    soft = int(next(line.split()[3] for line in limits.splitlines() if "open files" in line))
    assert fd_size >= min(16384, soft)  # --max-flows' default
