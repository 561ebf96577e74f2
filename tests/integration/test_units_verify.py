"""systemd/: every unit clean for ``systemd-analyze verify``, as make install writes them.

The units name their programs under /usr/local (make install's default
PREFIX, which it substitutes: ``/usr/local/`` becomes ``$(PREFIX)/``).
``systemd-analyze verify`` checks that every Exec*= program exists, so the
copies verified here get this checkout's venv as their prefix, the same
substitution. The templates are verified instantiated, all together, so
that their Wants=/After= on ferry-repair.socket resolve.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.paths import REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"),
]

UNITS = REPO / "systemd"
#: Each unit file, and the name it is verified under (templates instantiated).
VERIFIED = {
    "ferry-repair.socket": "ferry-repair.socket",
    "ferry-repair.service": "ferry-repair.service",
    "ferryd@.service": "ferryd@vm1.service",
    "ferryd-netns@.service": "ferryd-netns@guest1.service",
}


def test_every_unit_is_verified() -> None:
    assert sorted(p.name for p in UNITS.iterdir()) == sorted(VERIFIED)


def test_programs_are_named_under_the_default_prefix() -> None:
    """What make install's substitution relies on: every Exec*= program is /usr/local/bin's."""
    for name in VERIFIED:
        for line in (UNITS / name).read_text().splitlines():
            if re.match(r"Exec\w+=", line):
                program = line.split("=", 1)[1].lstrip("+-!@:").split()[0]
                assert program.startswith("/usr/local/bin/"), (name, line)


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    prefix = Path(sys.executable).parent.parent
    for program in ("ferryd", "ferry-tap-setup", "ferry-repair"):
        if not (prefix / "bin" / program).exists():
            pytest.skip(f"{prefix}/bin/{program} missing: install the project (make setup)")
    for source, instance in VERIFIED.items():
        text = (UNITS / source).read_text().replace("/usr/local/", f"{prefix}/")
        (tmp_path / instance).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *VERIFIED.values()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
