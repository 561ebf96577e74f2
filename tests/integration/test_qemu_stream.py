"""``ferryd --socket``: QEMU's stream netdev, with a real Linux stack as the guest.

No VM here (another suite boots one): the guest is a network namespace whose
tap is carried to ferryd's socket by testbed/stream_relay.py, which behaves
as QEMU's ``-netdev stream`` does (frames behind their lengths, reconnects)
and can be told to switch to another ferryd's socket or to send a hostile
length. The guest takes its address by DHCP (busybox udhcpc) from ferryd;
TCP traffic is checked byte for byte both ways by testbed/streamtool.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.ferryd_process import FerrydProcess, describe_status
from testbed.migrationbed import MigrationBed, migrate_killing_target
from testbed.netns import Netns
from testbed.paths import FERRYCTL, FERRYD
from testbed.qemu_stand_in import StreamRelay, dhcp, launch_stream_ferryd
from testbed.streams import Streams
from testbed.topology import Topology
from testbed.wait import wait_for

DNS = "10.77.0.53"


@pytest.fixture
def stream_ferryd(topology: Topology, short_tmp: Path) -> Iterator[tuple[FerrydProcess, str]]:
    """A ferryd --socket in the host namespace (stopped, and its exit checked, at the end)."""
    short_tmp.chmod(0o755)
    started: list[FerrydProcess] = []
    try:
        yield launch_stream_ferryd(topology.host, short_tmp, "vm", "-D", DNS, started=started)
    finally:
        for ferryd in started:
            status = ferryd.stop()
            print(f"--- ferryd log (exit {status}) ---\n{ferryd.log()}")
            assert status in ferryd.ok_exit, f"ferryd ended with {describe_status(status)}"


@pytest.fixture
def relay(topology: Topology, stream_ferryd: tuple[FerrydProcess, str]) -> Iterator[StreamRelay]:
    relay = StreamRelay(topology.guest, stream_ferryd[1])
    try:
        yield relay
    finally:
        relay.stop()


def _guest_up(topology: Topology, relay: StreamRelay, tmp: Path) -> dict[str, str]:
    relay.wait_connections(1)
    return dhcp(topology.guest, tmp)


def test_dhcp_ping_and_streams_both_ways(
    topology: Topology,
    stream_ferryd: tuple[FerrydProcess, str],
    relay: StreamRelay,
    short_tmp: Path,
) -> None:
    ferryd, path = stream_ferryd
    lease = _guest_up(topology, relay, short_tmp)
    assert (lease["ip"], lease["router"].split()[0]) == (topology.host_v4, topology.gateway_v4)
    assert (lease["mtu"], lease["dns"]) == ("65520", DNS)
    assert topology.guest.ping(topology.peers_v4[1])
    streams = Streams(topology.peer, topology.guest, "0.0.0.0", topology.peers_v4[1], 9000,
                      "busy:2", "idle:4")  # fmt: skip
    try:
        streams.wait_flowing("busy", 4 << 20)
        final = streams.finish()
        print("streams:", final["report"])
    finally:
        streams.close()
    status = ferryd.request("status")
    assert status["frontend"] == {
        "kind": "stream",
        "path": path,
        "connected": True,
        "peer_pid": relay.tool.proc.pid,
    }
    frontend = status["counters"]["frontend"]
    assert frontend["connections"] == 1 and frontend["framing_errors"] == 0
    assert frontend["frames_in"] == status["counters"]["frames_in"] > 0


def test_qemu_reconnects_and_a_second_qemu_is_refused(
    topology: Topology,
    stream_ferryd: tuple[FerrydProcess, str],
    relay: StreamRelay,
    short_tmp: Path,
) -> None:
    ferryd, path = stream_ferryd
    _guest_up(topology, relay, short_tmp)
    streams = Streams(topology.peer, topology.guest, "0.0.0.0", topology.peers_v4[1], 9000,
                      "busy:2")  # fmt: skip
    try:
        before = streams.wait_flowing("busy", 2 << 20)
        # A second QEMU while one is served: closed at once, the first one unharmed.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as second:
            second.settimeout(10)
            second.connect(path)
            assert second.recv(1) == b""
        relay.reconnect()  # QEMU went away and came back
        relay.wait_connections(2)
        streams.wait_more("busy", before, 2 << 20, "after QEMU reconnected")
        streams.finish()
    finally:
        streams.close()
    frontend = ferryd.request("status")["counters"]["frontend"]
    assert (frontend["connections"], frontend["refused"]) == (2, 1)
    assert "refused a second connection" in ferryd.log()


def test_a_hostile_length_costs_qemu_only_its_connection(
    topology: Topology,
    stream_ferryd: tuple[FerrydProcess, str],
    relay: StreamRelay,
    short_tmp: Path,
) -> None:
    ferryd, _ = stream_ferryd
    _guest_up(topology, relay, short_tmp)
    streams = Streams(topology.peer, topology.guest, "0.0.0.0", topology.peers_v4[1], 9000,
                      "busy:2")  # fmt: skip
    try:
        before = streams.wait_flowing("busy", 2 << 20)
        relay.hostile(0xFFFFFFFF)
        wait_for(lambda: relay.events("disconnected"), timeout=30, what="ferryd to hang up")
        relay.wait_connections(2)  # the relay reconnects by itself, as QEMU's reconnect-ms
        streams.wait_more("busy", before, 2 << 20, "after the hostile length")
        streams.finish()
    finally:
        streams.close()
    assert ferryd.proc.poll() is None
    status = ferryd.request("status")
    assert status["counters"]["frontend"]["framing_errors"] == 1
    assert "a frame length of 4294967295 bytes" in ferryd.log()


def _stream_pair(bed: MigrationBed) -> tuple[FerrydProcess, str, FerrydProcess, str]:
    """A source ferryd --socket in host A and an --incoming one in host B, with repair."""
    repair = ("--repair-socket", bed.repair_socket)
    source, source_path = launch_stream_ferryd(bed.host_a, bed.tmp, "a", *repair,
                                               started=bed.ferryds)  # fmt: skip
    target, target_path = launch_stream_ferryd(bed.host_b, bed.tmp, "b", "--incoming", *repair,
                                               started=bed.ferryds)  # fmt: skip
    return source, source_path, target, target_path


@pytest.mark.parametrize(
    "where",
    ["two_hosts", "one_host"],
)
def test_migration_between_two_stream_ferryds(request: pytest.FixtureRequest, where: str) -> None:
    """The relay moves from the source's socket to the target's; every byte arrives."""
    bed: MigrationBed = request.getfixturevalue(where)
    source, source_path, target, target_path = _stream_pair(bed)
    relay = StreamRelay(bed.guest, source_path)
    streams: Streams | None = None
    try:
        relay.wait_connections(1)
        lease = dhcp(bed.guest, bed.tmp)
        assert lease["ip"] == bed.host_v4
        streams = Streams(bed.peer, bed.guest, "0.0.0.0", bed.peer_v4, 9000, "busy:2", "idle:8")
        before = streams.wait_flowing("busy", 2 << 20)
        summary = bed.migrate_ok(source, target)
        relay.switch(target_path)  # the target's QEMU takes over
        assert summary["flows"]["tcp"] == 10
        assert [f.request("status")["role"] for f in (source, target)] == ["migrated", "running"]
        streams.wait_more("busy", before, 4 << 20, "after the migration")
        final = streams.finish()
        print("summary:", summary, "streams:", final["report"])
        assert target.request("status")["frontend"]["connected"] is True
    finally:
        if streams is not None:
            streams.close()
        relay.stop()


@pytest.mark.parametrize("precopy", [True, False], ids=["precopy", "no-precopy"])
def test_a_failed_migration_serves_the_same_qemu_again(
    two_hosts: MigrationBed, precopy: bool
) -> None:
    """Target killed mid-stream: the source rolls back and reads QEMU's connection again.

    Without pre-copy the source is frozen (its frontend handed over) when
    the target dies: the rollback takes the same connection back.
    """
    bed = two_hosts
    source, source_path, target, _ = _stream_pair(bed)
    relay = StreamRelay(bed.guest, source_path)
    streams: Streams | None = None
    try:
        relay.wait_connections(1)
        dhcp(bed.guest, bed.tmp)
        streams = Streams(bed.peer, bed.guest, "0.0.0.0", bed.peer_v4, 9000, "busy:4", "idle:300")
        streams.wait_flowing("busy", 2 << 20)
        extra = () if precopy else ("--no-precopy",)
        print("ferryctl:", migrate_killing_target(source, target, *extra))
        mark = streams.report()["busy"]
        streams.wait_more("busy", mark, 4 << 20, "on the source after the failure")
        streams.finish()
        status = relay.status()
        assert (status["connected"], status["connections"]) == (True, 1)  # never hung up
    finally:
        if streams is not None:
            streams.close()
        relay.stop()


# --- start-up, as one line --------------------------------------------------------


def _run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=30, check=False
    )


def test_socket_in_use_or_impossible_is_one_line(short_tmp: Path) -> None:
    path = short_tmp / "vm.qemu"
    control = short_tmp / "vm.ctl"
    with Netns("stream") as host:
        first = host.popen(
            [str(FERRYD), "--socket", str(path), "--control", str(control), "-a", "10.1.0.2/24",
             "-g", "10.1.0.1", "-4"],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            ready = _run(FERRYCTL, "--control", control, "status", "--wait", "15", "--json")
            assert ready.returncode == 0, ready.stderr
            assert json.loads(ready.stdout)["frontend"]["kind"] == "stream"
            busy = _run(FERRYD, "--socket", path, "-a", "10.1.0.2/24", "-g", "10.1.0.1", "-4")
        finally:
            first.terminate()
            first.wait(timeout=10)
    assert busy.returncode == 2
    assert busy.stderr.splitlines() == [
        f"ferryd: error: --socket {path}: another process (a live ferryd?) already listens there"
    ]
    (short_tmp / "file").write_text("")
    bad = short_tmp / "file" / "vm.qemu"
    result = _run(FERRYD, "--socket", bad, "-a", "10.1.0.2/24", "-g", "10.1.0.1", "-4")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"ferryd: error: --socket {bad}: {short_tmp / 'file'} is not a directory"
    ]


def test_modes_do_not_mix() -> None:
    result = _run(FERRYD, "--socket", "/nonexistent/x", "--netns", "guest")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "ferryd: error: argument --netns: not allowed with argument --socket"
    )
