"""Issue 12, item 5: several migrations at once, through one ferry-repair per host.

A KubeVirt node runs up to four migrations in parallel, every VM's ferryd
handing its batches to the node's one (socket-activated) ferry-repair. Here
GUESTS guests, each with its own source ferryd in host A and target in host
B, migrate at the same moment; host A's ferryds share the bed's helper,
host B's a second one. Every connection of every guest must then carry its
bytes exactly (the checked streams of testbed/streams.py), and every
migration must have moved all of its guest's connections.

The guests' connections all go to one server on one port (each client its
own seeds): from one host namespace, connect() then gives the sources
distinct local ports, as distinct nodes or pods would have. (With a port per
guest, two sources may get the same local port toward different peers, and
one target's restore can then meet its sibling's socket in the instant
between repair OFF and SO_REUSEADDR: its bind is tried again,
restore.BIND_PATIENCE.)
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testbed.ferryd_process import RUNAS_UID, FerrydProcess
from testbed.migrationbed import MigrationBed
from testbed.netns import Netns
from testbed.repair import listening_helper
from testbed.streams import Streams, Tool
from testbed.streamtool import UNLIMITED

pytestmark = pytest.mark.integration

GUESTS = 4
BUSY = 2  # per guest, both ways at BUSY_RATE bytes/s
BUSY_RATE = 1_000_000
IDLE = 18  # per guest
PORT = 9600


@pytest.mark.slow  # 8 ferryds, 4 guests' streams: ~30 s, a minute on a busy 2-CPU machine
def test_parallel_migrations_each_byte_exact(two_hosts: MigrationBed, short_tmp: Path) -> None:
    """GUESTS migrations started together, one helper per host: each moves all its
    connections, and every byte of every guest's streams arrives, in order."""
    bed = two_hosts
    with contextlib.ExitStack() as stack:
        guests = [bed.guest, *(stack.enter_context(Netns("guest")) for _ in range(GUESTS - 1))]
        repair_b = short_tmp / "repair-b.sock"
        helper_b = stack.enter_context(listening_helper(repair_b, "--allow-uid", str(RUNAS_UID)))
        stack.callback(bed.stop_ferryds)  # before host B's helper and the extra guests go
        pairs: list[tuple[FerrydProcess, FerrydProcess]] = [
            (
                bed.start_ferryd(bed.host_a, config_net=True, guest=guest),
                bed.start_ferryd(
                    bed.host_b, "--repair-socket", str(repair_b), incoming=True, guest=guest
                ),
            )
            for guest in guests
        ]
        server = Tool(bed.peer, "server", "::", str(PORT))
        stack.callback(server.stop)
        server.wait_line(lambda line: "listening" in line, "listening")
        busy = f"busy:{BUSY}:{UNLIMITED}:{UNLIMITED}:{BUSY_RATE}"
        streams = []
        for i, guest in enumerate(guests):
            seeds = f"seeds:{i * (BUSY + IDLE)}"
            one = Streams(
                bed.peer, guest, "::", bed.peer_v4, PORT, seeds, busy, f"idle:{IDLE}", server=server
            )
            stack.callback(one.close)
            streams.append(one)
        for one in streams:
            one.wait_flowing("busy", 1 << 16)
        with ThreadPoolExecutor(GUESTS) as pool:  # every ferryctl migrate at once
            results = list(pool.map(lambda pair: bed.migrate(*pair), pairs))
        problems = [f"{r.returncode}: {r.stderr.strip()}" for r in results if r.returncode != 0]
        assert not problems, problems
        bed.switch_fabric()
        for result in results:
            summary = json.loads(result.stdout)
            assert summary["flows"]["tcp"] == summary["restored"]["tcp"] == BUSY + IDLE
        for one in streams:
            mark = one.report()["busy"]
            one.wait_more("busy", mark, 1 << 16, "after the move")
        for one in streams:
            final = one.finish()
            assert final["report"]["idle"]["received"] == IDLE * 1000
        assert bed.helper.count("refused") == 0 and helper_b.count("refused") == 0
