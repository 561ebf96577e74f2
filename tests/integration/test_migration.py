"""Live migration through real ferryds: connections survive ``ferryctl migrate``.

The two-host bed (conftest ``two_hosts``; testbed/topology.py draws the fabric):
the source ferryd runs in host A, the target (``--incoming``) in host B,
both serving the one guest namespace's tap, both toggling TCP_REPAIR
through one ferry-repair in the root namespace. The guest is configured
by the source (``--config-net``); the target reconfigures nothing. Right
after ``ferryctl migrate`` succeeds the peer's link moves from A to B, as a
real fabric would; A's frozen sockets never answer again.

Traffic is real Linux TCP and UDP on both ends (tests/integration/
streamtool.py): every byte each way is checked against a seeded pattern,
and each end's count against the other's, so a lost, repeated or
misdelivered byte anywhere fails the test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Callable

import pytest

from ferryd.control import ControlRequestFailed
from ferryd.migration import migration_pb2 as pb
from testbed.ferryd_process import FerrydProcess
from testbed.migrationbed import MigrationBed, migrate_killing_target
from testbed.netns import Netns
from testbed.streams import Streams, UdpExchange, UdpFlood
from testbed.wait import wait_for

#: Idle connections in the many-connections test (each is two sockets in the
#: guest and peer, one in each ferryd: the fd limit here is 20,000 per process).
IDLE_CONNECTIONS = 5000
BUSY_CONNECTIONS = 20


def _roles(*ferryds: FerrydProcess) -> list[str]:
    return [str(f.request("status")["role"]) for f in ferryds]


def test_busy_streams_both_ways(two_hosts: MigrationBed) -> None:
    """Four full-speed bidirectional streams (IPv4 and IPv6) move, byte-exact."""
    bed = two_hosts
    source = bed.start_source()
    target = bed.start_target()
    v4 = Streams(bed.peer, bed.guest, "0.0.0.0", bed.peer_v4, 9000, "busy:2")
    v6 = Streams(bed.peer, bed.guest, "::", bed.peer_v6, 9001, "busy:2")
    try:
        before = v4.wait_flowing("busy", 1 << 20), v6.wait_flowing("busy", 1 << 20)
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["tcp"] == 4
        assert _roles(source, target) == ["migrated", "running"]
        after_v4 = v4.wait_more("busy", before[0], 8 << 20, "after")
        after_v6 = v6.wait_more("busy", before[1], 8 << 20, "after")
        print("summary:", summary, "v4:", after_v4, "v6:", after_v6)
        v4.finish()
        v6.finish()
    finally:
        v4.close()
        v6.close()


def test_udp_exchange_continues(two_hosts: MigrationBed) -> None:
    bed = two_hosts
    source = bed.start_source()
    target = bed.start_target()
    udp = UdpExchange(bed.peer, bed.guest, bed.peer_v4, bed.peer_v4, 9100)
    try:
        first = udp.sent()
        while udp.sent() < first + 100:
            pass
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["udp"] >= 1
        at_switch = udp.sent()
        while udp.sent() < at_switch + 1000:
            pass
        final = udp.finish()
        print("summary:", summary, "udp:", final)
    finally:
        udp.close()


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.flaky(reruns=2)  # one connection stalls in ~1 run of 30: README, known issues
def test_half_closed_both_ways(two_hosts: MigrationBed, family: str) -> None:
    """Guest shut its write side (FIN_WAIT2) / the peer did (CLOSE_WAIT); data goes on after."""
    bed = two_hosts
    source = bed.start_source()
    target = bed.start_target()
    peer = bed.peer_v4 if family == "v4" else bed.peer_v6
    rate = 8_000_000  # bytes/s: 64 MB takes 8 s, so the migration falls in the middle
    streams = Streams(
        bed.peer,
        bed.guest,
        "::",
        peer,
        9200,
        f"guestfirst:2:100000:{64 << 20}:{rate}",
        f"peerfirst:2:{64 << 20}:100000:{rate}",
    )
    try:
        streams.wait_flowing("guestfirst", 4 << 20, way="received")
        streams.wait_flowing("peerfirst", 4 << 20, way="sent")
        before = streams.report()
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["tcp"] == 4
        after = streams.wait_flowing(
            "guestfirst", before["guestfirst"]["min_received"] + (4 << 20), way="received"
        )
        streams.wait_flowing("peerfirst", before["peerfirst"]["min_sent"] + (4 << 20), way="sent")
        print("summary:", summary, "before:", before, "after:", after)
        final = streams.finish(timeout=30)
        assert final["report"]["guestfirst"]["received"] == 2 * (64 << 20)
        assert final["report"]["peerfirst"]["sent"] == 2 * (64 << 20)
    finally:
        streams.close()


#: What a migration target does with a connection's port before it connects
#: (sockstate.new_socket_for): a socket with SO_REUSEADDR bound to it.
_BIND_NEXT_TO = """
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((addr, port))
except OSError as exc:
    sys.exit(str(exc))
