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

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from ferryd.control import request
from tests.integration.test_repair_support import listening_helper, raise_fd_limit
from tests.netns import (
    Netns,
    Topology,
    TwoHostTopology,
    build_topology,
    two_host_topology,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
FERRYD = VENV_BIN / "ferryd"
FERRYCTL = VENV_BIN / "ferryctl"
HERE = Path(__file__).resolve().parent
#: Who ferryd becomes after setup when started as root (its --runas default).
RUNAS_UID = pwd.getpwnam("nobody").pw_uid

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
        """One control request (ferryd.control.request) to this ferryd."""
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


# ---------------------------------------------------------------------------
# Migration: two hosts (or one), one guest, one ferry-repair, ferryds started by role


@dataclass
class MigrationBed:
    """Everything a migration test runs on (see the ``two_hosts`` and ``one_host`` fixtures).

    ``host_a`` runs the source and ``host_b`` the target (the same namespace in
    the one-host bed). The guest namespace is shared: the source creates its
    multi-queue tap, the target attaches to it. One ferry-repair in the root
    namespace serves every ferryd (``--repair-socket``). Addresses: the hosts'
    ``host_v4``/``host_v6`` (which the guest gets too), the peer's ``peers_v4``
    and ``peers_v6`` (the first is the gateway; tests talk to the second).
    """

    host_a: Netns
    host_b: Netns
    peer: Netns
    guest: Netns
    tmp: Path
    repair_socket: str
    fabric: TwoHostTopology | None
    host_v4: str
    host_v6: str
    peers_v4: tuple[str, ...]
    peers_v6: tuple[str, ...]
    ferryds: list[FerrydProcess] = field(default_factory=list)

    @property
    def peer_v4(self) -> str:
        """The peer address tests connect to (not the guest's gateway)."""
        return self.peers_v4[-1]

    @property
    def peer_v6(self) -> str:
        return self.peers_v6[-1]

    def start_ferryd(
        self,
        host: Netns,
        *args: str,
        config_net: bool = False,
        incoming: bool = False,
        prefix: Sequence[str] = (),
    ) -> FerrydProcess:
        """Start ferryd in *host* for the shared guest; return it once ready.

        ``prefix``: a launcher that execs ferryd (test_tap_fd.py passes it a
        /dev/net/tun descriptor).
        """
        n = len(self.ferryds)
        control = str(self.tmp / f"m{n}.sock")
        log_path = self.tmp / f"ferryd-m{n}.log"
        argv = [
            *prefix,
            str(FERRYD),
            "--netns",
            self.guest.path,
            "--tap",
            "tap0",
            "--control",
            control,
            "--repair-socket",
            self.repair_socket,
            *(["--config-net"] if config_net else []),
            *(["--incoming"] if incoming else []),
            *args,
        ]
        with log_path.open("wb") as log_file:
            proc = host.popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
            )
        ferryd = FerrydProcess(proc, control, log_path, argv)
        self.ferryds.append(ferryd)
        _wait_ready(ferryd)
        return ferryd

    def start_source(self, *args: str, host: Netns | None = None) -> FerrydProcess:
        """A running ferryd that configures the guest (``--config-net``)."""
        return self.start_ferryd(host or self.host_a, *args, config_net=True)

    def start_target(self, *args: str, host: Netns | None = None) -> FerrydProcess:
        """A ferryd started with ``--incoming``: it waits for a stream."""
        return self.start_ferryd(host or self.host_b, *args, incoming=True)

    def migrate(
        self, source: FerrydProcess, target: FerrydProcess, *args: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ferryctl migrate --json`` (the real CLI) and return what it did."""
        return subprocess.run(
            [
                str(FERRYCTL),
                "migrate",
                "--source",
                source.control,
                "--target",
                target.control,
                "--json",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def migrate_ok(
        self, source: FerrydProcess, target: FerrydProcess, *args: str
    ) -> dict[str, Any]:
        """Migrate and switch the fabric; fail the test with both logs if ferryctl failed."""
        result = self.migrate(source, target, *args)
        if result.returncode != 0:
            pytest.fail(
                f"ferryctl migrate failed (exit {result.returncode}): {result.stderr.strip()}\n"
                f"--- source log ---\n{source.log()}\n--- target log ---\n{target.log()}",
                pytrace=False,
            )
        self.switch_fabric()
        summary: dict[str, Any] = json.loads(result.stdout)
        return summary

    def switch_fabric(self) -> None:
        """Move the peer's link to the other host (nothing to do on one host)."""
        if self.fabric is None:
            return
        if self.fabric.switched:
            self.fabric.switch_to_a()
        else:
            self.fabric.switch_to_b()

    def standby_a(self) -> None:
        """After A→B: give host A a fresh uplink, not yet on the fabric (for B→A)."""
        if self.fabric is not None:
            self.fabric.standby_a()
            _default_routes(self.host_a, self.peers_v4[0], self.peers_v6[0])


def _default_routes(host: Netns, gateway_v4: str, gateway_v6: str) -> None:
    """ferryd takes the guest's addresses from the host's default routes."""
    host.run(["ip", "-4", "route", "replace", "default", "via", gateway_v4])
    host.run(["ip", "-6", "route", "replace", "default", "via", gateway_v6])


@contextlib.contextmanager
def _migration_bed(
    request: pytest.FixtureRequest,
    tmp: Path,
    fabric: TwoHostTopology | None,
    topo: Topology | None,
) -> Iterator[MigrationBed]:
    raise_fd_limit()
    guest_cm = Netns("guest") if fabric is not None else contextlib.nullcontext(None)
    # ferryd runs as nobody once set up (daemon/privileges.py): the helper must serve it.
    allow = ("--allow-uid", str(RUNAS_UID))
    with guest_cm as own_guest, listening_helper(tmp / "repair.sock", *allow) as helper:
        if fabric is not None:
            assert own_guest is not None
            for host in (fabric.host_a, fabric.host_b):
                _default_routes(host, fabric.peers_v4[0], fabric.peers_v6[0])
            bed = MigrationBed(
                fabric.host_a, fabric.host_b, fabric.peer, own_guest, tmp,
                str(tmp / "repair.sock"), fabric, fabric.host_v4, fabric.host_v6,
                fabric.peers_v4, fabric.peers_v6,
            )  # fmt: skip
        else:
            assert topo is not None
            bed = MigrationBed(
                topo.host, topo.host, topo.peer, topo.guest, tmp, str(tmp / "repair.sock"),
                None, topo.host_v4, topo.host_v6, topo.peers_v4, topo.peers_v6,
            )  # fmt: skip
        try:
            yield bed
        finally:
            failed = _test_failed(request.node)
            for ferryd in bed.ferryds:
                status = ferryd.stop()
                if failed:
                    print(f"--- ferryd log ({' '.join(ferryd.argv)}, exit {status}) ---")
                    print(ferryd.log())
            if failed:
                print("--- ferry-repair log ---\n" + "\n".join(helper.lines[-50:]))


@pytest.fixture
def two_hosts(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[MigrationBed]:
    """Host A (source), host B (target), the peer on a fabric that moves, a shared guest.

    Every ferryd started through the bed is stopped (SIGTERM) before the
    namespaces go; their logs are printed when the test failed.
    """
    short_tmp.chmod(0o755)
    with two_host_topology() as fabric, _migration_bed(request, short_tmp, fabric, None) as bed:
        yield bed


@pytest.fixture
def one_host(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[MigrationBed]:
    """Source and target ferryd in one host namespace (the standard topology)."""
    short_tmp.chmod(0o755)
    with build_topology() as topo, _migration_bed(request, short_tmp, None, topo) as bed:
        yield bed
