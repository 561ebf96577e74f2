"""The systemd units: as confined as systemd-analyze can tell, and still working.

No systemd runs on the test machines, so each unit's confinement is
reproduced from the unit file itself (tests/integration/unit_syscall_filter.py
says how and what is left out) and the real program runs under it:
ferry-repair must still load its eBPF intake filter (CAP_BPF and bpf() only
at start); ferryd, holding no capability at all, must attach to the tap its
ExecStartPre= prepared and serve the guest (DHCP, a forward) as the unit's
unprivileged user, and again after a restart.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.ferryd_process import RUNAS_UID
from testbed.paths import FERRYCTL, FERRYD, REPO
from testbed.repair import listening_helper
from testbed.streams import Streams
from testbed.topology import Topology
from testbed.wait import wait_for
from tests.integration.fake_fdstore import FakeFdStore
from tests.integration.test_tap_fd import LAUNCHER, RUNAS_GID, dhcp

UNITS = REPO / "systemd"
FILTER = [sys.executable, "-m", "tests.integration.unit_syscall_filter"]
CAP_NET_BIND_SERVICE = 1 << 10
CAP_NET_ADMIN = 1 << 12
CAP_BPF = 1 << 39

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or shutil.which("setpriv") is None,
    reason="needs systemd-analyze and setpriv",
)


def _setting(unit: Path, key: str) -> str:
    values = [v for k, v in _lines(unit) if k == key]
    assert len(values) == 1, (key, values)
    return values[0]


def _lines(unit: Path) -> list[tuple[str, str]]:
    out = []
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.append((key, value))
    return out


def _setpriv_caps(unit: Path, key: str) -> str:
    """``CAP_NET_ADMIN CAP_BPF`` -> ``+net_admin,+bpf`` (setpriv's spelling); empty: ``-all``.

    The last assignment counts (a drop-in's, appended to the unit's empty one).
    """
    caps = [v for k, v in _lines(unit) if k == key][-1].split()
    return ",".join("+" + cap.removeprefix("CAP_").lower() for cap in caps) or "-all"


def _exposure(unit: Path) -> float:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert found, out
    return float(found.group(1))


def test_exposure_levels() -> None:
    """Every service scores 1.5 at most (ferryd's: 1.3, as low as a daemon with a host network can).

    The issue asks ferryd@.service for 2.0 at most; it holds to the others' 1.5.

    ferryd's floor: the host's network (PrivateNetwork, AF_INET, no IP
    allow-list), netlink for the host's addresses, and no user namespace
    (a drop-in may give CAP_NET_BIND_SERVICE, which must hold over the
    host's namespace).
    """
    assert _exposure(UNITS / "ferry-repair.service") <= 1.5
    assert _exposure(UNITS / "ferryd@.service") <= 1.5
    assert _exposure(UNITS / "ferryd-netns@.service") <= 1.5


def test_repair_helper_loads_its_ebpf_filter_under_its_unit(tmp_path: Path) -> None:
    unit = UNITS / "ferry-repair.service"
    assert _setting(unit, "PrivateNetwork") == "yes"
    assert _setting(unit, "NoNewPrivileges") == "yes"
    bounding = _setpriv_caps(unit, "CapabilityBoundingSet")
    prefix = [
        "unshare", "--net",
        "setpriv", "--bounding-set", f"-all,{bounding}", "--no-new-privs",
        *FILTER, str(unit), "--",
    ]  # fmt: skip
    with listening_helper(tmp_path / "repair.sock", prefix=prefix) as helper:
        serving = helper.wait_for_line("serving")
        status = helper.status()
    assert "intake freeze: eBPF program" in serving, serving
    # Serving, it holds CAP_NET_ADMIN alone: CAP_BPF went once the program was
    # loaded. (The bounding set stays the unit's: shrinking it needs
    # CAP_SETPCAP, and no_new_privs keeps anything from coming back from it.)
    for caps in ("CapPrm", "CapEff"):
        assert int(status[caps], 16) == CAP_NET_ADMIN, caps
    assert int(status["CapBnd"], 16) == CAP_NET_ADMIN | CAP_BPF
    assert int(status["CapInh"], 16) == int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"


#: In a private mount namespace: the unit's ProtectProc=invisible and
#: ProcSubset=pid (a /proc with only the processes, no /proc/sys), and its
#: PrivateDevices=yes as far as ferryd could notice: no /dev/net/tun at all.
_UNIT_MOUNTS = (
    "mount -t proc -o subset=pid,hidepid=invisible proc /proc"
    ' && mount -t tmpfs tmpfs /dev/net && exec "$@"'
)
#: The low-ports drop-in the unit's comment documents.
_LOW_PORTS = (
    "[Service]\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"
    "AmbientCapabilities=CAP_NET_BIND_SERVICE\nSystemCallFilter=capset\n"
)


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox udhcpc")
@pytest.mark.parametrize("drop_in", [False, True], ids=["unit", "low-ports-drop-in"])
def test_ferryd_works_under_its_unit(topology: Topology, short_tmp: Path, drop_in: bool) -> None:
    """ExecStartPre= as root, then ferryd with no capability, the unit's filter and mounts.

    ferry-tap-setup runs as the unit runs it, talking to a stand-in of
    systemd's notify socket (tests/integration/fake_fdstore.py); the stored
    descriptor is passed as systemd passes it. ferryd must reach ready, give
    the guest its address by DHCP and forward a port; then, restarted (the
    store keeps the descriptor the first ferryd attached, and refuses the one
    ExecStartPre= sends again), serve the guest again.
    """
    unit = UNITS / "ferryd-netns@.service"
    assert _setting(unit, "DynamicUser") == "yes"
    assert _setting(unit, "ProcSubset") == "pid"
    assert _setting(unit, "PrivateDevices") == "yes"
    assert (_setting(unit, "NotifyAccess"), _setting(unit, "FileDescriptorStoreMax")) == (
        "exec",
        "1",
    )
    if drop_in:
        unit = short_tmp / "ferryd-netns@.service"
        unit.write_text((UNITS / "ferryd-netns@.service").read_text() + _LOW_PORTS)
    short_tmp.chmod(0o755)
    run = short_tmp / "run"  # the unit's RuntimeDirectory, owned by its user
    run.mkdir()
    shutil.chown(run, RUNAS_UID, RUNAS_GID)
    pre = _exec_start_pre(unit, topology)
    store = FakeFdStore(short_tmp / "notify")
    try:
        for attempt in ("first", "restarted"):
            done = subprocess.run(
                pre, env={**os.environ, "NOTIFY_SOCKET": store.path}, capture_output=True,
                text=True, timeout=30, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert [name for name, _fd in store.stored] == ["tap"], store.messages
            port = 80 if drop_in else 8080
            _serve_once(topology, unit, short_tmp, store, port, attempt)
    finally:
        store.close()


def _exec_start_pre(unit: Path, topology: Topology) -> list[str]:
    """The unit's ExecStartPre=+ command, run as root here: ``%i`` is the guest namespace."""
    line = _setting(unit, "ExecStartPre")
    assert line.startswith("+/usr/local/bin/ferry-tap-setup "), line
    args = line.split()[1:]
    args = [a.replace("/run/netns/%i", topology.guest.path) for a in args]
    args[args.index("--group") + 1] = str(RUNAS_GID)  # the unit's Group=, nobody's here
    return [str(FERRYD.parent / "ferry-tap-setup"), *args]


def _serve_once(
    topology: Topology, unit: Path, tmp: Path, store: FakeFdStore, port: int, attempt: str
) -> None:
    stored = store.stored[0][1]
    control = str(tmp / "run" / "control.sock")
    caps = _setpriv_caps(unit, "AmbientCapabilities")
    kept_bound = _setpriv_caps(unit, "CapabilityBoundingSet")
    bounding = "-all" if kept_bound == "-all" else f"-all,{kept_bound}"
    argv = [
        # systemd's part: the stored descriptor becomes 3, LISTEN_* name it.
        *LAUNCHER, "--fd", str(stored), "--",
        "unshare", "--mount", "--propagation", "private", "sh", "-c", _UNIT_MOUNTS, "sh",
        "setpriv", "--reuid", str(RUNAS_UID), "--regid", str(RUNAS_GID), "--clear-groups",
        "--inh-caps", caps, "--ambient-caps", caps, "--bounding-set", bounding,
        "--no-new-privs", *FILTER, str(unit), "--",
        str(FERRYD), "--netns", topology.guest.path, "--tap", "tap0", "--control", control,
        "-t", str(port),
    ]  # fmt: skip
    log = tmp / f"ferryd-{attempt}.log"
    with log.open("wb") as out:
        proc = topology.host.popen(
            argv, stdout=out, stderr=subprocess.STDOUT, pass_fds=[stored],
            env={**os.environ, "NOTIFY_SOCKET": store.path},
        )  # fmt: skip
        told = len(store.messages)
    streams: Streams | None = None
    try:
        ready = subprocess.run(
            [str(FERRYCTL), "--control", control, "status", "--wait", "15"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert ready.returncode == 0, log.read_text()
        _wait_told(store, told, "READY", proc)  # Type=notify
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        )
        kept = CAP_NET_BIND_SERVICE if port < 1024 else 0
        assert status["Uid"].split() == [str(RUNAS_UID)] * 4
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == kept
        assert int(status["CapAmb"], 16) == int(status["CapInh"], 16) == 0
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp_filters"].strip() == "2"  # the unit's and ferryd's own
        if attempt == "first":
            assert dhcp(topology.guest, tmp) == topology.host_v4
        streams = Streams(
            topology.guest, topology.peer, "0.0.0.0", topology.host_v4, port, "busy:1"
        )
        streams.wait_flowing("busy", 1 << 20, f"through port {port} ({attempt})")
        streams.finish()
    finally:
        if streams is not None:
            streams.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()
    _wait_told(store, told, "STOPPING")


def _wait_told(
    store: FakeFdStore, since: int, key: str, proc: subprocess.Popen[bytes] | None = None
) -> dict[str, str]:
    """The first ``KEY=1`` notification after message ``since``, as systemd would hear it."""

    def told() -> dict[str, str] | None:
        for message in store.messages[since:]:
            if message.get(key) == "1":
                return message
        assert proc is None or proc.poll() is None, f"ended ({proc.returncode}) before {key}=1"
        return None

    return wait_for(told, timeout=30, what=f"{key}=1 on the notify socket")


def _free_ids(count: int) -> list[int]:
    """Ids in DynamicUser='s range (61184-65519) that name no user and no group here."""
    free = [
        n
        for n in range(61184, 65520)
        if not _exists(pwd.getpwuid, n) and not _exists(grp.getgrgid, n)
    ]
    return free[:count]


def _exists(lookup: Callable[[int], object], n: int) -> bool:
    try:
        lookup(n)
    except KeyError:
        return False
    return True


def _exec_start(unit: Path, instance: str, runtime: Path) -> list[str]:
    """The unit's ExecStart= for ``instance``: /run/ferry/ is ``runtime``, no $FERRYD_ARGS."""
    args = _setting(unit, "ExecStart").split()
    assert args[0] == "/usr/local/bin/ferryd" and args[-1] == "$FERRYD_ARGS", args
    args = [a.replace("%i", instance).replace("/run/ferry/", f"{runtime}/") for a in args[1:-1]]
    return [str(FERRYD), *args]


def test_vm_unit_ferryd_holds_nothing_and_serves_qemu_through_its_group(
    topology: Topology, short_tmp: Path
) -> None:
    """ferryd@.service: ferryd as the unit starts it, QEMU as libvirt's user in group ferry.

    The unit's user (a free uid, as DynamicUser= picks), Group= (a free gid
    standing in for "ferry"), UMask=, empty capability sets, no_new_privs,
    system call filter and /proc and /dev mounts are reproduced from the
    unit file; its RuntimeDirectory= is made as systemd makes it. ferryd
    must tell the notify socket READY=1 only once QEMU's socket (0660, the
    unit's group) and the control socket (0600) are there, hold no
    capability, and serve a QEMU running as another user that has the
    unit's group as a supplementary one, as libvirt starts QEMU; without it
    that QEMU is refused by the kernel. SIGTERM: STOPPING=1, exit 0.
    """
    unit = UNITS / "ferryd@.service"
    assert (_setting(unit, "Type"), _setting(unit, "DynamicUser")) == ("notify", "yes")
    assert _setting(unit, "RuntimeDirectory") == "ferry/%i"
    # What _UNIT_MOUNTS reproduces:
    assert (_setting(unit, "ProcSubset"), _setting(unit, "ProtectProc")) == ("pid", "invisible")
    assert _setting(unit, "PrivateDevices") == "yes"
    uid, gid, qemu_uid = _free_ids(3)
    short_tmp.chmod(0o755)
    runtime = short_tmp / "run"
    (runtime / "vm1").mkdir(parents=True)
    shutil.chown(runtime / "vm1", uid, gid)  # RuntimeDirectory=, mode 0755
    socket_path, control = runtime / "vm1" / "vhost-user.sock", runtime / "vm1" / "control.sock"
    umask = _setting(unit, "UMask")
    bounding = _setpriv_caps(unit, "CapabilityBoundingSet")
    ambient = _setpriv_caps(unit, "AmbientCapabilities")
    assert (bounding, ambient) == ("-all", "-all")
    no_new_privs = ["--no-new-privs"] if _setting(unit, "NoNewPrivileges") == "yes" else []
    argv = [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", f"umask {umask} && {_UNIT_MOUNTS}", "sh",
        "setpriv", "--reuid", str(uid), "--regid", str(gid), "--clear-groups",
        "--inh-caps", ambient, "--ambient-caps", ambient, "--bounding-set", bounding,
        *no_new_privs, *FILTER, str(unit), "--",
        *_exec_start(unit, "vm1", runtime),
    ]  # fmt: skip
    store = FakeFdStore(short_tmp / "notify")
    log = short_tmp / "ferryd.log"
    try:
        with log.open("wb") as out:
            proc = topology.host.popen(
                argv, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": store.path},
            )  # fmt: skip
        try:
            ready = _wait_told(store, 0, "READY", proc)
            assert ready["STATUS"].startswith("serving"), ready
            # At READY=1, not later: systemctl start returns then, and QEMU starts.
            sock, ctl = socket_path.lstat(), control.lstat()
            assert stat.S_ISSOCK(sock.st_mode) and stat.S_ISSOCK(ctl.st_mode)
            assert (stat.S_IMODE(sock.st_mode), sock.st_uid, sock.st_gid) == (0o660, uid, gid)
            assert (stat.S_IMODE(ctl.st_mode), ctl.st_uid) == (0o600, uid)
            status = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            )
            assert status["Uid"].split() == [str(uid)] * 4
            assert status["Gid"].split() == [str(gid)] * 4
            assert status["Groups"].split() == []
            for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(status[caps], 16) == 0, caps
            assert status["NoNewPrivs"].strip() == "1"
            assert status["Seccomp_filters"].strip() == "2"  # the unit's and ferryd's own
            qemu = ["setpriv", "--reuid", str(qemu_uid), "--regid", str(qemu_uid)]
            probe = [sys.executable, "-m", "tests.integration.vhost_user_probe",
                     str(socket_path), topology.host_v4, topology.gateway_v4]  # fmt: skip
            for groups, expected in ((["--clear-groups"], "refused: EACCES"),
                                     (["--groups", str(gid)], "served")):  # fmt: skip
                done = subprocess.run(
                    [*qemu, *groups, *probe], cwd=REPO, capture_output=True, text=True,
                    timeout=60, check=False,
                )  # fmt: skip
                assert (done.returncode, done.stdout.strip()) == (0, expected), done.stderr
            told = len(store.messages)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, log.read_text()
        _wait_told(store, told, "STOPPING")
        assert not socket_path.exists() and not control.exists()
    finally:
        store.close()
