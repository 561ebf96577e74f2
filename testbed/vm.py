"""A real virtual machine in the tests: QEMU booting the test guest, driven by QMP.

:class:`Vm` starts ``qemu-system-x86_64`` with the guest of
testbed/guest_image.py and one virtio-net device whose back-end is given as
QEMU arguments defining the netdev ``net0`` (:func:`stream_netdev` for
QEMU's stream netdev, the protocol of ``ferryd --socket`` and of passt's
default mode). The VM gets:

* a QMP socket (testbed/qmp.py), through which it is started, migrated and
  stopped;
* its console (the guest's ttyS0) in a log file, which tests print when
  they fail (:meth:`Vm.console`);
* the guest's command channel (its ttyS1) on a Unix socket: :meth:`Vm.run`
  runs a shell command in the guest and returns its exit status and output
  (protocol: testbed/guest_image.py).

QEMU starts paused (``-S``): the bed connects to QMP and to the command
channel first and only then lets the guest run, so the guest's
``@@ferry-ready`` can never be sent before anyone listens. A VM started
with ``incoming`` waits for a migration instead, and its channel carries on
the source guest's.

The accelerator is TCG unless the host has hardware virtualisation that a
stock kernel can use: KVM needs the CPU's vmx or svm flag (a machine whose
/dev/kvm is PVM, like the one this was written on, has neither, and a stock
guest kernel does not run there). ``FERRY_VM_ACCEL=tcg`` or ``=kvm``
overrides the choice.

Stopping is ``quit`` through QMP, then SIGKILL by PID if QEMU is still
there: no QEMU outlives its :class:`Vm`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.guest_image import GuestImage
from testbed.netns import Netns
from testbed.qmp import Qmp, QmpError, QmpEventTimeout
from testbed.wait import WaitTimeout, wait_for

__all__ = [
    "MIGRATION_ENDED",
    "QEMU",
    "QEMU_MIN_VERSION",
    "Guest",
    "GuestChannel",
    "GuestResult",
    "Vm",
    "VmError",
    "choose_accel",
    "qemu_unavailable",
    "qemu_version",
    "stream_netdev",
    "vhost_user_netdev",
]

QEMU = "qemu-system-x86_64"
#: The first QEMU with vhost-user device state (migration of a back-end's state).
QEMU_MIN_VERSION = (10, 0)

#: Booting under TCG takes seconds; the deadline is for a guest that never comes up.
BOOT_TIMEOUT = 120.0
#: QEMU creates its sockets before it runs anything.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
#: query-migrate's statuses once a migration is over, one way or the other.
MIGRATION_ENDED = ("completed", "failed", "cancelled")
#: The longest request line: the guest reads it through a tty (4 KiB line buffer).
MAX_COMMAND = 2000


class VmError(AssertionError):
    """QEMU or the guest failed; the message carries the console and QEMU's own log.

    An AssertionError, so that pytest reports a failed test, not an error in it.
    """


@dataclass(frozen=True)
class GuestResult:
    """What a command run in the guest gave: its exit status and its stdout and stderr."""

    status: int
    output: str


def qemu_version() -> tuple[int, int, int] | None:
    """``qemu-system-x86_64 --version`` as numbers, or None without a usable QEMU."""
    binary = shutil.which(QEMU)
    if binary is None:
        return None
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        return None
    major, minor, micro = (int(g) for g in match.groups())
    return (major, minor, micro)


def qemu_unavailable() -> str | None:
    """Why the VM tests cannot run here, or None when they can."""
    version = qemu_version()
    if version is None:
        return f"{QEMU} is not installed (scripts/bootstrap.sh installs QEMU 10 as root)"
    if version[:2] < QEMU_MIN_VERSION:
        return (
            f"{QEMU} is {'.'.join(map(str, version))}, the VM tests need "
            f">= {'.'.join(map(str, QEMU_MIN_VERSION))} (bookworm-backports; "
            "scripts/bootstrap.sh installs it as root)"
        )
    return None


def choose_accel() -> str:
    """``kvm`` where the CPU has VMX or SVM and /dev/kvm opens, else ``tcg`` (see module doc)."""
    forced = os.environ.get("FERRY_VM_ACCEL")
    if forced:
        if forced not in ("tcg", "kvm"):
            raise VmError(f"FERRY_VM_ACCEL={forced!r}: expected tcg or kvm")
        return forced
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "tcg"
    if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.MULTILINE):
        return "tcg"
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def stream_netdev(path: str | Path, *, reconnect_ms: int | None = None) -> list[str]:
    """QEMU arguments for netdev ``net0``: the stream netdev connecting to the Unix socket *path*.

    Each frame travels behind its length as a 4-byte big-endian number, the
    protocol of passt's default mode and of ``ferryd --socket``. With
    *reconnect_ms* QEMU connects again that long after losing the back-end.
    """
    spec = f"stream,id=net0,addr.type=unix,addr.path={path},server=off"
    if reconnect_ms is not None:
        spec += f",reconnect-ms={reconnect_ms}"
    return ["-netdev", spec]


def vhost_user_netdev(path: str | Path, *, reconnect_ms: int | None = None) -> list[str]:
    """QEMU arguments for netdev ``net0``: a vhost-user back-end listening on *path*.

    The back-end (``ferryd --vhost-user --socket PATH``, or passt
    ``--vhost-user``) maps the guest's RAM, so the VM must be started with
    ``shared_memory=True`` (QEMU refuses a vhost-user netdev otherwise). With
    *reconnect_ms* QEMU connects again that long after losing the back-end.
    """
    spec = f"socket,id=vhost0,path={path}"
    if reconnect_ms is not None:
        spec += f",reconnect-ms={reconnect_ms}"
    return ["-chardev", spec, "-netdev", "vhost-user,id=net0,chardev=vhost0"]


class GuestChannel:
    """The host's end of the guest's command channel (protocol: testbed/guest_image.py)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._tags = 0

    def close(self) -> None:
        self._sock.close()

    def _fill(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(what)
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(what) from None
        if not data:
            raise ConnectionError(f"QEMU closed the command channel while waiting for {what}")
        self._buffer += data

    def read_line(self, deadline: float, what: str) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            self._fill(deadline, what)
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line

    def read_exact(self, n: int, deadline: float, what: str) -> bytes:
        while len(self._buffer) < n:
            self._fill(deadline, what)
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def wait_ready(self, deadline: float) -> None:
        while self.read_line(deadline, "the guest's @@ferry-ready") != b"@@ferry-ready":
            pass

    def run(self, command: str, deadline: float) -> GuestResult:
        if "\n" in command or len(command) > MAX_COMMAND:
            raise ValueError(f"a guest command is one line of at most {MAX_COMMAND} characters")
        self._tags += 1
        tag = f"c{self._tags}"
        self._sock.sendall(f"{tag} {command}\n".encode())
        what = f"the guest's answer to {command!r}"
        while True:
            header = self.read_line(deadline, what)
            fields = header.split()
            if len(fields) != 4 or fields[0] != b"@@ferry":
                continue  # noise from before the channel was up
            try:
                status, length = int(fields[2]), int(fields[3])
            except ValueError:
                raise VmError(f"malformed answer header from the guest: {header!r}") from None
            output = self.read_exact(length, deadline, what)
            if fields[1].decode(errors="replace") == tag:
                return GuestResult(status, output.decode(errors="replace"))
            # The answer to an earlier request that timed out: skip it.


class Guest:
    """The guest's side of a running VM: its command channel, and what runs through it.

    Whoever started QEMU (:class:`Vm` by hand, or libvirt in
    testbed/libvirt.py) connects the channel's Unix socket and hands it over
    as :attr:`_channel`; :meth:`_report` says what went wrong with the VM.
    """

    name: str
    #: When the guest was let run (monotonic), for :meth:`wait_ready`'s answer.
    started_at: float
    _channel: GuestChannel | None

    def _report(self, what: str) -> str:
        raise NotImplementedError

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait until the guest's command channel is up; return the seconds since ``cont``."""
        try:
            self._require_channel().wait_ready(time.monotonic() + timeout)
        except (TimeoutError, ConnectionError) as e:
            raise VmError(
                self._report(f"the guest did not come up within {timeout:g} s ({e})")
            ) from None
        return time.monotonic() - self.started_at

    def run(self, command: str, timeout: float = 60.0) -> GuestResult:
        """Run one line of shell in the guest (busybox sh -c) and return its status and output.

        Commands run one at a time; one that should outlive the request
        must redirect its output and go to the background (``... >/tmp/x 2>&1 &``).
        """
        try:
            return self._require_channel().run(command, time.monotonic() + timeout)
        except (TimeoutError, ConnectionError) as e:
            raise VmError(self._report(f"guest command {command!r} failed: {e}")) from None

    def check(self, command: str, timeout: float = 60.0) -> str:
        """:meth:`run`, failing unless the command exits 0; returns its output."""
        result = self.run(command, timeout)
        if result.status != 0:
            raise VmError(
                self._report(f"guest command {command!r} exited {result.status}:\n{result.output}")
            )
        return result.output

    def lease(self) -> dict[str, str] | None:
        """The DHCP lease the guest applied (its /run/dhcp), or None before it has one."""
        result = self.run("cat /run/dhcp")
        if result.status != 0:
            return None
        fields = (item.partition("=") for item in result.output.split())
        return {key: value for key, _, value in fields}

    def wait_lease(self, timeout: float = 60.0) -> dict[str, str]:
        return wait_for(self.lease, timeout, interval=0.2, what=f"{self.name}'s DHCP lease")

    def addresses(self, ifname: str = "eth0") -> list[str]:
        """The guest's addresses on *ifname*, as ``address/prefix``."""
        output = self.check(f"ip -o addr show dev {ifname}")
        return re.findall(r"\binet6? (\S+)", output)

    def _require_channel(self) -> GuestChannel:
        if self._channel is None:
            raise VmError(f"{self.name} is not running")
        return self._channel


class Vm(Guest):
    """One QEMU running the test guest (see the module docstring).

    *netdev* is the QEMU arguments that define netdev ``net0`` (e.g.
    :func:`stream_netdev`); the guest sees it as a virtio-net device with
    *mac*; with *shared_memory* its RAM is a shared memfd (a vhost-user
    back-end maps it). *workdir* holds the VM's sockets and logs: its path must be short
    (Unix socket paths fit in 108 bytes). With *incoming* (a QEMU migration
    URI such as ``unix:PATH`` or ``defer``) the VM waits for a migration.
    With *netns* QEMU runs in that namespace (a "host" of the demo; the
    tests run it in the root namespace: its sockets are paths either way).
    *qemu_args* go last on QEMU's command line (a benchmark's trace events).
    """

    def __init__(
        self,
        image: GuestImage,
        workdir: Path,
        netdev: Sequence[str],
        *,
        name: str = "vm",
        mac: str = "52:54:00:12:34:56",
        memory_mb: int = 256,
        accel: str | None = None,
        incoming: str | None = None,
        shared_memory: bool = False,
        netns: Netns | None = None,
        qemu_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self._prefix = netns.exec_prefix() if netns is not None else []
        self.accel = accel or choose_accel()
        self.qmp_path = workdir / f"{name}-qmp.sock"
        self.channel_path = workdir / f"{name}-cmd.sock"
        self.console_path = workdir / f"{name}-console.log"
        self.log_path = workdir / f"{name}-qemu.log"
        self.incoming = incoming
        self.argv = [
            QEMU,
            "-name", name,
            "-nodefaults", "-no-user-config", "-nographic",
            "-machine", "pc", "-accel", self.accel,
            *(["-cpu", "host"] if self.accel == "kvm" else []),
            "-m", str(memory_mb), "-smp", "1",
            # vhost-user: the back-end maps the guest's RAM, which must be a shared memfd.
            *([
                "-object", f"memory-backend-memfd,id=mem0,size={memory_mb}M,share=on",
                "-numa", "node,memdev=mem0",
            ] if shared_memory else []),
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", image.cmdline,
            "-no-reboot",
            "-serial", f"file:{self.console_path}",
            "-chardev", f"socket,id=channel,path={self.channel_path},server=on,wait=off",
            "-serial", "chardev:channel",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *netdev,
            # No option ROM: the guest boots by -kernel, never from the network.
            "-device", f"virtio-net-pci,netdev=net0,mac={mac},romfile=",
            *(["-incoming", incoming] if incoming else ["-S"]),
            *qemu_args,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None
        self._channel: GuestChannel | None = None
        self.started_at = 0.0

    # Life cycle

    def start(self) -> Vm:
        """Start QEMU, connect QMP and the channel, and let the guest run (unless incoming)."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*self._prefix, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self.qmp = wait_for(self._connect_qmp, START_TIMEOUT, what=f"{self.name}'s QMP socket")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.channel_path))
            except OSError as e:
                sock.close()
                raise VmError(self._report(f"cannot connect to the command channel: {e}")) from e
            self._channel = GuestChannel(sock)
            self.started_at = time.monotonic()
            if self.incoming is None:
                self.qmp.cont()
        except WaitTimeout as e:
            self.stop()
            raise VmError(self._report(str(e))) from None
        except BaseException:
            self.stop()
            raise
        return self

    def _connect_qmp(self) -> Qmp | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise VmError(self._report(f"QEMU exited with status {self.proc.returncode}"))
        if not self.qmp_path.exists():
            return None
        try:
            return Qmp(str(self.qmp_path))
        except QmpError:
            return None

    def stop(self) -> int | None:
        """``quit`` through QMP, then SIGKILL by PID; return QEMU's exit status. Idempotent."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.qmp is not None:
            if self.proc is not None and self.proc.poll() is None:
                self.qmp.quit()
            self.qmp.close()
            self.qmp = None
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_migration(
        self,
        statuses: Sequence[str] = MIGRATION_ENDED,
        *,
        timeout: float = 60.0,
        interval: float = 0.01,
        what: str = "QEMU's migration to end",
    ) -> dict[str, Any]:
        """Poll query-migrate (this VM is the source) until its status is one of *statuses*;
        its last answer (``status``, ``downtime``, ``total-time``...)."""

        def reached() -> dict[str, Any] | None:
            assert self.qmp is not None
            info = self.qmp.query_migrate()
            return info if info.get("status") in statuses else None

        return wait_for(reached, timeout=timeout, interval=interval, what=what)

    def wait_migration_event(
        self, statuses: Sequence[str], *, timeout: float, what: str = "QEMU's migration"
    ) -> str:
        """Wait (this VM is the source) for QEMU's MIGRATION event with one of *statuses*;
        that status. QEMU sends the event only with the ``events`` migration
        capability on (migrate-set-capabilities, before migrate).

        Where a wait matters to the figure (the bench's pause in
        ``pre-switchover`` is part of QEMU's downtime), this finds the
        state the moment QEMU enters it; :meth:`wait_migration` polls,
        up to one interval late, with a command QEMU answers each time.
        WaitTimeout after *timeout* seconds.
        """
        assert self.qmp is not None
        try:
            data = self.qmp.wait_event("MIGRATION", lambda d: d.get("status") in statuses, timeout)
        except QmpEventTimeout:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}") from None
        return str(data["status"])

    # Reports

    def console(self) -> str:
        """The guest's console (ttyS0) so far."""
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _report(self, what: str) -> str:
        return (
            f"{self.name}: {what}\ncommand: {' '.join(self.argv)}\n"
            f"--- QEMU's log ---\n{self.qemu_log()}\n"
            f"--- the guest's console (last 60 lines) ---\n"
            + "\n".join(self.console().splitlines()[-60:])
        )
