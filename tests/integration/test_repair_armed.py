"""ferry-repair's armed filter (repair_helper/armed.py) through a real helper process.

Real loopback TCP connections: arming takes a socket out of repair mode
with the filter on; FREEZE_ARMED stops the intake of exactly the sockets
this connection armed (nothing counted, nothing ACKed), DISARM lets the
peer's retransmission in; a count that does not match, another
connection's FREEZE_ARMED, or ARM after a freeze are refused; a connection
that goes away frozen leaves its sockets frozen, and repair OFF over a new
connection thaws them.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry_repair.protocol import RepairCommand
from ferryd.migration.repair_client import RepairClient, RepairError, RepairMode
from ferryd.migration.sockstate import segment_counts
from testbed.repair import HelperProcess, listening_helper
from tests.integration.test_repair_helper import (
    bound_udp_socket,
    dropped,
    expect_refusal,
    peer_unacked,
)
from tests.integration.test_repair_support import (
    TcpConnections,
    public_tmp_dir,
    recv_exactly,
    recv_reply_or_eof,
    repair_states,
    requires_root,
    send_batch,
    unix_client,
    wait_until,
)

pytestmark = [pytest.mark.integration, requires_root]

ON = RepairCommand.ON.to_byte()
ARM = RepairCommand.ARM.to_byte()
DISARM = RepairCommand.DISARM.to_byte()


def freeze(count: int) -> bytes:
    return RepairCommand.FREEZE_ARMED.to_byte() + count.to_bytes(4, "little")


@pytest.fixture
def socket_path() -> Iterator[Path]:
    with public_tmp_dir() as directory:
        yield directory / "ferry-repair.sock"


@pytest.fixture
def helper(socket_path: Path) -> Iterator[HelperProcess]:
    with listening_helper(socket_path) as proc:
        assert "armed filter: yes" in proc.wait_for_line("serving")
        yield proc


def arm(unix: socket.socket, conns: TcpConnections) -> None:
    """Repair ON, then ARM (as a pre-copy does): out of repair mode, armed."""
    fds = [s.fileno() for s in conns.clients]
    batches = [fds[i : i + 200] for i in range(0, len(fds), 200)]
    for batch in batches:
        send_batch(unix, ON, batch)
        send_batch(unix, ARM, batch)
    assert recv_exactly(unix, 2 * len(batches)) == (ON + ARM) * len(batches)
    assert not any(repair_states(conns.clients))


def command(unix: socket.socket, data: bytes) -> None:
    unix.sendall(data)
    assert recv_exactly(unix, 1) == data[:1]


def assert_frozen(conns: TcpConnections, payload: bytes) -> None:
    """The peers' ``payload`` reaches each socket and is dropped there, unacknowledged."""
    before = [segment_counts(s) for s in conns.clients]
    drops = [dropped(c) for c in conns.clients]
    for server in conns.servers:
        server.send(payload)
    assert wait_until(
        lambda: sum(1 for c, d in zip(conns.clients, drops, strict=True) if dropped(c) > d),
        len(conns.clients),
    ) == len(conns.clients)
    assert [segment_counts(s) for s in conns.clients] == before
    assert {peer_unacked(server) for server in conns.servers} == {len(payload)}


def assert_flowing(conns: TcpConnections, payload: bytes) -> None:
    """What each peer sent (now, or retransmitted) arrives whole."""
    for client in conns.clients:
        client.settimeout(10)
        assert recv_exactly(client, len(payload)) == payload


def test_freeze_armed_stops_intake_and_disarm_lets_it_in(
    helper: HelperProcess, socket_path: Path
) -> None:
    with TcpConnections(300) as conns, unix_client(socket_path) as unix:
        arm(unix, conns)
        for server in conns.servers:
            server.send(b"a" * 10)
        assert_flowing(conns, b"a" * 10)  # armed, not frozen: everything passes
        command(unix, freeze(300))
        assert_frozen(conns, b"x" * 1000)
        assert not any(repair_states(conns.clients))  # frozen, never in repair mode
        command(unix, DISARM)
        assert_flowing(conns, b"x" * 1000)


def test_freeze_of_a_count_the_helper_does_not_hold_is_refused(
    helper: HelperProcess, socket_path: Path
) -> None:
    with TcpConnections(3) as conns, unix_client(socket_path) as unix:
        arm(unix, conns)
        with expect_refusal(helper, socket_path, "FREEZE_ARMED of 4 sockets, but this connection"):
            unix.sendall(freeze(4))
            assert recv_reply_or_eof(unix) == b""
        # Dropped unfrozen: released.
        for server in conns.servers:
            server.send(b"y" * 100)
        assert_flowing(conns, b"y" * 100)


