"""VhostUserFrontend and its device-state handler: what the migration hears, and when.

The frontend runs for real (its listening socket, trio, eventfds, the
guest's RAM in a memfd mapped by MmapMapper); testbed/vhost_user_driver.py
plays QEMU from a worker thread (blocking, as QEMU is towards its
back-end). The handler records each call with whether a ring was running
at that moment: a rollback (resumed) and a ring's start (started) must be
heard before any frame can flow, and the device state's descriptor is
QEMU's own pipe.
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.lowlevel
import trio.testing

from ferryd.frontends.vhost_user.frontend import VhostUserFrontend
from ferryd.frontends.vhost_user.messages import (
    Request,
    TransferDirection,
    pack_device_state,
    pack_u64,
)
from testbed.vhost_user_driver import ACKED_FEATURES, VhostUserQemu

T = TypeVar("T")


class Recorder:
    """A DeviceStateHandler that writes down what it is told (and what ran then)."""

    def __init__(self) -> None:
        self.frontend: VhostUserFrontend | None = None
        self.calls: list[tuple[str, object]] = []
        self.fds: list[int] = []
        self.verdict = True
        self.disconnected_event = trio.Event()

    def _running(self) -> tuple[bool, ...]:
        assert self.frontend is not None
        return tuple(self.frontend.describe()["rings"].values())

    def save(self, fd: int) -> None:
        self.fds.append(fd)
        self.calls.append(("save", None))

    def load(self, fd: int) -> None:
        self.fds.append(fd)
        self.calls.append(("load", None))

    async def check(self, direction: TransferDirection) -> bool:
        await trio.lowlevel.checkpoint()
        self.calls.append(("check", direction))
        return self.verdict

    async def resumed(self) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append(("resumed", self._running()))

    async def started(self) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append(("started", self._running()))

    def dirty_logging(self, on: bool) -> None:
        self.calls.append(("dirty_logging", on))

    def suspended(self) -> None:
        self.calls.append(("suspended", self._running()))

    def disconnected(self) -> None:
        self.calls.append(("disconnected", None))
        self.disconnected_event.set()


class Running:
    def __init__(self, frontend: VhostUserFrontend, recorder: Recorder) -> None:
        self.frontend = frontend
        self.recorder = recorder
        self.frames: list[bytes] = []
        self.arrived = trio.Event()

    def on_frame(self, frame: memoryview, trusted: bool) -> None:
        self.frames.append(bytes(frame))
        self.arrived.set()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    frontend = VhostUserFrontend.listen(str(tmp_path / "vhost.sock"))
    recorder = Recorder()
    recorder.frontend = frontend
    frontend.handler = recorder
    state = Running(frontend, recorder)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(frontend.serve)
            nursery.start_soon(frontend.run, state.on_frame, lambda: None)
            yield state
            nursery.cancel_scope.cancel()
    finally:
        frontend.close()
        for fd in recorder.fds:
            os.close(fd)
    assert not (tmp_path / "vhost.sock").exists()  # removed: it was ours


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """QEMU's side, blocking, while the frontend serves it."""
    return await trio.to_thread.run_sync(fn, *args)


async def test_save_check_then_a_restart_rolls_back_before_any_frame(running: Running) -> None:
    frontend, recorder = running.frontend, running.recorder
    qemu = VhostUserQemu(frontend.path)
    try:
        await _in_thread(qemu.start)
        assert recorder.calls == [("started", (False, False)), ("started", (True, False))]
        assert frontend.csum_offload  # the guest acked GUEST_CSUM
        await _in_thread(qemu.transmit, b"before the migration" * 3)
        await running.arrived.wait()
        assert running.frames == [b"before the migration" * 3]

        # QEMU's save: the rings stop, the pipe goes to the handler, the check waits for it.
        for ring in (qemu.rx, qemu.tx):
            await _in_thread(qemu.stop_ring, ring)
        assert frontend.describe()["rings"] == {"rx": False, "tx": False}
        r, w = os.pipe()
        try:
            await _in_thread(qemu.send, Request.SET_DEVICE_STATE_FD, pack_device_state(0, 0), (w,))
            assert await _in_thread(qemu.reply) == (
                Request.SET_DEVICE_STATE_FD,
                0x5,
                pack_u64(0x100),
            )
            assert await _in_thread(qemu.u64, Request.CHECK_DEVICE_STATE) == 0
            (fd,) = recorder.fds
            os.write(fd, b"ferry's stream")
            assert os.read(r, 100) == b"ferry's stream"  # the handler got QEMU's pipe
        finally:
            os.close(r)
            os.close(w)
        assert recorder.calls[2:] == [("save", None), ("check", TransferDirection.SAVE)]

        # The migration failed later: QEMU starts the rings again. The rollback
        # comes first, with no ring running, then each start, and frames flow.
        del recorder.calls[:]
        running.arrived = trio.Event()
        for ring in (qemu.rx, qemu.tx):
            base = struct.unpack_from("<H", qemu.ram, ring.avail + 2)[0]
            await _in_thread(qemu.start_ring, ring, base)
        await _in_thread(qemu.transmit, b"after the rollback" * 3)
        await running.arrived.wait()
        assert running.frames[-1] == b"after the rollback" * 3
        assert recorder.calls == [
            ("resumed", (False, False)),
            ("started", (False, False)),
            ("started", (True, False)),
        ]
    finally:
        qemu.close()
    await running.recorder.disconnected_event.wait()
    assert recorder.calls[-1] == ("disconnected", None)
    assert frontend.describe()["connected"] is False


