"""RepairClient reaching its helper again: a stale connection, a failed one, one retry.

The situation behind issue 9 item 8: ferryd keeps its helper connection
from one migration to the next, the helper is restarted in between, and
the next freeze (or the rollback after a failed one) must not be served
by the dead connection. Each scripted helper here is a pure protocol peer
over a socket pair (tests/unit/test_repair_client.py); ``redial`` hands
the client a new pair whose far end runs the next script, as connecting
to a restarted ferry-repair would. The real helper, killed and restarted
under a migrating ferryd, is tests/integration/test_migration_helper_restart.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio

from ferry_repair.protocol import close_fds
from ferryd.migration.repair_client import (
    RepairClient,
    RepairError,
    RepairMode,
    RepairRefused,
    RepairUnavailable,
)
from tests.unit.test_repair_client import Helper

Script = Callable[[Helper], Awaitable[None]]


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    for _ in range(150):
        opened.extend(os.pipe())
    yield opened
    close_fds(opened)


async def serve(helper: Helper) -> None:
    """A working helper: answers every batch, until the client hangs up."""
    while True:
        try:
            command = await helper.receive(1)
        except (OSError, trio.ClosedResourceError):  # hung up, or "restarted" by the test
            return
        if not command:
            return
        await helper.sock.send(command)


async def read_one_and_close(helper: Helper) -> None:
    """A helper that dies (or refuses) on the first batch it reads."""
    await helper.receive(1)
    helper.sock.close()


class Helpers:
    """The helpers a client reaches, one per connection, each running its script."""

    def __init__(self, nursery: trio.Nursery, *scripts: Script) -> None:
        self.nursery = nursery
        self.scripts = list(scripts)
        self.helpers: list[Helper] = []

    def connect(self) -> trio.socket.SocketType:
        ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        helper = Helper(theirs)
        self.helpers.append(helper)
        self.nursery.start_soon(self.scripts.pop(0), helper)
        return ours

    async def redial(self) -> trio.socket.SocketType:
        await trio.lowlevel.checkpoint()
        if not self.scripts:
            raise RepairUnavailable("no helper listening (test)")
        return self.connect()

    def client(self) -> RepairClient:
        return RepairClient(self.connect(), reply_timeout=5.0, redial=self.redial)

    def close(self) -> None:
        for helper in self.helpers:
            helper.sock.close()


async def test_stale_connection_is_replaced_before_use(fds: list[int]) -> None:
    """The helper hung up between two calls (restarted): the next call dials anew."""
    async with trio.open_nursery() as nursery:
        helpers = Helpers(nursery, serve, serve)
        client = helpers.client()
        await client.set_repair(fds, RepairMode.ON)
        helpers.helpers[0].sock.close()  # the helper restarts
        await client.set_repair(fds, RepairMode.OFF)
        assert client.reconnects == 1
        assert helpers.helpers[1].batches == [150, 150]
        await client.aclose()
        nursery.cancel_scope.cancel()
    helpers.close()


async def test_helper_dies_during_the_call_on_a_reused_connection(fds: list[int]) -> None:
    """Alive at the check, gone before answering: the call is repeated anew, once."""

    async def serve_once_then_die(helper: Helper) -> None:
        await helper.sock.send(await helper.receive(1))
        await read_one_and_close(helper)

    async with trio.open_nursery() as nursery:
        helpers = Helpers(nursery, serve_once_then_die, serve)
        client = helpers.client()
        await client.set_repair(fds[:10], RepairMode.ON)
        await client.set_repair(fds, RepairMode.ON)  # the first helper dies on it
        assert client.reconnects == 1
        assert helpers.helpers[0].batches == [10, 150]
        assert helpers.helpers[1].batches == [150, 150]
        await client.aclose()
        nursery.cancel_scope.cancel()
    helpers.close()


async def test_fresh_connection_refused_is_not_retried(fds: list[int]) -> None:
    """A helper that refuses on a new connection means it: no second try."""
    async with trio.open_nursery() as nursery:
        helpers = Helpers(nursery, read_one_and_close, serve)
        client = helpers.client()
        with pytest.raises(RepairRefused) as refused:
            await client.set_repair(fds, RepairMode.ON)
        assert refused.value.batch == 0
        assert client.reconnects == 0
        # The next call (a rollback) does not reuse the failed connection.
        await client.set_repair(fds, RepairMode.OFF)
        assert client.reconnects == 1
        assert helpers.helpers[1].batches == [150, 150]
        await client.aclose()
        nursery.cancel_scope.cancel()
    helpers.close()


async def test_retry_refused_again_fails(fds: list[int]) -> None:
    async def serve_once_then_refuse(helper: Helper) -> None:
        await helper.sock.send(await helper.receive(1))
        await read_one_and_close(helper)

    async with trio.open_nursery() as nursery:
        helpers = Helpers(nursery, serve_once_then_refuse, read_one_and_close)
        client = helpers.client()
        await client.set_repair(fds[:1], RepairMode.ON)
        with pytest.raises(RepairRefused) as refused:
            await client.set_repair(fds, RepairMode.ON)
        assert client.reconnects == 1  # exactly one retry
        # Both refusals are named, and the error is still the second one's.
        assert str(refused.value).count("closed the connection instead of answering") == 2
        assert refused.value.batch == 0
        nursery.cancel_scope.cancel()
    helpers.close()


async def test_refusal_then_no_helper_names_the_refusal(fds: list[int]) -> None:
    """A genuine refusal of batch 0 on a reused connection looks like a helper gone:
    when the new connection then fails too, the error names both, refusal first."""

    async def serve_once_then_refuse(helper: Helper) -> None:
        await helper.sock.send(await helper.receive(1))
        await read_one_and_close(helper)

    async with trio.open_nursery() as nursery:
        helpers = Helpers(nursery, serve_once_then_refuse)  # nothing to redial
        client = helpers.client()
        await client.set_repair(fds[:1], RepairMode.ON)
        with pytest.raises(RepairUnavailable) as failed:
            await client.set_repair(fds, RepairMode.ON)
        message = str(failed.value)
        assert message.startswith("TCP_REPAIR batch 1 of 2 (sockets 0..149) failed:")
        assert "closed the connection instead of answering" in message
        assert message.endswith("; then, on a new connection: no helper listening (test)")
        assert isinstance(failed.value.__cause__, RepairRefused)
        nursery.cancel_scope.cancel()
    helpers.close()


async def test_refusal_after_answers_is_not_retried(fds: list[int]) -> None:
    """Batches were answered, then the connection closed: not stale, the caller's error."""

    async def serve_then_fail_mid_call(helper: Helper) -> None:
        await helper.sock.send(await helper.receive(1))
        await helper.sock.send(await helper.receive(1))  # batch 1 of the second call
        await read_one_and_close(helper)

    async with trio.open_nursery() as nursery:
        helpers = Helpers(nursery, serve_then_fail_mid_call, serve)
        client = helpers.client()
        await client.set_repair(fds[:1], RepairMode.ON)
        with pytest.raises(RepairRefused) as refused:
            await client.set_repair(fds, RepairMode.ON)
        assert refused.value.batch == 1
        assert client.reconnects == 0
        nursery.cancel_scope.cancel()
    helpers.close()


async def test_no_helper_to_reach(fds: list[int]) -> None:
    """The helper is down: the call says so (RepairUnavailable), and the next one tries again."""
    async with trio.open_nursery() as nursery:
        helpers = Helpers(nursery, serve)
        client = helpers.client()
        await client.set_repair(fds, RepairMode.ON)
        helpers.helpers[0].sock.close()  # stopped, nobody restarts it (yet)
        with pytest.raises(RepairUnavailable):
            await client.set_repair(fds, RepairMode.OFF)
        assert not client.closed
        helpers.scripts.append(serve)  # back
        await client.set_repair(fds, RepairMode.OFF)
        assert helpers.helpers[1].batches == [150, 150]
        await client.aclose()
        with pytest.raises(RepairError, match="closed"):
            await client.set_repair(fds, RepairMode.OFF)
        nursery.cancel_scope.cancel()
    helpers.close()
