"""The vhost-user socket with real descriptors: a test plays QEMU over a socketpair.

Real SCM_RIGHTS, a real memfd as guest RAM (mapped by the daemon's
MmapMapper), real eventfds; no root, no QEMU.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import os
import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from ferryd.frontends.vhost_user.actions import (
    Action,
    RingChanged,
    SetCall,
    SetKick,
    TransferDeviceState,
)
from ferryd.frontends.vhost_user.channel import FAIRNESS, serve_connection
from ferryd.frontends.vhost_user.device import NetDevice, VhostUserCounters
from ferryd.frontends.vhost_user.features import (
    OFFERED_FEATURES,
    OFFERED_PROTOCOL_FEATURES,
    RX_QUEUE,
    TX_QUEUE,
)
from ferryd.frontends.vhost_user.memory import MmapMapper
from ferryd.frontends.vhost_user.messages import (
    HEADER_SIZE,
    Request,
    TransferDirection,
    build_request,
    pack_device_state,
    pack_memory_table,
    pack_u64,
    pack_vring_address,
    pack_vring_file,
    pack_vring_state,
)
from ferryd.frontends.vhost_user.session import VhostUserSession
from ferryd.frontends.vhost_user.virtqueue import NetHeader
from tests.unit.vhost_guest import ACKED_FEATURES, GuestDriver, MemfdRam, RamRegion

REGION = RamRegion(fd=-1, gpa=0, size=4 << 20, uva=0x7F12_0000_0000, offset=0)


def _open_fds() -> set[str]:
    """What this process's descriptors point at ("fd -> target"), to see what is new."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            out.add(f"{name} -> {os.readlink(f'/proc/self/fd/{name}')}")
    return out


def _memfds() -> int:
    return sum("memfd:guest-ram" in entry for entry in _open_fds())


