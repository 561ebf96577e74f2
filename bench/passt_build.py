"""passt and passt-repair, the reference back-end, built from Debian's newest source package.

Debian 12's ``passt`` (2023) rejects ``--vhost-user`` and has no migration;
Debian 13's binaries need glibc 2.38. The newest passt is in
trixie-backports, and its upstream tarball (the source package's
``.orig.tar.xz``) builds on Debian 12 in seconds with ``make passt
passt-repair`` (shared/REFERENCE.md, "passt, as the reference"). So the
bench fetches that tarball with ``apt-get source --download-only`` through
a private apt configuration (its own source list with one ``deb-src``
line, its own lists and cache; the system's apt setup is untouched) and
builds it into ``.venv/cache/passt/<version>/``. Nothing of passt goes
into the repository.

The cache is looked up first: a version directory holding both binaries
is used as it is, without asking the archive (the bench runs offline once
built). Without one, the newest version is fetched and built; any failure
is a :class:`PasstBuildError` saying which step failed and what it
printed. ``apt-get source`` may fail on the ``.dsc`` or the Debian diff
(a backports mirror that lacks them) and still have fetched the
``.orig`` tarball, which is all that is needed; so its exit status is
not the verdict, the tarball is.

``python -m bench.passt_build`` builds (or finds) it and prints the paths.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from testbed.apt_cache import KEYRING, locked, private_apt
from testbed.paths import REPO

__all__ = ["CACHE", "PasstBinaries", "PasstBuildError", "build_passt"]

#: Where the built versions live (not committed; ``make clean`` removes it with the venv).
CACHE = REPO / ".venv" / "cache" / "passt"
ARCHIVE = "http://deb.debian.org/debian"
SUITE = "trixie-backports"
SOURCE_PACKAGE = "passt"


class PasstBuildError(Exception):
    """passt could not be fetched or built; the message names the step and its output."""


@dataclass(frozen=True)
class PasstBinaries:
    """A built passt: its two programs and the Debian version they came from."""

    passt: Path
    passt_repair: Path
    version: str


def _found(directory: Path) -> PasstBinaries | None:
    passt, repair = directory / "passt", directory / "passt-repair"
    if passt.is_file() and repair.is_file():
        return PasstBinaries(passt, repair, directory.name)
    return None


def cached(cache: Path = CACHE) -> PasstBinaries | None:
    """The newest version already built in *cache*, or None."""
    if not cache.is_dir():
        return None
    for directory in sorted(cache.iterdir(), reverse=True):
        if directory.is_dir() and (binaries := _found(directory)):
            return binaries
    return None


def build_passt(cache: Path = CACHE) -> PasstBinaries:
    """passt and passt-repair from the cache, or fetched and built into it first."""
    cache.mkdir(parents=True, exist_ok=True)
    with locked(cache / ".lock"):
        binaries = cached(cache)
        if binaries is not None:
            return binaries
        with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
            work = Path(tmp)
            tarball = _fetch_orig(work)
            version = tarball.name.removeprefix(f"{SOURCE_PACKAGE}_").removesuffix(".orig.tar.xz")
            _run(["tar", "-xf", str(tarball), "-C", str(work)], "unpacking " + tarball.name)
            trees = [d for d in work.iterdir() if d.is_dir() and (d / "Makefile").exists()]
            if len(trees) != 1:
                raise PasstBuildError(f"{tarball.name} does not unpack to one source tree")
            _run(
                ["make", "-C", str(trees[0]), f"VERSION={version}", "passt", "passt-repair"],
                "make passt passt-repair",
                timeout=900,
            )
            built = work / "out"
            built.mkdir()
            for name in ("passt", "passt-repair"):
                shutil.copy2(trees[0] / name, built / name)
            destination = cache / version
            shutil.rmtree(destination, ignore_errors=True)
            built.rename(destination)
    binaries = _found(destination)
    assert binaries is not None
    return binaries


def _fetch_orig(work: Path) -> Path:
    """``apt-get source --download-only passt`` from trixie-backports; the .orig tarball."""
    opts = private_apt(work / "apt", f"deb-src [signed-by={KEYRING}] {ARCHIVE} {SUITE} main\n")
    _run(["apt-get", *opts, "update"], f"apt-get update ({SUITE} sources)")
    result = _run(
        ["apt-get", *opts, "source", "--download-only", SOURCE_PACKAGE],
        "apt-get source --download-only passt",
        cwd=work,
        check=False,
    )
    tarballs = sorted(work.glob(f"{SOURCE_PACKAGE}_*.orig.tar.xz"))
    if not tarballs:
        raise PasstBuildError(
            f"apt-get source --download-only {SOURCE_PACKAGE} ({SUITE}) fetched no .orig.tar.xz "
            f"(exit {result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return tarballs[-1]


def _run(
    argv: list[str], what: str, *, cwd: Path | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PasstBuildError(f"building passt: {what} failed: {e}") from e
    if check and result.returncode != 0:
        raise PasstBuildError(
            f"building passt: {what} failed with exit status {result.returncode}:\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


def main() -> None:
    binaries = build_passt()
    print(
        json.dumps(
            {
                "passt": str(binaries.passt),
                "passt_repair": str(binaries.passt_repair),
                "version": binaries.version,
            }
        )
    )


if __name__ == "__main__":
    main()
