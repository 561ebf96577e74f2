"""TcpConn and RFC 7323 timestamps with the guest: agreed, carried, continued after a move.

A real loopback TCP connection stands in for the host socket (its
TCP_TIMESTAMP clock is what ferryd's TSval follows); the guest is a recorder
that decodes the options of every segment ferryd sends it.
"""

from __future__ import annotations

import socket

from ferryd.flows.tcp_conn import (
    TS_OPTION_LEN,
    Flags,
    State,
    TcpConn,
)
from ferryd.linux import TCP_TIMESTAMP
from ferryd.wire.tcp import ACK, SYN, TcpOptions, TcpSegment
from tests.unit.tcp_conn_support import RecordingGuest, bare_conn

LINK_MSS = 65480
GUEST_TSVAL = 123456


def connecting(sock: socket.socket, guest: RecordingGuest, syn_options: TcpOptions) -> TcpConn:
    """An outbound connection whose host connect() just finished."""
    conn = bare_conn(sock, guest, State.CONNECTING, LINK_MSS)
    syn = TcpSegment(40000, 80, 1000, 0, SYN, 65535, syn_options, memoryview(b""))
    conn.start_outbound(syn, 1.0)
    conn.on_connected(1.0)
    return conn


def established_by_guest(conn: TcpConn, tsval: int, now: float) -> None:
    opts = TcpOptions(timestamp=(tsval, 0))
    seg = TcpSegment(
        40000, 80, 1001, (conn.isn + 1) & 0xFFFFFFFF, ACK, 65535, opts, memoryview(b"")
    )
    conn.on_guest_segment(seg, now)


def test_agreed_when_the_guest_offers_them(host_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = host_pair
    guest = RecordingGuest()
    sock_ts = ours.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP)
    conn = connecting(ours, guest, TcpOptions(mss=1460, wscale=7, timestamp=(GUEST_TSVAL, 0)))
    syn_ack = guest.sent[-1]
    assert syn_ack.flags == SYN | ACK
    assert syn_ack.options.timestamp is not None
    tsval, tsecr = syn_ack.options.timestamp
    assert tsecr == GUEST_TSVAL
    assert 0 <= (tsval - sock_ts) & 0xFFFFFFFF < 1000  # the host socket's clock

    established_by_guest(conn, GUEST_TSVAL + 5, 1.5)
    conn.guest_mss = LINK_MSS
    peer.sendall(bytes(200_000))
    while conn.push(1.5) == 0:
        pass
    data = [(s.options, s.length) for s in guest.sent if s.length]
    assert data
    for opts, n in data:
        assert opts.timestamp is not None
        assert opts.timestamp[1] == GUEST_TSVAL + 5  # the newest TSval echoed
        assert (opts.timestamp[0] - tsval) & 0xFFFFFFFF == 500  # 1.0 s -> 1.5 s
        assert n <= LINK_MSS - TS_OPTION_LEN


def test_not_without_the_guest(host_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = host_pair
    guest = RecordingGuest()
    conn = connecting(ours, guest, TcpOptions(mss=1460, wscale=7))
    assert Flags.TIMESTAMPS not in conn.flags
    established_by_guest(conn, 0, 1.5)
    conn.guest_mss = LINK_MSS
    peer.sendall(bytes(200_000))
    while conn.push(1.5) == 0:
        pass
    assert all(s.options.timestamp is None for s in guest.sent)
    assert max(s.length for s in guest.sent) == LINK_MSS


def test_a_migration_target_goes_on_with_the_clock(
    host_pair: tuple[socket.socket, socket.socket],
) -> None:
    """After the move TSval continues from the dumped socket clock (never back: the
    guest's PAWS would drop our segments) and TSecr waits for the guest's next TSval."""
    ours, _ = host_pair
    guest = RecordingGuest()
    conn = connecting(ours, guest, TcpOptions(mss=1460, timestamp=(GUEST_TSVAL, 0)))
    established_by_guest(conn, GUEST_TSVAL, 1.0)
    dumped = 0xFFFFFFF0  # about to wrap
    conn.continue_timestamps(dumped, 5000.0)  # another host's clock
    conn.send_ack()
    tsval, tsecr = guest.sent[-1].options.timestamp or (0, 0)
    assert (tsval - dumped) & 0xFFFFFFFF == 1
    assert tsecr == 0
    established_by_guest(conn, GUEST_TSVAL + 100, 5000.25)
    conn.send_ack()
    tsval, tsecr = guest.sent[-1].options.timestamp or (0, 0)
    assert (tsval - dumped) & 0xFFFFFFFF == 251
    assert tsecr == GUEST_TSVAL + 100
