"""A real libvirt runs ``ferry-passt`` for ``<backend type='passt'/>``, found as ``passt``
first on its PATH; the guest gets DHCP from ferryd and reaches a peer; destroy ends it.

The private libvirtd of testbed/libvirt.py (no ferry hook here) has a
directory holding ``passt``, a link to ``ferry-passt``, first on its PATH,
as the README's "libvirt's passt backend" tells operators to set it up.
The domain has ``<interface type='vhostuser'><backend type='passt'/>`` and a
shared memfd; libvirt 11.3 runs ``passt --vhost-user --one-off --socket S
--pid P`` as QEMU's user (libvirt-qemu), waits for it to exit 0 and reads
the pid file, then QEMU connects to S. The guest takes its lease from
ferryd and exchanges checked streams with a peer (SHA-256 both ways). On
``virsh destroy`` QEMU goes, and ``--one-off`` ends ferryd (libvirt 11.3
does not stop a vhostuser interface's passt itself): the process and its
pid file are gone.
"""

from __future__ import annotations

import time
from pathlib import Path

from testbed.guest_image import GuestImage
from testbed.libvirt import passt_directory, passt_vhostuser_interface
from testbed.tcptool_process import server
from testbed.topology import Topology
from testbed.wait import wait_for
from tests.integration.vm.conftest import StartLibvirt
from tests.integration.vm.test_vm_libvirt import SINK_PORT, SOURCE_PORT, exchange, ferryd_alive


def test_libvirts_passt_backend_runs_ferryd_dhcp_a_peer_and_destroy_ends_it(
    topology: Topology, libvirt: StartLibvirt, guest_image: GuestImage, short_tmp: Path
) -> None:
    daemon = libvirt(None, path_first=passt_directory(short_tmp / "passt-bin"))
    peer = topology.peers_v4[1]
    server(topology.peer, "sink", peer, SINK_PORT)
    server(topology.peer, "source", peer, SOURCE_PORT)

    began = time.monotonic()
    guest = daemon.create("vm1", guest_image, passt_vhostuser_interface())
    # libvirt's passt state: the socket and the pid file it read.
    state = daemon.dirs["run"] / "libvirt" / "qemu" / "passt"
    (pid_file,) = state.glob("*-vm1-net0-passt.pid")
    pid = int(pid_file.read_text())
    cmdline = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    # ferry-passt runs ferryd as ``python3 -m ferryd.main``, or the script.
    assert any(Path(word).name.startswith("ferryd") for word in cmdline[:3]), cmdline
    assert "--vhost-user" in cmdline and "--one-off" in cmdline

    guest.wait_ready()
    lease = guest.wait_lease()
    print(
        f"vm1 under libvirt's passt backend: leased {time.monotonic() - began:.1f} s after create"
    )
    assert (lease["ip"], lease["mask"], lease["router"]) == (
        topology.host_v4,
        str(topology.prefix_v4),
        topology.gateway_v4,
    )
    exchange(guest, peer, seed=31)

    daemon.virsh("destroy", "vm1")
    wait_for(lambda: not ferryd_alive(pid), 15, what="ferryd to end with QEMU (--one-off)")
    wait_for(lambda: not pid_file.exists(), 15, what="ferryd's pid file to go")
