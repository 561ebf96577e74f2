"""TargetMigration without root: read, restore, resume; discard on a bad stream.

The stream is written by the real StreamEncoder into a socketpair; the
target restores into an in-memory MigrationHost over real flow tables
(tests/unit/migration_host.py). No TCP record, so no repair helper: the
restorer's TCP part has its own test (test_migration_restorer.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio
import trio.testing

from ferryd.migration.errors import MigrationFailed
from ferryd.migration.records import StreamHeader, UdpFlowRecord
from ferryd.migration.repair_client import RepairClient, RepairUnavailable
from ferryd.migration.repair_source import RepairSource
from ferryd.migration.roles import IllegalTransition, Role
from ferryd.migration.stream import StreamEncoder
from ferryd.migration.target import TargetMigration
from tests.unit.migration_host import MemoryHost, role_of, session
from tests.unit.test_flows_helpers import GUEST4, LINK, gateway_of

GUEST_MAC = b"\x02\x00\x00\x00\x00\x42"
MOVED_LINK = dataclasses.replace(LINK, mtu=1400)


def _header(*, precopy: bool = False) -> StreamHeader:
    link = MOVED_LINK
    return StreamHeader(
        ferry_mac=link.mac,
        mtu=link.mtu,
        ipv4=link.ipv4,
        ipv6=link.ipv6,
        guest_mac=GUEST_MAC,
        precopy=precopy,
    )


def _udp(port: int, remote: IPv4Address | None = None) -> UdpFlowRecord:
    return UdpFlowRecord(GUEST4, 40000, remote or gateway_of(4), port, 0.5)


@asynccontextmanager
async def target(role: Role = Role.INCOMING) -> AsyncIterator[tuple[MemoryHost, TargetMigration]]:
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        host.holds_guest = False  # --incoming: the source has the guest's frames
        mig = TargetMigration(session(host, nursery, role))
        try:
            yield host, mig
        finally:
            await host.aclose()
            nursery.cancel_scope.cancel()


async def _send(sock: socket.socket, data: bytes) -> None:
    async with trio.SocketStream(trio.socket.from_stdlib_socket(sock)) as stream:
        await stream.send_all(data)


async def test_restores_the_stream_then_resumes() -> None:
    enc = StreamEncoder()
    stream = enc.header(_header()) + enc.flow(_udp(5353)) + enc.trailer()
    reader, writer = socket.socketpair()
    async with target() as (host, mig):
        assert await mig.migrate_in(reader.detach()) == {}
        assert host.calls == ["take_over"]  # before the source freezes
        await _send(writer, stream)
        result = await mig.wait()
        assert role_of(mig) is Role.RESTORED
        assert result["restored"]["udp"] == 1
        assert result["stream_bytes"] == len(stream)
        assert host.calls == ["take_over", "rebuild"]
        assert host.link == MOVED_LINK and host.guest_mac == GUEST_MAC
        assert len(host.udp.table) == 1
        assert host.calls[-1] != "start"

        await mig.resume()
        assert role_of(mig) is Role.RUNNING
        assert host.calls[-1] == "start"
        assert mig.s.counters.in_completed == 1
        assert mig.s.counters.in_failed == 0


@pytest.mark.parametrize("cut", [1, 10, -1])
async def test_truncated_stream_discards_everything(cut: int) -> None:
    """A stream that ends early (no trailer) undoes the restore: back to incoming."""
    enc = StreamEncoder()
    stream = enc.header(_header()) + enc.flow(_udp(5353)) + enc.trailer()
    reader, writer = socket.socketpair()
    async with target() as (host, mig):
        await mig.migrate_in(reader.detach())
        await _send(writer, stream[:cut])
        with pytest.raises(MigrationFailed, match=r"^restore failed: "):
            await mig.wait()
        assert role_of(mig) is Role.INCOMING
        assert host.calls[0] == "take_over"
        assert host.calls[-2:] == ["hand_over", "rebuild"]  # given back, tables fresh
        assert not host.holds_guest
        assert len(host.udp.table) == 0
        assert mig.s.counters.in_failed == 1
        with pytest.raises(IllegalTransition, match="nothing to resume: this ferryd is incoming"):
            await mig.resume()


async def test_a_record_the_policy_refuses_discards_everything() -> None:
    """The guest may not reach the host's loopback directly: the source cannot make it."""
    enc = StreamEncoder()
    stream = enc.header(_header()) + enc.flow(_udp(5353, IPv4Address("127.0.0.1")))
    stream += enc.trailer()
    reader, writer = socket.socketpair()
    async with target() as (host, mig):
        await mig.migrate_in(reader.detach())
        await _send(writer, stream)
        with pytest.raises(MigrationFailed, match=r"^restore failed: .* refuses \(loopback\)"):
            await mig.wait()
        assert role_of(mig) is Role.INCOMING
        assert len(host.udp.table) == 0


