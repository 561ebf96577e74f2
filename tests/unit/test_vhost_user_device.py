"""NetDevice: frames between the data path's calls and a guest driver played in memory."""

from __future__ import annotations

import pytest

from ferryd.frontends.vhost_user.device import (
    MAX_TX_FRAME,
    NOTIFY,
    TAKEN,
    NetDevice,
    VhostUserCounters,
)
from ferryd.frontends.vhost_user.features import (
    TX_QUEUE,
    VIRTIO_NET_F_GUEST_CSUM,
    bit,
)
from ferryd.frontends.vhost_user.messages import Request, pack_vring_state
from ferryd.frontends.vhost_user.session import VhostUserSession
from ferryd.frontends.vhost_user.virtqueue import (
    NET_HDR_SIZE,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    NetHeader,
    parse_net_header,
)
from tests.unit.vhost_guest import (
    ACKED_FEATURES,
    HIGH,
    LOW,
    FileMapper,
    GuestRam,
    Qemu,
    start_device,
)

W = 2


def _device(features: int = ACKED_FEATURES) -> tuple[GuestRam, Qemu, NetDevice]:
    mapper = FileMapper()
    ram = GuestRam(mapper, [LOW, HIGH])
    session = VhostUserSession(mapper)
    qemu, _, _ = start_device(session, ram, num=64, features=features)
    return ram, qemu, NetDevice(session, VhostUserCounters())


def _put_tx(ram: GuestRam, qemu: Qemu, frames: list[tuple[int, bytes]]) -> None:
    for k, (flags, frame) in enumerate(frames):
        data = NetHeader(flags=flags).pack() + frame
        gpa = HIGH.gpa + k * 0x10000
        ram.write(gpa, data)
        qemu.tx.post(qemu.tx.chain([(gpa, len(data), 0)]))


def test_guest_frames_reach_on_frame_byte_exact_with_their_trust() -> None:
    ram, qemu, device = _device()
    frames = [
        (0, b"\x01" * 60),
        (VIRTIO_NET_HDR_F_NEEDS_CSUM, b"\x02" * 1514),
        (VIRTIO_NET_HDR_F_DATA_VALID, b"\x03" * 65534),
    ]
    _put_tx(ram, qemu, frames)
    got: list[tuple[bytes, bool]] = []
    more, notify = device.receive_burst(lambda f, t: got.append((bytes(f), t)), limit=64)
    assert got == [(frames[0][1], False), (frames[1][1], True), (frames[2][1], True)]
    assert (more, notify) == (False, True)
    assert device.counters.frames_in == 3
    assert [n for _, n in qemu.tx.take_used()] == [0, 0, 0]


def test_bursts_stop_at_the_limit_and_say_more_is_queued() -> None:
    ram, qemu, device = _device()
    _put_tx(ram, qemu, [(0, bytes([k]) * 100) for k in range(5)])
    got: list[bytes] = []
    assert device.receive_burst(lambda f, t: got.append(bytes(f)), limit=3) == (True, True)
    assert device.receive_burst(lambda f, t: got.append(bytes(f)), limit=3) == (False, True)
    assert got == [bytes([k]) * 100 for k in range(5)]
    assert device.receive_burst(lambda f, t: got.append(bytes(f)), limit=3) == (False, False)


def test_too_long_empty_and_disabled_ring_frames_are_discarded_but_returned() -> None:
    ram, qemu, device = _device()
    too_long = b"\x00" * (MAX_TX_FRAME - NET_HDR_SIZE + 1)
    ram.write(HIGH.gpa, NetHeader().pack() + too_long[: 0x10000 - NET_HDR_SIZE])
    ram.write(LOW.gpa + 0x80000, too_long[0x10000 - NET_HDR_SIZE :])
    qemu.tx.post(
        qemu.tx.chain(
            [
                (HIGH.gpa, 0x10000, 0),
                (LOW.gpa + 0x80000, len(too_long) + NET_HDR_SIZE - 0x10000, 0),
            ]
        )
    )
    _put_tx(ram, qemu, [(0, b"")])  # a header and no frame
    got: list[bytes] = []
    device.receive_burst(lambda f, t: got.append(bytes(f)), limit=64)
    assert got == [] and device.counters.discarded_in == 2
    assert len(qemu.tx.take_used()) == 2
    qemu.send(Request.SET_VRING_ENABLE, pack_vring_state(TX_QUEUE, 0))
    _put_tx(ram, qemu, [(0, b"x" * 60)])
    device.receive_burst(lambda f, t: got.append(bytes(f)), limit=64)
    assert got == [] and device.counters.discarded_in == 3
    assert len(qemu.tx.take_used()) == 1  # processed and discarded, as a disabled ring is


def test_send_delivers_into_guest_buffers_and_counts_drops() -> None:
    ram, qemu, device = _device()
    assert device.send(b"no buffer yet") == 0
    assert device.counters.dropped_out == 1 and device.counters.notifications == 0
    heads = {}
    for k in range(4):
        gpa = HIGH.gpa + k * 4096
        heads[qemu.rx.chain([(gpa, 4096, W)])] = gpa
    for head in heads:
        qemu.rx.post(head)
    assert device.send(b"hello guest") == TAKEN | NOTIFY
    assert device.send_partial([b"part one ", memoryview(b"part two")], 34, 16) == TAKEN | NOTIFY
    assert device.counters.frames_out == 2 and device.counters.notifications == 2
    used = qemu.rx.take_used()
    first = ram.read(heads[used[0][0]], used[0][1])
    second = ram.read(heads[used[1][0]], used[1][1])
    assert first[NET_HDR_SIZE:] == b"hello guest"
    assert second[NET_HDR_SIZE:] == b"part one part two"
    header = parse_net_header(second)
    assert (header.flags, header.csum_start, header.csum_offset) == (1, 34, 16)


def test_no_interrupt_when_the_guest_asks_for_none() -> None:
    _, qemu, device = _device()
    qemu.rx.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    qemu.rx.post(qemu.rx.chain([(HIGH.gpa, 4096, W)]))
    assert device.send(b"quiet") == TAKEN
    assert device.counters.frames_out == 1 and device.counters.notifications == 0


@pytest.mark.parametrize(
    ("features", "offload"),
    [(ACKED_FEATURES, True), (ACKED_FEATURES & ~bit(VIRTIO_NET_F_GUEST_CSUM), False)],
)
def test_checksum_offload_follows_guest_csum(features: int, offload: bool) -> None:
    _, _, device = _device(features)
    assert device.csum_offload is offload
