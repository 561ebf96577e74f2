"""ferryd on a /dev/net/tun descriptor opened for it in the guest's namespace.

The tap is a persistent one that root made beforehand in the guest's
namespace, owned by nobody's group (``ip tuntap add ... group G``), as
ferryd-netns@.service's ExecStartPre= does. A launcher opens /dev/net/tun inside
the guest's namespace and execs ferryd in the host's with it as descriptor 3
(tests/integration/tap_fd_launcher.py), by socket activation (LISTEN_FDS=1)
or ``--tap-fd 3``. ferryd attaches to the tap itself (TUNSETIFF) with no
setns; the guest configures itself by DHCP (busybox udhcpc), as a guest of
that unit does.
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from testbed.ferryd_process import RUNAS_UID
from testbed.migrationbed import MigrationBed
from testbed.netns import Netns
from testbed.paths import FERRYCTL, FERRYD
from testbed.streams import Streams
from testbed.topology import Topology
from tests.integration.test_privileges import _confinement, _expected

TAP = "tap0"
#: nobody's group: ferryd drops to nobody and attaches as a member of it.
RUNAS_GID = pwd.getpwuid(RUNAS_UID).pw_gid
#: nobody with no capability at all, as ferryd-netns@.service starts ferryd.
AS_NOBODY = ["setpriv", "--reuid", str(RUNAS_UID), "--regid", str(RUNAS_GID), "--clear-groups",
             "--inh-caps", "-all", "--bounding-set", "-all", "--no-new-privs"]  # fmt: skip


LAUNCHER = [sys.executable, "-m", "tests.integration.tap_fd_launcher"]


def launcher(netns: Netns, *, explicit: bool = False) -> list[str]:
    return [*LAUNCHER, "--netns", netns.path, *(["--explicit"] if explicit else []), "--"]


def persistent_tap(guest: Netns, group: int = RUNAS_GID) -> None:
    """What ferryd-netns@.service's ExecStartPre= does, as root."""
    guest.run(["ip", "tuntap", "add", "dev", TAP, "mode", "tap", "multi_queue", "vnet_hdr",
               "group", str(group)])  # fmt: skip
    guest.run(["ip", "link", "set", TAP, "mtu", "65520", "up"])


