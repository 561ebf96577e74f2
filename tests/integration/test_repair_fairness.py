"""Issue 9, item 6: no client can stall ferry-repair for the others.

The helper is one thread serving every ferryd of the host. A client that
hands over a TCP socket with SO_LINGER on and unsent data toward a peer that
does not take it, then closes its own copy, leaves the helper holding the
last reference: before the fix, the helper's close() waited for the linger
time (tcp_close → sk_stream_wait_close) and nobody else was answered.

Everything here is real: loopback TCP connections whose peer stopped
reading (its receive window full, so the data stays unsent), real clients on
the helper's socket, real concurrent ferryd clients (RepairClient). Waits
are bounded (WAIT_SECONDS) but nothing asserts a duration: the lingering
socket lingers for twice that bound, so a helper stuck on it cannot answer
the other client within the bound.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from daemon.migration.repair_client import RepairClient, RepairMode
from repair_helper.protocol import SCM_MAX_FD
from tests.integration.test_repair_support import (
    WAIT_SECONDS,
    HelperProcess,
    TcpConnections,
    clear_repair,
    listening_helper,
    recv_exactly,
    recv_reply_or_eof,
    repair_states,
    requires_root,
    send_batch,
    unix_client,
)

pytestmark = [pytest.mark.integration, requires_root]

LINGER_SECONDS = int(2 * WAIT_SECONDS)


@pytest.fixture
def helper_path(tmp_path: Path) -> Iterator[tuple[HelperProcess, Path]]:
    path = tmp_path / "ferry-repair.sock"
    with listening_helper(path) as helper:
        yield helper, path


def stuck_lingering_socket(conns: TcpConnections) -> socket.socket:
    """A connection with unsent data its peer will not take, and SO_LINGER {1, 60 s}."""
    sock = conns.clients[0]
    sock.setblocking(False)
    chunk = b"x" * 65536
    try:
        while True:  # the peer never reads: its window and our buffer fill up
            sock.send(chunk)
    except BlockingIOError:
        pass
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, LINGER_SECONDS))
    return sock


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(b"\x00", id="repair-off"),  # carried out, then closed
        pytest.param(b"\x05", id="refused"),  # refused by the parser, then closed
    ],
)
def test_lingering_socket_does_not_stall_others(
    helper_path: tuple[HelperProcess, Path], command: bytes
) -> None:
    helper, path = helper_path
    with TcpConnections(1) as stuck, TcpConnections(5) as others:
        sock = stuck_lingering_socket(stuck)
        with unix_client(path) as hostile:
            send_batch(hostile, command, [sock.fileno()])
            sock.close()  # the helper now holds the last reference
            assert recv_reply_or_eof(hostile) == (command if command == b"\x00" else b"")
        with unix_client(path) as good:
            send_batch(good, b"\x01", [s.fileno() for s in others.clients])
            assert recv_exactly(good, 1) == b"\x01"  # times out after WAIT_SECONDS if stuck
            assert all(repair_states(others.clients))
            clear_repair(others.clients)
    assert helper.proc.poll() is None


def test_lingering_sockets_left_unread_do_not_stall_others(
    helper_path: tuple[HelperProcess, Path],
) -> None:
    """A refused batch with a lingering socket queued behind it: the helper drops the
    connection with that message unread, and the kernel releases its descriptor then."""
    helper, path = helper_path
    with TcpConnections(1) as stuck, TcpConnections(5) as others:
        sock = stuck_lingering_socket(stuck)
        with unix_client(path) as hostile:
            # An unknown command (refused) with a descriptor, so that the helper's
            # read stops there (af_unix ends a read after a message with
            # descriptors), and the lingering socket waits unread behind it.
            send_batch(hostile, b"\x05", [others.clients[0].fileno()])
            send_batch(hostile, b"\x00", [sock.fileno()])
            sock.close()
            assert recv_reply_or_eof(hostile) == b""
        with unix_client(path) as good:
            send_batch(good, b"\x01", [s.fileno() for s in others.clients])
            assert recv_exactly(good, 1) == b"\x01"
            clear_repair(others.clients)
    assert helper.proc.poll() is None


async def _migrate_like_ferryd(
    path: Path, socks: list[socket.socket], latencies: list[float]
) -> None:
    async with await RepairClient.connect(path) as client:
        for mode in (RepairMode.ON, RepairMode.OFF, RepairMode.ON, RepairMode.OFF):
            t0 = time.monotonic()
            await client.set_repair(socks, mode)  # its batches pipelined, as ferryd does
            latencies.append(time.monotonic() - t0)
            assert repair_states(socks) == [mode == RepairMode.ON] * len(socks)


async def test_four_ferryds_at_once(helper_path: tuple[HelperProcess, Path]) -> None:
    """A KubeVirt node runs up to four migrations at once, each through the one helper."""
    helper, path = helper_path
    per_client = 4 * SCM_MAX_FD
    with TcpConnections(4 * per_client) as conns:
        latencies: list[list[float]] = [[] for _ in range(4)]
        async with trio.open_nursery() as nursery:
            for i in range(4):
                socks = conns.clients[i * per_client : (i + 1) * per_client]
                nursery.start_soon(_migrate_like_ferryd, path, socks, latencies[i])
        assert [len(lat) for lat in latencies] == [4] * 4
        # For the report, not asserted: each client's slowest pass over its 4 batches.
        print("slowest pass of 4 batches per client (ms):", [max(lat) * 1e3 for lat in latencies])
    assert helper.count("refused") == 0


@pytest.mark.parametrize("hostile_kind", ["silent", "flood-never-reads"])
def test_hostile_client_does_not_delay_others(
    helper_path: tuple[HelperProcess, Path], hostile_kind: str
) -> None:
    """A client that says nothing, or pipelines batches without ever reading a reply
    (its socket fills, the helper stops reading it), holds no one else up."""
    helper, path = helper_path
    with TcpConnections(1) as target, TcpConnections(SCM_MAX_FD) as others:
        with unix_client(path) as hostile:
            hostile.setblocking(False)
            sent = 0
            if hostile_kind == "flood-never-reads":
                fd = target.clients[0].fileno()
                try:
                    while True:  # until the helper stops reading us: backpressure
                        send_batch(hostile, b"\x01", [fd])
                        sent += 1
                except BlockingIOError:
                    pass
                assert sent > 0
            with unix_client(path) as good:
                for command in (b"\x01", b"\x00"):
                    send_batch(good, command, [s.fileno() for s in others.clients])
                    assert recv_exactly(good, 1) == command
            assert helper.proc.poll() is None
        clear_repair(target.clients)
