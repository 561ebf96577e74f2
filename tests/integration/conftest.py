"""Fixtures for integration tests: namespaces wired as a small network, and ferryd in it.

Everything here needs root (``ip netns add``, veth, taps); without it the
whole directory is skipped with the reason, rather than failing with
permission errors that look like bugs.

``topology`` gives every test fresh host/peer/guest namespaces (see
tests/netns.py for the picture) that are gone after the test, however it
ended. ``start_ferryd`` starts the real daemon in the host namespace,
serving a tap in the guest namespace, and returns only once
``ferryctl status --wait`` says it is ready; if ferryd dies or never gets
ready the test fails with ferryd's log, and at teardown the log is printed
when the test failed. ferryd is stopped with SIGTERM (then SIGKILL) before
the namespaces are removed, and an unclean exit fails the test: a crash at
shutdown is a bug like any other.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from daemon.control import request
from tests.netns import Topology, build_topology, wait_for

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
FERRYD = VENV_BIN / "ferryd"
FERRYCTL = VENV_BIN / "ferryctl"
HERE = Path(__file__).resolve().parent

#: How long ferryd may take to become ready, and to stop after SIGTERM.
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces, veth and tap devices)"
    if shutil.which("ip") is None:
        return "integration tests need the ip command (iproute2)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this directory `integration`, and skip them all without root."""
    reason = _skip_reason()
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember each phase's report on the item, so teardown knows if the test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _test_failed(node: pytest.Item) -> bool:
    reports = node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


@pytest.fixture
def topology() -> Iterator[Topology]:
    """Fresh host, peer and guest namespaces (tests/netns.py: Topology)."""
    with build_topology() as topo:
        yield topo


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: Unix socket paths must fit 108 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="ft-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class FerrydProcess:
    """A running ferryd: its process, control socket and log."""

    proc: subprocess.Popen[bytes]
    control: str
    log_path: Path
    argv: list[str]
    #: Exit statuses that teardown accepts (0, or death by the SIGTERM we sent).
    ok_exit: frozenset[int] = field(
        default_factory=lambda: frozenset({0, -signal.SIGTERM, 128 + signal.SIGTERM})
    )
    #: Set once a failure of this ferryd has been reported, so teardown does not repeat it.
    reported: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """ferryd's stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """One control request (daemon.control.request) to this ferryd."""
        return request(self.control, cmd, **args)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ferryctl --control SOCK ARGS`` (the real CLI) and return its output."""
        result = subprocess.run(
            [str(FERRYCTL), "--control", self.control, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"ferryctl {' '.join(args)} failed (exit {result.returncode}): "
                f"{result.stderr.strip()}\n--- ferryd log ---\n{self.log()}",
                pytrace=False,
            )
        return result

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM by pid, wait up to *timeout*, then SIGKILL; returns the exit status.

        Safe to call again (returns the status it already has).
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                with self.log_path.open("a") as log_file:
                    log_file.write(
                        f"\n[conftest] ferryd ignored SIGTERM for {timeout:g} s; sent SIGKILL\n"
                    )
        return self.proc.returncode


class StartFerryd(Protocol):
    def __call__(
        self, topology: Topology, /, *extra_args: str, config_net: bool = False
    ) -> FerrydProcess: ...


@pytest.fixture
def ferryd_command() -> list[str]:
    """The command that starts ferryd (before its arguments).

    The venv's console script by default; a test module can override this
    fixture to run a stand-in (test_topology.py does, to test the harness).
    """
    return [str(FERRYD)]


@pytest.fixture
def start_ferryd(
    request: pytest.FixtureRequest,
    topology: Topology,
    short_tmp: Path,
    ferryd_command: list[str],
) -> Iterator[StartFerryd]:
    """A factory: ``start_ferryd(topology, *extra_args, config_net=False)``.

    Runs ``ip netns exec HOST ferryd --netns GUEST_PATH --tap tap0
    --control SOCK [--config-net] EXTRA_ARGS`` and returns a ready
    FerrydProcess. Several daemons may be started (each gets its own socket
    and log). It depends on ``topology`` so that ferryd is always stopped
    before the namespaces are torn down, whichever topology it was given.
    """
    started: list[FerrydProcess] = []

    def start(topo: Topology, *extra_args: str, config_net: bool = False) -> FerrydProcess:
        n = len(started)
        control = str(short_tmp / f"ctl{n}.sock")
        log_path = short_tmp / f"ferryd{n}.log"
        argv = [
            *ferryd_command,
            "--netns",
            topo.guest.path,
            "--tap",
            "tap0",
            "--control",
            control,
            *(["--config-net"] if config_net else []),
            *extra_args,
        ]
        with log_path.open("wb") as log_file:
            proc = topo.host.popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
            )
        ferryd = FerrydProcess(proc, control, log_path, argv)
        started.append(ferryd)
        _wait_ready(ferryd)
        return ferryd

    yield start

    failed = _test_failed(request.node)
    problems: list[str] = []
    for ferryd in started:
        already_dead = ferryd.proc.poll() is not None
        status = ferryd.stop()
        if failed:
            print(f"--- ferryd log ({' '.join(ferryd.argv)}, exit {status}) ---")
            print(ferryd.log())
        elif ferryd.reported:
            pass
        elif status not in ferryd.ok_exit:
            when = "during the test" if already_dead else "after SIGTERM"
            problems.append(
                f"ferryd (pid {ferryd.pid}) ended {when} with {_describe_status(status)}, "
                "expected exit 0 or death by SIGTERM"
            )
    if problems:
        logs = "\n".join(f"--- ferryd log ---\n{f.log()}" for f in started)
        pytest.fail("; ".join(problems) + "\n" + logs, pytrace=False)


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"exit status {status}"


def _wait_ready(ferryd: FerrydProcess) -> None:
    """Block until ``ferryctl status --wait`` succeeds; fail with the log if ferryd dies first."""
    ctl = subprocess.Popen(
        [str(FERRYCTL), "--control", ferryd.control, "status", "--wait", f"{READY_TIMEOUT:g}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # ferryctl enforces the deadline; the margin only covers its start-up.
        wait_for(
            lambda: ctl.poll() is not None or ferryd.proc.poll() is not None,
            timeout=READY_TIMEOUT + 30,
            what="ferryctl status --wait or ferryd to exit",
        )
    finally:
        if ctl.poll() is None:
            ctl.kill()
        _, ctl_err = ctl.communicate()
    if ctl.returncode == 0:
        return
    exited = ferryd.proc.poll()
    why = (
        f"ferryd exited with status {exited} before it was ready"
        if exited is not None
        else f"ferryd not ready: {ctl_err.strip() or 'ferryctl was stopped'}"
    )
    ferryd.reported = True
    pytest.fail(f"{why}\ncommand: {' '.join(ferryd.argv)}\n--- ferryd log ---\n{ferryd.log()}")
