"""The systemd units: as confined as systemd-analyze can tell, and still working.

No systemd runs on the test machines, so each unit's confinement is
reproduced from the unit file itself (tests/integration/unit_syscall_filter.py
says how and what is left out) and the real program runs under it:
ferry-repair must still load its eBPF intake filter (CAP_BPF and bpf() only
at start), ferryd must still set up its tap, drop what it holds and forward
traffic as the unit's unprivileged user.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import FERRYCTL, FERRYD, RUNAS_UID
from tests.integration.test_migration_support import Streams
from tests.integration.test_repair_support import REPO, listening_helper
from tests.netns import Topology

UNITS = REPO / "systemd"
FILTER = [sys.executable, "-m", "tests.integration.unit_syscall_filter"]
CAP_NET_BIND_SERVICE = 1 << 10

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
    """``CAP_NET_ADMIN CAP_BPF`` -> ``+net_admin,+bpf`` (setpriv's spelling)."""
    return ",".join("+" + cap.removeprefix("CAP_").lower() for cap in _setting(unit, key).split())


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
    """ferry-repair scores 1.5 at most; ferryd as low as a daemon with a host network can.

    ferryd's floor: the host's network (PrivateNetwork, AF_INET, no IP
    allow-list), CAP_SYS_ADMIN for setns and CAP_NET_ADMIN for the tap
    during setup, the capset() it drops them with, and no user namespace
    (capabilities must hold over the guest's namespace).
    """
    assert _exposure(UNITS / "ferry-repair.service") <= 1.5
    assert _exposure(UNITS / "ferryd@.service") <= 2.3


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
    assert "intake freeze: eBPF program" in serving, serving


#: In a private mount namespace: the unit's ProtectProc=invisible and
#: ProcSubset=pid (a /proc with only the processes, no /proc/sys), and a
#: /dev/net/tun of mode 0666 as Debian's udev makes it (some containers do not).
_UNIT_MOUNTS = (
    "mount -t proc -o subset=pid,hidepid=invisible proc /proc"
    ' && d=$(mktemp -d) && mount -t tmpfs tmpfs "$d" && mknod -m 666 "$d/tun" c 10 200'
    ' && mount --bind "$d/tun" /dev/net/tun && exec "$@"'
)


def test_ferryd_works_under_its_unit(topology: Topology, short_tmp: Path) -> None:
    """A non-root ferryd with the unit's ambient capabilities and filter; -t 80."""
    unit = UNITS / "ferryd@.service"
    assert _setting(unit, "DynamicUser") == "yes"
    assert _setting(unit, "ProcSubset") == "pid"
    caps = _setpriv_caps(unit, "AmbientCapabilities")
    bounding = _setpriv_caps(unit, "CapabilityBoundingSet")
    short_tmp.chmod(0o755)
    run = short_tmp / "run"  # the unit's RuntimeDirectory, owned by its user
    run.mkdir()
    shutil.chown(run, RUNAS_UID, RUNAS_UID)
    control = str(run / "control.sock")
    argv = [
        "unshare", "--mount", "--propagation", "private", "sh", "-c", _UNIT_MOUNTS, "sh",
        "setpriv", "--reuid", str(RUNAS_UID), "--regid", str(RUNAS_UID), "--clear-groups",
        "--inh-caps", caps, "--ambient-caps", caps, "--bounding-set", f"-all,{bounding}",
        "--no-new-privs", *FILTER, str(unit), "--",
        str(FERRYD), "--netns", topology.guest.path, "--tap", "tap0", "--control", control,
        "--config-net", "-t", "80",
    ]  # fmt: skip
    log = short_tmp / "ferryd.log"
    with log.open("wb") as out:
        proc = topology.host.popen(argv, stdout=out, stderr=subprocess.STDOUT)
    streams: Streams | None = None
    try:
        ready = subprocess.run(
            [str(FERRYCTL), "--control", control, "status", "--wait", "15"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert ready.returncode == 0, log.read_text()
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        )
        assert status["Uid"].split() == [str(RUNAS_UID)] * 4
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == CAP_NET_BIND_SERVICE
        assert int(status["CapAmb"], 16) == int(status["CapInh"], 16) == 0
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp_filters"].strip() == "2"  # the unit's and ferryd's own
        streams = Streams(topology.guest, topology.peer, "0.0.0.0", topology.host_v4, 80, "busy:1")
        streams.wait_flowing("busy", 1 << 20, "through port 80")
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