def test_one_connection_cannot_freeze_anothers_sockets(
    helper: HelperProcess, socket_path: Path
) -> None:
    with (
        TcpConnections(3) as conns,
        unix_client(socket_path) as owner,
        unix_client(socket_path) as other,
    ):
        arm(owner, conns)
        command(other, freeze(0))  # its own: none
        for server in conns.servers:
            server.send(b"z" * 100)
        assert_flowing(conns, b"z" * 100)
        command(other, DISARM)


def test_arm_after_freeze_is_refused(helper: HelperProcess, socket_path: Path) -> None:
    with TcpConnections(2) as conns, unix_client(socket_path) as unix:
        arm(unix, conns)
        command(unix, freeze(2))
        with expect_refusal(helper, socket_path, "ARM after FREEZE_ARMED"):
            send_batch(unix, ARM, [conns.clients[0].fileno()])
            assert recv_reply_or_eof(unix) == b""


def test_a_frozen_connection_that_goes_leaves_its_sockets_frozen(
    helper: HelperProcess, socket_path: Path
) -> None:
    with TcpConnections(2) as conns:
        with unix_client(socket_path) as unix:
            arm(unix, conns)
            command(unix, freeze(2))
        helper.wait_for_line("left 2 armed sockets frozen")
        assert_frozen(conns, b"f" * 500)
        # Repair OFF (a rollback over a new connection) takes the filter off.
        with unix_client(socket_path) as unix:
            send_batch(unix, RepairCommand.OFF.to_byte(), [s.fileno() for s in conns.clients])
            assert recv_exactly(unix, 1) == RepairCommand.OFF.to_byte()
        assert_flowing(conns, b"f" * 500)


async def test_ferryds_client_arms_freezes_and_disarms(
    helper: HelperProcess, socket_path: Path
) -> None:
    """RepairClient's side of it, as a migration source uses it; a count the helper
    does not hold is a RepairError (the source then freezes one by one)."""
    with TcpConnections(300) as conns:
        async with await RepairClient.connect(socket_path) as client:
            assert client.can_arm
            await client.set_repair(conns.clients, RepairMode.ON)
            await client.set_repair(conns.clients, RepairMode.ARM)
            assert not any(repair_states(conns.clients))
            with pytest.raises(RepairError, match="closed the connection instead of answering"):
                await client.freeze_armed(299)
            # That connection is gone, and what it armed with it: a new one holds none.
            with pytest.raises(RepairError, match="connection that armed them is gone"):
                await client.freeze_armed(300)
            await client.set_repair(conns.clients, RepairMode.ON)
            await client.set_repair(conns.clients, RepairMode.ARM)
            await client.freeze_armed(300)
            assert_frozen(conns, b"c" * 700)
            await client.disarm()
            assert_flowing(conns, b"c" * 700)


def test_sockets_armed_over_two_connections_are_released_by_each(
    helper: HelperProcess, socket_path: Path
) -> None:
    """The second DISARM finds the keys gone (the map's batch delete stops at the
    first missing key) and removes the rest one by one, still answering."""
    with (
        TcpConnections(3) as conns,
        unix_client(socket_path) as first,
        unix_client(socket_path) as second,
    ):
        arm(first, conns)
        arm(second, conns)
        command(first, DISARM)
        command(second, DISARM)
        command(second, freeze(0))  # nothing left armed there
        assert helper.count("cannot remove its armed keys") == 0
        for server in conns.servers:
            server.send(b"d" * 100)
        assert_flowing(conns, b"d" * 100)


def test_an_arm_refused_half_way_leaves_the_helper_serving(
    helper: HelperProcess, socket_path: Path
) -> None:
    """A UDP socket after two TCP ones: the kernel refuses TCP_REPAIR on it once the
    two are armed; the batch is refused, and the connection's keys go with it."""
    with (
        TcpConnections(2) as conns,
        bound_udp_socket() as udp,
        unix_client(socket_path) as unix,
    ):
        fds = [s.fileno() for s in conns.clients]
        send_batch(unix, ON, fds)
        assert recv_exactly(unix, 1) == ON
        reason = "descriptor 2 of the batch is not a TCP socket; descriptors 0..1 were switched"
        with expect_refusal(helper, socket_path, reason):
            send_batch(unix, ARM, [*fds, udp.fileno()])
            assert recv_reply_or_eof(unix) == b""
        assert not any(repair_states(conns.clients))
        for server in conns.servers:
            server.send(b"h" * 100)
        assert_flowing(conns, b"h" * 100)