"""


def _host_ends(ferryd: FerrydProcess) -> list[tuple[str, int]]:
    flows = ferryd.request("flows")["flows"]
    return [(str(f["host_addr"]), int(f["host_port"])) for f in flows if f["proto"] == "tcp"]


def _twin_binds(host: Netns, ends: list[tuple[str, int]]) -> bool:
    return all(
        host.run([sys.executable, "-c", _BIND_NEXT_TO, addr, str(port)], check=False).returncode
        == 0
        for addr, port in ends
    )


def test_ports_take_a_restored_twin_before_and_after_a_move(two_hosts: MigrationBed) -> None:
    """Each connection's local port takes a migration's restored socket next to it.

    Several ferryds in one namespace (VMs over vhost-user, started by
    libvirt) share its ports: connect() gives one local port to connections
    towards different peers, and a migration arriving binds each of its
    connections' ports before connecting it. A ferry socket holding the
    port without SO_REUSEADDR made that bind fail (EADDRINUSE), and the
    whole migration roll back: new connections have it from the start, and
    restored ones get it back after repair OFF, which clears it.
    """
    bed = two_hosts
    source = bed.start_source()
    target = bed.start_target()
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9450, "busy:1", "idle:3")
    try:
        streams.wait_flowing("busy", 1 << 20)
        ends = _host_ends(source)
        assert len(ends) == 4
        assert _twin_binds(bed.host_a, ends)
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["tcp"] == 4
        moved = _host_ends(target)
        assert sorted(moved) == sorted(ends)
        # (Given back just after the resume, in the background.)
        wait_for(lambda: _twin_binds(bed.host_b, moved), what="restored ports shared again")
        mark = streams.report()["busy"]
        streams.wait_more("busy", mark, 4 << 20, "after the move")
        streams.finish()
    finally:
        streams.close()


def test_inbound_connection_and_listener_move(two_hosts: MigrationBed) -> None:
    """A -t connection keeps going; afterwards host B's listener reaches the guest."""
    bed = two_hosts
    source = bed.start_source("-t", "8080", "-t", "8081")
    target = bed.start_target()
    inbound = Streams(bed.guest, bed.peer, "0.0.0.0", bed.host_v4, 8080, "busy:2")
    later: Streams | None = None
    try:
        inbound.wait_flowing("busy", 1 << 20)
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["listeners"] >= 2
        assert summary["flows"]["tcp"] == 2
        before = inbound.report()["busy"]
        inbound.wait_more("busy", before, 4 << 20, "after the move")
        # A new connection, through the listener that moved to host B.
        later = Streams(bed.guest, bed.peer, "0.0.0.0", bed.host_v4, 8081, "busy:1", "idle:3")
        later.wait_flowing("busy", 1 << 20, "on a new inbound connection")
        assert target.request("status")["flows"]["tcp"] >= 6
        later.finish()
        inbound.finish()
    finally:
        inbound.close()
        if later is not None:
            later.close()


# Known issue (README): two moves back to back stall one connection in about
# one run of eight. It predates the hardening; a test must fail three times
# running to fail.
KNOWN_FLAKY = pytest.mark.flaky(reruns=2)


def test_one_host_namespace(one_host: MigrationBed) -> None:
    """Source and target in one namespace: the sockets themselves go to the target
    (ferryd.migration.handover); a busy peer never meets a moment without one."""
    bed = one_host
    source = bed.start_source()
    target = bed.start_target()
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9300, "busy:2", "idle:50")
    udp = UdpExchange(bed.peer, bed.guest, bed.peer_v6, bed.peer_v6, 9301)
    try:
        streams.wait_flowing("busy", 1 << 20)
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["tcp"] == 52
        before = streams.report()["busy"]
        streams.wait_more("busy", before, 4 << 20, "after the move")
        print("summary:", summary)
        streams.finish()
        udp.finish()
    finally:
        streams.close()
        udp.close()


