"""The README's usage examples, run exactly as written, so they cannot rot.

Every ```sh block of the usage sections is run by bash with ``-euo
pipefail``, after only the substitutions the README itself announces: the
namespace name ``guest`` and the runtime directory ``/run/ferry`` become a
fresh namespace and a temporary directory, so a test run never touches a
real guest or a real /run/ferry. The blocks of one section run in one shell,
in order; each section gets its own namespace and directory. The installed
programs are found on PATH (the virtualenv's bin first), as a user's shell
would find them.

A new usage section must be listed in ``SECTIONS``; a listed section that
lost its example fails, so renaming one cannot silently skip it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from testbed.netns import NETNS_PREFIX, ip

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
#: The README's usage sections (level-2 headings) whose sh blocks are run.
SECTIONS = ("Running ferryd", "Migration", "Operations")
#: Time one section's examples may take, background programs excluded.
SECTION_TIMEOUT = 120.0


def section_blocks(text: str, heading: str) -> list[str]:
    """The ```sh blocks between ``## heading`` and the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        return []
    return re.findall(r"^```sh\n(.*?)^```", match.group(1), re.M | re.S)


def substitute(block: str, netns: str, rundir: str) -> str:
    """The README's announced substitutions, and no others."""
    block = block.replace("/run/ferry", rundir)
    return re.sub(r"(?<![\w/.-])guest(?![\w-])", netns, block)


def test_readme_announces_the_substitutions() -> None:
    text = README.read_text()
    assert "`guest`" in text and "`/run/ferry`" in text
    assert "test_readme" in text, "the README must say its examples are tested"


@pytest.mark.parametrize("heading", SECTIONS)
def test_readme_section_runs_as_written(heading: str) -> None:
    blocks = section_blocks(README.read_text(), heading)
    assert blocks, f"README section {heading!r} has no sh example"
    netns = f"{NETNS_PREFIX}readme-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="ferry-readme-") as tmp:
        rundir = os.path.join(tmp, "run")
        script = "\n".join(substitute(b, netns, rundir) for b in blocks)
        env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}")
        log_path = os.path.join(tmp, "output")
        # A file, not a pipe: the examples' background programs (ferryd &)
        # keep their stdout open after bash has finished. A session of its
        # own: they stay in its process group, which is killed afterwards.
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", script],
                env=env,
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            proc.wait(timeout=SECTION_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"README {heading!r} did not finish in {SECTION_TIMEOUT} s:\n"
                + Path(log_path).read_text()
            )
        finally:
            _kill_group(proc.pid)
            ip("netns", "del", netns, check=False)
        out = Path(log_path).read_text()
        assert proc.returncode == 0, f"README {heading!r} failed as written:\n{script}\n---\n{out}"


def _kill_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