async def test_precopy_takes_the_guest_only_when_restored_ahead() -> None:
    enc = StreamEncoder()
    reader, writer = socket.socketpair()
    tsock = trio.SocketStream(trio.socket.from_stdlib_socket(writer))
    async with target() as (host, mig):
        await mig.migrate_in(reader.detach(), precopy=True)
        await tsock.send_all(enc.header(_header(precopy=True)) + enc.precopy_end())
        assert (await mig.wait_precopy())["precopied"] == 0
        assert host.calls == ["rebuild", "take_over"]
        await tsock.send_all(enc.flow(_udp(5353)) + enc.trailer())
        await tsock.aclose()
        assert (await mig.wait())["restored"]["udp"] == 1


async def test_abort_of_a_restored_target_discards() -> None:
    enc = StreamEncoder()
    reader, writer = socket.socketpair()
    async with target() as (host, mig):
        await mig.migrate_in(reader.detach())
        await _send(writer, enc.header(_header()) + enc.flow(_udp(5353)) + enc.trailer())
        await mig.wait()
        assert await mig.abort() == {"role": "incoming"}
        assert host.calls[-2:] == ["hand_over", "rebuild"]
        assert len(host.udp.table) == 0


async def test_migrate_in_refused_unless_incoming() -> None:
    reader, writer = socket.socketpair()
    with writer:
        async with target(Role.RUNNING) as (host, mig):
            with pytest.raises(IllegalTransition, match="cannot take a migration: this ferryd is"):
                await mig.migrate_in(reader.detach())
            assert host.calls == [] and mig.s.roles.role is Role.RUNNING
            # The stream was closed: the writer's peer is gone.
            with pytest.raises(BrokenPipeError):
                writer.send(b"x")


async def test_an_abort_while_resume_starts_the_data_path_waits_for_it() -> None:
    """migrate-abort (the coordinator's, on a resume timeout) arrives while resume awaits.

    It must not discard what resume is starting: it waits, then finds the
    target running and undoes nothing.
    """
    enc = StreamEncoder()
    reader, writer = socket.socketpair()
    async with target() as (host, mig):
        await mig.migrate_in(reader.detach())
        await _send(writer, enc.header(_header()) + enc.flow(_udp(5353)) + enc.trailer())
        await mig.wait()
        async with trio.open_nursery() as nursery:
            starting, go = trio.Event(), trio.Event()
            start = host.start

            async def slow_start() -> None:
                starting.set()
                await go.wait()
                await start()

            host.start = slow_start  # type: ignore[method-assign]
            resumed: list[object] = []

            async def resume() -> None:
                resumed.append(await mig.resume())

            nursery.start_soon(resume)
            await starting.wait()
            aborted: list[object] = []

            async def abort() -> None:
                aborted.append(await mig.abort())

            nursery.start_soon(abort)
            await trio.testing.wait_all_tasks_blocked()
            assert aborted == []  # still waiting for resume
            go.set()
        assert len(resumed) == 1
        assert aborted == [{"role": "running"}]
        assert role_of(mig) is Role.RUNNING
        assert host.running and host.holds_guest
        assert "hand_over" not in host.calls
        assert len(host.udp.table) == 1
        assert mig.s.counters.in_completed == 1 and mig.s.counters.in_failed == 0


class NoHelper:
    """A RepairSupply with no helper to give, counting the requests."""

    def __init__(self) -> None:
        self.requests = 0

    async def get(self) -> RepairClient:
        self.requests += 1
        await trio.lowlevel.checkpoint()
        raise RepairUnavailable("no helper here")


async def test_the_helper_is_reached_before_the_streams_first_record() -> None:
    """The target asks for its repair helper as the restore starts, not at its first
    batch of TCP connections; one it cannot reach fails only a restore that needs it."""
    repair = NoHelper()
    reader, writer = socket.socketpair()
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery)
        host.holds_guest = False
        mig = TargetMigration(session(host, nursery, Role.INCOMING, repair=repair))
        await mig.migrate_in(reader.detach())
        await trio.testing.wait_all_tasks_blocked()
        assert repair.requests == 1  # not a byte of the stream yet
        enc = StreamEncoder()
        await _send(writer, enc.header(_header()) + enc.flow(_udp(5353)) + enc.trailer())
        result = await mig.wait()
        assert result["restored"]["udp"] == 1
        await host.aclose()
        nursery.cancel_scope.cancel()


async def test_the_helper_is_connected_to_once_however_many_ask(tmp_path: Path) -> None:
    """RepairSource.get() from the early reach and from the restore at once: one connection."""
    path = str(tmp_path / "helper.sock")
    source = RepairSource(path, None)
    clients: list[RepairClient] = []

    async def get() -> None:
        clients.append(await source.get())

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(8)
        listener.setblocking(False)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(get)
        accepted = []
        with contextlib.suppress(BlockingIOError):
            while True:
                accepted.append(listener.accept()[0])  # what connected (queued, not served)
        assert len(accepted) == 1
        assert clients[0] is clients[1] is clients[2]
        for conn in accepted:
            conn.close()
        await clients[0].aclose()
