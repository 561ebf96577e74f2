"""Bounded queues at the freeze: a pre-copy caps busy connections' kernel queues.

From a pre-copy's start the source caps each host socket's receive and send
buffers (ferryd.migration.source.QUEUE_BOUND), so what a busy connection
holds when the freeze comes is bounded; a rollback gives the sockets back to
the kernel's autotuning, and the target's sockets are never capped. Seen
from outside: ``ss -tmi`` in the hosts' namespaces (skmem rb/tb: sk_rcvbuf,
sk_sndbuf; Recv-Q/Send-Q) and in the guest's (snd_wnd: the window ferryd
advertises to the guest), with a connection streaming both ways at full
speed throughout, checked byte for byte at the end.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ferryd.control import request
from ferryd.migration.source import QUEUE_BOUND
from testbed.ferryd_process import FerrydProcess, describe_status, launch
from testbed.migrationbed import PRECOPY_NOW, MigrationBed, start_precopy
from testbed.netns import Netns
from testbed.paths import FERRYD
from testbed.streams import Streams
from testbed.topology import Topology
from testbed.vhost_user_driver import VhostUserQemu
from testbed.wait import wait_for

PORT = 9470


@dataclass
class SockView:
    recv_q: int
    send_q: int
    rcvbuf: int
    sndbuf: int
    snd_wnd: int
    moved: int
    """bytes_received + bytes_sent: tells the busy connection from the idle ones."""


def _sockets(ns: Netns, port: int) -> list[SockView]:
    """Every established TCP socket in ``ns`` towards ``port``, as ``ss -tmi`` shows it."""
    out = ns.run(["ss", "-Htmni", "state", "established", f"dport = :{port}"]).stdout
    views = []
    # Each socket: a line with the queues and addresses, then a line of details.
    for head, detail in re.findall(r"^(\d+\s+\d+\s+\S+\s+\S+.*)\n\s+(skmem.*)$", out, re.M):
        recv_q, send_q = (int(x) for x in head.split()[:2])
        rb = re.search(r"\brb(\d+)", detail)
        tb = re.search(r"\btb(\d+)", detail)
        wnd = re.search(r"\bsnd_wnd:(\d+)", detail)
        assert rb and tb, f"ss output not understood: {detail}"
        snd_wnd = int(wnd[1]) if wnd else 0  # (ss leaves a zero window out)
        moved = sum(int(m) for m in re.findall(r"\bbytes_(?:received|sent):(\d+)", detail))
        views.append(SockView(recv_q, send_q, int(rb[1]), int(tb[1]), snd_wnd, moved))
    return views


def _one(ns: Netns, port: int) -> SockView:
    """The busy connection: the one that moved the most (the idle ones moved nothing)."""
    views = _sockets(ns, port)
    assert len(views) == 6, f"expected 6 connections to port {port} in {ns}: {views}"
    return max(views, key=lambda v: v.moved)


def test_precopy_bounds_queues_rollback_and_target_restore(two_hosts: MigrationBed) -> None:
    bed = two_hosts
    source = bed.start_source(*PRECOPY_NOW)
    target = bed.start_target()
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, PORT, "busy:1", "idle:5")
    try:
        streams.wait_flowing("busy", 4 << 20)
        # Autotuning grew the busy socket's buffers beyond the cap: else this
        # test could not tell a cap from the defaults.
        wait_for(
            lambda: _one(bed.host_a, PORT).rcvbuf > QUEUE_BOUND,
            what="the busy socket's receive buffer to grow past the cap",
        )

        pre = start_precopy(source, target, timeout=60)
        assert pre["precopied"] >= 5  # the idle ones
        capped = _one(bed.host_a, PORT)
        assert capped.rcvbuf <= QUEUE_BOUND and capped.sndbuf <= QUEUE_BOUND, capped

        # The queues drain to the cap while the guest runs, and the window
        # ferryd offers the guest (3/4 of the free send space) follows.
        def drained() -> bool:
            host, guest = _one(bed.host_a, PORT), _one(bed.guest, PORT)
            return (
                host.recv_q <= QUEUE_BOUND
                and host.send_q <= QUEUE_BOUND
                and guest.snd_wnd <= QUEUE_BOUND
            )

        before = streams.report()["busy"]
        streams.wait_more("busy", before, 4 << 20, "capped")
        wait_for(drained, what="the busy connection's queues and window within the cap")

        # Rolled back: autotuning again, the buffers grow past the cap.
        request(target.control, "migrate-abort", timeout=30)
        request(source.control, "migrate-abort", timeout=30)
        assert request(source.control, "status")["role"] == "running"
        wait_for(
            lambda: _one(bed.host_a, PORT).rcvbuf > QUEUE_BOUND,
            what="the receive buffer to grow past the cap after the rollback",
        )

        # The move itself: the target's sockets are the kernel's usual ones.
        assert request(target.control, "status")["role"] == "incoming"
        summary = bed.migrate_ok(source, target)
        assert summary["flows"]["tcp"] == 6, summary
        before = streams.report()["busy"]
        streams.wait_more("busy", before, 4 << 20, "after the move")
        wait_for(
            lambda: _one(bed.host_b, PORT).rcvbuf > QUEUE_BOUND,
            what="the target's receive buffer to grow past the cap",
        )
        streams.finish()  # byte for byte, both ways, every connection
    finally:
        streams.close()


CAP = 64 * 1024


def test_max_queue_bounds_what_a_plain_migration_carries(two_hosts: MigrationBed) -> None:
    """--max-queue caps every socket always, on the source and on the target, so a
    migration without a pre-copy (QEMU's kind) carries little of a busy connection."""
    bed = two_hosts
    source = bed.start_source("--max-queue", str(CAP))
    target = bed.start_target("--max-queue", str(CAP))
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, PORT, "busy:1", "idle:5")
    try:
        streams.wait_flowing("busy", 4 << 20)
        capped = _one(bed.host_a, PORT)
        assert capped.rcvbuf <= CAP and capped.sndbuf <= CAP, capped
        wait_for(
            lambda: (v := _one(bed.host_a, PORT)).recv_q <= CAP and v.send_q <= CAP,
            what="the busy connection's queues within the cap",
        )
        assert _one(bed.guest, PORT).snd_wnd <= CAP

        summary = bed.migrate_ok(source, target, "--no-precopy")
        print("summary:", summary)
        assert summary["flows"]["tcp"] == 6, summary
        # Both queues of the busy connection and six records: tens of kilobytes,
        # where autotuning's buffers held megabytes (the test above).
        assert summary["stream_bytes"] <= 8 * CAP, summary

        before = streams.report()["busy"]
        streams.wait_more("busy", before, 4 << 20, "after the move")
        moved = _one(bed.host_b, PORT)
        assert moved.rcvbuf <= CAP and moved.sndbuf <= CAP, moved
        streams.finish()  # byte for byte, both ways, every connection
    finally:
        streams.close()


