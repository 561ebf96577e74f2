"""What the builds into .venv/cache share: a lock, and a private apt configuration.

The VM guest (testbed/guest_image.py) and the bench's passt
(bench/passt_build.py) fetch Debian packages into the cache. Both go through
an apt configuration of their own (source list, package lists and archive
cache under the cache directory), so the system's apt setup is never
touched and its possibly stale lists do not matter; and both build under an
exclusive lock, so that two runs at once build once.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

__all__ = ["KEYRING", "locked", "private_apt"]

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
"""Debian's archive keys (the debian-archive-keyring package), for ``signed-by``."""


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on *path* (another run building the same thing waits for it)."""
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def private_apt(apt_dir: Path, sources: str) -> list[str]:
    """``-o`` options for apt-get/apt-cache that use only *apt_dir* and the *sources* lines."""
    for d in (apt_dir / "lists" / "partial", apt_dir / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    (apt_dir / "sources.list").write_text(sources)
    return [
        "-o", f"Dir::Etc::SourceList={apt_dir / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
        "-o", f"Dir::Cache={apt_dir}",
        "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
        "-o", "APT::Sandbox::User=root",
        "-q",
    ]  # fmt: skip
