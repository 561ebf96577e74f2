"""systemd/ferry-repair.socket and .service: clean for systemd-analyze, and as hardened as claimed.

``systemd-analyze verify`` checks that the ExecStart binary exists, so the
units are verified in a copy whose ExecStart points at this checkout's
``ferry-repair`` script instead of the installed location.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.paths import REPO

pytestmark = pytest.mark.integration

UNITS = REPO / "systemd"
INSTALLED = "/usr/local/bin/ferry-repair"


def settings(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "ferry-repair"
    if not script.exists():
        pytest.skip(f"{script} missing: install the project (make setup)")
    service = (UNITS / "ferry-repair.service").read_text()
    assert INSTALLED in service
    (tmp_path / "ferry-repair.service").write_text(service.replace(INSTALLED, str(script)))
    shutil.copy(UNITS / "ferry-repair.socket", tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "ferry-repair.socket", "ferry-repair.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_service_keeps_only_net_admin_and_is_confined() -> None:
    service = settings(UNITS / "ferry-repair.service")
    # CAP_BPF only to load the eBPF intake filter at start (sandbox.py drops it).
    assert service["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_BPF"]
    for key in ("NoNewPrivileges", "PrivateNetwork", "PrivateDevices", "ProtectHome"):
        assert service[key] == ["yes"], key
    assert service["ProtectSystem"] == ["strict"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert service["ExecStart"][0].split()[0].endswith("/ferry-repair")


def test_socket_passes_one_stream_socket() -> None:
    socket_unit = settings(UNITS / "ferry-repair.socket")
    assert len(socket_unit["ListenStream"]) == 1
    assert socket_unit["ListenStream"][0].startswith("/")
    assert socket_unit["Accept"] == ["no"]  # one helper process serves every client
