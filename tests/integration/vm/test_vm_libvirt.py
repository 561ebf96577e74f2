"""A real libvirt starts a domain's ferryd through ferry's hook; ``virsh destroy`` stops it.

A private libvirtd (testbed/libvirt.py: libvirt 11.3's own daemon, with its
own /etc/libvirt and no systemd, so the hook starts ferryd itself) runs in
the host namespace with ferry-libvirt-hook installed as
``hooks/qemu.d/ferry``. The domain opts in the way the README's "libvirt"
section says: an ``<interface type='vhostuser'>`` whose source is
``RUNTIME/NAME/vhost-user.sock`` in mode client; its RAM is a shared memfd
(``<memoryBacking>``), it boots the test guest under TCG, QEMU running as
``libvirt-qemu`` as Debian's libvirt runs it. ``virsh create`` makes
libvirt call ``prepare begin``: the hook starts ferryd and returns once it
is ready; then ``start begin``: the hook gives ferryd's socket (mode 0600)
to QEMU's user, and QEMU connects; the guest takes its lease from ferryd by
DHCP and exchanges checked streams (SHA-256 both ways) with a peer. Then
``virsh destroy`` makes libvirt call ``release end``, and ferryd's process,
its pid file and its sockets are gone.

Two cheaper domains show the hook's two refusals to act: one without
ferry's socket starts and stops with no ferryd at all, and one that names
ferry's directory wrongly (QEMU as the server) does not start, with the
hook's reason in libvirt's error.
"""

from __future__ import annotations

import grp
import pwd
import time
from pathlib import Path

from ferryd.control import request
from ferryd.libvirt_hook import DomainPaths, is_ferryd_of
from testbed.guest_image import GuestImage
from testbed.libvirt import (
    QEMU_USER,
    LibvirtDaemon,
    LibvirtGuest,
    hook_wrapper,
    vhostuser_interface,
)
from testbed.tcptool import expected
from testbed.tcptool_process import server
from testbed.topology import Topology
from tests.integration.vm.conftest import StartLibvirt

SINK_PORT = 5001
SOURCE_PORT = 5002
#: Each way: enough for many segments and merged receive buffers, quick under TCG.
NBYTES = 1 << 20


def exchange(guest: LibvirtGuest, peer: str, seed: int) -> None:
    """NBYTES to the peer's sink and NBYTES from its source, each checked by SHA-256."""
    digest = guest.check(
        f"dd if=/dev/urandom of=/tmp/up bs=64k count={NBYTES >> 16} 2>/dev/null"
        " && sha256sum /tmp/up"
    ).split()[0]
    # The sink answers with the count and hash of what arrived, then closes.
    guest.check(f"nc {peer} {SINK_PORT} </tmp/up >/tmp/up.answer", timeout=120)
    assert guest.check("cat /tmp/up.answer").split()[:2] == [str(NBYTES), digest]
    # The request goes through a FIFO whose writer stays open: the peer closes first.
    guest.check(
        "mkfifo /tmp/request; sleep 600 >/tmp/request & echo $! >/tmp/holder;"
        f" echo '{NBYTES} {seed}' >/tmp/request & nc {peer} {SOURCE_PORT} </tmp/request"
        " >/tmp/down; kill $(cat /tmp/holder)",
        timeout=120,
    )
    down = guest.check("wc -c </tmp/down && sha256sum /tmp/down").split()[:2]
    assert down == [str(NBYTES), expected(NBYTES, seed)]


def daemon_with_hook(libvirt: StartLibvirt, short_tmp: Path) -> tuple[LibvirtDaemon, Path]:
    runtime = short_tmp / "ferry"
    return libvirt(hook_wrapper(short_tmp / "etc-ferry", runtime)), runtime


def ferryd_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def test_libvirt_starts_the_domains_ferryd_the_guest_gets_dhcp_and_a_peer_and_destroy_stops_it(
    topology: Topology, libvirt: StartLibvirt, guest_image: GuestImage, short_tmp: Path
) -> None:
    daemon, runtime = daemon_with_hook(libvirt, short_tmp)
    paths = DomainPaths("vm1", runtime, short_tmp / "etc-ferry")
    peer = topology.peers_v4[1]
    server(topology.peer, "sink", peer, SINK_PORT)
    server(topology.peer, "source", peer, SOURCE_PORT)

    began = time.monotonic()
    guest = daemon.create("vm1", guest_image, vhostuser_interface(paths.socket))
    # libvirt returned: the hook started ferryd, and QEMU is its client.
    pid = int(paths.pid_file.read_text())
    cmdline = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    assert is_ferryd_of(cmdline, paths)
    status = request(str(paths.control), "status")
    assert status["ready"] and status["frontend"]["kind"] == "vhost-user"
    assert status["frontend"]["connected"]
    qemu = pwd.getpwnam(QEMU_USER)
    owner = paths.socket.stat()
    group = grp.getgrnam(QEMU_USER).gr_gid  # qemu.conf: group = user
    assert (owner.st_uid, owner.st_gid) == (qemu.pw_uid, group)
    assert owner.st_mode & 0o777 & ~0o640 == 0  # ferryd's mode kept: only the owner connects

    guest.wait_ready()
    lease = guest.wait_lease()
    print(f"vm1 under libvirt: leased {time.monotonic() - began:.1f} s after virsh create")
    assert (lease["ip"], lease["mask"], lease["router"]) == (
        topology.host_v4,
        str(topology.prefix_v4),
        topology.gateway_v4,
    )
    exchange(guest, peer, seed=21)
    counters = request(str(paths.control), "status")["counters"]["frontend"]
    assert counters["connections"] == 1 and counters["protocol_errors"] == 0

    daemon.virsh("destroy", "vm1")
    # libvirt's release end ran the hook before destroy returned.
    assert not ferryd_alive(pid)
    for gone in (paths.pid_file, paths.socket, paths.control):
        assert not gone.exists(), gone
    assert daemon.virsh("list", "--all", "--name").stdout.split() == []


def test_libvirt_domains_that_are_not_ferrys_or_name_it_wrongly(
    libvirt: StartLibvirt, guest_image: GuestImage, short_tmp: Path
) -> None:
    daemon, runtime = daemon_with_hook(libvirt, short_tmp)
    # No ferry socket: the hook is called, starts nothing, the domain runs.
    daemon.create("plain", guest_image, "", resume=False)
    assert daemon.virsh("domstate", "plain").stdout.strip() == "paused"
    daemon.virsh("destroy", "plain")
    assert not runtime.exists()

    # QEMU as the server on ferry's socket: the start is refused, with the reason.
    wrong = vhostuser_interface(runtime / "bad" / "vhost-user.sock").replace(
        'mode="client"', 'mode="server"'
    )
    assert 'mode="server"' in wrong
    result = daemon.virsh(
        "create", str(daemon.write_domain("bad", guest_image, wrong)), check=False
    )
    assert result.returncode != 0
    assert "ferry: domain bad: the vhostuser interface's source must have mode='client'" in (
        result.stderr
    )
    assert daemon.virsh("list", "--all", "--name").stdout.split() == []
    assert not (runtime / "bad" / "ferryd.pid").exists()
