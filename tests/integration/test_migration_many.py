"""Many connections at once: thousands of idle and BUSY_CONNECTIONS busy ones move together.

Each connection is one socket in the guest, one in each ferryd and one in
the peer; the open-file limit here is 20,000 per process (REFERENCE.md), so
5,000 is well inside it. Marked slow: opening them through ferryd and
closing them again takes most of the time.
"""

from __future__ import annotations

import pytest

from testbed.migrationbed import MigrationBed
from testbed.streams import Streams

#: Connections streaming both ways at full speed throughout.
BUSY_CONNECTIONS = 20


@pytest.mark.slow
@pytest.mark.parametrize(
    "idle_connections",
    [1000, 5000],
)
def test_many_idle_and_busy_connections(two_hosts: MigrationBed, idle_connections: int) -> None:
    """IDLE idle connections (each sends and receives 1,000 bytes after the move) and
    BUSY_CONNECTIONS busy ones move together."""
    IDLE_CONNECTIONS = idle_connections
    bed = two_hosts
    source = bed.start_source("--max-flows", str(IDLE_CONNECTIONS + BUSY_CONNECTIONS + 100))
    target = bed.start_target("--max-flows", str(IDLE_CONNECTIONS + BUSY_CONNECTIONS + 100))
    streams = Streams(
        bed.peer,
        bed.guest,
        "::",
        bed.peer_v4,
        9700,
        f"busy:{BUSY_CONNECTIONS}",
        f"idle:{IDLE_CONNECTIONS}",
    )
    try:
        streams.wait_flowing("busy", 1 << 20)
        summary = bed.migrate_ok(source, target)
        print("summary:", summary)
        assert summary["flows"]["tcp"] == IDLE_CONNECTIONS + BUSY_CONNECTIONS
        assert summary["restored"]["tcp"] == IDLE_CONNECTIONS + BUSY_CONNECTIONS
        mark = streams.report()["busy"]
        streams.wait_more("busy", mark, 1 << 20, "after the move")
        final = streams.finish(timeout=120 if IDLE_CONNECTIONS > 1000 else 300)
        assert final["report"]["idle"]["received"] == IDLE_CONNECTIONS * 1000
    finally:
        streams.close()
