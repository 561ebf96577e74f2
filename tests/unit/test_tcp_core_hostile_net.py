"""The TCP core over a hostile guest link: drops, duplicates, reordering, both directions.

trio's DTLS tests do this with a seeded router; so do we (tests/unit/tcp_sim.py):
every seed replays exactly. Whatever the link does, every byte arrives at
both ends, in order, once, and both FINs are carried; the pair's checks run
after every event meanwhile (tcp_memory.Watch: bookkeeping never goes
back, the peek offset is the flight, no ACK beyond what the socket took).
"""

from __future__ import annotations

import random

import pytest

from ferryd.flows.tcp_conn import State
from tests.unit.tcp_sim import run

UP = random.Random(10).randbytes(120_000)
DOWN = random.Random(11).randbytes(200_000)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    ("drop", "dup", "reorder"),
    [(0.02, 0.0, 0.0), (0.0, 0.05, 0.0), (0.0, 0.0, 0.05), (0.03, 0.03, 0.03)],
    ids=["drop", "duplicate", "reorder", "all"],
)
def test_every_byte_arrives(seed: int, drop: float, dup: float, reorder: float) -> None:
    out = run(UP, DOWN, seed=seed, drop=drop, dup=dup, reorder=reorder, inbound=seed % 2 == 1)
    assert out.damage > 0  # the link really was hostile
    assert out.at_peer == UP
    assert out.at_guest == DOWN
    assert out.guest.fin_received
    assert out.host.shut_wr
    assert out.conn.state is State.CLOSED
    assert not out.host.aborted


@pytest.mark.parametrize("seed", range(3))
def test_with_timestamps_and_short_writes(seed: int) -> None:
    out = run(
        UP,
        DOWN,
        seed=seed,
        drop=0.03,
        dup=0.03,
        reorder=0.03,
        timestamps=True,
        capacity=16_000,
        peer_read=4_000,
    )
    assert out.at_peer == UP
    assert out.at_guest == DOWN
    assert not out.host.aborted


@pytest.mark.parametrize("seed", range(4))
def test_migrations_midway_lose_nothing(seed: int) -> None:
    """guest_state() and TcpConn.restored(): the connection moves mid-transfer,
    and once more after the peer's FIN."""
    out = run(
        UP,
        DOWN,
        seed=seed,
        drop=0.02,
        dup=0.02,
        reorder=0.02,
        timestamps=seed % 2 == 0,
        migrate_at=(0.2 + 0.1 * seed, 0.5 + 0.1 * seed),
        migrate_after_peer_fin=True,
    )
    assert out.migrations >= 2 and out.migrated_after_peer_fin
    assert out.at_peer == UP
    assert out.at_guest == DOWN
    assert not out.host.aborted
