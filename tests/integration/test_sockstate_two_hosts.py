"""sockstate in the real topology: connections move between two hosts with the same address.

Host A and host B both carry 10.88.0.1/24 and fd00:88::1/64 with the same
MAC (testbed/topology.py: two_host_topology). Connections run from sockets in A to
a server in the peer namespace. A's sockets are frozen and dumped while the
peer keeps sending and reading; B restores them in repair mode; the fabric
moves from A to B (A's link is deleted, so A's frozen sockets can never
answer); repair goes off in B and the connections continue. Every byte of
every stream, both ways, is checked (tests/integration/test_sockstate_support.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from ferryd.migration.kernel_state import TcpState
from testbed.topology import TwoHostTopology, two_host_topology
from testbed.wait import wait_for
from tests.integration.test_sockstate_support import (
    ENDLESS,
    Conn,
    Direction,
    Timing,
    Traffic,
    close_all,
    connect_pairs,
    extend_and_close,
    fill_queues,
    freeze_and_dump,
    make_conns,
    raise_fd_limit,
    requires_root,
    restore_all,
    tcp_state,
)

pytestmark = [pytest.mark.integration, requires_root]


@pytest.fixture
def hosts() -> Iterator[TwoHostTopology]:
    raise_fd_limit()
    with two_host_topology() as topo:
        yield topo


def _pairs(topo: TwoHostTopology, count: int) -> list[tuple[socket.socket, socket.socket]]:
    """``count`` connections from host A to the peer, half over IPv4, half over IPv6."""
    half = count // 2
    a, peer = topo.host_a.path, topo.peer.path
    return connect_pairs(a, peer, topo.peers_v4[0], half) + connect_pairs(
        a, peer, topo.peers_v6[0], count - half
    )


def test_busy_connections_move_between_hosts(hosts: TwoHostTopology) -> None:
    """100 connections with MBs in their queues move from A to B while the peer keeps going."""
    pairs = _pairs(hosts, 100)
    sources = [local for local, _ in pairs]
    conns = make_conns(pairs, ENDLESS)
    restored: list[socket.socket] = []
    try:
        with Traffic(conns) as traffic:
            traffic.wait(
                lambda: all(c.up.received > 100_000 and c.down.received > 100_000 for c in conns),
                "traffic to flow both ways on every connection",
            )
            fill_queues(traffic, conns, 256 << 10)
            # ferryd stops touching its sockets; the peer goes on writing, and reads
            # again as soon as the sockets are frozen.
            traffic.set(local_paused=True)

            def peer_goes_on() -> None:
                extend_and_close(conns, 256 << 10)
                traffic.read_remote = True

            timing = Timing()
            states = freeze_and_dump(
                sources, timing, after_freeze=lambda: traffic.call(peer_goes_on)
            )
            in_queues = sum(len(s.send_queue) + len(s.recv_queue) for s in states)
            restored = restore_all(
                states, timing, netns=hosts.host_b.path, before_repair_off=hosts.switch_to_b
            )
            print(timing.report(f"two hosts, busy, {in_queues / 1e6:.1f} MB in queues"))
            assert in_queues > 4 << 20
            traffic.adopt(list(zip(restored, states, strict=True)))
            traffic.set(read_local=True)
            traffic.wait(lambda: all(c.done for c in conns), "every stream to complete")
    finally:
        close_all(sources + restored + [remote for _, remote in pairs])


def test_idle_connections_move_between_hosts(hosts: TwoHostTopology) -> None:
    """1,000 idle connections move from A to B, then carry data both ways."""
    pairs = _pairs(hosts, 1000)
    sources = [local for local, _ in pairs]
    restored: list[socket.socket] = []
    try:
        timing = Timing()
        states = freeze_and_dump(sources, timing)
        assert {s.tcp_state for s in states} == {TcpState.ESTABLISHED}
        restored = restore_all(
            states, timing, netns=hosts.host_b.path, before_repair_off=hosts.switch_to_b
        )
        print(timing.report("two hosts, idle"))
        conns = make_conns(
            [(new, remote) for new, (_, remote) in zip(restored, pairs, strict=True)], 1000
        )
        with Traffic(conns) as traffic:
            traffic.adopt(list(zip(restored, states, strict=True)))
            traffic.wait(lambda: all(c.done for c in conns), "every connection to finish")
    finally:
        close_all(sources + restored + [remote for _, remote in pairs])


#: Per half-closed state: (up total, up closes before the move), (down total, down closes),
#: whether the local and the remote end read while the state is being reached.
_SETUPS = {
    # Our FIN sent and ACKed; the peer still sends (into a full receive queue).
    TcpState.FIN_WAIT2: ((1000, True), (4 << 20, True), False, True),
    # Our FIN queued behind data the peer does not read: not even sent.
    TcpState.FIN_WAIT1: ((512 << 10, True), (4 << 20, True), False, False),
    # The peer's FIN received (with data before it); we still have 1 MB to send.
    TcpState.CLOSE_WAIT: ((1 << 20, False), (50_000, True), False, False),
    # Both: the peer's FIN received, then ours queued behind data the peer does not read.
    TcpState.LAST_ACK: ((512 << 10, False), (50_000, True), False, False),
}


def test_half_closed_connections_move_between_hosts(hosts: TwoHostTopology) -> None:
    """FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT and LAST_ACK (IPv4 and IPv6) move; data and close finish."""
    pairs = _pairs(hosts, 2 * len(_SETUPS))
    sources = [local for local, _ in pairs]
    wanted = [state for _ in range(2) for state in _SETUPS]
    conns: list[Conn] = []
    for index, ((local, remote), state) in enumerate(zip(pairs, wanted, strict=True)):
        (up_total, up_close), (down_total, down_close), read_local, read_remote = _SETUPS[state]
        conns.append(
            Conn(
                local,
                remote,
                up=Direction(2 * index, up_total, close_after=up_close),
                down=Direction(2 * index + 1, down_total, close_after=down_close),
                read_local=read_local,
                read_remote=read_remote,
            )
        )
    restored: list[socket.socket] = []

    def reached() -> bool:
        for conn, state in zip(conns, wanted, strict=True):
            now = tcp_state(conn.local)
            if state == TcpState.LAST_ACK and now == TcpState.CLOSE_WAIT:
                conn.up.close_after = True  # the peer's FIN is in: now close ours
            if now != state or (state == TcpState.FIN_WAIT2 and not conn.up.done):
                return False
        return True

    try:
        with Traffic(conns) as traffic:
            traffic.wait(reached, "every connection to reach its half-closed state")
            traffic.set(local_paused=True)

            def read_everywhere() -> None:
                for conn in conns:
                    conn.read_local = conn.read_remote = True

            timing = Timing()
            states = freeze_and_dump(
                sources, timing, after_freeze=lambda: traffic.call(read_everywhere)
            )
            assert [s.tcp_state for s in states] == wanted
            restored = restore_all(
                states, timing, netns=hosts.host_b.path, before_repair_off=hosts.switch_to_b
            )

            def close_when_done() -> None:
                for conn in conns:
                    conn.up.close_after = True

            traffic.adopt(list(zip(restored, states, strict=True)))
            traffic.call(close_when_done)
            traffic.wait(lambda: all(c.done for c in conns), "every stream to complete")
        # The closes complete: the peer's sockets are closed (TIME_WAIT) on both sides'
        # FINs. A restored socket that had received the peer's FIN never learns of it
        # again, so it waits in FIN_WAIT2 (see sockstate's docstring).
        for conn, dumped in zip(conns, states, strict=True):
            expected = TcpState.FIN_WAIT2 if dumped.fin_received else TcpState.CLOSE

            def closed(conn: Conn = conn, expected: int = expected) -> bool:
                return (
                    tcp_state(conn.remote) == TcpState.CLOSE and tcp_state(conn.local) == expected
                )

            wait_for(
                closed,
                timeout=30,
                what=f"the close of a connection restored in {TcpState.NAMES[dumped.tcp_state]}"
                " to complete",
            )
    finally:
        close_all(sources + restored + [remote for _, remote in pairs])
