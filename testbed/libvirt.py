"""A private libvirt in the tests: its own daemon, configuration and hooks, and a guest under it.

libvirt fixes its paths at build time: the hooks are read from
``/etc/libvirt/hooks`` (virhook.c, LIBVIRT_HOOK_DIR), the configuration from
``/etc/libvirt``, the state from ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/cache/libvirt`` and ``/var/log/libvirt``. So :class:`LibvirtDaemon`
runs ``libvirtd`` in a mount namespace of its own (``unshare --mount
--propagation private``, inside the host's network namespace) where
directories of the test's work directory are bind-mounted over those, and
an empty one over ``/run``: libvirt, its hooks and the QEMUs it starts see
their own /etc/libvirt, no systemd (``/run/systemd/system`` is absent there,
so ferry's hook starts ferryd itself, as on a host without systemd) and no
other libvirt; the machine's own libvirt and /etc are not touched. The
test talks to it through a socket in the work directory
(``qemu:///system?socket=...``); everything in the work directory is
visible from outside (the daemon's /run is its ``run`` directory), the
mounts are gone with the daemon. Because each daemon has its own /run, ferry's hook
can run at its production paths (/run/ferry) in two daemons at once, as on
two hosts (:func:`hook_wrapper`). Under TCG the daemon's /dev/kvm is hidden:
one that QEMU's user may open but that cannot run the guest (a PVM one,
testbed/vm.py) makes libvirt throw its QEMU capabilities away on every
lookup (~50 s per domain start).

The daemon's QEMU runs as ``libvirt-qemu``, as Debian's libvirt runs it,
with no security driver, no cgroups and no private /dev (``qemu.conf``
below); libvirt relabels nothing (``dynamic_ownership = 0``): the guest's
kernel and initramfs are world-readable, and the directory where QEMU writes
the console and makes the command channel's socket is QEMU's user's. The
work directory must be traversable by that user (mode 0755). ferryd's socket
is QEMU's because ferry's hook gives it to QEMU's user at ``start begin``,
as it must in production (README, "libvirt").

:func:`domain_xml` writes a domain that boots the test guest
(testbed/guest_image.py) under TCG with the given ``<interface>``
(:func:`vhostuser_interface`): RAM a shared memfd (a vhost-user back-end
maps it), the console (ttyS0) in a file, and the guest's command channel
(ttyS1, protocol in testbed/guest_image.py) on a Unix socket QEMU listens
on. :meth:`LibvirtDaemon.create` starts it paused (``virsh create
--paused``), connects the channel and resumes it, so that the guest's
``@@ferry-ready`` always has a listener; the :class:`LibvirtGuest` it
returns runs commands in the guest like testbed/vm.py's Vm;
:meth:`LibvirtDaemon.attach` connects to a domain that migrated in
(``virsh migrate --xml`` with :meth:`LibvirtDaemon.migratable_xml`: the
target's own console and channel paths). :func:`passt_directory` and
:func:`passt_vhostuser_interface` are for libvirt's passt backend, with
``ferry-passt`` as the ``passt`` first on the daemon's PATH.

Stopping (:meth:`LibvirtDaemon.stop`) destroys every domain through libvirt
(so the hooks run), then ends libvirtd by PID, then kills by PID whatever a
failed test left: a QEMU in libvirt's pid files, a ferryd in the hook's.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from testbed.guest_image import GuestImage
from testbed.netns import Netns
from testbed.paths import VENV_BIN
from testbed.vm import QEMU, Guest, GuestChannel, VmError, choose_accel
from testbed.wait import WaitTimeout, wait_for

__all__ = [
    "LIBVIRTD",
    "QEMU_USER",
    "VIRSH",
    "LibvirtDaemon",
    "LibvirtGuest",
    "domain_xml",
    "hook_wrapper",
    "libvirt_unavailable",
    "passt_directory",
    "passt_vhostuser_interface",
    "vhostuser_interface",
    "without_systemd",
]

LIBVIRTD = "/usr/sbin/libvirtd"
VIRSH = "virsh"
#: libvirtd probes QEMU's capabilities when it starts (a few seconds).
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
#: One virsh command (destroy waits for QEMU and the hooks).
VIRSH_TIMEOUT = 60.0

#: What the daemon's private mount namespace gets from the work directory.
_MOUNTS = {
    "etc": "/etc/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "run": "/run",
}

#: Who QEMU runs as: Debian's default (libvirt-daemon-driver-qemu creates the user).
QEMU_USER = "libvirt-qemu"

_QEMU_CONF = """\
# ferry's test libvirt (testbed/libvirt.py): QEMU as {user}, nothing relabelled.
user = "{user}"
group = "{user}"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = []
cgroup_controllers = []
stdio_handler = "file"
"""


def libvirt_unavailable() -> str | None:
    """Why the real-libvirt tests cannot run here, or None when they can."""
    missing = [
        program
        for program in (LIBVIRTD, VIRSH, "unshare", "mount")
        if shutil.which(program) is None
    ]
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        missing.append(f"the user {QEMU_USER}")
    if missing:
        return (
            f"libvirt is not installed ({', '.join(missing)} missing; scripts/bootstrap.sh"
            " installs libvirt-daemon-driver-qemu and libvirt-clients as root)"
        )
    return None


def passt_vhostuser_interface(mac: str = "52:54:00:12:34:56") -> str:
    """``<interface type='vhostuser'>`` with ``<backend type='passt'/>``: libvirt starts
    ``passt --vhost-user`` (the first on its PATH) and QEMU connects to its socket."""
    interface = ET.Element("interface", type="vhostuser")
    ET.SubElement(interface, "mac", address=mac)
    ET.SubElement(interface, "backend", type="passt")
    ET.SubElement(interface, "model", type="virtio")
    ET.SubElement(interface, "rom", enabled="no")
    return ET.tostring(interface, encoding="unicode")


def vhostuser_interface(socket_path: str | Path, mac: str = "52:54:00:12:34:56") -> str:
    """``<interface type='vhostuser'>`` on *socket_path*, QEMU the client (ferry's opt-in)."""
    interface = ET.Element("interface", type="vhostuser")
    ET.SubElement(interface, "mac", address=mac)
    ET.SubElement(interface, "source", type="unix", path=str(socket_path), mode="client")
    ET.SubElement(interface, "model", type="virtio")
    # No option ROM: the guest boots by <kernel>, never from the network.
    ET.SubElement(interface, "rom", enabled="no")
    return ET.tostring(interface, encoding="unicode")


def domain_xml(
    name: str,
    image: GuestImage,
    interface: str,
    *,
    console: Path,
    channel: Path,
    memory_mb: int = 256,
    accel: str | None = None,
) -> str:
    """A domain booting the test guest with *interface* (module docstring)."""
    kind = "kvm" if (accel or choose_accel()) == "kvm" else "qemu"
    domain = ET.Element("domain", type=kind)
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = str(memory_mb)
    ET.SubElement(domain, "vcpu").text = "1"
    backing = ET.SubElement(domain, "memoryBacking")
    ET.SubElement(backing, "source", type="memfd")
    ET.SubElement(backing, "access", mode="shared")
    os_ = ET.SubElement(domain, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(image.kernel)
    ET.SubElement(os_, "initrd").text = str(image.initrd)
    ET.SubElement(os_, "cmdline").text = image.cmdline
    if kind == "kvm":
        ET.SubElement(domain, "cpu", mode="host-passthrough")
    ET.SubElement(domain, "on_reboot").text = "destroy"
    devices = ET.SubElement(domain, "devices")
    ET.SubElement(devices, "emulator").text = shutil.which(QEMU) or f"/usr/bin/{QEMU}"
    if interface:
        devices.append(ET.fromstring(interface))
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
    serial = ET.SubElement(devices, "serial", type="unix")
    ET.SubElement(serial, "source", mode="bind", path=str(channel))
    ET.SubElement(serial, "target", port="1")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


class LibvirtGuest(Guest):
    """A domain of the test libvirt, running the test guest; commands run as in Vm."""

    def __init__(self, daemon: LibvirtDaemon, name: str, console: Path, channel: Path) -> None:
        self.daemon = daemon
        self.name = name
        self.console_path = console
        self.channel_path = channel
        self.started_at = 0.0
        self._channel: GuestChannel | None = None

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def disconnect(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _report(self, what: str) -> str:
        return (
            f"{self.name}: {what}\n--- QEMU's log (libvirt) ---\n{self.daemon.qemu_log(self.name)}"
            f"\n--- the guest's console (last 60 lines) ---\n"
            + "\n".join(self.console().splitlines()[-60:])
        )


class LibvirtDaemon:
    """libvirtd in *host*'s network namespace with a private /etc/libvirt (module docstring).

    *hook* is the program installed as ``/etc/libvirt/hooks/qemu.d/ferry``
    (a shell script: libvirt passes hooks no environment of its own choice,
    so a wrapper sets what the program needs); None installs no hook.
    QEMU runs as *qemu_user*. *path_first* goes first on the daemon's PATH
    (where libvirt looks for ``passt``: :func:`passt_directory`).
    """

    def __init__(
        self,
        workdir: Path,
        host: Netns,
        hook: str | None = None,
        qemu_user: str = QEMU_USER,
        path_first: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.path_first = path_first
        self.qemu_user = qemu_user
        self.guest_dir = workdir / "guests"
        self.host = host
        self.hook = hook
        self.dirs = {key: workdir / key for key in _MOUNTS}
        self.socket_path = workdir / "sock" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket_path}"
        self.log_path = workdir / "libvirtd.log"
        self.host_uuid = str(uuid.uuid4())
        self.proc: subprocess.Popen[bytes] | None = None
        self.guests: list[LibvirtGuest] = []

    # Life cycle

    def start(self) -> LibvirtDaemon:
        for directory in (*self.dirs.values(), self.socket_path.parent):
            directory.mkdir(parents=True, exist_ok=True)
        etc = self.dirs["etc"]
        (etc / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.socket_path.parent}"\n'
            'unix_sock_rw_perms = "0700"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{self.log_path}"\n'
            f'host_uuid = "{self.host_uuid}"\n'
        )
        (etc / "qemu.conf").write_text(_QEMU_CONF.format(user=self.qemu_user))
        # QEMU writes the console and makes the channel's socket there.
        self.guest_dir.mkdir(mode=0o700)
        shutil.chown(self.guest_dir, self.qemu_user, self.qemu_user)
        if self.hook is not None:
            hooks = etc / "hooks" / "qemu.d"
            hooks.mkdir(parents=True)
            (hooks / "ferry").write_text(self.hook)
            (hooks / "ferry").chmod(0o755)
        binds = " && ".join(
            f"mount --bind {self.dirs[key]} {target}" for key, target in _MOUNTS.items()
        )
        if choose_accel() == "tcg" and os.path.exists("/dev/kvm"):
            # A /dev/kvm that QEMU's user may open but that cannot run the
            # guest (testbed/vm.py: a PVM one) makes libvirt throw its QEMU
            # capabilities away and probe again on every lookup (seconds
            # each, many per start): under TCG, QEMU's user sees none.
            no_kvm = self.workdir / "no-kvm"
            no_kvm.touch(mode=0o000)
            binds += f" && mount --bind {no_kvm} /dev/kvm"
        script = f"{binds} && exec {LIBVIRTD} --pid-file {self.workdir / 'libvirtd.pid'}"
        with (self.workdir / "libvirtd.out").open("wb") as out:
            env = dict(os.environ)
            if self.path_first is not None:
                env["PATH"] = f"{self.path_first}:{env.get('PATH', os.defpath)}"
            self.proc = self.host.popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(self._answers, START_TIMEOUT, interval=0.1, what="libvirtd to answer")
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise VmError(f"libvirtd exited with status {self.proc.returncode}\n{self.logs()}")
        if not self.socket_path.exists():
            return False
        return self.virsh("version", check=False).returncode == 0

    def stop(self) -> int | None:
        """Destroy every domain (hooks run), end libvirtd, kill leftovers; libvirtd's status."""
        for guest in self.guests:
            guest.disconnect()
        if self.proc is not None and self.proc.poll() is None:
            names = self.virsh("list", "--name", check=False).stdout.split()
            for name in names:
                self.virsh("destroy", name, check=False)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid_file in (
            *(self.dirs["run"] / "libvirt" / "qemu").glob("*.pid"),
            *(self.dirs["run"] / "ferry").glob("*/ferryd.pid"),
        ):
            _kill_pid_file(pid_file, self.workdir)
        return None if self.proc is None else self.proc.returncode

    def __enter__(self) -> LibvirtDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Commands

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [VIRSH, "-q", "-c", self.uri, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=VIRSH_TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            raise VmError(
                f"virsh {' '.join(args)} failed (exit {result.returncode}): "
                f"{result.stderr.strip()}\n{self.logs()}"
            )
        return result

    def write_domain(self, name: str, image: GuestImage, interface: str) -> Path:
        """The domain's XML (:func:`domain_xml`) in a file of the work directory."""
        path = self.workdir / f"{name}.xml"
        path.write_text(
            domain_xml(
                name,
                image,
                interface,
                console=self.guest_dir / f"{name}-console.log",
                channel=self.guest_dir / f"{name}-cmd.sock",
            )
        )
        return path

    def create(
        self, name: str, image: GuestImage, interface: str, *, resume: bool = True
    ) -> LibvirtGuest:
        """Start a transient domain booting the test guest, paused, connect its
        command channel, and (with *resume*) let it run."""
        xml_path = self.write_domain(name, image, interface)
        self.virsh("create", str(xml_path), "--paused")
        guest = self.attach(name)
        if resume:
            guest.started_at = time.monotonic()
            self.virsh("resume", name)
        return guest

    def attach(self, name: str) -> LibvirtGuest:
        """Connect to the command channel of domain *name*, running here (created, or
        migrated in with this daemon's paths: :meth:`migratable_xml`)."""
        guest = LibvirtGuest(
            self, name, self.guest_dir / f"{name}-console.log", self.guest_dir / f"{name}-cmd.sock"
        )
        self.guests.append(guest)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(guest.channel_path))
        except OSError as e:
            sock.close()
            raise VmError(guest._report(f"cannot connect to the command channel: {e}")) from e
        guest._channel = GuestChannel(sock)
        return guest

    def migratable_xml(self, name: str, target: LibvirtDaemon) -> Path:
        """Domain *name*'s migratable XML with *target*'s console and channel paths,
        in a file of *target*'s (``virsh migrate --xml``)."""
        xml = self.virsh("dumpxml", "--migratable", name).stdout
        path = target.workdir / f"{name}-incoming.xml"
        path.write_text(xml.replace(str(self.guest_dir), str(target.guest_dir)))
        return path

    # Reports

    def qemu_log(self, name: str) -> str:
        return _read(self.dirs["log"] / "qemu" / f"{name}.log")

    def logs(self) -> str:
        return (
            f"--- libvirtd's output ---\n{_read(self.workdir / 'libvirtd.out')}"
            f"--- libvirtd's log ---\n{_read(self.log_path)}"
        )


def passt_directory(directory: Path) -> Path:
    """*directory* holding ``passt``, a link to the venv's ``ferry-passt``: first on
    libvirt's PATH, it runs ferryd for ``<backend type='passt'/>`` (README)."""
    directory.mkdir(mode=0o755, exist_ok=True)
    (directory / "passt").symlink_to(VENV_BIN / "ferry-passt")
    return directory


def without_systemd(argv: Sequence[str]) -> list[str]:
    """*argv* run in a mount namespace of its own whose /run is an empty tmpfs:
    no ``/run/systemd/system``, so to ferry's hook the host has no systemd."""
    script = 'mount -t tmpfs -o mode=0755 ferry-test /run && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]


def hook_wrapper(config: Path, runtime: Path | None = None) -> str:
    """The hook script the test installs: ferry's hook with its configuration
    directory moved, and its runtime directory (default: /run/ferry, which is
    the daemon's own, private: module docstring)."""
    moved = f"FERRY_RUNTIME_DIR={runtime} " if runtime is not None else ""
    return (
        f'#!/bin/sh\n{moved}FERRY_CONFIG_DIR={config} exec {VENV_BIN / "ferry-libvirt-hook"} "$@"\n'
    )


def _kill_pid_file(pid_file: Path, workdir: Path) -> None:
    """SIGKILL the pid in *pid_file* if its command line names *workdir* or the
    private /run (ours), and wait."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if os.fsencode(workdir) not in cmdline and b"\0/run/ferry/" not in cmdline:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    with contextlib.suppress(WaitTimeout):
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, what=f"pid {pid} to end")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