def dhcp(guest: Netns, tmp: Path) -> str:
    """Configure the guest by DHCP from ferryd (busybox udhcpc); its address."""
    script = tmp / "udhcpc.sh"
    script.write_text(
        '#!/bin/sh\n[ "$1" = bound ] || exit 0\nip addr add "$ip/$mask" dev "$interface"\n'
        'ip route add default via "$router" dev "$interface"\necho "$ip" > "$0.ip"\n'
    )
    script.chmod(0o755)
    result = guest.run(
        ["busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", TAP, "-s",
         str(script)],
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return Path(f"{script}.ip").read_text().strip()


pytestmark = pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox udhcpc")


@pytest.mark.parametrize("explicit", [False, True], ids=["activation", "tap-fd"])
def test_root_ferryd_on_given_descriptor_drops_to_nobody(
    topology: Topology, short_tmp: Path, explicit: bool
) -> None:
    """Started as root: nobody, no capability, seccomp; DHCP and a forward work."""
    persistent_tap(topology.guest)
    args = ("--tap-fd", "3") if explicit else ()
    ferryd = _start_with_launcher(topology, short_tmp, launcher(topology.guest, explicit=explicit),
                                  *args, "-t", "8080")  # fmt: skip
    try:
        assert _confinement(ferryd.pid) == _expected(0)
        assert dhcp(topology.guest, short_tmp) == topology.host_v4
        streams = Streams(
            topology.guest, topology.peer, "0.0.0.0", topology.host_v4, 8080, "busy:1"
        )
        try:
            streams.wait_flowing("busy", 1 << 20)
            streams.finish()
        finally:
            streams.close()
    finally:
        ferryd.terminate()
        assert ferryd.wait(timeout=10) == 0


def _start_with_launcher(
    topology: Topology, tmp: Path, prefix: Sequence[str], *args: str
) -> subprocess.Popen[bytes]:
    control = tmp / "ctl.sock"
    log = tmp / "ferryd.log"
    argv = [*prefix, str(FERRYD), "--netns", topology.guest.path, "--tap", TAP,
            "--control", str(control), *args]  # fmt: skip
    with log.open("wb") as out:
        proc = topology.host.popen(argv, stdout=out, stderr=subprocess.STDOUT)
    ready = subprocess.run(
        [str(FERRYCTL), "--control", str(control), "status",
         "--wait", "15"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if ready.returncode != 0:
        proc.kill()
        proc.wait()
        pytest.fail(f"ferryd not ready: {log.read_text()}", pytrace=False)
    return proc


def _run_briefly(
    topology: Topology, tmp: Path, *args: str, wrapper: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    argv = [*launcher(topology.guest), *wrapper, str(FERRYD), "--netns", topology.guest.path,
            "--tap", TAP, "--control", str(tmp / "ctl.sock"), *args]  # fmt: skip
    return topology.host.run(argv, check=False, timeout=30)


def test_config_net_is_refused_with_a_descriptor(topology: Topology, short_tmp: Path) -> None:
    persistent_tap(topology.guest)
    result = _run_briefly(topology, short_tmp, "--config-net")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--config-net" in result.stderr, result.stderr


def test_tap_of_another_group_is_refused(topology: Topology, short_tmp: Path) -> None:
    """tun_not_capable(): neither owner nor group is ours, and we hold no CAP_NET_ADMIN.

    ferryd starts as nobody with no capability (as under ferryd-netns@.service);
    started as root it would attach before dropping, as root may.
    """
    persistent_tap(topology.guest, group=RUNAS_GID + 1)
    result = _run_briefly(topology, short_tmp, wrapper=AS_NOBODY)
    assert result.returncode == 2, result.stderr
    assert "cannot attach to tap 'tap0'" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_migration_between_descriptor_ferryds(two_hosts: MigrationBed, short_tmp: Path) -> None:
    """Source and target each get their own descriptor; the target attaches a second queue."""
    bed = two_hosts
    persistent_tap(bed.guest)
    prefix = launcher(bed.guest)
    source = bed.start_ferryd(bed.host_a, prefix=prefix)
    assert dhcp(bed.guest, short_tmp) == bed.host_v4
    target = bed.start_ferryd(bed.host_b, incoming=True, prefix=prefix)
    streams = Streams(bed.peer, bed.guest, "0.0.0.0", bed.peer_v4, 9400, "busy:2")
    try:
        streams.wait_flowing("busy", 1 << 20)
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["tcp"] == 2
        before = streams.report()["busy"]
        streams.wait_more("busy", before, 4 << 20, "after the move")
        streams.finish()
    finally:
        streams.close()


def test_tap_setup_makes_a_tap_and_leaves_an_existing_one_alone() -> None:
    from ferryd.netns import run_in_netns
    from ferryd.tap_setup import ensure_tap

    with Netns("tapsetup") as guest:
        run_in_netns(guest.path, lambda: ensure_tap("tap0", RUNAS_GID, 9000))
        made = guest.run(["ip", "link", "show", "tap0"]).stdout
        assert "mtu 9000" in made and ",UP" in made
        tuntap = {
            line.split(":")[0]: line
            for line in guest.run(["ip", "tuntap", "show"]).stdout.splitlines()
        }
        assert f"persist group {RUNAS_GID}" in tuntap["tap0"]
        # Someone else's tap of that name, down at another MTU: not touched.
        guest.run(["ip", "tuntap", "add", "dev", "tap1", "mode", "tap"])
        run_in_netns(guest.path, lambda: ensure_tap("tap1", RUNAS_GID, 9000))
        other = guest.run(["ip", "link", "show", "tap1"]).stdout
        assert "mtu 1500" in other and ",UP" not in other
        tuntap = {
            line.split(":")[0]: line
            for line in guest.run(["ip", "tuntap", "show"]).stdout.splitlines()
        }
        assert "group" not in tuntap["tap1"]
