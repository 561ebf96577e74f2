"""ferryd.frontends.stream: QEMU's stream netdev served on a real Unix socket.

The "QEMU" here is a plain Unix stream client in the test (no privilege
needed): what it writes and reads is checked byte for byte against what the
frontend delivered and sent.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from ferryd.frontends.base import Frontend
from ferryd.frontends.stream import (
    StreamAddressInUse,
    StreamFrontend,
    StreamSetupError,
    open_listener,
)
from ferryd.frontends.stream_framing import FrameReader, max_frame_for_mtu
from ferryd.wire.checksum import complete_partial
from testbed.wait import until
from tests.unit.test_qemu_stream_framing import framed

WAIT = 10.0


def numbered(i: int, size: int = 100) -> bytes:
    return i.to_bytes(4, "big") + bytes((i + k) % 251 for k in range(size - 4))


class Qemu:
    """A stand-in for QEMU: a client of ferryd's socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.reader = FrameReader()

    @classmethod
    async def connect(cls, path: Path) -> Qemu:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(path))
        return cls(sock)

    async def send(self, data: bytes) -> None:
        while data:
            n = await self.sock.send(data)
            data = data[n:]

    async def frames(self, count: int) -> list[bytes]:
        got: list[bytes] = []
        with trio.fail_after(WAIT):
            while len(got) < count:
                data = await self.sock.recv(1 << 20)
                assert data, f"ferryd closed the connection after {len(got)} frames"
                got += [bytes(f) for f in self.reader.feed_untrusted(data)]
        return got

    async def closed_by_ferryd(self) -> bool:
        with trio.fail_after(WAIT):
            while True:
                try:
                    data = await self.sock.recv(1 << 16)
                except ConnectionResetError:
                    return True
                if not data:
                    return True

    def close(self) -> None:
        self.sock.close()


