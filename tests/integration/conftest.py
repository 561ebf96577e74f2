"""Fixtures for integration tests: namespaces wired as a small network, and ferryd in it.

The machinery is the bed's (testbed/: namespaces, topologies, ferryd and
ferry-repair processes, the migration bed); this file only ties it to
pytest's fixtures and reports. Everything here needs root (``ip netns
add``, veth, taps); without it the whole directory is skipped with the
reason, rather than failing with permission errors that look like bugs.

``topology`` gives every test fresh host/peer/guest namespaces (see
testbed/topology.py for the picture) that are gone after the test, however it
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
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from testbed.ferryd_process import FerrydProcess, describe_status, launch
from testbed.migrationbed import MigrationBed, one_host_bed, two_host_bed
from testbed.paths import FERRYD
from testbed.topology import Topology, build_topology

HERE = Path(__file__).resolve().parent


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
    """Fresh host, peer and guest namespaces (testbed/topology.py: Topology)."""
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
        return launch(topo.host, argv, control, short_tmp / f"ferryd{n}.log", started)

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
                f"ferryd (pid {ferryd.pid}) ended {when} with {describe_status(status)}, "
                "expected exit 0 or death by SIGTERM"
            )
    if problems:
        logs = "\n".join(f"--- ferryd log ---\n{f.log()}" for f in started)
        pytest.fail("; ".join(problems) + "\n" + logs, pytrace=False)


# ---------------------------------------------------------------------------
# Migration: two hosts (or one), one guest, one ferry-repair, ferryds started by role


def _report_bed(request: pytest.FixtureRequest, bed: MigrationBed) -> None:
    """Stop the bed's ferryds; when the test failed, print their logs and the helper's."""
    statuses = bed.stop_ferryds()
    if _test_failed(request.node):
        for ferryd, status in zip(bed.ferryds, statuses, strict=True):
            print(f"--- ferryd log ({' '.join(ferryd.argv)}, exit {status}) ---")
            print(ferryd.log())
        print("--- ferry-repair log ---\n" + "\n".join(bed.helper.lines[-50:]))


@pytest.fixture
def two_hosts(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[MigrationBed]:
    """Host A (source), host B (target), the peer on a fabric that moves, a shared guest.

    Every ferryd started through the bed is stopped (SIGTERM) before the
    namespaces go; their logs are printed when the test failed.
    """
    with two_host_bed(short_tmp) as bed:
        try:
            yield bed
        finally:
            _report_bed(request, bed)


@pytest.fixture
def one_host(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[MigrationBed]:
    """Source and target ferryd in one host namespace (the standard topology)."""
    with one_host_bed(short_tmp) as bed:
        try:
            yield bed
        finally:
            _report_bed(request, bed)
