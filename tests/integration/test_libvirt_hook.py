"""ferry-libvirt-hook's processes, called as libvirt calls it, on a host without systemd.

The hook runs as libvirt runs it (``HOOK DOMAIN OPERATION SUBOPERATION
EXTRA``, the domain's XML on stdin: libvirt 11.3's own, from
tests/unit/fixtures/libvirt_hook/) in the host namespace, in a mount
namespace whose /run is empty (testbed.libvirt.without_systemd): no
``/run/systemd/system``, so it starts and stops ferryd itself, as on a host
whose init is not systemd (the machine the tests run on may have systemd).
Its runtime and configuration directories are the test's
(``FERRY_RUNTIME_DIR``, ``FERRY_CONFIG_DIR``). What is checked is what an
operator sees: the real ferryd answering on its control socket with the
domain's options, the pid file, the process and sockets gone after
release, one line on stderr when ferryd cannot start, and a pid that is
not this domain's ferryd left alone. Where systemd is the init system the
hook only asks systemctl (``restart``/``stop ferryd@NAME.service``): two
tests give it a ``/run/systemd/system`` and a recording ``systemctl`` on
its PATH (systemd is not PID 1 here). tests/integration/vm/test_vm_libvirt.py
runs the same hook under a real libvirt with a real guest.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferryd.control import request
from ferryd.libvirt_hook import CONFIG_DIR_ENV, RUNTIME_DIR_ENV, DomainPaths, is_ferryd_of
from testbed.libvirt import without_systemd
from testbed.paths import VENV_BIN
from testbed.topology import Topology
from testbed.wait import wait_for

HOOK = VENV_BIN / "ferry-libvirt-hook"
#: Debian's interpreter, which any uid may run (the test's may sit in root's home).
PYTHON = "/usr/bin/python3"
FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "libvirt_hook"


@dataclass
class Host:
    """The hook's world: the host namespace and the test's ferry directories."""

    topology: Topology
    paths: DomainPaths

    def xml(self, fixture: str) -> bytes:
        """A captured domain XML, naming this test's runtime directory."""
        text = (FIXTURES / fixture).read_bytes()
        return text.replace(b"/run/ferry/", os.fsencode(self.paths.runtime) + b"/")

    def hook(
        self, args: str, xml: bytes, systemd: Path | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the hook as libvirt does; with *systemd* (a directory holding a
        ``systemctl``), on a host whose init is systemd, that being its systemctl."""
        env = {
            **os.environ,
            RUNTIME_DIR_ENV: str(self.paths.runtime),
            CONFIG_DIR_ENV: str(self.paths.config),
        }
        argv = [str(HOOK), *args.split()]
        if systemd is None:
            argv = without_systemd(argv)
        else:
            env["PATH"] = f"{systemd}:{env['PATH']}"
            script = (
                "mount -t tmpfs -o mode=0755 ferry-test /run && mkdir -p /run/systemd/system"
                ' && exec "$@"'
            )
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
            argv += [str(HOOK), *args.split()]
        return subprocess.run(
            [*self.topology.host.exec_prefix(), *argv],
            input=xml,
            capture_output=True,
            env=env,
            timeout=60,
            check=False,
        )

    def pid(self) -> int:
        return int(self.paths.pid_file.read_text())

    def prepare(self) -> int:
        xml = self.xml("vm1_prepare_begin.xml")
        result = self.hook("vm1 prepare begin -", xml)
        assert (result.returncode, result.stdout) == (0, xml), result.stderr.decode()
        return self.pid()

    def release(self, reason: str = "destroyed") -> subprocess.CompletedProcess[bytes]:
        xml = self.xml("vm1_release_end.xml")
        result = self.hook(f"vm1 release end {reason}", xml)
        assert (result.returncode, result.stdout) == (0, xml), result.stderr.decode()
        return result


@pytest.fixture
def host(topology: Topology, short_tmp: Path) -> Iterator[Host]:
    paths = DomainPaths("vm1", short_tmp / "run", short_tmp / "etc")
    short_tmp.chmod(0o755)  # a QEMU of another uid reaches the socket
    paths.config.mkdir()
    bed = Host(topology, paths)
    try:
        yield bed
    finally:
        # Whatever a failed test left: the hook's own stop, then the netns's kill.
        bed.hook("vm1 release end destroyed", bed.xml("vm1_release_end.xml"))
        if paths.log.exists():
            print(f"--- ferryd's log ---\n{paths.log.read_text()}")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def test_prepare_starts_the_domains_ferryd_and_release_stops_it(host: Host) -> None:
    paths = host.paths
    paths.conf.write_text('FERRYD_ARGS="-a 10.99.0.7/24 -g 10.99.0.1 -D none"\n')
    pid = host.prepare()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert is_ferryd_of([os.fsdecode(w) for w in cmdline], paths)
    status = request(str(paths.control), "status")
    assert status["ready"] and status["frontend"]["kind"] == "vhost-user"
    assert status["link"]["ipv4"]["address"] == "10.99.0.7/24"  # the domain's options
    assert paths.socket.is_socket()
    # Ready when the hook returns: QEMU may connect at once.
    assert "QEMU" not in paths.log.read_text()

    host.release()
    assert not alive(pid)
    for gone in (paths.pid_file, paths.socket, paths.control):
        assert not gone.exists()


def test_a_ferryd_that_cannot_start_fails_the_domains_start_with_one_line(host: Host) -> None:
    host.paths.conf.write_text("FERRYD_ARGS=--mtu 5\n")
    xml = host.xml("vm1_prepare_begin.xml")
    result = host.hook("vm1 prepare begin -", xml)
    err = result.stderr.decode()
    assert (result.returncode, result.stdout) == (1, xml)
    assert err.count("\n") == 1, err
    assert err.startswith("ferry: domain vm1: ferryd exited with status 2: ")
    assert "--mtu" in err and str(host.paths.log) in err
    assert not host.paths.pid_file.exists()


def test_a_pid_file_naming_another_process_never_gets_it_killed(host: Host) -> None:
    host.paths.directory.mkdir(parents=True)
    other = subprocess.Popen(["sleep", "600"])
    try:
        host.paths.pid_file.write_text(f"{other.pid}\n")
        result = host.release()
        assert other.poll() is None
        assert f"names pid {other.pid}, which is not ferryd" in result.stderr.decode()
        assert not host.paths.pid_file.exists()
    finally:
        other.kill()
        other.wait()


def test_a_migrated_source_is_left_to_linger_and_a_new_start_replaces_it(host: Host) -> None:
    """release after an outgoing migration leaves ferryd to end by itself
    (--linger); if the domain starts here again first, prepare replaces it."""
    first = host.prepare()
    host.release("migrated")
    assert alive(first) and host.pid() == first
    second = host.prepare()
    assert second != first and not alive(first)
    assert request(str(host.paths.control), "status")["ready"]
    host.release()
    wait_for(lambda: not alive(second), 10, what="the second ferryd to end")


#: QEMU's identity in the test: no user needs to exist for a numeric DAC label.
QEMU_UID = 4242


def connects_as(uid: int, path: Path) -> bool:
    """Whether a process of *uid* (no groups) can connect to the Unix socket *path*."""
    probe = (
        "import socket,sys; s=socket.socket(socket.AF_UNIX)\n"
        "try: s.connect(sys.argv[1])\nexcept PermissionError: sys.exit(3)"
    )
    result = subprocess.run(
        [
            *("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"),
            PYTHON,
            "-c",
            probe,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode in (0, 3), result.stderr
    return result.returncode == 0


def start_begin(host: Host, label: str) -> subprocess.CompletedProcess[bytes]:
    xml = host.xml("vm1_start_begin.xml").replace(b"+0:+0</label>", label.encode() + b"</label>")
    assert label.encode() in xml
    result = host.hook("vm1 start begin -", xml)
    assert result.stdout == xml
    return result


def test_start_gives_ferryds_socket_to_qemus_user_and_only_to_it(host: Host) -> None:
    host.prepare()
    assert not connects_as(QEMU_UID, host.paths.socket)  # ferryd's own (0660 less the umask)
    result = start_begin(host, f"+{QEMU_UID}:+{QEMU_UID}")
    assert (result.returncode, result.stderr) == (0, b"")
    owner = host.paths.socket.stat()
    assert (owner.st_uid, owner.st_gid) == (QEMU_UID, QEMU_UID)
    assert owner.st_mode & 0o777 & ~0o640 == 0  # ferryd's mode kept: only the owner writes
    assert connects_as(QEMU_UID, host.paths.socket)
    assert not connects_as(QEMU_UID + 1, host.paths.socket)
    # ferryd served the QEMU-to-be (a different uid from its own).
    wait_for(lambda: "QEMU connected" in host.paths.log.read_text(), 10, what="ferryd to see it")


def test_start_never_gives_away_what_a_link_in_the_socket_place_points_to(host: Host) -> None:
    host.prepare()
    victim = host.paths.runtime / "victim"
    victim.write_text("root's\n")
    host.paths.socket.unlink()
    host.paths.socket.symlink_to(victim)
    result = start_begin(host, f"+{QEMU_UID}:+{QEMU_UID}")
    assert result.returncode == 1
    assert result.stderr.decode() == f"ferry: domain vm1: {host.paths.socket} is not a socket\n"
    assert victim.stat().st_uid == 0
    host.paths.socket.unlink()


def fake_systemctl(directory: Path, status: int, error: str = "") -> Path:
    """A ``systemctl`` that records its arguments in ``calls`` and exits *status*
    after printing *error*: what the hook asks of systemd, without systemd here."""
    directory.mkdir()
    (directory / "systemctl").write_text(
        f'#!/bin/sh\necho "$*" >>{directory / "calls"}\n'
        + (f"echo '{error}' >&2\n" if error else "")
        + f"exit {status}\n"
    )
    (directory / "systemctl").chmod(0o755)
    return directory


def test_with_systemd_the_hook_restarts_and_stops_the_domains_unit(
    host: Host, short_tmp: Path
) -> None:
    """sd_booted(3): /run/systemd/system exists; ferryd@NAME does the work
    (its Type=notify start returns once ferryd is ready)."""
    systemd = fake_systemctl(short_tmp / "bin", 0)
    for args, fixture in [
        ("vm1 prepare begin -", "vm1_prepare_begin.xml"),
        ("vm1 started begin -", "vm1_started_begin.xml"),
        ("vm1 release end migrated", "vm1_release_end.xml"),
        ("vm1 release end destroyed", "vm1_release_end.xml"),
    ]:
        xml = host.xml(fixture)
        result = host.hook(args, xml, systemd)
        assert (result.returncode, result.stdout, result.stderr) == (0, xml, b"")
    calls = (systemd / "calls").read_text().splitlines()
    assert calls == ["restart ferryd@vm1.service", "stop ferryd@vm1.service"]
    assert not host.paths.directory.exists()  # the unit's RuntimeDirectory=, not the hook's


def test_with_systemd_a_unit_that_fails_fails_the_domains_start_with_one_line(
    host: Host, short_tmp: Path
) -> None:
    error = "Job for ferryd@vm1.service failed because the control process exited with error"
    systemd = fake_systemctl(short_tmp / "bin", 1, error)
    xml = host.xml("vm1_prepare_begin.xml")
    result = host.hook("vm1 prepare begin -", xml, systemd)
    assert (result.returncode, result.stdout) == (1, xml)
    assert result.stderr.decode() == (
        f"ferry: domain vm1: systemctl restart ferryd@vm1.service failed: {error}"
        " (journalctl -u ferryd@vm1.service)\n"
    )