class Guest:
    """What the frontend delivered (the stack's side)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.trusted: list[bool] = []
        self.bursts = 0

    def on_frame(self, frame: memoryview, trusted: bool) -> None:
        self.frames.append(bytes(frame))
        self.trusted.append(trusted)

    def on_burst_end(self) -> None:
        self.bursts += 1


@asynccontextmanager
async def served(
    tmp_path: Path, *, incoming: bool = False, mtu: int = 65520, run: bool = True
) -> AsyncIterator[tuple[StreamFrontend, Guest, Path, trio.Nursery]]:
    path = tmp_path / "qemu.sock"
    frontend = StreamFrontend.listen(str(path), mtu, incoming=incoming)
    conforms: Frontend = frontend  # the interface the data path drives
    guest = Guest()
    try:
        async with trio.open_nursery() as nursery:
            if run:
                nursery.start_soon(conforms.run, guest.on_frame, guest.on_burst_end)
            yield frontend, guest, path, nursery
            nursery.cancel_scope.cancel()
    finally:
        frontend.close()


# --- the socket file -----------------------------------------------------------


def test_socket_is_private_and_removed_at_close(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "qemu.sock"
    frontend = StreamFrontend.listen(str(path), 1500)
    mode = os.lstat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert frontend.describe() == {
        "kind": "stream",
        "path": str(path),
        "connected": False,
        "peer_pid": None,
    }
    frontend.close()
    assert not path.exists()


def test_a_stale_socket_is_replaced_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "qemu.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays: a ferryd that died
    listener, _ = open_listener(str(path))
    try:
        with pytest.raises(StreamAddressInUse, match="already listens there"):
            open_listener(str(path))
    finally:
        listener.close()


def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("mine")
    with pytest.raises(StreamAddressInUse, match="not a socket"):
        open_listener(str(path))
    assert path.read_text() == "mine"
    with pytest.raises(StreamSetupError, match="not a directory"):
        open_listener(str(path / "qemu.sock"))


# --- frames in and out -----------------------------------------------------------


async def test_frames_both_ways(tmp_path: Path) -> None:
    async with served(tmp_path) as (frontend, guest, path, _):
        qemu = await Qemu.connect(path)
        sent = [numbered(i, 60 + i * 97) for i in range(50)]
        data = framed(*sent)
        for at in range(0, len(data), 777):  # pieces that cut frames anywhere
            await qemu.send(data[at : at + 777])
        await until(lambda: len(guest.frames) == len(sent), what="every frame delivered")
        assert guest.frames == sent
        assert guest.trusted == [False] * len(sent)  # complete frames: verified by the stack
        assert guest.bursts >= 1
        assert frontend.describe()["connected"] is True
        assert frontend.describe()["peer_pid"] == os.getpid()

        out = [numbered(i, 1514) for i in range(20)]
        for f in out:
            frontend.send(f)
        assert await qemu.frames(len(out)) == out
        assert frontend.counters.frames_in == len(sent)
        assert frontend.counters.frames_out == len(out)
        assert frontend.counters.dropped_out == 0
        qemu.close()


async def test_send_partial_completes_the_checksum(tmp_path: Path) -> None:
    """No offload on a stream: a partial checksum leaves ferryd summed."""
    async with served(tmp_path) as (frontend, _, path, _):
        qemu = await Qemu.connect(path)
        await until(lambda: frontend.describe()["connected"], what="QEMU accepted")
        head = bytes(range(34)) + bytes(20)  # eth+ip (34), a TCP header with a zero field
        payload = bytes(range(200))
        frontend.send_partial([head, memoryview(payload)], 34, 16)
        (got,) = await qemu.frames(1)
        assert got == head[:34] + complete_partial(head[34:], 16, payload) + payload
        assert not frontend.csum_offload
        qemu.close()


async def test_one_qemu_at_a_time_then_the_next(tmp_path: Path) -> None:
    async with served(tmp_path) as (frontend, guest, path, _):
        first = await Qemu.connect(path)
        await first.send(framed(numbered(1)))
        await until(lambda: guest.frames == [numbered(1)], what="the first QEMU served")
        second = await Qemu.connect(path)
        assert await second.closed_by_ferryd()
        second.close()
        assert frontend.counters.refused == 1
        await first.send(framed(numbered(2)))  # the first one is still served
        await until(lambda: len(guest.frames) == 2, what="the first QEMU still served")

        first.close()  # QEMU goes away and comes back (reconnect-ms)
        third = await Qemu.connect(path)
        await third.send(framed(numbered(3)))
        await until(lambda: len(guest.frames) == 3, what="the reconnected QEMU served")
        assert guest.frames[2] == numbered(3)
        frontend.send(numbered(4))
        assert await third.frames(1) == [numbered(4)]
        assert frontend.counters.connections == 2
        assert frontend.counters.refused == 1
        third.close()


async def test_a_reconnect_racing_the_hangup_is_served(tmp_path: Path) -> None:
    """A QEMU that hangs up and connects again at once is not refused as a second one."""
    async with served(tmp_path) as (frontend, guest, path, _):
        for i in range(20):
            qemu = await Qemu.connect(path)  # right after the last one hung up
            await qemu.send(framed(numbered(i)))
            await until(lambda: len(guest.frames) == i + 1, what="served")  # noqa: B023
            qemu.close()
        await until(lambda: len(guest.frames) == 20, what="every reconnect served")
        assert guest.frames == [numbered(i) for i in range(20)]
        assert frontend.counters.refused == 0
        assert frontend.counters.connections == 20


@pytest.mark.parametrize("length", [0, 65535 + 14 + 1, 1500 + 14 + 4 + 1, 0xFFFFFFFF])
async def test_a_hostile_length_costs_qemu_its_connection_only(
    tmp_path: Path, length: int, caplog: pytest.LogCaptureFixture
) -> None:
    async with served(tmp_path, mtu=1500) as (frontend, guest, path, _):
        qemu = await Qemu.connect(path)
        await qemu.send(framed(numbered(1)))
        await until(lambda: len(guest.frames) == 1, what="a good frame first")
        await qemu.send(struct.pack(">I", length) + bytes(64))
        assert await qemu.closed_by_ferryd()
        qemu.close()
        assert frontend.counters.framing_errors == 1
        assert f"frame length of {length} bytes" in caplog.text
        assert "dropped the connection" in caplog.text
        frontend.send(numbered(9))  # nobody to send to: dropped, counted
        assert frontend.counters.dropped_out == 1

        again = await Qemu.connect(path)  # ferryd serves the next one
        await again.send(framed(numbered(2)))
        await until(lambda: len(guest.frames) == 2, what="the next QEMU served")
        assert guest.frames == [numbered(1), numbered(2)]
        again.close()


async def test_a_full_qemu_costs_frames_never_half_a_frame(tmp_path: Path) -> None:
    """QEMU not reading: frames are dropped and counted, and the stream stays framed.

    64 KiB frames overflow the socket part-way through a frame: that frame
    is finished before any later one, so QEMU reads only whole frames, in
    order, and exactly as many as ferryd counted out.
    """
    async with served(tmp_path) as (frontend, _, path, _):
        qemu = await Qemu.connect(path)
        await until(lambda: frontend.describe()["connected"], what="QEMU accepted")
        size = max_frame_for_mtu(65520) - 4
        total = 200
        for i in range(total):
            frontend.send(numbered(i, size))
        counters = frontend.counters
        assert counters.dropped_out > 0
        assert counters.frames_out + counters.dropped_out == total
        got = await qemu.frames(counters.frames_out)
        indexes = [int.from_bytes(f[:4], "big") for f in got]
        assert indexes == sorted(indexes)
        assert all(f == numbered(i, size) for f, i in zip(got, indexes, strict=True))
        # Room again: the next frame goes through whole.
        frontend.send(numbered(total, size))
        assert await qemu.frames(1) == [numbered(total, size)]
        qemu.close()


async def test_a_refused_frame_is_said_and_room_again_ends_a_burst(tmp_path: Path) -> None:
    """send() says which frames QEMU's full side refused (TCP's push stops there), and
    once QEMU reads again the frontend calls on_burst_end (the push goes on); while
    it does not read, no such call comes."""
    async with served(tmp_path) as (frontend, guest, path, _):
        qemu = await Qemu.connect(path)
        await until(lambda: frontend.describe()["connected"], what="QEMU accepted")
        size = max_frame_for_mtu(65520) - 4
        taken = [frontend.send(numbered(i, size)) for i in range(200)]
        assert taken.count(True) == frontend.counters.frames_out
        assert taken.count(False) == frontend.counters.dropped_out > 0
        bursts = guest.bursts
        with trio.fail_after(WAIT):
            await trio.testing.wait_all_tasks_blocked()  # waiting for writability
        assert guest.bursts == bursts  # QEMU reads nothing: no room, no call
        await qemu.frames(frontend.counters.frames_out)
        await until(lambda: guest.bursts > bursts, what="on_burst_end once QEMU read")
        assert frontend.send(numbered(200, size))
        qemu.close()


# --- the handover -------------------------------------------------------------------


async def test_incoming_waits_unread_until_run(tmp_path: Path) -> None:
    """A migration target's QEMU connects at once; its frames wait until resume."""
    async with served(tmp_path, incoming=True, run=False) as (frontend, guest, path, nursery):
        qemu = await Qemu.connect(path)  # sits in the backlog: nothing accepts yet
        await qemu.send(framed(numbered(1), numbered(2)))
        frontend.send(numbered(0))
        assert frontend.counters.dropped_out == 1  # not serving, not connected
        assert guest.frames == []
        frontend.take_over()
        nursery.start_soon(frontend.run, guest.on_frame, guest.on_burst_end)
        await until(lambda: len(guest.frames) == 2, what="the frames held until resume")
        assert guest.frames == [numbered(1), numbered(2)]
        qemu.close()


