"""A real VM on ``ferry-passt`` started with the argv libvirt 11.3 gives passt for a
``<interface type='vhostuser'><backend type='passt'/>`` with shared memory.

``ferry-passt --vhost-user --one-off --socket S --pid P --log-file L`` runs in
the host namespace as libvirt runs passt (waited for, output captured):
it returns 0 once ferryd serves, leaving the pid file behind. QEMU then
connects the way libvirt configures it for passt (a vhost-user chardev on
S with a 5 s reconnect, a shared memfd); the guest takes the host's
address by DHCP from ferryd and streams 4 MiB each way to a peer, checked
by SHA-256. When QEMU quits, ``--one-off`` ends ferryd, which removes its
pid file and sockets.
"""

from __future__ import annotations

import time
from pathlib import Path

from testbed.tcptool_process import server
from testbed.topology import Topology
from testbed.vm import vhost_user_netdev
from tests.integration.test_passt_compat import daemons, start, state_dir, wait_gone
from tests.integration.vm.conftest import StartVm
from tests.integration.vm.test_vm_vhost_user import SINK_PORT, SOURCE_PORT, _lease, _streams

__all__ = ["daemons", "state_dir"]  # the fixtures, used by name

#: libvirt's reconnect for passt's vhost-user chardev (qemuPasstPrepareVhostUser: 5 s).
LIBVIRT_RECONNECT_MS = 5000


def test_libvirt_argv_dhcp_bytes_both_ways_and_one_off(
    topology: Topology, state_dir: Path, start_vm: StartVm, daemons: list[int]
) -> None:
    sock = state_dir / "1-vm1-net0.socket"
    pid_file, log = state_dir / "1-vm1-net0-passt.pid", state_dir / "passt.log"
    started, _ = start(
        topology, "--vhost-user", "--one-off", "--socket", str(sock), "--pid", str(pid_file),
        "--log-file", str(log),
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    pid = int(pid_file.read_text())
    daemons.append(pid)

    peer = topology.peers_v4[1]
    server(topology.peer, "sink", peer, SINK_PORT)
    server(topology.peer, "source", peer, SOURCE_PORT)
    began = time.monotonic()
    vm = start_vm(vhost_user_netdev(sock, reconnect_ms=LIBVIRT_RECONNECT_MS), shared_memory=True)
    _lease(vm, topology, began)
    up, down = _streams(vm, peer, seed=21)
    print(f"4 MiB up in {up:.2f} s, down in {down:.2f} s")

    vm.stop()  # QMP quit: QEMU closes the vhost-user connection
    wait_gone(pid)
    assert sorted(p.name for p in state_dir.iterdir()) == ["passt.log"]
    text = log.read_text()
    assert "QEMU connected" in text and "exiting (--one-off)" in text, text