class FakeQemu:
    """QEMU's side of the socket: requests with descriptors out, replies in."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def send(
        self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (), ack: bool = False
    ) -> None:
        data = build_request(request, payload, need_reply=ack)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        await self.sock.sendmsg([data], rights if fds else [])

    async def reply(self) -> tuple[int, int, bytes]:
        header = await self._exactly(HEADER_SIZE)
        request, flags, size = struct.unpack("=III", header)
        return request, flags, await self._exactly(size)

    async def u64(self, request: int, ack: bool = False) -> int:
        await self.send(request, ack=ack)
        got, flags, payload = await self.reply()
        assert (got, flags) == (request, 0x5)
        return int(struct.unpack("=Q", payload)[0])

    async def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            more = await self.sock.recv(n - len(out))
            assert more, "ferryd closed the connection"
            out += more
        return out


class Served:
    def __init__(self) -> None:
        self.session = VhostUserSession(MmapMapper())
        self.applied: list[Action] = []
        self.checks: list[TransferDirection] = []
        self.done = trio.Event()

    async def apply(self, action: Action) -> None:
        self.applied.append(action)

    async def check(self, direction: TransferDirection) -> bool:
        self.checks.append(direction)
        return True

    def close_applied_fds(self) -> None:
        """The adapter's part: eventfds and the device state's pipe end."""
        for a in self.applied:
            if isinstance(a, (SetKick, SetCall, TransferDeviceState)) and a.fd is not None:
                os.close(a.fd)


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeQemu, Served]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    state = Served()
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            with ours:
                await serve_connection(ours, state.session, state.apply, state.check)
            state.done.set()

        nursery.start_soon(run)
        with trio.socket.from_stdlib_socket(theirs) as qsock:
            yield FakeQemu(qsock), state
        await state.done.wait()
    state.close_applied_fds()


async def test_start_up_with_real_descriptors_then_frames_through_the_mapping(
    served: tuple[FakeQemu, Served],
) -> None:
    qemu, state = served
    ram = MemfdRam(REGION)
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        assert await qemu.u64(Request.GET_FEATURES) == OFFERED_FEATURES
        assert await qemu.u64(Request.GET_PROTOCOL_FEATURES) == OFFERED_PROTOCOL_FEATURES
        await qemu.send(Request.SET_PROTOCOL_FEATURES, pack_u64(OFFERED_PROTOCOL_FEATURES))
        await qemu.send(Request.SET_OWNER)
        await qemu.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES))
        assert _memfds() == 1  # the test's own
        region = RamRegion(ram.fd, REGION.gpa, REGION.size, REGION.uva, REGION.offset)
        await qemu.send(
            Request.SET_MEM_TABLE, pack_memory_table([region.spec]), (ram.fd,), ack=True
        )
        assert await qemu.reply() == (Request.SET_MEM_TABLE, 0x5, pack_u64(0))
        # ferryd's copy of the memfd is closed; its mapping keeps one (CPython's mmap dup()s)
        assert _memfds() == 2
        drivers = {}
        for index, base in ((RX_QUEUE, 0x10000), (TX_QUEUE, 0x20000)):
            driver = drivers[index] = GuestDriver(ram, index, 64, base)
            await qemu.send(Request.SET_VRING_NUM, pack_vring_state(index, 64))
            await qemu.send(Request.SET_VRING_BASE, pack_vring_state(index, 0))
            await qemu.send(Request.SET_VRING_ADDR, pack_vring_address(driver.address))
            await qemu.send(Request.SET_VRING_KICK, pack_vring_file(index, True), (kick,))
            await qemu.send(Request.SET_VRING_CALL, pack_vring_file(index, True), (call,))
            await qemu.send(Request.SET_VRING_ENABLE, pack_vring_state(index, 1), ack=True)
            assert await qemu.reply() == (Request.SET_VRING_ENABLE, 0x5, pack_u64(0))
        assert RingChanged(TX_QUEUE, True, True) in state.applied
        kicks = [a for a in state.applied if isinstance(a, SetKick)]
        assert len(kicks) == 2 and all(os.fstat(a.fd or -1) for a in kicks)
        # the guest sends a frame; ferryd reads it through its own mapping of the memfd
        device = NetDevice(state.session, VhostUserCounters())
        frame = NetHeader().pack() + b"through shared memory" * 50
        ram.write(0x100000, frame)
        tx = drivers[TX_QUEUE]
        tx.post(tx.chain([(0x100000, len(frame), 0)]))
        got: list[bytes] = []
        device.receive_burst(lambda f, t: got.append(bytes(f)), 64)
        assert got == [frame[12:]]
        rx = drivers[RX_QUEUE]
        rx.post(rx.chain([(0x200000, 4096, 2)]))
        device.send(b"and back")
        assert ram.read(0x200000 + 12, 8) == b"and back"
        # the device state: saved after the rings stop, checked by the controller
        for index in (RX_QUEUE, TX_QUEUE):
            await qemu.send(Request.GET_VRING_BASE, pack_vring_state(index, 0))
            _, _, payload = await qemu.reply()
            assert struct.unpack("=II", payload) == (index, 1)
        r, w = os.pipe()
        try:
            await qemu.send(Request.SET_DEVICE_STATE_FD, pack_device_state(0, 0), (r,))
            assert await qemu.reply() == (Request.SET_DEVICE_STATE_FD, 0x5, pack_u64(0x100))
            assert await qemu.u64(Request.CHECK_DEVICE_STATE) == 0
            assert state.checks == [TransferDirection.SAVE]
            (transfer,) = [a for a in state.applied if isinstance(a, TransferDeviceState)]
            assert transfer.direction is TransferDirection.SAVE
            assert os.fstat(transfer.fd).st_ino == os.fstat(r).st_ino  # QEMU's pipe
        finally:
            os.close(r)
            os.close(w)
    finally:
        os.close(kick)
        os.close(call)
        ram.close()


async def test_too_many_descriptors_disconnect_and_are_all_closed(
    served: tuple[FakeQemu, Served],
) -> None:
    qemu, state = served
    fds = [os.eventfd(0) for _ in range(12)]
    try:
        before = _open_fds()
        await qemu.send(Request.SET_OWNER, b"", tuple(fds))
        await state.done.wait()
        assert _open_fds() <= before  # what ferryd received is closed again
        assert await qemu.sock.recv(1) == b""  # and the connection ended
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("=III", Request.SET_MEM_TABLE, 1, 1 << 20),  # oversized: refused unread
        build_request(Request.SET_FEATURES, pack_u64(1))[:15],  # closed mid-message
        build_request(77),  # unknown request
        build_request(Request.SET_VRING_CALL, pack_vring_file(0, True)),  # before SET_OWNER
    ],
)
async def test_invalid_messages_end_the_connection_cleanly(
    served: tuple[FakeQemu, Served], data: bytes
) -> None:
    qemu, state = served
    fd = os.eventfd(0)
    try:
        before = _open_fds()
        await qemu.sock.sendmsg(
            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        )
        qemu.sock.shutdown(socket.SHUT_WR)
        await state.done.wait()
        assert _open_fds() <= before
        assert state.session.memory is None
    finally:
        os.close(fd)


async def test_a_header_in_pieces_keeps_its_descriptors(
    served: tuple[FakeQemu, Served],
) -> None:
    qemu, state = served
    call = os.eventfd(0)
    try:
        await qemu.send(Request.SET_OWNER)
        data = build_request(Request.SET_VRING_CALL, pack_vring_file(0, True))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [call]).tobytes())]
        await qemu.sock.sendmsg([data[:5]], rights)
        await trio.testing.wait_all_tasks_blocked()  # ferryd read the first piece alone
        await qemu.sock.send(data[5:])
        await qemu.send(Request.GET_FEATURES)
        await qemu.reply()  # every message before it was handled
        (set_call,) = [a for a in state.applied if isinstance(a, SetCall)]
        assert set_call.index == 0 and set_call.fd is not None
        assert os.fstat(set_call.fd).st_ino == os.fstat(call).st_ino
    finally:
        os.close(call)


@pytest.mark.parametrize("requests", [1, 50])
async def test_qemu_dying_with_replies_unread_ends_the_connection_cleanly(
    served: tuple[FakeQemu, Served], requests: int
) -> None:
    """QEMU killed mid-conversation: ECONNRESET or EPIPE ends the session, never ferryd.

    Closing a unix socket with data unread resets the peer (ECONNRESET on its
    next receive); a reply to a closed peer fails with EPIPE. Many requests
    make both likely, whichever way the scheduling falls.
    """
    qemu, state = served
    for _ in range(requests):
        await qemu.send(Request.GET_FEATURES)
    qemu.sock.close()
    with trio.fail_after(10):
        await state.done.wait()
    assert state.session.memory is None


async def test_a_message_flood_leaves_the_data_path_its_turns(
    served: tuple[FakeQemu, Served],
) -> None:
    """Messages already there are read without yielding (a reply must not wait for
    every busy flow task), yet a QEMU writing faster than they are handled does not
    keep the other tasks from running: FAIRNESS messages at most, then a turn."""
    qemu, state = served
    await qemu.send(Request.SET_OWNER)
    n = 4 * FAIRNESS
    message = build_request(Request.SET_VRING_CALL, pack_vring_file(0, True))
    # All written before ferryd runs again (no await in between); each is handed
    # to the adapter (applied) as it is handled.
    with socket.socket(fileno=os.dup(qemu.sock.fileno())) as raw:
        for _ in range(n):
            fd = os.dup(0)
            raw.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            os.close(fd)  # (in flight: the message holds its own reference)
    seen: list[int] = []
    with trio.fail_after(10):
        while len(state.applied) < n:
            seen.append(len(state.applied))
            await trio.lowlevel.checkpoint()
    steps = [b - a for a, b in itertools.pairwise([*seen, n])]
    # (Within one scheduler round trio may run the channel before or after this
    # task: two of its batches may fall between two looks.)
    assert max(steps) <= 2 * FAIRNESS, steps
    assert max(steps) > 1  # (several per turn: read without yielding)
