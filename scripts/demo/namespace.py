"""``make demo``: the guest is a network namespace with a tap that ferryd serves.

The guest configures itself the way a VM would: busybox udhcpc for IPv4
(DHCP from ferryd) and the kernel's SLAAC for IPv6 (ferryd's router
advertisements). Its connections are streamtool's (testbed/streams.py):
BUSY of them move data both ways at full speed for the whole run, the
others sit idle and exchange their bytes at the end; both ends check every
byte against a pattern, and what each end sent must be exactly what the
other received. The migration is ``ferryctl migrate`` from ferryd A to
ferryd B (started with ``--incoming``), the peer's link moving once it
succeeded. ferryd A forwards FORWARD_PORT to the guest; ferryd B gets that
listener in the migration stream, and a connection from the peer through
it is checked the same way.
"""

from __future__ import annotations

from pathlib import Path

from scripts.demo.report import DemoFailed, Summary, progress, step
from testbed.migrationbed import MigrationBed
from testbed.netns import Netns
from testbed.streams import Streams
from testbed.wait import wait_for

__all__ = ["run"]

PORT = 7000
#: ferryd A forwards this host port to the same port in the guest.
FORWARD_PORT = 8022
#: What each busy connection must move both ways before the migration, and again after it.
FLOWING = 1 << 20
RECORDER = """#!/bin/sh
[ "$1" = bound ] && ip addr add "$ip/$mask" dev "$interface" && ip route add default via "$router"
env > "{out}"
"""


def run(bed: MigrationBed, count: int, busy: int) -> Summary:
    """The demo on *bed*: *count* connections, *busy* of them streaming (see the module doc)."""
    step("ferryd in host A, serving tap0 in the guest namespace")
    source = bed.start_ferryd(bed.host_a, "-t", str(FORWARD_PORT))
    progress(f"ferryd A ready (pid {source.pid}), forwarding host port {FORWARD_PORT}")

    step("guest: DHCP with busybox udhcpc, SLAAC from ferryd's router advertisements")
    lease = _dhcp(bed.guest, bed.tmp)
    progress(f"DHCP lease {lease['ip']}/{lease['mask']}, router {lease['router']}")
    wait_for(
        lambda: "dynamic" in bed.guest.run(["ip", "-6", "addr", "show", "tap0"]).stdout,
        timeout=20,
        what="a SLAAC address in the guest",
    )
    progress("SLAAC address configured")
    for address in (bed.peer_v4, bed.peer_v6):
        if not bed.guest.ping(address, count=2):
            raise DemoFailed(f"the guest gets no ping reply from the peer's {address}")
        progress(f"ping {address}: ok")

    step(f"guest → peer: {count} TCP connections, every byte checked by both ends")
    streams = Streams(
        bed.peer, bed.guest, "0.0.0.0", bed.peer_v4, PORT, f"busy:{busy}", f"idle:{count - busy}"
    )
    try:
        progress(f"{count} connections open")
        before = streams.wait_flowing("busy", FLOWING, "before the migration")
        progress(f"data flowing: {_flowing(before)}")

        step("migration: ferryd B (--incoming) in host B, ferryctl migrate, the fabric moves")
        target = bed.start_target()
        progress(f"ferryd B ready (pid {target.pid}); migrating, the streams still running...")
        summary = bed.migrate_ok(source, target)
        progress(
            f"ferryd downtime {summary['downtime_ms']:.1f} ms (freeze to resume),"
            f" ferryctl migrate took {summary['ferryctl_ms']:.0f} ms"
        )
        progress("fabric: the peer's link now goes to host B")
        moved_out = int(source.migration_counters()["last_connections"])
        moved_in = int(target.migration_counters()["last_connections"])
        progress(f"ferryd A streamed out {moved_out} TCP connections, ferryd B restored {moved_in}")
        after = streams.wait_more("busy", streams.report()["busy"], FLOWING, "through host B")
        progress(f"data flowing through host B: {_flowing(after)}")

        step(f"peer → host port {FORWARD_PORT} → guest, through host B's forward")
        forwarded = Streams(bed.guest, bed.peer, "0.0.0.0", bed.host_v4, FORWARD_PORT, "idle:1")
        try:
            forwarded.finish()
        finally:
            forwarded.close()
        progress("a connection through the forwarded port reached the guest, checked")

        step("checking: every connection finishes its exchange, both ends check every byte")
        final = streams.finish()
    finally:
        streams.close()
    report = final["report"]
    sent = sum(kind["sent"] for kind in report.values())
    received = sum(kind["received"] for kind in report.values())
    progress(f"{count} of {count} connections checked")
    return Summary(
        guest="network namespace, tap0 (ferryd --tap)",
        opened=count,
        kinds=f"{busy} streaming both ways, {count - busy} idle",
        survived=count - int(final["bad_count"]),
        sent=sent,
        received=received,
        downtime=f"{summary['downtime_ms']:.1f} ms (ferryd: freeze to resume)",
        migration=f"{summary['ferryctl_ms']:.0f} ms (ferryctl migrate)",
        moved_out=moved_out,
        moved_in=moved_in,
        forwarded=f"host {FORWARD_PORT} → guest {FORWARD_PORT}: ok",
    )


def _dhcp(guest: Netns, tmp: Path) -> dict[str, str]:
    """busybox udhcpc in the guest, once; the lease it applied."""
    script, out = tmp / "udhcpc.sh", tmp / "lease"
    script.write_text(RECORDER.format(out=out))
    script.chmod(0o755)
    result = guest.run(
        ["busybox", "udhcpc", "-i", "tap0", "-f", "-q", "-n", "-s", str(script)],
        check=False,
        timeout=30,
    )
    if result.returncode != 0 or not out.exists():
        why = result.stderr.strip() or f"exit status {result.returncode}"
        raise DemoFailed(f"the guest's DHCP client (busybox udhcpc) got no lease: {why}")
    lines = out.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _flowing(entry: dict[str, int]) -> str:
    return (
        f"{entry['sent']:,} bytes guest → peer, {entry['received']:,} peer → guest"
        " on the busy connections"
    )
