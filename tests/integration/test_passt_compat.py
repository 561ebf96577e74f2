"""``ferry-passt`` started the way libvirt starts passt, with a real Linux stack as the guest.

libvirt runs passt and waits for that process to exit: 0 means the socket
listens; then it reads the pid file, and stops the daemon with SIGTERM.
Here the same argv (qemu_passt.c's for a ``type='user'`` interface with a
log file) runs in the host namespace, its output captured as virCommand's
error buffer would be (the call only returns once the daemon let go of
it). The guest is a namespace behind testbed/stream_relay.py, which
behaves as QEMU's ``-netdev stream`` does: it takes its address by DHCP
from the daemon; when it hangs up, ``--one-off`` ends the daemon and the
pid file goes. The state directory belongs to the user the daemon runs
as (nobody here, since the test is root; libvirt's qemu user there), as
libvirt's passt directory does, so the daemon can remove its files.

A daemon is not the test's child: its end is waited for through a pidfd.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.paths import VENV_BIN
from testbed.qemu_stand_in import StreamRelay, dhcp
from testbed.topology import Topology, veth

FERRY_PASST = VENV_BIN / "ferry-passt"
NOBODY = 65534


@pytest.fixture
def state_dir(short_tmp: Path) -> Path:
    """libvirt's passt state directory, owned by the user the daemon becomes."""
    short_tmp.chmod(0o755)
    directory = short_tmp / "passt"
    directory.mkdir()
    os.chown(directory, NOBODY, NOBODY)
    return directory


@pytest.fixture
def daemons() -> Iterator[list[int]]:
    """Pids of the daemons a test started: killed at the end if still there."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start(topology: Topology, *argv: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``ferry-passt ARGV`` in the host namespace as virCommandRun does: wait for it,
    its output captured. Returns the result and the starter's own pid."""
    proc = topology.host.popen(
        [str(FERRY_PASST), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Block until process ``pid`` (not our child) has ended."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        assert readable, f"process {pid} still runs after {timeout} s"
    finally:
        os.close(pidfd)


def test_libvirt_starts_it_the_guest_gets_a_lease_and_one_off_ends_it(
    topology: Topology, state_dir: Path, short_tmp: Path, daemons: list[int]
) -> None:
    sock, pid_file, log = (
        state_dir / "1-vm1-net0.socket",
        state_dir / "1-vm1-net0-passt.pid",
        (state_dir / "passt.log"),
    )
    started, starter = start(
        topology, "--one-off", "--socket", str(sock), "--pid", str(pid_file),
        "--log-file", str(log),
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert (started.stdout, started.stderr) == ("", "")  # its log went to --log-file
    pid = int(pid_file.read_text())
    daemons.append(pid)
    assert pid != starter  # the parent exited; its child serves, detached
    assert os.getsid(pid) == pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"ferryd.main" in cmdline and b"--one-off" in cmdline and b"--daemonize" in cmdline
    assert sock.is_socket()

    relay = StreamRelay(topology.guest, str(sock))
    try:
        relay.wait_connections(1)
        lease = dhcp(topology.guest, short_tmp)
        assert (lease["ip"], lease["router"].split()[0]) == (
            topology.host_v4,
            topology.gateway_v4,
        )
        assert topology.guest.ping(topology.peers_v4[1])
    finally:
        relay.stop()  # QEMU quits

    wait_gone(pid)
    assert not pid_file.exists() and not sock.exists()
    text = log.read_text()
    assert "ready (running)" in text and "exiting (--one-off)" in text, text


def test_sigterm_stops_it_and_its_pid_file_goes(
    topology: Topology, state_dir: Path, daemons: list[int]
) -> None:
    """libvirt's qemuPasstStop(): SIGTERM to the pid in the file."""
    sock, pid_file = state_dir / "vm.socket", state_dir / "vm.pid"
    started, _ = start(topology, "--vhost-user", "--one-off", "-s", str(sock), "-P", str(pid_file))
    assert started.returncode == 0, started.stderr
    pid = int(pid_file.read_text())
    daemons.append(pid)
    repair = Path(f"{sock}.repair")  # passt's default with --vhost-user: ferryd listens there
    assert repair.is_socket()
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not pid_file.exists() and not sock.exists() and not repair.exists()


def test_a_failed_start_is_the_starters_exit_status_and_message(
    topology: Topology, state_dir: Path
) -> None:
    """ferryd's own configuration error, found after the fork, reaches libvirt."""
    pid_file = state_dir / "vm.pid"
    started, _ = start(
        topology, "--one-off", "--socket", str(state_dir / "vm.socket"), "--pid", str(pid_file),
        "--address", "10.0.2.15/24", "--gateway", "10.0.2.15",
    )  # fmt: skip
    assert started.returncode == 2
    assert started.stderr == (
        "ferryd: error: IPv4: the gateway 10.0.2.15 is the guest's own address\n"
    )
    assert not pid_file.exists()


def test_an_option_ferry_cannot_honour_is_refused_before_anything_starts(
    topology: Topology, state_dir: Path
) -> None:
    started, _ = start(topology, "--socket", str(state_dir / "vm.socket"), "--no-dhcp")
    assert started.returncode == 2
    assert started.stderr == (
        "ferry-passt: error: --no-dhcp: not supported: ferryd cannot switch DHCP off\n"
    )
    assert list(state_dir.iterdir()) == []


def test_interface_gives_that_interfaces_address_and_gateway(
    topology: Topology, state_dir: Path, daemons: list[int]
) -> None:
    """libvirt's ``<source dev=.../>``: passt's ``--interface``, not the first default route."""
    host = topology.host
    veth(host, "second", topology.guest, "second")  # a second uplink
    host.add_addr("second", "10.88.0.5/16")
    host.run(
        ["ip", "route", "add", "default", "via", "10.88.0.1", "dev", "second", "metric", "500"]
    )
    sock, pid_file, log = state_dir / "vm.socket", state_dir / "vm.pid", state_dir / "vm.log"
    started, _ = start(
        topology, "--socket", str(sock), "--pid", str(pid_file), "--log-file", str(log),
        "--interface", "second", "-4",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    pid = int(pid_file.read_text())
    daemons.append(pid)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    ready = [line for line in log.read_text().splitlines() if "ready (running)" in line]
    assert len(ready) == 1 and "'10.88.0.5/16'" in ready[0] and "'10.88.0.1'" in ready[0]

    for interface, message in (
        ("nosuch", "--interface nosuch: no such interface on this host"),
        ("lo", "no guest address: --interface lo has no default route with an address"),
    ):
        started, _ = start(topology, "--socket", str(sock), "--interface", interface)
        assert started.returncode == 2
        assert started.stderr.splitlines()[-1].startswith(f"ferryd: error: {message}")
