"""TcpConn and RFC 7323 timestamps with the guest: agreed, carried, continued after a move.

The host socket is the in-memory kernel of tests/unit/tcp_memory.py (its
TCP_TIMESTAMP clock, ``MemoryHost.clock``, is what ferryd's TSval follows);
the guest link parses the options of every segment ferryd sends it.
"""

from __future__ import annotations

from ferryd.flows.table import Flow
from ferryd.flows.tcp_conn import TS_OPTION_LEN, Flags, State, TcpConn
from ferryd.flows.tcp_seq import seq_add
from ferryd.wire.tcp import ACK, SYN, TcpOptions, TcpSegment
from tests.unit.tcp_memory import ENDS, GUEST_PORT, REMOTE_PORT, MemoryHost, WireGuest, new_conn

LINK_MSS = 65480
GUEST_TSVAL = 123456


def connecting(host: MemoryHost, wire: WireGuest, syn_options: TcpOptions) -> TcpConn:
    """An outbound connection whose host connect() just finished."""
    conn = new_conn(host, wire, State.CONNECTING, link_mss=LINK_MSS)
    syn = TcpSegment(GUEST_PORT, REMOTE_PORT, 1000, 0, SYN, 65535, syn_options, memoryview(b""))
    wire.irs = syn.seq
    conn.start_outbound(syn, 1.0)
    conn.on_connected(1.0)
    return conn


def established_by_guest(conn: TcpConn, tsval: int, now: float) -> None:
    opts = TcpOptions(timestamp=(tsval, 0))
    seg = TcpSegment(
        GUEST_PORT, REMOTE_PORT, 1001, seq_add(conn.isn, 1), ACK, 65535, opts, memoryview(b"")
    )
    conn.on_guest_segment(seg, now)
    assert conn.state is State.ESTABLISHED


def test_agreed_when_the_guest_offers_them() -> None:
    host = MemoryHost()
    wire = WireGuest(host)
    syn_options = TcpOptions(mss=LINK_MSS, wscale=7, timestamp=(GUEST_TSVAL, 0))
    conn = connecting(host, wire, syn_options)
    syn_ack = wire.out[-1]
    assert syn_ack.flags == SYN | ACK
    assert syn_ack.options.timestamp is not None
    tsval, tsecr = syn_ack.options.timestamp
    assert tsecr == GUEST_TSVAL
    assert tsval == host.clock  # the host socket's clock

    established_by_guest(conn, GUEST_TSVAL + 5, 1.5)
    host.rcv += bytes(200_000)  # the peer sends
    assert conn.push(1.5) > 0
    data = [(s.options, len(s.payload)) for s in wire.out if len(s.payload)]
    assert data
    for opts, n in data:
        assert opts.timestamp is not None
        assert opts.timestamp[1] == GUEST_TSVAL + 5  # the newest TSval echoed
        assert (opts.timestamp[0] - tsval) & 0xFFFFFFFF == 500  # 1.0 s -> 1.5 s
        assert n <= LINK_MSS - TS_OPTION_LEN


def test_not_without_the_guest() -> None:
    host = MemoryHost()
    wire = WireGuest(host)
    conn = connecting(host, wire, TcpOptions(mss=LINK_MSS, wscale=7))
    assert not conn.flags & Flags.TIMESTAMPS
    established_by_guest(conn, 0, 1.5)
    host.rcv += bytes(200_000)
    assert conn.push(1.5) > 0
    assert all(s.options.timestamp is None for s in wire.out)
    assert max(len(s.payload) for s in wire.out) == LINK_MSS


def test_a_migration_target_goes_on_with_the_clock() -> None:
    """After the move TSval continues from the dumped socket clock (never back: the
    guest's PAWS would drop our segments) and TSecr waits for the guest's next TSval."""
    host = MemoryHost()
    wire = WireGuest(host)
    conn = connecting(host, wire, TcpOptions(mss=1460, timestamp=(GUEST_TSVAL, 0)))
    established_by_guest(conn, GUEST_TSVAL, 1.0)
    dumped = 0xFFFFFFF0  # about to wrap
    conn.continue_timestamps(dumped, 5000.0)  # another host's clock
    conn.send_ack()
    tsval, tsecr = wire.out[-1].options.timestamp or (0, 0)
    assert (tsval - dumped) & 0xFFFFFFFF == 1
    assert tsecr == 0
    established_by_guest(conn, GUEST_TSVAL + 100, 5000.25)
    conn.send_ack()
    tsval, tsecr = wire.out[-1].options.timestamp or (0, 0)
    assert (tsval - dumped) & 0xFFFFFFFF == 251
    assert tsecr == GUEST_TSVAL + 100


def test_a_shared_clock_never_takes_a_connections_tsval_back() -> None:
    """Connections of one IP version share their clock (TcpShared): an event another
    one handled at a later time, then one of this connection's with an older ``now``,
    must not send a TSval below what it sent meanwhile (the guest's PAWS check)."""
    host = MemoryHost()
    wire = WireGuest(host)
    conn = connecting(host, wire, TcpOptions(mss=LINK_MSS, wscale=7, timestamp=(GUEST_TSVAL, 0)))
    established_by_guest(conn, GUEST_TSVAL, 3.0)
    other = TcpConn(ENDS, MemoryHost(), conn.shared, State.ESTABLISHED)
    other.flow = Flow(ENDS, other, State.ESTABLISHED.value, 3.0)

    def last_tsval() -> int:
        opts = wire.out[-1].options.timestamp
        assert opts is not None
        return opts[0]

    host.rcv += bytes(1000)
    assert conn.push(3.0) > 0
    sent = [last_tsval()]
    other.on_timer(5.0)  # nothing due there; the shared clock moves to 5 s
    conn.send_ack()
    sent.append(last_tsval())
    host.rcv += bytes(1000)
    assert conn.push(4.0) > 0  # a now taken before the other connection's event
    sent.append(last_tsval())
    assert [(t - sent[0]) & 0xFFFFFFFF for t in sent] == [0, 2000, 2000]
