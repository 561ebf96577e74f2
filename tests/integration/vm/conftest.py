"""Fixtures for the VM tests: the guest image, and QEMUs that always go away.

Every test here is marked ``vm`` and is skipped, with the reason, where
QEMU >= 10 is missing (scripts/bootstrap.sh installs it from
bookworm-backports as root). The guest is built once per session into the
cache (testbed/guest_image.py); a failure to build it fails the tests that
need it, with apt's or the builder's message. Each VM a test starts is
stopped at teardown (QMP quit, then SIGKILL by PID); when the test failed,
its console and QEMU's log are printed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest

from testbed.guest_image import GuestImage, build_guest_image
from testbed.guest_traffic import ECHO_PORT
from testbed.libvirt import LibvirtDaemon, libvirt_unavailable
from testbed.migrationbed import MigrationBed
from testbed.netns import Netns
from testbed.passt_process import PasstProcess, start_passt
from testbed.tcptool_process import Tool, server
from testbed.topology import Topology
from testbed.vm import Vm, qemu_unavailable
from tests.integration.conftest import _test_failed

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this directory `vm`; skip them all without QEMU >= 10."""
    mine = [item for item in items if HERE in item.path.parents]
    if not mine:
        return
    reason = qemu_unavailable()
    for item in mine:
        item.add_marker(pytest.mark.vm)
        why = reason or ("libvirt" in getattr(item, "fixturenames", ()) and libvirt_unavailable())
        if why:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The test guest, built (or found in the cache) once per session."""
    return build_guest_image()


class StartVm(Protocol):
    def __call__(self, netdev: Sequence[str], /, **kwargs: Any) -> Vm: ...


@pytest.fixture
def start_vm(
    request: pytest.FixtureRequest, guest_image: GuestImage, short_tmp: Path
) -> Iterator[StartVm]:
    """A factory: ``start_vm(netdev_args, name=..., mac=..., incoming=...)`` -> a started Vm."""
    started: list[Vm] = []

    def start(netdev: Sequence[str], /, **kwargs: Any) -> Vm:
        kwargs.setdefault("name", f"vm{len(started)}")
        vm = Vm(guest_image, short_tmp, netdev, **kwargs)
        started.append(vm)
        return vm.start()

    yield start

    for vm in started:
        status = vm.stop()
        if _test_failed(request.node):
            print(f"--- {vm.name}: QEMU exit {status}; command: {' '.join(vm.argv)} ---")
            print(f"--- {vm.name}: QEMU's log ---\n{vm.qemu_log()}")
            print(f"--- {vm.name}: the guest's console ---\n{vm.console()}")


class StartPasst(Protocol):
    def __call__(self) -> PasstProcess: ...


@pytest.fixture
def start_passt_backend(
    request: pytest.FixtureRequest, topology: Topology, short_tmp: Path
) -> Iterator[StartPasst]:
    """A factory: ``start_passt_backend()`` -> passt listening in the host namespace.

    Each passt gets its own socket; all are stopped at teardown (after the
    VMs, which were started later), their logs printed when the test failed.
    """
    started: list[PasstProcess] = []

    def start() -> PasstProcess:
        passt = start_passt(topology.host, short_tmp / f"passt{len(started)}.log")
        started.append(passt)
        return passt

    yield start

    for passt in started:
        status = passt.stop()
        if _test_failed(request.node):
            print(f"--- passt's log ({passt.socket_path}, exit {status}) ---\n{passt.log()}")


class StartLibvirt(Protocol):
    def __call__(
        self, hook: str | None, /, path_first: Path | None = None, host: Netns | None = None
    ) -> LibvirtDaemon: ...


@pytest.fixture
def libvirt(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[StartLibvirt]:
    """A factory: ``libvirt(hook_script, path_first=None, host=None)`` -> a private
    libvirtd in *host* (default: the ``topology`` fixture's host namespace).

    testbed/libvirt.py: its own /etc/libvirt (the hook installed as
    hooks/qemu.d/ferry), /run, state and socket under the test's directory,
    *path_first* first on its PATH. At teardown every domain is destroyed
    through libvirt (the hooks run), the daemon is stopped by PID and
    leftovers killed; when the test failed, libvirtd's log, each domain's
    QEMU log and console are printed. Tests using it skip, with the reason,
    where libvirt is not installed.
    """
    started: list[LibvirtDaemon] = []
    # QEMU runs as libvirt-qemu: it must reach its files under the test's directory.
    short_tmp.chmod(0o755)

    def start(
        hook: str | None, /, path_first: Path | None = None, host: Netns | None = None
    ) -> LibvirtDaemon:
        if host is None:
            topology: Topology = request.getfixturevalue("topology")
            host = topology.host
        workdir = short_tmp / f"libvirt{len(started)}"
        daemon = LibvirtDaemon(workdir, host, hook, path_first=path_first)
        started.append(daemon)
        return daemon.start()

    yield start

    for daemon in started:
        daemon.stop()
        if _test_failed(request.node):
            print(daemon.logs())
            for guest in daemon.guests:
                print(f"--- {guest.name}: QEMU's log ---\n{daemon.qemu_log(guest.name)}")
                print(f"--- {guest.name}: the guest's console ---\n{guest.console()}")


@pytest.fixture
def echo(two_hosts: MigrationBed) -> Iterator[Tool]:
    """tcptool's echo server on the two-host bed's peer (stopped by PID at the end)."""
    tool = server(two_hosts.peer, "echo", two_hosts.peer_v4, ECHO_PORT)
    try:
        yield tool
    finally:
        tool.proc.kill()
        tool.proc.wait()
