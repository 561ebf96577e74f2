"""make install / make uninstall (scripts/install.sh), staged with DESTDIR.

The staged tree must hold exactly the expected files with sane modes; its
programs must run as installed, which a private mount namespace shows
without touching this machine: the staged $PREFIX is bind-mounted on
/usr/local, where the symlinks, the venv's #! lines and the units point.
There the installed units verify clean, and ferryd runs as an unprivileged
user (what ferryd@.service's DynamicUser= gets). make uninstall must then
leave nothing. make deb's package installs, runs and purges in a chroot
onto an overlay of this machine's root (dpkg, groupadd and all write to the
overlay's upper layer, a tmpfs, gone with the mount namespace).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.paths import REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare"),
]

PREFIX = "/usr/local"
VENV = "usr/local/lib/ferry/venv"
#: Console scripts that make install links into $PREFIX/bin (pyproject.toml's).
SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def _make(target: str, destdir: Path) -> None:
    done = subprocess.run(
        ["make", "-s", target, f"DESTDIR={destdir}", f"PREFIX={PREFIX}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    destdir = tmp_path_factory.mktemp("stage")
    _make("install", destdir)
    yield destdir
    shutil.rmtree(destdir, ignore_errors=True)


def _expected() -> dict[str, str]:
    """Every path outside the venv, with its kind: a mode, or ``-> target`` for a symlink."""
    files = {
        "etc/default/ferry-repair": "0644",
        "etc/ferry/guest.conf.example": "0644",
        "usr/local/share/doc/ferry/README.md": "0644",
    }
    for unit in os.listdir(REPO / "systemd"):
        files[f"usr/local/lib/systemd/system/{unit}"] = "0644"
    for script in SCRIPTS:
        files[f"usr/local/bin/{script}"] = f"-> ../lib/ferry/venv/bin/{script}"
    if "ferry-libvirt-hook" in SCRIPTS:
        files["etc/libvirt/hooks/qemu.d/ferry"] = "-> /usr/local/bin/ferry-libvirt-hook"
    if "ferry-passt" in SCRIPTS:
        files["usr/local/lib/ferry/passt-compat/passt"] = "-> /usr/local/bin/ferry-passt"
    return files


def _found(root: Path) -> dict[str, str]:
    found = {}
    for path in root.rglob("*"):
        relative = str(path.relative_to(root))
        if relative == VENV or relative.startswith(VENV + "/"):
            continue
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            found[relative] = f"-> {os.readlink(path)}"
        elif stat.S_ISDIR(mode):
            assert stat.S_IMODE(mode) == 0o755, relative
        else:
            found[relative] = f"{stat.S_IMODE(mode):04o}"
    return found


def test_install_stages_exactly_the_expected_files(staged: Path) -> None:
    assert _found(staged) == _expected()
    for path in (staged / VENV).rglob("*"):
        mode = path.lstat().st_mode
        # Nothing writable but by root (the owner): no unprivileged ferryd
        # may change the code another will run.
        assert stat.S_ISLNK(mode) or not mode & 0o022, path
    # The venv names its final place, not the staging directory.
    for text in (staged / VENV / "pyvenv.cfg", staged / VENV / "bin" / "ferryd"):
        assert str(staged) not in text.read_text()
    assert (staged / VENV / "bin" / "ferryd").read_text().startswith(f"#!{PREFIX}/lib/ferry/venv/")
    units = staged / "usr/local/lib/systemd/system"
    assert "ExecStart=/usr/local/bin/ferryd --vhost-user" in (units / "ferryd@.service").read_text()
    assert "--allow-gid ferry" in (staged / "etc/default/ferry-repair").read_text()


#: Inside the mount namespace: the staged prefix where it will be installed.
_AS_INSTALLED = 'mount --bind "$0/usr/local" /usr/local && exec "$@"'


def _as_installed(staged: Path, *argv: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private",
         "sh", "-c", _AS_INSTALLED, str(staged), *argv],
        capture_output=True, text=True, timeout=120, check=False, cwd=cwd,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_installed_programs_run(staged: Path) -> None:
    for script in SCRIPTS:
        assert "usage:" in _as_installed(staged, f"/usr/local/bin/{script}", "--help").lower(), (
            script
        )
    # As a user with no home and no write access anywhere, as under the units.
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    out = _as_installed(staged, *nobody, "/usr/local/bin/ferryd", "--help")
    assert "--vhost-user" in out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_installed_units_verify_clean(staged: Path, tmp_path: Path) -> None:
    units = staged / "usr/local/lib/systemd/system"
    names = {
        "ferryd@.service": "ferryd@vm1.service",
        "ferryd-netns@.service": "ferryd-netns@g1.service",
    }
    for unit in units.iterdir():
        shutil.copy(unit, tmp_path / names.get(unit.name, unit.name))
    out = _as_installed(staged, "systemd-analyze", "verify", *os.listdir(tmp_path), cwd=tmp_path)
    assert out == ""


def test_uninstall_leaves_nothing(staged: Path, tmp_path: Path) -> None:
    destdir = tmp_path / "stage"
    shutil.copytree(staged, destdir, symlinks=True)  # what make install staged, once
    _make("uninstall", destdir)
    assert list(destdir.rglob("*")) == []


#: In a private mount namespace: an overlay of / (writes to a tmpfs), with
#: /dev, a /proc, /tmp and /run (no /run/systemd/system: no systemd runs
#: there, as here), then the package's whole life under chroot.
_IN_OVERLAY = """
set -e
work=$0
mount -t tmpfs tmpfs "$work"
mkdir "$work/upper" "$work/work" "$work/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper,workdir=$work/work" "$work/root"
mount --rbind /dev "$work/root/dev"
mount -t proc proc "$work/root/proc"
mount -t tmpfs tmpfs "$work/root/tmp"
mount -t tmpfs tmpfs "$work/root/run"
cp "$1" "$work/root/tmp/ferry.deb"
exec chroot "$work/root" sh -c "$2"
"""

_PACKAGE_LIFE = """
set -e
dpkg -i /tmp/ferry.deb
echo "group: $(getent group ferry)"
setpriv --reuid 65534 --regid 65534 --clear-groups ferryd --help | head -n 1
readlink /usr/bin/ferryd
dpkg -r ferry
echo "removed: $(ls /usr/lib/ferry /usr/bin/ferryd /etc/ferry 2>&1 | tr '\\n' ' ')"
dpkg -P ferry
echo "purged: $(ls /etc/ferry /etc/default/ferry-repair 2>&1 | tr '\\n' ' ')"
"""


@pytest.mark.skipif(
    shutil.which("dpkg-deb") is None or "overlay" not in Path("/proc/filesystems").read_text(),
    reason="needs dpkg-deb and overlayfs",
)
def test_deb_installs_runs_and_purges(tmp_path: Path) -> None:
    done = subprocess.run(
        ["make", "-s", "deb"], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (package,) = (REPO / "build").glob("ferry_*.deb")
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(package), "Package", "Depends"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert fields.startswith("Package: ferry\nDepends: python3 (>= 3.11~)"), fields
    (tmp_path / "overlay").mkdir()
    life = subprocess.run(
        ["unshare", "--mount", "--propagation", "private",
         "sh", "-c", _IN_OVERLAY, str(tmp_path / "overlay"), str(package), _PACKAGE_LIFE],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = life.stdout + life.stderr
    assert life.returncode == 0, out
    lines = life.stdout.splitlines()
    # postinst: the group, with libvirt's QEMU user in it where libvirt is installed.
    (group,) = [line for line in lines if line.startswith("group: ")]
    members = group.split(":")[-1].split(",")
    assert group.startswith("group: ferry:x:"), group
    assert members == (["libvirt-qemu"] if _exists_user("libvirt-qemu") else [""]), group
    assert any(line.startswith("usage: ferryd") for line in lines), out
    assert "../lib/ferry/venv/bin/ferryd" in lines, out
    # Removed: the programs and code go, the conffiles stay until purged.
    (removed,) = [line for line in lines if line.startswith("removed: ")]
    assert "/usr/lib/ferry': No such file" in removed and "guest.conf.example" in removed, removed
    (purged,) = [line for line in lines if line.startswith("purged: ")]
    assert purged.count("No such file") == 2, purged


def _exists_user(name: str) -> bool:
    return subprocess.run(["id", name], capture_output=True, check=False).returncode == 0
