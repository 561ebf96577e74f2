"""Pre-copy: quiet connections are dumped while the guest runs; the freeze confirms them.

The migration is driven step by step over the two daemons' control
sockets (what ``ferryctl migrate`` does in one go, daemon/coordinator.py), so
that the guest can act between the pre-copy and the freeze: some
pre-copied connections then carry data (the source must dump them again
and the target replace them), some close (the target must drop them), and
the rest stay quiet (the source must confirm them without a dump). Every
connection that is left must then echo checked bytes through the target.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ferryd.control import request
from ferryd.netns import run_in_netns
from testbed.ferryd_process import FerrydProcess
from testbed.migrationbed import PRECOPY_NOW, MigrationBed, start_precopy
from testbed.streams import Streams
from testbed.tcptool_process import server, spawn
from testbed.wait import wait_for

COUNT = 300
POKED = 50
CLOSED = 50


def _wait_established(ferryd: FerrydProcess, count: int, guest_port: int | None = None) -> None:
    """Until ``count`` TCP flows (to ``guest_port``, if given) are established in ``ferryd``.

    With ``--precopy-quiet 0`` (PRECOPY_NOW) that is what makes an idle
    connection one a pre-copy takes: no sleep for a quiet time.
    """

    def established() -> bool:
        flows: list[dict[str, Any]] = request(ferryd.control, "flows")["flows"]
        ready = [
            f
            for f in flows
            if f["proto"] == "tcp"
            and f["state"] == "established"
            and guest_port in (None, f["guest_port"])
        ]
        return len(ready) >= count

    wait_for(established, what=f"{count} established connections")


def test_precopy_replaced_gone_and_unchanged(two_hosts: MigrationBed) -> None:
    bed = two_hosts
    source = bed.start_source(*PRECOPY_NOW)
    target = bed.start_target()
    echo = server(bed.peer, "echo", "0.0.0.0", 9400)
    conns = spawn(bed.guest, "echoconns", bed.peer_v4, 9400, COUNT)
    try:
        assert conns.out.json(what="connected") == {"connected": COUNT}
        _wait_established(source, COUNT)
        pre = start_precopy(source, target)
        assert pre["precopied"] == COUNT
        assert request(source.control, "status")["role"] == "precopied"

        # The guest goes on: POKED connections carry data, CLOSED ones end.
        conns.tell(f"poke 0 {POKED}")
        assert conns.out.json(what="poked") == {"poked": POKED, "bad": []}
        conns.tell(f"close {COUNT - CLOSED} {COUNT}")
        assert conns.out.json(what="closed") == {"closed": CLOSED}
        wait_for(
            lambda: len(request(source.control, "flows")["flows"]) <= COUNT - CLOSED,
            what="the closed connections to leave the flow table",
        )

        request(target.control, "migrate-wait-precopy", timeout=30)
        out = request(source.control, "migrate-out", timeout=30)
        restored = request(target.control, "migrate-wait", timeout=30)["restored"]
        request(source.control, "migrate-commit")
        request(target.control, "migrate-resume", timeout=30)
        bed.switch_fabric()
        print("source:", out, "target:", restored)

        kept = COUNT - CLOSED
        assert out["flows"]["tcp"] == kept
        assert out["flows"]["unchanged"] == kept - POKED
        assert restored["tcp"] == kept
        assert restored["replaced"] == POKED
        assert len(request(target.control, "flows")["flows"]) == kept

        conns.tell("check")
        assert conns.out.json(timeout=60, what="check") == {"ok": True, "checked": kept, "bad": []}
        assert conns.finish() == 0
    finally:
        for tool in (conns, echo):
            if tool.proc.poll() is None:
                tool.proc.kill()
            tool.proc.wait(timeout=10)


def _tcp_out_segments(ns_run: Callable[..., Any]) -> int:
    """Tcp OutSegs of a namespace (/proc/net/snmp): every segment its kernel sent."""
    lines = [line.split() for line in ns_run(["cat", "/proc/net/snmp"]).stdout.splitlines()]
    tcp = [line for line in lines if line[0] == "Tcp:"]
    return int(tcp[1][tcp[0].index("OutSegs")])


def test_abort_after_precopy_closes_silently(two_hosts: MigrationBed) -> None:
    """Aborted after the pre-copy: the target's restored sockets (out of repair mode by
    then) go back into it and close without a segment; the source goes on."""
    bed = two_hosts
    source = bed.start_source(*PRECOPY_NOW)
    target = bed.start_target()
    echo = server(bed.peer, "echo", "0.0.0.0", 9401)
    conns = spawn(bed.guest, "echoconns", bed.peer_v4, 9401, 100)
    try:
        assert conns.out.json(what="connected") == {"connected": 100}
        _wait_established(source, 100)
        assert start_precopy(source, target)["precopied"] == 100
        request(target.control, "migrate-wait-precopy", timeout=30)
        assert len(request(target.control, "flows")["flows"]) == 100
        sent_before = _tcp_out_segments(bed.host_b.run)
        request(target.control, "migrate-abort", timeout=30)
        request(source.control, "migrate-abort")
        assert request(target.control, "status")["role"] == "incoming"
        assert request(source.control, "status")["role"] == "running"
        assert request(target.control, "flows")["flows"] == []
        assert _tcp_out_segments(bed.host_b.run) == sent_before  # no FIN, no RST
        established = bed.host_b.run(["ss", "-Htn", "state", "established"]).stdout
        assert established.strip() == ""
        conns.tell("check")
        assert conns.out.json(timeout=60, what="check") == {"ok": True, "checked": 100, "bad": []}
        assert "stranded" not in target.log()
    finally:
        for tool in (conns, echo):
            if tool.proc.poll() is None:
                tool.proc.kill()
            tool.proc.wait(timeout=10)


def test_precopied_inbound_connections_and_their_listener(two_hosts: MigrationBed) -> None:
    """Quiet connections accepted on a -t port are pre-copied: on the target they leave
    repair mode early, which clears their address reuse (SK_NO_REUSE). The port's
    listener, restored at the freeze after every connection, must still bind next to
    them, and the connections go on through the target."""
    bed = two_hosts
    source = bed.start_source("-t", "8080", *PRECOPY_NOW)
    target = bed.start_target()
    inbound = Streams(bed.guest, bed.peer, "0.0.0.0", bed.host_v4, 8080, "busy:1", "idle:10")
    try:
        inbound.wait_flowing("busy", 1 << 20)
        _wait_established(source, 11, guest_port=8080)  # the idle ones, and the busy one
        summary = bed.migrate_ok(source, target)
        print("summary:", summary)
        assert summary["flows"]["listeners"] >= 1
        assert summary["flows"]["unchanged"] >= 10  # pre-copied, confirmed at the freeze
        before = inbound.report()["busy"]
        inbound.wait_more("busy", before, 4 << 20, "after the move")
        inbound.finish()
    finally:
        inbound.close()


def test_a_paused_upload_is_left_for_the_freeze(two_hosts: MigrationBed) -> None:
    """A connection ferryd has nothing to do for may still hold bytes in its kernel queues.

    The guest uploads 48 KiB to a peer that does not read and offers a few
    KiB of window: ferryd takes it all (its host socket has room), ACKs it,
    and the bytes wait in the socket's send queue, most of them unsent. From
    the data path's side the connection is at rest, so a pre-copy with no
    quiet time considers it; but the target keeps a pre-copied connection
    that stood unchanged as it was restored, without sending its unsent tail
    (restore.py), so such a connection must be left for the freeze. Every
    byte, and 1 MiB more, then reaches the peer through the target in order.
    """
    bed = two_hosts
    source = bed.start_source(*PRECOPY_NOW)
    target = bed.start_target()
    first = 48 << 10
    payload = random.Random(7).randbytes(first + (1 << 20))

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accept()
        sock.bind(("0.0.0.0", 9481))
        sock.listen()
        return sock

    listener = run_in_netns(bed.peer.path, listen)
    client = run_in_netns(
        bed.guest.path, lambda: socket.create_connection((bed.peer_v4, 9481), timeout=10)
    )
    with listener, client:
        server, _ = listener.accept()
        with server:
            client.sendall(payload[:first])
            _wait_established(source, 1)
            wait_for(_upload_stalled(source, first), what="ferryd to take the upload")

            pre = start_precopy(source, target)
            assert pre["precopied"] == 0, "a connection with queued bytes was pre-copied"
            request(target.control, "migrate-wait-precopy", timeout=30)
            out = request(source.control, "migrate-out", timeout=30)
            request(target.control, "migrate-wait", timeout=30)
            request(source.control, "migrate-commit")
            request(target.control, "migrate-resume", timeout=30)
            bed.switch_fabric()
            assert out["flows"]["tcp"] == 1
            assert out["flows"]["unchanged"] == 0

            rest = threading.Thread(target=client.sendall, args=(payload[first:],), daemon=True)
            rest.start()
            server.settimeout(60)
            received = bytearray()
            while len(received) < len(payload):
                part = server.recv(1 << 20)
                assert part, f"end of stream after {len(received)} of {len(payload)} bytes"
                received += part
            rest.join(60)
            assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()


def _upload_stalled(ferryd: FerrydProcess, total: int) -> Callable[[], bool]:
    """A check: the one TCP flow took ``total`` bytes from the guest, and nothing moved in
    the last 200 ms (so nothing is in flight to the guest either)."""
    seen: list[tuple[int, int]] = []

    def stalled() -> bool:
        time.sleep(0.2)
        [flow] = request(ferryd.control, "flows")["flows"]
        seen.append((flow["bytes_from_guest"], flow["bytes_to_guest"]))
        return len(seen) >= 2 and seen[-1] == seen[-2] and seen[-1][0] == total

    return stalled
