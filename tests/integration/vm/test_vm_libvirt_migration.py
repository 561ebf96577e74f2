"""``virsh migrate --live`` between two private libvirts, ferryd started by the hook on both.

The two-host bed (testbed/migrationbed.py): host A and host B carry the
same address, the peer sits on a fabric that moves from A to B once the
migration is over, one ferry-repair serves both. Each host runs its own
libvirtd (testbed/libvirt.py: its own /etc/libvirt, hooks and /run, a
distinct host UUID), with ferry's hook at its production paths: the
domain's socket is /run/ferry/vm1/vhost-user.sock on both, each in its own
private /run, and /run/ferry/repair.sock leads to the bed's ferry-repair,
so the hook passes ``--repair-socket``. The guest opens a busy connection
and idle ones to the peer's echo server (testbed/guest_traffic.py). Then
``virsh migrate --live`` (a managed direct migration driven from the
test, QEMU's stream over a Unix socket, since the two hosts share no
network): on B libvirt calls ``migrate begin`` and ``prepare begin`` (the
hook starts ferryd B with the same command line), QEMU B connects, QEMU's
migration carries ferryd A's device state into ferryd B; on A ``release
end migrated`` leaves ferryd A to linger. The fabric moves, the test
talks to the guest through B's command channel, and every connection
must carry on, byte for byte.
"""

from __future__ import annotations

import time
from pathlib import Path

from ferryd.control import request
from testbed.guest_image import GuestImage
from testbed.guest_traffic import echo_idle, finish, open_connections, size, wait_echoed
from testbed.libvirt import LibvirtDaemon, hook_wrapper, vhostuser_interface
from testbed.migrationbed import MigrationBed
from testbed.tcptool_process import Tool
from tests.integration.vm.conftest import StartLibvirt

IDLE = 3
SOCKET = Path("/run/ferry/vm1/vhost-user.sock")
BEFORE = AFTER = 128 << 10


def with_repair(daemon: LibvirtDaemon, bed: MigrationBed) -> LibvirtDaemon:
    """/run/ferry/repair.sock in *daemon*'s private /run, leading to the bed's helper."""
    ferry = daemon.dirs["run"] / "ferry"
    ferry.mkdir(mode=0o755, exist_ok=True)
    (ferry / "repair.sock").symlink_to(bed.repair_socket)
    return daemon


def test_virsh_migrate_live_carries_the_guests_connections(
    two_hosts: MigrationBed,
    echo: Tool,
    libvirt: StartLibvirt,
    guest_image: GuestImage,
    short_tmp: Path,
) -> None:
    bed = two_hosts
    hook = hook_wrapper(short_tmp / "etc-ferry")
    a = libvirt(hook, host=bed.host_a)
    b = libvirt(hook, host=bed.host_b)
    for daemon in (a, b):
        with_repair(daemon, bed)

    guest = a.create("vm1", guest_image, vhostuser_interface(SOCKET))
    guest.wait_ready()
    lease = guest.wait_lease()
    assert lease["ip"] == bed.host_v4
    open_connections(guest, bed.peer_v4, IDLE)
    echo_idle(guest, IDLE, "before")
    wait_echoed(guest, BEFORE, "the busy connection before the migration")

    incoming = a.migratable_xml("vm1", b)
    began = time.monotonic()
    result = a.virsh(
        "migrate", "--live", "--xml", str(incoming), "vm1", b.uri,
        "--migrateuri", f"unix://{b.guest_dir / 'migration.sock'}",
        check=False,
    )  # fmt: skip
    took = time.monotonic() - began
    assert result.returncode == 0, f"{result.stderr}\n{a.logs()}\n{b.logs()}"
    bed.switch_fabric()
    print(f"virsh migrate --live took {took:.1f} s")

    # B's hook started ferryd B, which took ferryd A's connections from QEMU.
    status_b = request(str(b.dirs["run"] / "ferry/vm1/control.sock"), "status")
    print("ferryd B:", status_b["role"], status_b["flows"], status_b["migration"])
    assert status_b["frontend"]["connected"] and status_b["flows"]["tcp"] == IDLE + 1
    # A's release end (migrated) left ferryd A to linger with its frozen sockets.
    pid_a = int((a.dirs["run"] / "ferry/vm1/ferryd.pid").read_text())
    assert Path(f"/proc/{pid_a}").exists()

    moved = b.attach("vm1")
    sent = size(moved, "/tmp/sent")
    echo_idle(moved, IDLE, "after")
    wait_echoed(moved, sent + AFTER, "the busy connection after the migration")
    total = finish(moved, IDLE)
    print(f"busy connection: {total} bytes each way, byte-exact")
    assert a.virsh("list", "--name").stdout.split() == []
