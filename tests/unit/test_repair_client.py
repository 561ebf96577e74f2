"""RepairClient against scripted helpers over a real socket pair.

The scripted helper reads the real messages (descriptors and all) and then
answers as the test says: correctly, wrongly, late, or not at all. So batch
numbering, pipelining and every error path are checked without privileges;
the real helper is exercised in tests/integration/test_repair_modes.py.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from ferry_repair.protocol import ANCILLARY_BUFFER_SIZE, SCM_MAX_FD, close_fds
from ferryd.migration.repair_client import (
    RepairBatchError,
    RepairClient,
    RepairError,
    RepairMode,
    RepairProtocolError,
    RepairRefused,
    RepairTimeout,
    split_batches,
)

Script = Callable[[trio.socket.SocketType], Awaitable[None]]


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """600 descriptors to hand over (3 batches of 200)."""
    opened: list[int] = []
    for _ in range(300):
        opened.extend(os.pipe())
    yield opened
    close_fds(opened)


async def receive_batch(sock: trio.socket.SocketType) -> tuple[bytes, int]:
    """One message: the command byte and how many descriptors came with it (closed)."""
    data, ancdata, _, _ = await sock.recvmsg(1, ANCILLARY_BUFFER_SIZE)
    received = array.array("i")
    for _, _, payload in ancdata:
        received.frombytes(payload)
    close_fds(received)
    return data, len(received)


class Helper:
    """The scripted helper's end, and what it saw."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.batches: list[int] = []

    async def receive(self, n: int) -> bytes:
        commands = b""
        for _ in range(n):
            data, count = await receive_batch(self.sock)
            commands += data
            self.batches.append(count)
        return commands


def pair(reply_timeout: float = 5.0, max_in_flight: int = 64) -> tuple[RepairClient, Helper]:
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = RepairClient(ours, reply_timeout=reply_timeout, max_in_flight=max_in_flight)
    return client, Helper(theirs)


@pytest.fixture
async def client_and_helper() -> AsyncIterator[tuple[RepairClient, Helper]]:
    client, helper = pair()
    yield client, helper
    await client.aclose()
    helper.sock.close()


async def test_batches_are_pipelined(
    client_and_helper: tuple[RepairClient, Helper], fds: list[int]
) -> None:
    client, helper = client_and_helper

    async def answer_after_all() -> None:
        # Reads all three batches before answering any: a client waiting for
        # each reply before sending the next batch would hang here.
        commands = await helper.receive(3)
        await helper.sock.send(commands)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_after_all)
        await client.set_repair(fds, RepairMode.OFF_NO_WINDOW_PROBE)
    assert helper.batches == [200, 200, 200]
    assert not client.closed


async def test_progress_says_how_many_are_switched_as_answers_arrive(
    client_and_helper: tuple[RepairClient, Helper], fds: list[int]
) -> None:
    """``progress(n)`` after each answer: a migration source dumps ``socks[:n]`` meanwhile."""
    client, helper = client_and_helper
    seen: list[int] = []
    answered = trio.Event()

    async def answer_one_by_one() -> None:
        commands = await helper.receive(3)
        await helper.sock.send(commands[:1])
        await answered.wait()  # the client reported the first batch before the others came
        await helper.sock.send(commands[1:])

    def progress(n: int) -> None:
        seen.append(n)
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_one_by_one)
        await client.set_repair(fds, RepairMode.ON, progress=progress)
    assert seen[0] == 200
    assert seen[-1] == 600
    assert seen == sorted(seen)


async def test_empty_is_a_no_op(client_and_helper: tuple[RepairClient, Helper]) -> None:
    """No descriptors: nothing goes to the helper and no reply is awaited.

    The helper answers only the next call's batch: had the empty call sent a
    message, the first one the helper reads would be that (ON, no descriptors);
    had it awaited a reply, it would end in RepairTimeout.
    """
    client, helper = client_and_helper
    await client.set_repair([], RepairMode.ON)
    a, b = socket.socketpair()
    with a, b:
        seen: list[bytes] = []

        async def answer() -> None:
            commands = await helper.receive(1)
            seen.append(commands)
            await helper.sock.send(commands)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            await client.set_repair([a, b], RepairMode.OFF)
    assert seen == [b"\x00"]
    assert helper.batches == [2]
    assert not client.closed


