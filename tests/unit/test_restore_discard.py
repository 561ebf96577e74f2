"""Restorer.discard() leaves nothing behind, and nothing broken, on real flow tables.

The situation: a restore fails half-way (a target's, or a same-namespace
source's rollback that binds its datagram flows again from its records):
discard() undoes it, and the restore is tried again later, with the same
4-tuples and the same UDP flows once more. No helper here: the restored TCP socket
is adopted as the Restorer would, and discard() closes it plainly (it is
not in repair mode) rather than silently. The host is the migration
layer's in-memory one (tests/unit/migration_host.py) over real flow tables.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import trio

from ferryd.flows.table import FlowKey
from ferryd.flows.tcp_conn import Endpoints, State, TcpConn, TcpGuestState
from ferryd.flows.tcp_host import SocketHost
from ferryd.migration.records import UdpFlowRecord
from ferryd.migration.repair_source import RepairSource
from ferryd.migration.restore import Restorer
from ferryd.wire.ip import IPPROTO_TCP
from tests.unit.migration_host import MemoryHost
from tests.unit.test_flows_helpers import GUEST4, gateway_of, udp_from_guest

NO_HELPER = RepairSource(None, None)
"""No repair helper: none is needed, none of these sockets is in repair mode."""


@asynccontextmanager
async def daemon() -> AsyncIterator[MemoryHost]:
    async with trio.open_nursery() as nursery:
        d = MemoryHost(nursery)
        try:
            yield d
        finally:
            await d.aclose()
            nursery.cancel_scope.cancel()


def _adopt(d: MemoryHost, restorer: Restorer, ends: Endpoints, sock: SocketHost[TcpConn]) -> None:
    """What Restorer._batch does with a socket restored in repair mode."""
    saved = TcpGuestState(State.ESTABLISHED, 0, 1, 1, 1, 1, 65535, 0, 0, 1460)
    now = trio.current_time()
    conn = d.tcp.adopt(ends, sock, 4, saved, sock_timestamp=0, fin_received=False, now=now)
    restorer.in_repair[id(sock)] = sock
    restorer.restored[ends] = (conn, cast(Any, None), cast(Any, None), False)


async def test_discard_forgets_restored_tcp_connections(
    host_pair: tuple[SocketHost[TcpConn], socket.socket],
) -> None:
    ours, _peer = host_pair
    ends = Endpoints(GUEST4, 40000, gateway_of(4), 80)
    key = FlowKey(IPPROTO_TCP, GUEST4, 40000, gateway_of(4), 80)
    async with daemon() as d:
        restorer = Restorer(d, NO_HELPER)
        _adopt(d, restorer, ends, ours)
        await restorer.discard()
        assert ours.fileno() < 0
        assert d.tcp.table.get(key) is None
        # The rollback's next attempt restores the same connection again.
        again = Restorer(d, NO_HELPER)
        with SocketHost[TcpConn]() as sock:
            _adopt(d, again, ends, sock)
            assert d.tcp.table.get(key) is not None
            d.tcp.forget(again.restored[ends][0])


async def test_discard_leaves_udp_usable() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        async with daemon() as d:
            restorer = Restorer(d, NO_HELPER)
            await restorer.add(UdpFlowRecord(GUEST4, 40000, gateway_of(4), port, 0.0))
            await restorer.finish()
            assert len(d.udp.table) == 1
            await restorer.discard()
            assert len(d.udp.table) == 0  # the restored flow went, its port freed
            # The source keeps its UdpFlows: a guest's datagram opens a flow again.
            d.udp.from_guest(
                *udp_from_guest(GUEST4, gateway_of(4), 40001, port, b"hi"), trio.current_time()
            )
            assert len(d.udp.table) == 1
            with trio.fail_after(5):
                data = await trio.socket.from_stdlib_socket(server).recv(100)
            assert data == b"hi"
