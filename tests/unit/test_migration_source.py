"""SourceMigration without root: freeze, stream, commit, roll back, refuse.

Driven through the migration layer's own interface (an in-memory
MigrationHost over real flow tables, tests/unit/migration_host.py) with no
TCP connection, so no repair helper is needed; the stream is a real
socketpair, and what arrives at its other end is decoded and checked.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from ferryd.migration.errors import MigrationFailed
from ferryd.migration.records import UdpFlowRecord
from ferryd.migration.roles import IllegalTransition, Role
from ferryd.migration.source import SourceMigration
from ferryd.migration.stream_events import FlowReceived, HeaderReceived
from tests.unit.migration_host import MemoryHost, decode_stream, read_all, role_of, session
from tests.unit.test_flows_helpers import GUEST4, LINK, gateway_of, udp_from_guest


@asynccontextmanager
async def source(role: Role = Role.RUNNING) -> AsyncIterator[tuple[MemoryHost, SourceMigration]]:
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        host.guest_mac = b"\x02\x00\x00\x00\x00\x99"
        mig = SourceMigration(session(host, nursery, role))
        try:
            yield host, mig
        finally:
            await host.aclose()
            nursery.cancel_scope.cancel()


async def test_migrate_out_streams_the_flows_and_commits() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        reader, writer = socket.socketpair()
        with reader:
            async with source() as (host, mig):
                host.udp.from_guest(
                    *udp_from_guest(GUEST4, gateway_of(4), 40001, port, b"hi"), trio.current_time()
                )
                async with trio.open_nursery() as n:
                    received: list[bytes] = []

                    async def read() -> None:
                        received.append(await read_all(reader))

                    n.start_soon(read)
                    answer = await mig.migrate_out(writer.detach(), same_netns=False)
                assert role_of(mig) is Role.FROZEN
                assert host.calls == ["stop", "hand_over(drain)"]
                assert not host.holds_guest
                assert answer["flows"]["udp"] == 1
                assert answer["stream_bytes"] == len(received[0])
                events = decode_stream(received[0])
                assert isinstance(events[0], HeaderReceived)
                assert events[0].header.ferry_mac == LINK.mac
                assert events[0].header.guest_mac == b"\x02\x00\x00\x00\x00\x99"
                flows = [e.flow for e in events if isinstance(e, FlowReceived)]
                assert len(flows) == 1 and isinstance(flows[0], UdpFlowRecord)
                assert (flows[0].guest_addr, flows[0].guest_port) == (GUEST4, 40001)
                assert (flows[0].remote_addr, flows[0].remote_port) == (gateway_of(4), port)

                assert await mig.commit() == {"linger": 0.0}
                assert role_of(mig) is Role.MIGRATED
                with trio.fail_after(5):
                    await host.exited.wait()
                counters = mig.s.counters
                assert (counters.out_completed, counters.out_failed) == (1, 0)


async def test_reader_gone_rolls_back_and_runs_on() -> None:
    """A failed write mid-stream: everything is put back, the data path runs again."""
    reader, writer = socket.socketpair()
    reader.close()
    async with source() as (host, mig):
        with pytest.raises(MigrationFailed, match=r"reader went away.*rolled back, nothing lost"):
            await mig.migrate_out(writer.detach(), same_netns=False)
        assert role_of(mig) is Role.RUNNING
        assert host.calls == ["stop", "hand_over(drain)", "stop", "take_over", "start"]
        assert host.holds_guest
        assert host.running
        counters = mig.s.counters
        assert (counters.out_failed, counters.out_rolled_back, counters.out_completed) == (1, 1, 0)
        # And a rolled-back source has nothing left to undo.
        assert (await mig.abort())["note"] == "no migration in progress: nothing to undo"


async def test_abort_of_a_frozen_source_rolls_back() -> None:
    reader, writer = socket.socketpair()
    with reader:
        async with source() as (host, mig):
            async with trio.open_nursery() as n:
                n.start_soon(read_all, reader)
                await mig.migrate_out(writer.detach(), same_netns=False)
            assert await mig.abort() == {"role": "running", "note": "rolled back, nothing lost"}
            assert host.calls[-3:] == ["stop", "take_over", "start"]
            refusal = "nothing to commit: this ferryd is running"
            with pytest.raises(IllegalTransition, match=refusal):
                await mig.commit()


@pytest.mark.parametrize("role", [Role.INCOMING, Role.FROZEN, Role.PRECOPIED])
async def test_migrate_out_refused_outside_running(role: Role) -> None:
    """Refused before anything is touched; the stream is closed (the reader sees its end)."""
    reader, writer = socket.socketpair()
    with reader:
        async with source(role) as (host, mig):
            with pytest.raises(IllegalTransition, match=f"this ferryd is {role}"):
                await mig.migrate_out(writer.detach(), same_netns=False)
            assert role_of(mig) is role
            assert host.calls == []
            assert await read_all(reader) == b""


async def test_migrate_out_without_a_stream_needs_a_precopy() -> None:
    async with source() as (_, mig):
        with pytest.raises(IllegalTransition, match="needs a pre-copy first"):
            await mig.migrate_out(None, same_netns=False)
        assert role_of(mig) is Role.RUNNING


async def test_precopy_then_freeze_on_the_same_stream() -> None:
    """No quiet TCP connection: the pre-copy is a header and its end; the freeze follows."""
    reader, writer = socket.socketpair()
    with reader:
        async with source() as (host, mig):
            async with trio.open_nursery() as n:
                received: list[bytes] = []

                async def read() -> None:
                    received.append(await read_all(reader))

                n.start_soon(read)
                pre = await mig.precopy(writer.detach())
                assert pre["precopied"] == 0
                assert role_of(mig) is Role.PRECOPIED
                assert host.calls == []  # the guest still runs here
                await mig.migrate_out(None, same_netns=False)
            assert role_of(mig) is Role.FROZEN
            events = decode_stream(received[0])
            assert isinstance(events[0], HeaderReceived) and events[0].header.precopy