def test_one_host_needs_no_repair_helper(one_host: MigrationBed) -> None:
    """Nothing is frozen or repaired in one namespace: with ferry-repair gone the move
    still succeeds (a rollback needs none either: the unit tests check it makes no
    helper call)."""
    bed = one_host
    source = bed.start_source()
    target = bed.start_target()
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9380, "busy:2", "idle:4")
    try:
        streams.wait_flowing("busy", 1 << 20)
        bed.helper.stop()
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["tcp"] == 6
        before = streams.report()["busy"]
        streams.wait_more("busy", before, 4 << 20, "after the move")
        streams.finish()
    finally:
        streams.close()


def test_one_host_hands_a_forwarded_ports_listener_over(one_host: MigrationBed) -> None:
    """In one namespace the forward's listening socket goes to the target with the
    connections through it: they carry on, and a new one reaches the guest there."""
    bed = one_host
    source = bed.start_source("-t", "9370,9371")
    target = bed.start_target("-t", "9370,9371")
    inbound = Streams(bed.guest, bed.peer, "0.0.0.0", bed.host_v4, 9370, "busy:2")
    later: Streams | None = None
    try:
        inbound.wait_flowing("busy", 1 << 20)
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["listeners"] == 2 and summary["restored"]["listeners"] == 2
        before = inbound.report()["busy"]
        inbound.wait_more("busy", before, 4 << 20, "after the move")
        source.stop()  # its linger over: the target's reference keeps the port listening
        later = Streams(bed.guest, bed.peer, "0.0.0.0", bed.host_v4, 9371, "busy:1")
        later.wait_flowing("busy", 1 << 20, "on a new connection to the target's port")
        later.finish()
        inbound.finish()
    finally:
        inbound.close()
        if later is not None:
            later.close()


def test_one_host_loses_no_datagram(one_host: MigrationBed) -> None:
    """In one namespace the datagram sockets go to the target too: a forwarded UDP
    port's listener and an outbound flow's socket, flooded one datagram every 2 ms
    through the move, lose none. (Closed on the source and bound again on the
    target, what arrived from the freeze until the target's bind was lost.)"""
    bed = one_host
    source = bed.start_source("-u", "9380")
    target = bed.start_target("-u", "9380")
    inbound = UdpFlood(bed.peer, bed.guest, bed.host_v4, 9380, inbound=True)
    outbound = UdpFlood(bed.peer, bed.guest, bed.peer_v6, 9381, inbound=False)
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9382, "idle:20")
    try:
        for flood in (inbound, outbound):
            flood.wait_more(50, "before the move")
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["udp"] >= 2 and summary["restored"]["listeners"] == 1
        for flood in (inbound, outbound):
            flood.wait_more(50, "after the move")
        results = [inbound.finish(), outbound.finish()]
        print("summary:", summary, "datagrams:", results)
        for result in results:
            # None lost between the first and the last, and the last one sent came.
            # (The count starts with the first that arrived: one before the guest's
            # link was up would not be the migration's.)
            assert result["missing"] == 0 and result["last"] == result["sent"] - 1, result
        streams.finish()
    finally:
        inbound.close()
        outbound.close()
        streams.close()


@pytest.mark.parametrize("where", ["one_host", "two_hosts"])
def test_a_target_stopped_before_the_resume_lets_go_silently(
    request: pytest.FixtureRequest, where: str
) -> None:
    """SIGTERM between restore and resume: the target discards what it restored, as a
    migrate-abort would, without resetting anything (in one namespace the sockets are
    the source's too); the source rolls back and every stream goes on byte-exact."""
    bed: MigrationBed = request.getfixturevalue(where)
    source = bed.start_source()
    target = bed.start_target()
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9350, "busy:2", "idle:4")
    try:
        streams.wait_flowing("busy", 1 << 20)
        one_host = where == "one_host"
        if one_host:
            near, far = socket.socketpair()
            rfd, wfd = near.detach(), far.detach()
        else:
            rfd, wfd = os.pipe()
        try:
            target.request("migrate-in", fds=[rfd])
        finally:
            os.close(rfd)
        try:
            source.request("migrate-out", fds=[wfd], same_netns=one_host, timeout=60)
        finally:
            os.close(wfd)
        assert target.request("migrate-wait", timeout=60)["restored"]["tcp"] == 6
        assert target.stop() == 0
        source.request("migrate-abort", timeout=60)
        assert source.role() == "running"
        before = streams.report()["busy"]
        streams.wait_more("busy", before, 4 << 20, "on the source after the target stopped")
        streams.finish()
    finally:
        streams.close()


