"""ferryd.collector: the cyclic collector paused in a migration's downtime, imports frozen.

The pauses are checked where they matter: the source's freeze and stream
see the collector off (the in-memory MigrationHost of the migration tests
records it when the migration calls it) and it runs again once the stream
is written; the target's stays off from the start of its restore (after a
pre-copy's end, with a pre-copy) to its resume, and runs again after a
resume, a failed restore or a discard.
"""

from __future__ import annotations

import gc
import socket

import pytest
import trio
import trio.testing

from ferryd import collector
from ferryd.migration.errors import MigrationFailed
from ferryd.migration.roles import Role
from ferryd.migration.stream import StreamEncoder
from tests.unit.migration_host import MemoryHost, read_all, role_of
from tests.unit.test_flows_helpers import GUEST4, gateway_of, udp_from_guest
from tests.unit.test_migration_source import source
from tests.unit.test_migration_target import _header, _send, _udp, target


def test_paused_stops_the_collector_until_the_outermost_block_ends() -> None:
    with collector.paused():
        assert not gc.isenabled()
        with collector.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still runs
    assert gc.isenabled()


def test_paused_ends_on_an_exception_too() -> None:
    with pytest.raises(RuntimeError), collector.paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_disabled_before_stays_disabled() -> None:
    gc.disable()
    with collector.paused():
        pass
    assert not gc.isenabled()


def test_freeze_imports_leaves_what_is_alive_out_of_collections() -> None:
    before = gc.get_freeze_count()
    try:
        collector.freeze_imports()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def _record_collector(host: MemoryHost, seen: dict[str, bool]) -> None:
    """Note whether the collector runs when the migration stops, rebuilds or starts ``host``."""
    for name in ("stop", "rebuild", "start"):
        method = getattr(host, name)

        def wrapper(*args: object, _name: str = name, _method: object = method) -> object:
            seen[_name] = gc.isenabled()
            return _method(*args)  # type: ignore[operator]

        setattr(host, name, wrapper)


async def test_the_source_freezes_and_streams_with_the_collector_paused() -> None:
    seen: dict[str, bool] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        reader, writer = socket.socketpair()
        with reader:
            async with source() as (host, mig):
                host.udp.from_guest(
                    *udp_from_guest(GUEST4, gateway_of(4), 40001, port, b"hi"), trio.current_time()
                )
                _record_collector(host, seen)
                entries = host.udp.entries

                def listed(now: float) -> object:
                    seen["stream"] = gc.isenabled()
                    return entries(now)

                host.udp.entries = listed  # type: ignore[method-assign,assignment]
                async with trio.open_nursery() as n:
                    n.start_soon(read_all, reader)
                    await mig.migrate_out(writer.detach(), same_netns=False)
                assert role_of(mig) is Role.FROZEN
                assert gc.isenabled()
    assert seen == {"stop": False, "stream": False}


async def test_the_target_keeps_the_collector_paused_from_its_restore_to_its_resume() -> None:
    seen: dict[str, bool] = {}
    enc = StreamEncoder()
    stream = enc.header(_header()) + enc.flow(_udp(5353)) + enc.trailer()
    reader, writer = socket.socketpair()
    async with target() as (host, mig):
        _record_collector(host, seen)
        await mig.migrate_in(reader.detach())
        await _send(writer, stream)
        await mig.wait()
        assert role_of(mig) is Role.RESTORED
        assert not gc.isenabled()  # restored, not resumed: still the downtime
        await mig.resume()
        assert role_of(mig) is Role.RUNNING
        assert gc.isenabled()
    assert seen == {"rebuild": False, "start": False}


async def test_a_failed_restore_lets_the_collector_run_again() -> None:
    enc = StreamEncoder()
    stream = enc.header(_header()) + enc.flow(_udp(5353)) + enc.trailer()
    reader, writer = socket.socketpair()
    async with target() as (_, mig):
        await mig.migrate_in(reader.detach())
        await _send(writer, stream[:-1])
        with pytest.raises(MigrationFailed):
            await mig.wait()
        assert role_of(mig) is Role.INCOMING
        assert gc.isenabled()


async def test_a_discarded_restore_lets_the_collector_run_again() -> None:
    enc = StreamEncoder()
    reader, writer = socket.socketpair()
    async with target() as (_, mig):
        await mig.migrate_in(reader.detach())
        await _send(writer, enc.header(_header()) + enc.flow(_udp(5353)) + enc.trailer())
        await mig.wait()
        assert not gc.isenabled()
        await mig.abort()
        assert role_of(mig) is Role.INCOMING
        assert gc.isenabled()


async def test_a_precopy_is_restored_with_the_collector_on_and_the_rest_without() -> None:
    enc = StreamEncoder()
    reader, writer = socket.socketpair()
    tsock = trio.SocketStream(trio.socket.from_stdlib_socket(writer))
    async with target() as (_, mig):
        await mig.migrate_in(reader.detach(), precopy=True)
        await tsock.send_all(enc.header(_header(precopy=True)))
        await trio.testing.wait_all_tasks_blocked()
        assert gc.isenabled()  # the guest still runs on the source: not the downtime
        await tsock.send_all(enc.precopy_end())
        await mig.wait_precopy()
        assert not gc.isenabled()  # the source freezes next
        await tsock.send_all(enc.flow(_udp(5353)) + enc.trailer())
        await tsock.aclose()
        await mig.wait()
        await mig.resume()
        assert gc.isenabled()


async def test_qemus_load_restores_even_a_precopy_with_the_collector_paused() -> None:
    """QEMU's guest is stopped before the stream exists: all of a LOAD is the downtime."""
    enc = StreamEncoder()
    reader, writer = socket.socketpair()
    tsock = trio.SocketStream(trio.socket.from_stdlib_socket(writer))
    async with target(Role.RUNNING) as (_, mig):
        await mig.load(reader.detach())
        await tsock.send_all(enc.header(_header(precopy=True)))
        await trio.testing.wait_all_tasks_blocked()
        assert not gc.isenabled()
        await tsock.send_all(enc.precopy_end() + enc.flow(_udp(5353)) + enc.trailer())
        await tsock.aclose()
        await mig.wait()
        await mig.resume()
        assert gc.isenabled()