async def test_a_failed_check_answers_qemu_with_failure(running: Running) -> None:
    recorder = running.recorder
    recorder.verdict = False
    qemu = VhostUserQemu(running.frontend.path)
    try:
        await _in_thread(qemu.negotiate)
        r, w = os.pipe()
        try:
            await _in_thread(qemu.send, Request.SET_DEVICE_STATE_FD, pack_device_state(1, 0), (r,))
            await _in_thread(qemu.reply)
            assert await _in_thread(qemu.u64, Request.CHECK_DEVICE_STATE) == 1
        finally:
            os.close(r)
            os.close(w)
        assert recorder.calls == [("load", None), ("check", TransferDirection.LOAD)]
    finally:
        qemu.close()
    await recorder.disconnected_event.wait()


async def test_log_all_tells_the_handler_a_migration_starts_and_ends(running: Running) -> None:
    """QEMU's LOG_ALL reaches the handler (ferryd caps its queues then), and its end too."""
    recorder = running.recorder
    qemu = VhostUserQemu(running.frontend.path)
    try:
        await _in_thread(qemu.start)
        log = await _in_thread(qemu.start_dirty_log)  # acknowledged: applied by then
        log.close()
        assert ("dirty_logging", True) in recorder.calls
        await _in_thread(
            lambda: qemu.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES), ack=True)
        )
        assert recorder.calls[-1] == ("dirty_logging", False)
        assert [c for c in recorder.calls if c[0] == "dirty_logging"] == [
            ("dirty_logging", True),
            ("dirty_logging", False),
        ]
    finally:
        qemu.close()
    await recorder.disconnected_event.wait()


async def test_stopping_the_vm_while_migrating_tells_the_handler(running: Running) -> None:
    """With LOG_ALL on, the last ring's stop is QEMU stopping the VM to end its
    migration (the handler may freeze then); starting the rings again without a
    SAVE means a failed migration: the rollback comes before any frame."""
    frontend, recorder = running.frontend, running.recorder
    qemu = VhostUserQemu(frontend.path)
    try:
        await _in_thread(qemu.start)
        log = await _in_thread(qemu.start_dirty_log)
        log.close()
        await _in_thread(qemu.stop_ring, qemu.rx)
        assert not any(c[0] == "suspended" for c in recorder.calls)  # tx still runs
        await _in_thread(qemu.stop_ring, qemu.tx)
        assert recorder.calls[-1] == ("suspended", (False, False))
        del recorder.calls[:]
        for ring in (qemu.rx, qemu.tx):
            base = struct.unpack_from("<H", qemu.ram, ring.avail + 2)[0]
            await _in_thread(qemu.start_ring, ring, base)
        await _in_thread(qemu.transmit, b"after the rollback" * 3)
        await running.arrived.wait()
        assert recorder.calls == [
            ("resumed", (False, False)),
            ("started", (False, False)),
            ("started", (True, False)),
        ]
        # Without LOG_ALL a stop is only a stop (a paused VM): nothing to tell.
        await _in_thread(
            lambda: qemu.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES), ack=True)
        )
        del recorder.calls[:]
        for ring in (qemu.rx, qemu.tx):
            await _in_thread(qemu.stop_ring, ring)
        assert recorder.calls == []
    finally:
        qemu.close()
    await recorder.disconnected_event.wait()


async def test_a_frame_to_the_guest_interrupts_it_at_once_unless_it_asked_not_to(
    running: Running,
) -> None:
    """The call eventfd is written with the frame, not at the end of the scheduler
    step: a guest that drained its ring starts on the first frame of a long burst
    while the rest goes in (its NAPI poll sets NO_INTERRUPT and picks them up)."""
    frontend = running.frontend
    qemu = VhostUserQemu(frontend.path)
    try:
        await _in_thread(qemu.start)
        qemu.post_rx(8)
        assert frontend.describe()["rings"]["rx"]
        frame = b"\x02" * 12 + b"\x08\x00" + b"to the guest" * 5
        frontend.send(frame)  # no checkpoint until the eventfd is read
        assert os.eventfd_read(qemu.rx.call) == 1
        qemu.rx_interrupts(False)
        frontend.send(frame)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(qemu.rx.call)
        qemu.rx_interrupts(True)
        frontend.send(frame)
        assert os.eventfd_read(qemu.rx.call) == 1
        assert await _in_thread(qemu.receive, 3) == [frame] * 3
    finally:
        qemu.close()
    await running.recorder.disconnected_event.wait()