def _accepted(ns: Netns, port: int) -> SockView | None:
    """The one established socket in ``ns`` on local ``port`` (ferryd's accepted one)."""
    out = ns.run(["ss", "-Htmni", "state", "established", f"sport = :{port}"]).stdout
    found = re.findall(r"skmem:\(r\d+,rb(\d+),t\d+,tb(\d+)", out)
    if len(found) != 1:
        return None
    return SockView(0, 0, int(found[0][0]), int(found[0][1]), 0, 0)


def test_qemus_log_all_caps_the_queues(topology: Topology, short_tmp: Path) -> None:
    """vhost-user has no pre-copy of ferryd's own: QEMU turning LOG_ALL on (its RAM
    pre-copy starts) is the sign, and ferryd caps its sockets' buffers then."""
    socket_path, control = short_tmp / "vhost.sock", str(short_tmp / "ferryd.ctl")
    argv = [
        str(FERRYD), "--vhost-user", "--socket", str(socket_path), "--control", control,
        "-t", str(PORT),
    ]  # fmt: skip
    started: list[FerrydProcess] = []
    peer: subprocess.Popen[bytes] | None = None
    try:
        launch(topology.host, argv, control, short_tmp / "ferryd.log", started)
        with VhostUserQemu(socket_path) as qemu:
            qemu.start()
            # A peer's connection to the forwarded port: ferryd's accepted socket
            # is a flow (its SYN to the guest goes unanswered: no matter here).
            connect = (
                "import socket, sys, time;"
                f"s = socket.create_connection(({topology.host_v4!r}, {PORT}));"
                "print('connected', flush=True); time.sleep(120)"
            )
            peer = topology.peer.popen([sys.executable, "-c", connect], stdout=subprocess.PIPE)
            before = wait_for(lambda: _accepted(topology.host, PORT), what="ferryd's socket")
            assert before.sndbuf > QUEUE_BOUND, before  # else the cap could not be told
            log = qemu.start_dirty_log()
            log.close()
            capped = wait_for(
                lambda: (
                    (v := _accepted(topology.host, PORT))
                    and v.sndbuf <= QUEUE_BOUND
                    and v.rcvbuf <= QUEUE_BOUND
                    and v
                ),
                what="ferryd's socket capped after LOG_ALL",
            )
            print("before:", before, "capped:", capped)
    finally:
        if peer is not None:
            peer.kill()
            peer.wait()
        for ferryd in started:
            status = ferryd.stop()
            print(f"--- ferryd log (exit {describe_status(status)}) ---\n{ferryd.log()}")