async def test_hand_over_drains_then_stops_both_ways(tmp_path: Path) -> None:
    async with served(tmp_path, run=False) as (frontend, guest, path, nursery):
        qemu = await Qemu.connect(path)
        generation, stopped = trio.CancelScope(), trio.Event()  # one data path generation
        nursery.start_soon(_run_in, generation, stopped, frontend, guest)
        await qemu.send(framed(numbered(1)))
        await until(lambda: len(guest.frames) == 1, what="served")
        generation.cancel()  # the freeze: the data path stops
        await stopped.wait()
        await qemu.send(framed(numbered(2), numbered(3)))  # in ferryd's socket, unread
        assert len(guest.frames) == 1
        drained = Guest()
        frontend.drain(drained.on_frame, drained.on_burst_end)
        assert drained.frames == [numbered(2), numbered(3)]
        frontend.hand_over()
        frontend.send(numbered(4))
        assert frontend.counters.dropped_out == 1
        await qemu.send(framed(numbered(5)))
        frontend.drain(drained.on_frame, drained.on_burst_end)  # handed over: not read
        assert len(drained.frames) == 2
        # A rollback: the same QEMU is served again, from where it was.
        frontend.take_over()
        nursery.start_soon(frontend.run, guest.on_frame, guest.on_burst_end)
        await until(lambda: len(guest.frames) == 2, what="served again")
        assert guest.frames[1] == numbered(5)
        qemu.close()


async def _run_in(
    scope: trio.CancelScope, stopped: trio.Event, frontend: StreamFrontend, guest: Guest
) -> None:
    try:
        with scope:
            await frontend.run(guest.on_frame, guest.on_burst_end)
    finally:
        stopped.set()
