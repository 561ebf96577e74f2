"""Two peers through the TCP core, in memory: the guest's TCP, ferryd's core, the host's peer.

:func:`run` moves ``up`` (guest → peer) and ``down`` (peer → guest) both at
once through a :class:`Net` that may drop, duplicate and reorder segments in
either direction (seeded: a failure replays exactly), with explicit time that
jumps to the next deadline when nothing moves. Every byte is compared at
both ends by the caller.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ferryd.flows.tcp_conn import State, TcpConn, TcpShared
from ferryd.wire.tcp import TcpSegment
from tests.unit.tcp_memory import (
    ENDS,
    LINK_MSS,
    PEEK_BUFFER,
    MemoryHost,
    Pair,
    WireGuest,
    new_conn,
)
from tests.unit.tcp_ref_guest import RefGuest

STEP = 0.001
RCV_CAP = 1 << 17
"""The host socket's receive queue holds at most this much (the peer then waits)."""


@dataclass
class Net:
    """One direction of the guest link: drops, duplicates and holds back (reorders)."""

    rng: random.Random
    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0

    def __post_init__(self) -> None:
        self.held: list[TcpSegment] = []
        self.dropped = self.duplicated = self.reordered = 0

    def carry(self, segs: list[TcpSegment]) -> list[TcpSegment]:
        out, self.held = self.held, []
        for seg in segs:
            r = self.rng.random()
            if r < self.drop:
                self.dropped += 1
            elif r < self.drop + self.dup:
                self.duplicated += 1
                out += (seg, seg)
            elif r < self.drop + self.dup + self.reorder:
                self.reordered += 1
                self.held.append(seg)  # arrives after the next step's segments
            else:
                out.append(seg)
        return out


def migrate(pair: Pair, seed: int) -> Pair:
    """The connection moves to a new host socket with the same queues (a migration)."""
    old, conn = pair.host, pair.conn
    saved = conn.guest_state()
    host = MemoryHost(sndbuf=old.sndbuf_size, capacity=old.capacity)
    host.rcv, host.snd = bytearray(old.rcv), bytearray(old.snd)
    host.accepted, host.shut_wr = old.accepted, old.shut_wr
    host.clock = old.clock + 1000
    # A restored socket never reports its peer's earlier FIN as EOF: the
    # connection learns it from the dump (fin_received).
    host.eof = False
    fin_received = old.eof
    old.closed = True  # handed over: the source closes it silently
    pair.wire.host = host
    shared = TcpShared(
        pair.wire,
        LINK_MSS,
        memoryview(bytearray(PEEK_BUFFER)),
        PEEK_BUFFER,
        random.Random(seed + 1),
    )
    moved = TcpConn.restored(
        ENDS,
        host,
        shared,
        saved,
        sock_timestamp=host.clock,
        fin_received=fin_received,
        now=pair.now,
    )
    moved.flow = conn.flow
    assert moved.guest_state() == saved or fin_received
    new = Pair(moved, host, pair.wire, pair.now, pair.share)
    new.watch = pair.watch  # the bookkeeping goes on from where it was
    moved.resume(pair.now)
    new.check()
    return new


@dataclass
class Outcome:
    conn: TcpConn
    host: MemoryHost
    guest: RefGuest
    at_peer: bytes
    """What the host's peer read from the socket."""
    at_guest: bytes
    """What the guest's TCP received, in order."""
    steps: int
    damage: int
    """Segments the link dropped, duplicated or held back (both directions)."""
    migrations: int
    migrated_after_peer_fin: bool
    """A move happened once the peer's FIN was in the socket (restored: fin_received)."""


def run(
    up: bytes,
    down: bytes,
    *,
    seed: int = 0,
    drop: float = 0.0,
    dup: float = 0.0,
    reorder: float = 0.0,
    inbound: bool = False,
    timestamps: bool = False,
    peer_read: int = 1 << 16,
    capacity: int | None = None,
    guest_mss: int = 1460,
    max_steps: int = 200_000,
    migrate_at: tuple[float, ...] = (),
    migrate_after_peer_fin: bool = False,
    share: int | None = None,
) -> Outcome:
    """Open, move ``up`` and ``down``, close both ways (FINs); returns what arrived where.

    Once the guest received each fraction of ``down`` in ``migrate_at``
    (and the connection is established) the connection moves: guest_state()
    and the socket's queues go to a new host, where TcpConn.restored() and
    resume() take over, as a migration does; with
    ``migrate_after_peer_fin`` it moves once more, right after the peer's FIN.
    ``share`` limits every push as TcpFlows does while the guest sends bulk data.
    """
    rng = random.Random(seed)
    to_guest = Net(rng, drop, dup, reorder)
    to_ferry = Net(rng, drop, dup, reorder)
    host = MemoryHost(capacity=capacity)
    wire = WireGuest(host)
    guest = RefGuest(rng.getrandbits(32), up, mss=guest_mss, timestamps=timestamps)
    now = 100.0
    if inbound:
        conn = new_conn(host, wire, State.SYN_SENT, seed)
        pair = Pair(conn, host, wire, now, share)
        wire.irs = guest.isn
        conn.start_inbound(now)
    else:
        conn = new_conn(host, wire, State.CONNECTING, seed)
        pair = Pair(conn, host, wire, now, share)
        wire.irs = guest.isn
        conn.start_outbound(guest.connect(now), now)
        pair.connect_done = True  # the host's connect() succeeds at once
    at_peer = bytearray()
    fed = 0
    steps = 0
    peer_fin = False
    migrations = 0
    moved_after_fin = False
    while steps < max_steps:
        steps += 1
        pair.now = now
        moved = False
        due = (
            migrations < len(migrate_at)
            and len(guest.received) >= migrate_at[migrations] * len(down)
        ) or (migrate_after_peer_fin and peer_fin and not moved_after_fin)
        if due and conn.state is State.ESTABLISHED:
            moved_after_fin = peer_fin
            pair = migrate(pair, seed)
            conn, host = pair.conn, pair.host
            migrations += 1
            moved = True
        # The peer writes what the receive queue takes, then its FIN.
        if fed < len(down) and len(host.rcv) < RCV_CAP:
            n = min(RCV_CAP - len(host.rcv), len(down) - fed, 1 << 15)
            host.rcv += down[fed : fed + n]
            fed += n
            moved = True
        if fed == len(down) and not peer_fin:
            host.eof = peer_fin = True
            moved = True
        got = host.peer_read(peer_read)
        if got:
            at_peer += got
            moved = True
        moved |= pair.host_events()
        moved |= pair.timers()
        out = list(wire.out)
        wire.out.clear()
        for seg in to_guest.carry(out):
            guest.receive(seg, now)
        guest.on_timer(now)
        guest.send(now)
        segs = to_ferry.carry(guest.take())
        if segs:
            moved = True
            if not conn.closed:
                pair.burst(segs)
        if out:
            moved = True
        if (
            conn.closed
            and guest.fin_received
            and len(at_peer) == len(up)
            and bytes(guest.received) == down
        ):
            break
        if conn.closed and (host.aborted or guest.state.name == "RESET"):
            break
        if moved or to_guest.held or to_ferry.held:
            now += STEP
        else:
            nxt = min(conn.deadline() if not conn.closed else float("inf"), guest.timer)
            now = max(now + STEP, nxt) if nxt != float("inf") else now + STEP
    damage = sum(n.dropped + n.duplicated + n.reordered for n in (to_guest, to_ferry))
    return Outcome(
        conn,
        host,
        guest,
        bytes(at_peer),
        bytes(guest.received),
        steps,
        damage,
        migrations,
        moved_after_fin,
    )
