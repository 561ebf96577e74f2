"""systemd/ferry-repair.socket and .service: as hardened as claimed.

(test_units_verify.py runs ``systemd-analyze verify`` on every unit.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.paths import REPO

pytestmark = pytest.mark.integration

UNITS = REPO / "systemd"


def settings(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


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