def _signalled(fd: int) -> bool:
    """The eventfd was written (without reading it)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


async def test_the_transmit_interrupt_goes_with_the_answer_or_at_the_bursts_end(
    tmp_path: Path,
) -> None:
    """A burst of the guest's frames owes it a transmit interrupt. Not before
    on_burst_end: when the data path answers there (an ACK, a push), the two
    interrupts go back to back, which wakes QEMU once; with no answer it goes
    before the reader waits again, so the guest never waits for it."""
    frontend = VhostUserFrontend.listen(str(tmp_path / "vhost.sock"))
    recorder = Recorder()
    recorder.frontend = frontend
    frontend.handler = recorder
    reply = b"\x02" * 12 + b"\x08\x00" + b"an answer" * 5
    answer = True
    seen: list[tuple[bool, bool]] = []  # in on_burst_end: (tx signalled, answered)
    ended = trio.Event()
    qemu = VhostUserQemu(frontend.path)

    def on_burst_end() -> None:
        if "_watch_room" in trio.lowlevel.current_task().name or not qemu.sent:
            return
        seen.append((_signalled(qemu.tx.call), answer))
        if answer:
            assert frontend.send(reply)
            # Both written now, in this call, before any checkpoint.
            assert os.eventfd_read(qemu.rx.call) == 1
            assert os.eventfd_read(qemu.tx.call) == 1
        ended.set()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(frontend.serve)
            nursery.start_soon(frontend.run, lambda f, t: None, on_burst_end)
            await _in_thread(qemu.start)
            qemu.post_rx(4)
            qemu.transmit(b"\x02" * 12 + b"\x08\x00" + b"from the guest" * 5)
            with trio.fail_after(5):
                await ended.wait()
            assert seen == [(False, True)]  # not written before the answer
            assert frontend.counters.notifications == 2
            answer, ended = False, trio.Event()
            qemu.transmit(b"\x02" * 12 + b"\x08\x00" + b"and again" * 5)
            with trio.fail_after(5):
                await ended.wait()
                await trio.testing.wait_all_tasks_blocked()  # the reader waits again
            assert seen[1] == (False, False)
            assert os.eventfd_read(qemu.tx.call) == 1  # written at the burst's end
            assert not _signalled(qemu.rx.call)
            assert qemu.transmitted() == 2
            assert await _in_thread(qemu.receive, 1) == [reply]
            nursery.cancel_scope.cancel()
    finally:
        qemu.close()
        frontend.close()


async def test_a_frame_with_no_buffer_is_refused_and_new_buffers_let_the_sender_go_on(
    tmp_path: Path,
) -> None:
    """A frame that finds no receive buffer is refused (send says so: TCP's push
    stops there). The guest's next kick on the receive ring, which comes with new
    buffers, calls on_burst_end (the data path pushes again); until it comes, a
    retry that finds no buffer either is all that happens."""
    frontend = VhostUserFrontend.listen(str(tmp_path / "vhost.sock"))
    recorder = Recorder()
    recorder.frontend = frontend
    frontend.handler = recorder
    frame = b"\x02" * 12 + b"\x08\x00" + b"to the guest" * 5
    retries: list[bool] = []
    retried = trio.Event()

    def on_burst_end() -> None:
        if "_watch_room" in trio.lowlevel.current_task().name:  # not the reader's
            retries.append(frontend.send(frame))
            retried.set()

    qemu = VhostUserQemu(frontend.path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(frontend.serve)
            nursery.start_soon(frontend.run, lambda f, t: None, on_burst_end)
            await _in_thread(qemu.start)
            qemu.post_rx(1)  # one buffer, and its kick
            assert frontend.send(frame)
            assert not frontend.send(frame)
            with trio.fail_after(5):
                await retried.wait()
            retried = trio.Event()
            with trio.fail_after(5):  # a watcher that retried without a kick would spin here
                await trio.testing.wait_all_tasks_blocked()  # it waits for a kick
            assert retries == [False]  # the old kick was read: no new one, no retry
            qemu.post_rx(2)
            with trio.fail_after(5):
                await retried.wait()
            assert retries == [False, True]
            assert await _in_thread(qemu.receive, 2) == [frame] * 2
            assert frontend.counters.dropped_out == 2
            nursery.cancel_scope.cancel()
    finally:
        qemu.close()
        frontend.close()
