"""A pre-copy that fails for any reason undoes itself: the source runs on.

Driven without root: an in-memory host with one quiet connection (so the
pre-copy asks for the repair helper) and no helper configured, which
RepairSource.get() reports as RepairUnavailable.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from ferryd.flows.tcp_conn import Endpoints, State, TcpConn, TcpGuestState
from ferryd.flows.tcp_host import SocketHost
from ferryd.migration.errors import MigrationFailed
from ferryd.migration.roles import Role
from ferryd.migration.source import SourceMigration
from tests.unit.migration_host import MemoryHost, session
from tests.unit.test_flows_helpers import GUEST4, gateway_of


async def test_precopy_without_a_helper_fails_and_runs_on(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, _peer = host_pair
    read_end, write_end = os.pipe()
    try:
        async with trio.open_nursery() as nursery:
            host = MemoryHost(nursery)
            # Established with nothing in flight: quiet at once with a quiet time of 0.
            saved = TcpGuestState(State.ESTABLISHED, 0, 1, 1, 1, 1, 65535, 0, 0, 1460)
            ends = Endpoints(GUEST4, 40000, gateway_of(4), 80)
            now = trio.current_time()
            conn = host.tcp.adopt(
                ends, ours, 4, saved, sock_timestamp=0, fin_received=False, now=now
            )
            assert conn.settled(now, 0.0)
            mig = SourceMigration(session(host, nursery, Role.RUNNING, precopy_quiet=0.0))
            with pytest.raises(MigrationFailed, match=r"pre-copy failed .*repair helper"):
                await mig.precopy(write_end)
            assert mig.roles.role is Role.RUNNING
            assert mig.stream is None
            assert mig.s.counters.out_failed == 1
            assert host.tcp.connections() == [conn]  # untouched, never held
            # Nothing pre-copied, so nothing for migrate-abort to undo.
            assert (await mig.abort())["note"] == "no migration in progress: nothing to undo"
            host.tcp.forget(conn)
            await host.aclose()
            nursery.cancel_scope.cancel()
    finally:
        os.close(read_end)