@KNOWN_FLAKY
def test_there_and_back(two_hosts: MigrationBed) -> None:
    """A→B, then a new --incoming ferryd in A and B→A; the streams never notice."""
    bed = two_hosts
    first = bed.start_source()
    second = bed.start_target()
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v6, 9400, "busy:2", "idle:20")
    try:
        streams.wait_flowing("busy", 1 << 20)
        bed.migrate_ok(first, second)
        mark = streams.report()["busy"]
        streams.wait_more("busy", mark, 4 << 20, "on host B")
        # The old source lingers with frozen twins of every socket in A: it
        # must be gone before A's new ferryd restores the same 4-tuples there.
        assert first.stop() in first.ok_exit
        bed.standby_a()
        third = bed.start_target(host=bed.host_a)
        summary = bed.migrate_ok(second, third)
        assert summary["flows"]["tcp"] == 22
        mark = streams.report()["busy"]
        streams.wait_more("busy", mark, 4 << 20, "back on host A")
        assert third.request("status")["role"] == "running"
        streams.finish()
    finally:
        streams.close()


# ---------------------------------------------------------------------------
# failures: the source keeps running with every connection intact


def _source_survives(source: FerrydProcess, target: FerrydProcess, streams: Streams) -> None:
    assert source.request("status")["role"] == "running"
    mark = streams.report()["busy"]
    streams.wait_more("busy", mark, 4 << 20, "on the source after the failure")
    streams.finish()


def test_target_killed_mid_stream(two_hosts: MigrationBed) -> None:
    bed = two_hosts
    source = bed.start_source()
    target = bed.start_target()
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9500, "busy:8", "idle:500")
    try:
        streams.wait_flowing("busy", 4 << 20)
        print("ferryctl:", migrate_killing_target(source, target))
        _source_survives(source, target, streams)
    finally:
        streams.close()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _newer_version(stream: bytes) -> bytes:
    """The stream with its header claiming version 99, readable only by readers ≥ 99."""
    assert stream[0] == 0x0A, "the stream does not start with a header"
    length, pos = _read_varint(stream, 1)
    header = pb.Header.FromString(stream[pos : pos + length])
    header.version = 99
    header.min_compatible_version = 99
    body = header.SerializeToString()
    return b"\x0a" + _varint(len(body)) + body + stream[pos + length :]


def _flip_middle(stream: bytes) -> bytes:
    middle = len(stream) // 2
    return stream[:middle] + bytes([stream[middle] ^ 0xFF]) + stream[middle + 1 :]


def _migrate_through(
    source: FerrydProcess, target: FerrydProcess, mangle: Callable[[bytes], bytes]
) -> str:
    """Drive the protocol by hand with the stream passing through *mangle*; the wait's error."""
    from_source, to_proxy = os.pipe()
    from_proxy, to_target = os.pipe()
    target.request("migrate-in", fds=[from_proxy])
    os.close(from_proxy)
    chunks: list[bytes] = []

    def proxy() -> None:
        with os.fdopen(from_source, "rb") as reader:
            chunks.append(reader.read())
        # A target that refuses the header stops reading: the rest meets EPIPE.
        with contextlib.suppress(BrokenPipeError), os.fdopen(to_target, "wb") as writer:
            writer.write(mangle(chunks[0]))

    thread = threading.Thread(target=proxy)
    thread.start()
    try:
        answer = source.request("migrate-out", fds=[to_proxy], same_netns=False, timeout=60)
    finally:
        os.close(to_proxy)
        thread.join(60)
    assert answer["stream_bytes"] == len(chunks[0])
    with pytest.raises(ControlRequestFailed) as failed:
        target.request("migrate-wait", timeout=60)
    source.request("migrate-abort", timeout=60)
    return failed.value.error


@pytest.mark.parametrize(
    ("mangle", "expected"),
    [(_flip_middle, ""), (_newer_version, "version")],
    ids=["corrupt", "version-too-new"],
)
def test_target_refuses_stream(
    two_hosts: MigrationBed, mangle: Callable[[bytes], bytes], expected: str
) -> None:
    bed = two_hosts
    source = bed.start_source()
    target = bed.start_target()
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9600, "busy:4", "idle:100")
    try:
        streams.wait_flowing("busy", 4 << 20)
        error = _migrate_through(source, target, mangle)
        print("target refused:", error)
        assert expected in error
        _source_survives(source, target, streams)
        # The target went back to waiting for a stream.
        wait_for(
            lambda: target.request("status")["role"] == "incoming",
            timeout=10,
            what="the target to reset to incoming",
        )
    finally:
        streams.close()
