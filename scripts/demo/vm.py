"""``make demo VM=1``: the guest is a QEMU VM on ``ferryd --vhost-user``, migrated by QEMU.

As the VM tests do (tests/integration/vm/test_vm_vhost_migration.py):
ferryd A runs in host A and ferryd B in host B with the same command line
(``--vhost-user --socket``); each QEMU runs next to its ferryd (the tests
run them in the root namespace: a vhost-user socket is a path), its RAM
in a shared memfd (ferryd maps it), under TCG unless the host has usable
VMX/SVM (testbed/vm.py). The guest (testbed/guest_image.py, built once
into .venv/cache/vm) takes its address by DHCP from ferryd A; its
``guest_conns`` (testbed/guest_conns.c) opens the connections to an echo
server on the peer, BUSY of them streaming both ways, each byte checked as
it comes back. The target QEMU
waits with ``-incoming``; QMP ``migrate`` moves the VM and, through the
vhost-user device state, ferryd A's connections to ferryd B; then the
fabric moves to host B, the source QEMU quits (ferryd A commits), a
connection from the peer through ferryd's forwarded port reaches the guest,
and guest_conns checks every connection to its close.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from scripts.demo.report import DemoFailed, Summary, progress, step
from testbed.guest_image import CACHE, GuestImage, build_guest_image, recipe_key
from testbed.guest_traffic import (
    ECHO_PORT,
    finish_conns,
    inbound,
    start_conns,
    wait_conns_ready,
)
from testbed.migrationbed import MigrationBed
from testbed.netns import Netns
from testbed.tcptool_process import server
from testbed.vm import Vm, qemu_unavailable, vhost_user_netdev
from testbed.wait import wait_for

__all__ = ["run"]

#: ferryd forwards this host port to the guest's GUEST_PORT (busybox nc listens there).
FORWARD_PORT, GUEST_PORT = 2222, 22
#: The busy connections' rate together, bytes/s: a TCG guest keeps up with it.
BUSY_RATE = 1_000_000
#: QEMU's limit for the final pass (its default, 300 ms, lets the last RAM pass dominate).
DOWNTIME_LIMIT_MS = 10
#: How long guest_conns' final check may take, in the guest.
CHECK_SECONDS = 60


def run(bed: MigrationBed, count: int, busy: int) -> Summary:
    """The demo on *bed* with a VM: *count* connections, *busy* of them streaming."""
    why = qemu_unavailable()
    if why is not None:
        raise DemoFailed(why)
    step("the guest: a Debian kernel and a busybox initramfs")
    cached = (CACHE / f"image-{recipe_key()}" / "manifest.json").exists()
    progress(f"{'cached in' if cached else 'building (downloads Debian packages) into'} {CACHE}")
    image = build_guest_image()
    progress(f"kernel {image.manifest['kernel_release']}")

    echo = server(bed.peer, "echo", bed.peer_v4, ECHO_PORT)
    vms: list[Vm] = []
    try:
        return _run(bed, image, vms, count, busy)
    finally:
        for vm in vms:
            vm.stop()
        echo.proc.kill()
        echo.proc.wait()


def _run(bed: MigrationBed, image: GuestImage, vms: list[Vm], count: int, busy: int) -> Summary:
    def start_vm(name: str, host: Netns, socket: Path, **kwargs: Any) -> Vm:
        netdev = vhost_user_netdev(socket)
        vm = Vm(image, bed.tmp, netdev, name=name, shared_memory=True, netns=host, **kwargs)
        vms.append(vm)
        return vm.start()

    forward = ("-t", f"{FORWARD_PORT}:{GUEST_PORT}")
    step("host A: ferryd --vhost-user, and QEMU on it")
    source_ferryd, source_socket = bed.start_vhost_user(bed.host_a, "a", *forward)
    progress(f"ferryd A ready (pid {source_ferryd.pid}), forwarding host port {FORWARD_PORT}")
    source = start_vm("source", bed.host_a, source_socket)
    assert source.proc is not None
    progress(f"QEMU in host A (pid {source.proc.pid}, {source.accel.upper()}): guest booting...")
    progress(f"guest up after {source.wait_ready():.1f} s")
    lease = source.wait_lease()
    progress(f"DHCP lease {lease.get('ip')}, router {lease.get('router')}")

    step(f"guest → peer: {count} TCP connections, every byte checked as it comes back")
    start_conns(source, bed.peer_v4, count, busy, BUSY_RATE, CHECK_SECONDS)
    wait_conns_ready(source, count, timeout=120 + count * 0.2)
    progress(
        f"{count} connections open, each echoed its first chunk;"
        f" {busy} streaming both ways at {BUSY_RATE / 1e6:g} MB/s in all"
    )

    step("host B: ferryd --vhost-user (the same command line), QEMU -incoming on it")
    target_ferryd, target_socket = bed.start_vhost_user(bed.host_b, "b", *forward)
    channel = bed.tmp / "migration.sock"
    target = start_vm("target", bed.host_b, target_socket, incoming=f"unix:{channel}")
    assert target.proc is not None
    progress(
        f"ferryd B ready (pid {target_ferryd.pid}); QEMU in host B (pid {target.proc.pid}) waits"
    )

    step("live migration through QMP, the streams still running")
    assert source.qmp is not None
    source.qmp.set_downtime_limit(DOWNTIME_LIMIT_MS)
    began = time.monotonic()
    source.qmp.migrate(f"unix:{channel}")
    progress(f"migrating (downtime limit {DOWNTIME_LIMIT_MS} ms)...")
    info = source.wait_migration(timeout=180)
    if info["status"] != "completed":
        raise DemoFailed(f"QEMU's migration {info['status']}: {info.get('error-desc')}")
    progress(
        f"completed in {(time.monotonic() - began) * 1000:.0f} ms;"
        f" QEMU downtime {info['downtime']} ms, total {info['total-time']} ms"
    )
    bed.switch_fabric()
    progress("fabric: the peer's link now goes to host B")
    wait_for(
        lambda: target.qmp is not None and target.qmp.query_status() == "running",
        what="the target VM to run",
    )
    wait_for(lambda: target_ferryd.role() == "running", what="ferryd B to resume")
    moved_out = int(source_ferryd.migration_counters()["last_connections"])
    moved_in = int(target_ferryd.migration_counters()["last_connections"])
    progress(f"ferryd A streamed out {moved_out} TCP connections, ferryd B restored {moved_in}")
    source.stop()  # the source QEMU quits: ferryd A commits
    wait_for(
        lambda: source_ferryd.migration_counters()["out_completed"] == 1,
        what="ferryd A to commit",
    )
    progress("the source QEMU quit; ferryd A committed")

    step(f"peer → host port {FORWARD_PORT} → guest port {GUEST_PORT}, through host B")
    inbound(bed.peer, target, bed.host_v4, FORWARD_PORT, GUEST_PORT)
    progress("the guest's listener got the peer's line")

    step("checking: every connection sends more, waits for its echo, closes both ways")
    result = finish_conns(target, timeout=CHECK_SECONDS + 60)
    progress(f"{result.ok} of {count} connections checked, {result.failed} failed")
    if result.failed or result.ok != count:
        raise DemoFailed(
            f"{result.failed} of {count} connections failed in the guest:\n"
            + "\n".join(result.errors[:10])
        )
    return Summary(
        guest=f"QEMU VM ({source.accel.upper()}), virtio-net on ferryd --vhost-user",
        opened=count,
        kinds=f"{busy} streaming both ways, {count - busy} echoing a chunk before and after",
        survived=result.ok,
        sent=result.sent,
        received=result.sent,  # everything sent came back, checked
        downtime=f"{info['downtime']} ms (QEMU: the guest paused)",
        migration=f"{info['total-time']} ms (QEMU)",
        moved_out=moved_out,
        moved_in=moved_in,
        forwarded=f"host {FORWARD_PORT} → guest {GUEST_PORT}: ok",
    )