async def test_empty_needs_no_helper(client_and_helper: tuple[RepairClient, Helper]) -> None:
    """An empty call does not touch the connection: a helper that hung up is not an error.

    (A call with descriptors would find the hang-up, and with no way to
    redial, fail with RepairError.)
    """
    client, helper = client_and_helper
    helper.sock.close()
    await client.set_repair([], RepairMode.OFF)
    assert client.reconnects == 0
    with pytest.raises(RepairError):
        await client.set_repair([0], RepairMode.OFF)


async def test_accepts_socket_objects(client_and_helper: tuple[RepairClient, Helper]) -> None:
    client, helper = client_and_helper
    a, b = socket.socketpair()
    with a, b:

        async def answer() -> None:
            await helper.sock.send(await helper.receive(1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            await client.set_repair([a, b], RepairMode.ON)
    assert helper.batches == [2]


async def failing(
    fds: list[int], script: Callable[[Helper], Awaitable[None]], *, reply_timeout: float = 5.0
) -> RepairBatchError:
    client, helper = pair(reply_timeout)
    with helper.sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(script, helper)
            with pytest.raises(RepairBatchError) as excinfo:
                await client.set_repair(fds, RepairMode.ON)
            nursery.cancel_scope.cancel()
    assert client.closed
    with pytest.raises(RepairError, match="closed"):
        await client.set_repair(fds[:1], RepairMode.OFF)
    return excinfo.value


async def test_helper_closes_after_first_batch(fds: list[int]) -> None:
    async def answer_one_then_close(helper: Helper) -> None:
        await helper.sock.send(await helper.receive(1))
        helper.sock.close()

    error = await failing(fds, answer_one_then_close)
    assert isinstance(error, RepairRefused)
    assert (error.batch, error.batches, error.sockets) == (1, 3, range(200, 400))
    assert "batch 2 of 3 (sockets 200..399)" in str(error)


async def test_wrong_reply_is_the_helpers_bug(fds: list[int]) -> None:
    async def answer_wrong(helper: Helper) -> None:
        await helper.receive(3)
        await helper.sock.send(b"\x01\x00\x01")
        await trio.sleep_forever()

    error = await failing(fds, answer_wrong)
    assert isinstance(error, RepairProtocolError)
    assert error.batch == 1
    assert "answered 0x00, not 0x01" in str(error)


async def test_silent_helper_times_out(fds: list[int]) -> None:
    async def answer_two_then_nothing(helper: Helper) -> None:
        await helper.receive(3)
        await helper.sock.send(b"\x01\x01")
        await trio.sleep_forever()

    error = await failing(fds, answer_two_then_nothing, reply_timeout=0.05)
    assert isinstance(error, RepairTimeout)
    assert (error.batch, error.sockets) == (2, range(400, 600))
    assert "did not answer within 0.05 s" in str(error)


async def test_closed_descriptor_is_our_bug(fds: list[int]) -> None:
    bad = fds[:300]
    bad[160] = 1_000_000  # never open (above any RLIMIT_NOFILE): EBADF on batch 2

    async def answer(helper: Helper) -> None:
        await helper.sock.send(await helper.receive(1))
        await trio.sleep_forever()

    error = await failing(bad, answer)
    assert type(error) is RepairBatchError
    assert error.batch == 1
    assert "cannot send it to the repair helper" in str(error)


async def _close_unanswered(helper: Helper) -> None:
    await helper.receive(1)
    helper.sock.close()


async def _answer_wrong(helper: Helper) -> None:
    await helper.receive(1)
    await helper.sock.send(b"\x00")
    await trio.sleep_forever()


async def _answer_nothing(helper: Helper) -> None:
    await helper.receive(1)
    await trio.sleep_forever()


@pytest.mark.parametrize(
    ("script", "kind", "message"),
    [
        (_close_unanswered, RepairRefused, "closed the connection instead of answering"),
        (_answer_wrong, RepairProtocolError, "answered 0x00, not 0x01"),
        (_answer_nothing, RepairTimeout, "did not answer within 0.05 s"),
    ],
)
async def test_one_batch_fails_as_several_do(
    fds: list[int],
    script: Callable[[Helper], Awaitable[None]],
    kind: type[RepairBatchError],
    message: str,
) -> None:
    # One batch is sent and answered without a sender task: the same errors.
    error = await failing(fds[:100], script, reply_timeout=0.05)
    assert type(error) is kind
    assert (error.batch, error.batches, error.sockets) == (0, 1, range(100))
    assert message in str(error)


async def test_one_batch_with_a_closed_descriptor_is_our_bug(fds: list[int]) -> None:
    bad = fds[:10]
    bad[3] = 1_000_000  # never open: EBADF

    error = await failing(bad, _answer_nothing)
    assert type(error) is RepairBatchError
    assert (error.batch, error.batches) == (0, 1)
    assert "cannot send it to the repair helper" in str(error)


async def test_window_bounds_batches_in_flight(fds: list[int]) -> None:
    client, helper = pair(max_in_flight=1)
    seen: list[int] = []

    async def one_at_a_time() -> None:
        for _ in range(3):
            command = await helper.receive(1)
            # Nothing else may be in flight before this batch is answered.
            with trio.move_on_after(0) as probe:
                await helper.sock.recv(1, socket.MSG_PEEK)
            seen.append(0 if probe.cancelled_caught else 1)
            await helper.sock.send(command)

    with helper.sock:
        async with client, trio.open_nursery() as nursery:
            nursery.start_soon(one_at_a_time)
            await client.set_repair(fds, RepairMode.ON)
    assert seen == [0, 0, 0]


@pytest.mark.parametrize(
    ("n", "sizes"),
    [
        (0, []),
        (1, [1]),
        (253, [253]),
        (254, [127, 127]),
        (600, [200, 200, 200]),
        (601, [201, 200, 200]),
        (5_000, [250] * 20),
    ],
)
def test_split_batches(n: int, sizes: list[int]) -> None:
    bounds = split_batches(n)
    assert [len(b) for b in bounds] == sizes
    assert [i for b in bounds for i in b] == list(range(n))


@given(st.integers(0, 20_000), st.integers(1, SCM_MAX_FD))
def test_split_batches_properties(n: int, limit: int) -> None:
    sizes = [len(b) for b in split_batches(n, limit)]
    assert sum(sizes) == n
    assert all(1 <= size <= limit for size in sizes)
    assert sizes == sorted(sizes, reverse=True)  # never growing
    assert len(sizes) == -(-n // limit)  # as few as possible


async def test_steady_batches_never_grow(fds: list[int]) -> None:
    # What passt-repair needs: no batch larger than the one before, across calls.
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    helper = Helper(theirs)

    async def answer_forever() -> None:
        while True:
            await helper.sock.send(await helper.receive(1))

    with helper.sock:
        async with RepairClient(ours, steady_batches=True) as client, trio.open_nursery() as n:
            n.start_soon(answer_forever)
            await client.set_repair(fds[:599], RepairMode.ON)
            await client.set_repair(fds[:10], RepairMode.OFF)
            await client.set_repair(fds[:600], RepairMode.ON)
            n.cancel_scope.cancel()
    assert helper.batches == [200, 200, 199, 10] + [10] * 60
    assert helper.batches == sorted(helper.batches, reverse=True)


def test_window_must_be_positive() -> None:
    ours, theirs = trio.socket.socketpair()
    with ours, theirs, pytest.raises(ValueError):
        RepairClient(ours, max_in_flight=0)
