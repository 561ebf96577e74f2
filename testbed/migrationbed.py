"""The bed a migration runs on: hosts, a shared guest, one ferry-repair, ferryds by role.

:func:`two_host_bed` is the real case (two hosts with one identity, the
peer on a fabric that moves: testbed/topology.py); :func:`one_host_bed`
runs source and target in one host namespace. Either way one ferry-repair
serves every ferryd, and every ferryd started through the bed is stopped
(SIGTERM, by PID) before the helper and the namespaces go.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferryd.control import request
from testbed.ferryd_process import RUNAS_UID, FerrydFailed, FerrydProcess, launch
from testbed.netns import Netns
from testbed.paths import FERRYCTL, FERRYD
from testbed.repair import HelperProcess, listening_helper, raise_fd_limit
from testbed.topology import TwoHostTopology, build_topology, two_host_topology
from testbed.wait import wait_for

__all__ = ["PRECOPY_NOW", "MigrationBed", "default_routes", "one_host_bed", "two_host_bed"]

#: ferryd's hidden ``--precopy-quiet`` at 0: a pre-copy takes every connection
#: idle at that moment, so a test waits for its connections to be established
#: and idle (a condition) rather than for time to pass. (Not the default: the
#: benchmarks measure ferryd as it is shipped.)
PRECOPY_NOW = ("--precopy-quiet", "0")


@dataclass
class MigrationBed:
    """Everything a migration runs on (see :func:`two_host_bed` and :func:`one_host_bed`).

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
    helper: HelperProcess
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
        guest: Netns | None = None,
    ) -> FerrydProcess:
        """Start ferryd in *host* for the shared guest; return it once ready.

        ``prefix``: a launcher that execs ferryd (test_tap_fd.py passes it a
        /dev/net/tun descriptor). ``guest``: another guest namespace than the
        bed's (several migrations at once through the same hosts and helper).
        """
        n = len(self.ferryds)
        control = str(self.tmp / f"m{n}.sock")
        argv = [
            *prefix,
            str(FERRYD),
            "--netns",
            (guest or self.guest).path,
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
        return launch(host, argv, control, self.tmp / f"ferryd-m{n}.log", self.ferryds)

    def start_vhost_user(self, host: Netns, name: str, *args: str) -> tuple[FerrydProcess, Path]:
        """``ferryd --vhost-user --socket TMP/NAME.vhost`` in *host*, ready; the socket's path.

        For a VM (testbed/vm.py, vhost_user_netdev): source and target get
        the same command line, QEMU's LOAD of the device state makes one the
        target. *args*: more of ferryd's options (``-t``, ...).
        """
        socket_path, control = self.tmp / f"{name}.vhost", str(self.tmp / f"{name}.ctl")
        argv = [
            str(FERRYD), "--vhost-user", "--socket", str(socket_path), "--control", control,
            "--repair-socket", self.repair_socket, *args,
        ]  # fmt: skip
        log_path = self.tmp / f"ferryd-{name}.log"
        return launch(host, argv, control, log_path, self.ferryds), socket_path

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
            migrate_argv(source, target, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def migrate_ok(
        self, source: FerrydProcess, target: FerrydProcess, *args: str
    ) -> dict[str, Any]:
        """Migrate and switch the fabric; raise FerrydFailed with both logs if ferryctl failed."""
        result = self.migrate(source, target, *args)
        if result.returncode != 0:
            raise FerrydFailed(
                f"ferryctl migrate failed (exit {result.returncode}): {result.stderr.strip()}\n"
                f"--- source log ---\n{source.log()}\n--- target log ---\n{target.log()}"
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
            default_routes(self.host_a, self.peers_v4[0], self.peers_v6[0])

    def stop_ferryds(self) -> list[int]:
        """Stop every ferryd started here (safe to call again); their exit statuses."""
        return [ferryd.stop() for ferryd in self.ferryds]


def migrate_argv(source: FerrydProcess, target: FerrydProcess, *args: str) -> list[str]:
    """``ferryctl migrate --json`` from ``source`` to ``target``, with ``args`` added."""
    return [
        str(FERRYCTL),
        "migrate",
        "--source",
        source.control,
        "--target",
        target.control,
        "--json",
        *args,
    ]


def migrate_killing_target(
    source: FerrydProcess, target: FerrydProcess, *ferryctl_args: str
) -> str:
    """``ferryctl migrate``, the target killed as soon as the source has begun.

    Waits for ferryctl to fail (exit 1) and for the source to be running
    again (rolled back); returns ferryctl's standard error.
    """
    ctl = subprocess.Popen(
        [str(FERRYCTL), "migrate", "--source", source.control, "--target", target.control,
         *ferryctl_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    wait_for(
        lambda: source.request("status")["role"] != "running" or ctl.poll() is not None,
        timeout=30,
        interval=0.001,
        what="the source to start migrating",
    )
    target.proc.kill()
    _, err = ctl.communicate(timeout=120)
    assert ctl.returncode == 1, err
    wait_for(
        lambda: source.request("status")["role"] == "running",
        timeout=30,
        what="the source to roll back",
    )
    return err


def start_precopy(
    source: FerrydProcess, target: FerrydProcess, timeout: float = 30
) -> dict[str, Any]:
    """Start a pre-copy step by step over the control sockets (what ``ferryctl migrate``
    begins with), the stream over a pipe; returns the source's migrate-precopy answer.
    Next: migrate-wait-precopy on the target, migrate-out on the source, and so on."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        request(target.control, "migrate-in", fds=[rfd], precopy=True)
        answer: dict[str, Any] = request(
            source.control, "migrate-precopy", fds=[wfd], timeout=timeout
        )
    finally:
        os.close(rfd)
        os.close(wfd)
    return answer


def default_routes(host: Netns, gateway_v4: str, gateway_v6: str) -> None:
    """ferryd takes the guest's addresses from the host's default routes."""
    host.run(["ip", "-4", "route", "replace", "default", "via", gateway_v4])
    host.run(["ip", "-6", "route", "replace", "default", "via", gateway_v6])


@contextlib.contextmanager
def two_host_bed(tmp: Path) -> Iterator[MigrationBed]:
    """Host A (source), host B (target), the peer on a fabric that moves, a shared guest.

    *tmp* holds the sockets and logs (a short path: Unix socket paths must
    fit 108 bytes); it is made traversable for ferryd, which runs as nobody.
    """
    with two_host_topology() as fabric, Netns("guest") as guest, _helper(tmp) as helper:
        for host in (fabric.host_a, fabric.host_b):
            default_routes(host, fabric.peers_v4[0], fabric.peers_v6[0])
        bed = MigrationBed(
            fabric.host_a, fabric.host_b, fabric.peer, guest, tmp, str(tmp / "repair.sock"),
            helper, fabric, fabric.host_v4, fabric.host_v6, fabric.peers_v4, fabric.peers_v6,
        )  # fmt: skip
        try:
            yield bed
        finally:
            bed.stop_ferryds()


@contextlib.contextmanager
def one_host_bed(tmp: Path) -> Iterator[MigrationBed]:
    """Source and target ferryd in one host namespace (the standard topology)."""
    with build_topology() as topo, _helper(tmp) as helper:
        bed = MigrationBed(
            topo.host, topo.host, topo.peer, topo.guest, tmp, str(tmp / "repair.sock"), helper,
            None, topo.host_v4, topo.host_v6, topo.peers_v4, topo.peers_v6,
        )  # fmt: skip
        try:
            yield bed
        finally:
            bed.stop_ferryds()


@contextlib.contextmanager
def _helper(tmp: Path) -> Iterator[HelperProcess]:
    raise_fd_limit()
    tmp.chmod(0o755)
    # ferryd runs as nobody once set up (daemon/privileges.py): the helper must serve it.
    with listening_helper(tmp / "repair.sock", "--allow-uid", str(RUNAS_UID)) as helper:
        yield helper
