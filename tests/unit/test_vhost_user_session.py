"""The vhost-user session, driven by a test playing QEMU (and the guest's driver)."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferryd.frontends.vhost_user.actions import (
    Action,
    CheckDeviceState,
    CloseFds,
    DeviceResumed,
    DeviceSuspended,
    DirtyLogging,
    RingChanged,
    SendReply,
    SetCall,
    SetKick,
    TransferDeviceState,
)
from ferryd.frontends.vhost_user.errors import GuestDriverError, VhostUserProtocolError
from ferryd.frontends.vhost_user.features import (
    OFFERED_FEATURES,
    OFFERED_PROTOCOL_FEATURES,
    RX_QUEUE,
    TX_QUEUE,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_PROTOCOL_F_DEVICE_STATE,
    VHOST_USER_PROTOCOL_F_LOG_SHMFD,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    bit,
)
from ferryd.frontends.vhost_user.memory import MmapMapper
from ferryd.frontends.vhost_user.messages import (
    VHOST_VRING_F_LOG,
    VRING_NOFD,
    MemoryRegion,
    Request,
    TransferDirection,
    VringAddress,
    build_reply,
    build_request,
    pack_device_state,
    pack_log_area,
    pack_memory_table,
    pack_u64,
    pack_vring_address,
    pack_vring_file,
    pack_vring_state,
)
from ferryd.frontends.vhost_user.session import Phase, VhostUserSession
from ferryd.frontends.vhost_user.virtqueue import NET_HDR_SIZE, NetHeader
from tests.unit.vhost_guest import (
    ACKED_FEATURES,
    HIGH,
    LOW,
    FileMapper,
    GuestRam,
    Qemu,
    RamRegion,
    replies,
    start_device,
    u64_reply,
)

BUF = 0x40000
LOG_FD = 300


def _device(num: int = 64) -> tuple[FileMapper, GuestRam, VhostUserSession, Qemu]:
    mapper = FileMapper()
    ram = GuestRam(mapper, [LOW, HIGH])
    session = VhostUserSession(mapper)
    qemu, _, _ = start_device(session, ram, num=num)
    return mapper, ram, session, qemu


def _fds_in(actions: list[Action]) -> list[int]:
    out: list[int] = []
    for a in actions:
        if isinstance(a, CloseFds):
            out += a.fds
        elif isinstance(a, (SetKick, SetCall, TransferDeviceState)) and a.fd is not None:
            out.append(a.fd)
    return out


def _phase(session: VhostUserSession) -> Phase:
    return session.phase


def _state(session: VhostUserSession) -> object:
    return (
        session.phase,
        session.features,
        session.protocol_features,
        session.memory.regions if session.memory else None,
        session.log is not None,
        [
            (vq.num, vq.address, vq.last_avail, vq.used_idx, vq.started, vq.enabled, vq.log)
            for vq in session.queues
        ],
    )


# -- QEMU's start-up -------------------------------------------------------------


def test_qemu_start_sequence_brings_both_rings_up() -> None:
    mapper, _, session, _qemu = _device()
    assert session.phase is Phase.OWNED
    assert session.features == ACKED_FEATURES
    assert session.protocol_features == OFFERED_PROTOCOL_FEATURES
    assert all(vq.ready for vq in session.queues)
    assert all(vq.mergeable for vq in session.queues)
    assert len(mapper.live) == 2  # both regions mapped


def test_every_descriptor_is_handed_on_exactly_once() -> None:
    session = VhostUserSession(FileMapper())
    qemu = Qemu(session)
    qemu.send(Request.SET_OWNER)
    sent: list[int] = []
    got: list[int] = []
    for request, payload in [
        (Request.SET_VRING_CALL, pack_vring_file(0, True)),
        (Request.SET_VRING_ERR, pack_vring_file(1, True)),
        (Request.SET_LOG_FD, b""),
    ]:
        fd = qemu.fd()
        sent.append(fd)
        got += _fds_in(qemu.send(request, payload, (fd,)))
    assert got == sent


def test_the_actions_of_one_rings_start_in_order() -> None:
    """What the adapter executes for vhost_virtqueue_start() and the enable after it."""
    mapper = FileMapper()
    ram = GuestRam(mapper, [LOW, HIGH])
    session = VhostUserSession(mapper)
    qemu, _, _ = start_device(session, ram)
    qemu.send(Request.GET_VRING_BASE, pack_vring_state(TX_QUEUE, 0))
    qemu.send(Request.SET_VRING_ENABLE, pack_vring_state(TX_QUEUE, 0))
    kick = qemu.fd() + 1  # qemu.ring() sends the next two: kick, then call
    call = kick + 1
    actions = qemu.ring(qemu.tx)
    assert actions == [
        SetKick(TX_QUEUE, kick),
        RingChanged(TX_QUEUE, True, False),
        SetCall(TX_QUEUE, call),
    ]
    actions = qemu.send(Request.SET_VRING_ENABLE, pack_vring_state(TX_QUEUE, 1), ack=True)
    assert actions == [
        RingChanged(TX_QUEUE, True, True),
        SendReply(build_reply(Request.SET_VRING_ENABLE, pack_u64(0))),
    ]


def test_rings_start_on_kick_and_stop_on_get_vring_base() -> None:
    _, ram, session, qemu = _device()
    rx = qemu.rx
    for k in range(3):
        rx.post(rx.chain([(BUF + 2048 * k, 2048, 2)]))
    assert session.queues[RX_QUEUE].push_frame_untrusted([b"x" * 100]) == 1
    actions = qemu.send(Request.GET_VRING_BASE, pack_vring_state(RX_QUEUE, 0))
    # The reply before the adapter's work: QEMU waits for it with the VM stopped.
    assert isinstance(actions[0], SendReply)
    assert actions[1:] == [SetKick(RX_QUEUE, None), RingChanged(RX_QUEUE, False, True)]
    assert struct.unpack("=II", replies(actions)[0][2]) == (RX_QUEUE, 1)
    assert not session.queues[RX_QUEUE].started
    # restart at the base QEMU saved: the used index is read back from guest memory
    qemu.ring(rx, base=1)
    vq = session.queues[RX_QUEUE]
    assert (vq.last_avail, vq.used_idx, vq.started) == (1, 1, True)
    assert vq.push_frame_untrusted([b"y" * 100]) == 1
    assert [h for h, _ in rx.take_used()] == [0, 1]
    assert ram.read(BUF + 2048 + NET_HDR_SIZE, 100) == b"y" * 100


def test_reply_ack_answers_only_requests_without_a_reply_of_their_own() -> None:
    _, _, _, qemu = _device()
    actions = qemu.send(Request.SET_VRING_ENABLE, pack_vring_state(0, 1), ack=True)
    assert replies(actions) == [(Request.SET_VRING_ENABLE, 0x5, pack_u64(0))]
    assert u64_reply(qemu.send(Request.GET_FEATURES, ack=True)) == OFFERED_FEATURES
    assert replies(qemu.send(Request.SET_VRING_ENABLE, pack_vring_state(0, 1))) == []


def test_features_without_protocol_features_enable_every_ring() -> None:
    session = VhostUserSession(FileMapper())
    qemu = Qemu(session)
    qemu.send(Request.SET_OWNER)
    actions = qemu.send(Request.SET_FEATURES, pack_u64(bit(VIRTIO_F_VERSION_1)))
    assert actions == [RingChanged(0, False, True), RingChanged(1, False, True)]
    assert not session.queues[0].mergeable


# -- what QEMU may not do ----------------------------------------------------------


def _fresh() -> tuple[VhostUserSession, Qemu]:
    session = VhostUserSession(FileMapper())
    return session, Qemu(session)


@pytest.mark.parametrize(
    ("request_", "payload", "nfds", "says"),
    [
        (Request.SET_FEATURES, pack_u64(bit(VIRTIO_F_VERSION_1)), 0, "out of order"),
        (Request.SET_VRING_NUM, pack_vring_state(0, 256), 0, "out of order"),
        (Request.SET_MEM_TABLE, pack_memory_table([LOW.spec]), 1, "out of order"),
    ],
)
def test_configuration_before_set_owner_is_out_of_order(
    request_: Request, payload: bytes, nfds: int, says: str
) -> None:
    session, qemu = _fresh()
    before = _state(session)
    with pytest.raises(VhostUserProtocolError, match=says):
        qemu.send(request_, payload, tuple(range(nfds)))
    assert _state(session) == before


def _hostile_after_start() -> list[tuple[str, Request, bytes, int]]:
    addr = VringAddress(0, 0, LOW.uva + 0x10000, LOW.uva + 0x12000, LOW.uva + 0x11000, 0)
    return [
        ("SET_OWNER is out of order", Request.SET_OWNER, b"", 0),
        ("ring 2, ferryd has 2", Request.SET_VRING_NUM, pack_vring_state(2, 256), 0),
        ("ring 7, ferryd has 2", Request.SET_VRING_CALL, pack_vring_file(7, True), 1),
        ("ring 0 is running", Request.SET_VRING_NUM, pack_vring_state(0, 128), 0),
        ("ring 1 is running", Request.SET_VRING_BASE, pack_vring_state(1, 0), 0),
        ("not a power of two", Request.SET_VRING_NUM, pack_vring_state(0, 100), 0),
        ("not offered", Request.SET_FEATURES, pack_u64(OFFERED_FEATURES | bit(VIRTIO_NET_F_MQ)), 0),
        (
            "while rings run",
            Request.SET_FEATURES,
            pack_u64(ACKED_FEATURES & ~bit(VIRTIO_NET_F_CSUM)),
            0,
        ),
        ("while rings run", Request.SET_PROTOCOL_FEATURES, pack_u64(0), 0),
        ("polling is not supported", Request.SET_VRING_KICK, pack_vring_file(0, False), 0),
        (
            "flags 0x2 unknown",
            Request.SET_VRING_ADDR,
            pack_vring_address(
                addr.__class__(
                    0,
                    2,
                    *[
                        getattr(addr, f)
                        for f in (
                            "desc_user_addr",
                            "used_user_addr",
                            "avail_user_addr",
                            "log_guest_addr",
                        )
                    ],
                )
            ),
            0,
        ),
        ("while rings run", Request.SET_DEVICE_STATE_FD, pack_device_state(0, 0), 1),
        ("without SET_DEVICE_STATE_FD", Request.CHECK_DEVICE_STATE, b"", 0),
        ("reserved num", Request.GET_VRING_BASE, pack_vring_state(0, 3), 0),
        ("0 or 1", Request.SET_VRING_ENABLE, pack_vring_state(0, 2), 0),
    ]


@pytest.mark.parametrize(("says", "request_", "payload", "nfds"), _hostile_after_start())
def test_hostile_requests_on_a_running_device_change_nothing(
    says: str, request_: Request, payload: bytes, nfds: int
) -> None:
    mapper, ram, session, qemu = _device()
    before, memory_before, live = _state(session), ram.snapshot(), dict(mapper.live)
    with pytest.raises(VhostUserProtocolError, match=says):
        qemu.send(request_, payload, tuple(range(900, 900 + nfds)))
    assert _state(session) == before
    assert ram.snapshot() == memory_before
    assert mapper.live == live


def test_set_vring_addr_before_the_memory_table_is_refused() -> None:
    _session, qemu = _fresh()
    qemu.send(Request.SET_OWNER)
    qemu.send(Request.SET_VRING_NUM, pack_vring_state(0, 64))
    address = VringAddress(0, 0, LOW.uva, LOW.uva + 4096, LOW.uva + 2048, 0)
    with pytest.raises(VhostUserProtocolError, match="before SET_MEM_TABLE"):
        qemu.send(Request.SET_VRING_ADDR, pack_vring_address(address))


@pytest.mark.parametrize(
    ("address", "says"),
    [
        (VringAddress(0, 0, LOW.uva + 8, LOW.uva + 0x2000, LOW.uva + 0x1000, 0), "16-byte"),
        (VringAddress(0, 0, LOW.uva, LOW.uva + 0x2002, LOW.uva + 0x1000, 0), "4-byte"),
        (VringAddress(0, 0, LOW.uva - 4096, LOW.uva + 0x2000, LOW.uva + 0x1000, 0), "no memory"),
        (
            VringAddress(0, 0, LOW.uva, LOW.uva + LOW.size - 64, LOW.uva + 0x1000, 0),
            "run past",
        ),
    ],
)
def test_ring_addresses_outside_memory_or_misaligned_are_refused(
    address: VringAddress, says: str
) -> None:
    mapper = FileMapper()
    GuestRam(mapper, [LOW, HIGH])
    session = VhostUserSession(mapper)
    qemu = Qemu(session)
    qemu.send(Request.SET_OWNER)
    qemu.set_mem_table([LOW, HIGH])
    qemu.send(Request.SET_VRING_NUM, pack_vring_state(0, 64))
    with pytest.raises(VhostUserProtocolError, match=says):
        qemu.send(Request.SET_VRING_ADDR, pack_vring_address(address))
    assert session.queues[0].address is None


def test_kick_before_addresses_is_refused() -> None:
    _session, qemu = _fresh()
    qemu.send(Request.SET_OWNER)
    with pytest.raises(VhostUserProtocolError, match="before its size and addresses"):
        qemu.send(Request.SET_VRING_KICK, pack_vring_file(1, True), (5,))


def test_legacy_virtio_is_refused() -> None:
    session, qemu = _fresh()
    qemu.send(Request.SET_OWNER)
    with pytest.raises(VhostUserProtocolError, match="VERSION_1"):
        qemu.send(Request.SET_FEATURES, pack_u64(bit(VIRTIO_NET_F_MRG_RXBUF)))
    assert session.features is None


def test_protocol_features_not_offered_are_refused() -> None:
    session, qemu = _fresh()
    with pytest.raises(VhostUserProtocolError, match="not offered"):
        qemu.send(Request.SET_PROTOCOL_FEATURES, pack_u64(1))  # MQ
    assert session.protocol_features == 0


def test_log_base_needs_log_shmfd() -> None:
    _session, qemu = _fresh()
    qemu.send(Request.SET_PROTOCOL_FEATURES, pack_u64(bit(VHOST_USER_PROTOCOL_F_DEVICE_STATE)))
    qemu.send(Request.SET_OWNER)
    with pytest.raises(VhostUserProtocolError, match="protocol feature"):
        qemu.send(Request.SET_LOG_BASE, pack_log_area(4096, 0), (LOG_FD,))


# -- memory table changes -------------------------------------------------------------


def test_a_new_memory_table_remaps_running_rings() -> None:
    """Memory hotplug: a new table (LOW under a new descriptor, plus a region)."""
    mapper, ram, session, qemu = _device()
    low_again = RamRegion(fd=200, gpa=LOW.gpa, size=LOW.size, uva=LOW.uva, offset=0)
    mapper.files[200] = mapper.files[LOW.fd]  # the same memory under another descriptor
    plugged = RamRegion(fd=102, gpa=8 << 30, size=1 << 20, uva=0x7F00_2000_0000, offset=0)
    ram.regions.append(plugged)
    mapper.add(plugged.fd, plugged.size)
    actions = qemu.set_mem_table([low_again, HIGH, plugged])
    assert CloseFds((200, HIGH.fd, plugged.fd)) in actions
    assert replies(actions) == [(Request.SET_MEM_TABLE, 0x5, pack_u64(0))]
    assert len(mapper.live) == 3  # the old mappings are gone
    tx, rx = qemu.tx, qemu.rx
    data = NetHeader().pack() + b"after the remap"
    ram.write(BUF, data)
    tx.post(tx.chain([(BUF, len(data), 0)]))
    out = memoryview(bytearray(100))
    got = session.queues[TX_QUEUE].pop_readable_untrusted(out)
    assert got is not None and bytes(out[: got[1]]) == data
    rx.post(rx.chain([(plugged.gpa + 4096, 2048, 2)]))
    assert session.queues[RX_QUEUE].push_frame_untrusted([b"into the new region"]) == 1
    assert ram.read(plugged.gpa + 4096 + NET_HDR_SIZE, 19) == b"into the new region"


def test_a_table_that_loses_a_ring_is_refused_and_the_old_one_stays() -> None:
    mapper, _, session, qemu = _device()
    before, live = _state(session), dict(mapper.live)
    with pytest.raises(VhostUserProtocolError, match="ring 0"):
        qemu.set_mem_table([HIGH])  # the rings are in LOW
    assert _state(session) == before
    assert mapper.live == live


def test_a_table_with_overlapping_regions_is_refused() -> None:
    _mapper, _, session, qemu = _device()
    before = _state(session)
    overlapping = RamRegion(fd=LOW.fd, gpa=LOW.gpa + 4096, size=4096, uva=1 << 40, offset=0)
    with pytest.raises(VhostUserProtocolError, match="overlap"):
        qemu.set_mem_table([LOW, overlapping])
    assert _state(session) == before


# -- migration: dirty log and device state ----------------------------------------------


def _start_logging(mapper: FileMapper, session: VhostUserSession, qemu: Qemu) -> bytearray:
    """QEMU's vhost_migration_log(): SET_LOG_BASE, SET_FEATURES + LOG_ALL, rings' LOG flag."""
    pages = (HIGH.gpa + HIGH.size) >> 12
    log = mapper.add(LOG_FD, pages // 8)
    actions = qemu.send(Request.SET_LOG_BASE, pack_log_area(len(log), 0), (LOG_FD,))
    assert replies(actions) == [(Request.SET_LOG_BASE, 0x5, pack_u64(0))]
    assert CloseFds((LOG_FD,)) in actions
    qemu.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES | bit(VHOST_F_LOG_ALL)), ack=True)
    for driver in (qemu.rx, qemu.tx):
        a = driver.address
        flagged = VringAddress(
            a.index,
            VHOST_VRING_F_LOG,
            a.desc_user_addr,
            a.used_user_addr,
            a.avail_user_addr,
            a.log_guest_addr,
        )
        qemu.send(Request.SET_VRING_ADDR, pack_vring_address(flagged), ack=True)
    return log


def _bits(log: bytearray) -> set[int]:
    return {8 * i + b for i, byte in enumerate(log) if byte for b in range(8) if byte >> b & 1}


def test_dirty_logging_while_rings_run_marks_rx_buffers_and_used_rings() -> None:
    mapper, _, session, qemu = _device()
    rx, tx = qemu.rx, qemu.tx
    log = _start_logging(mapper, session, qemu)
    assert all(vq.started for vq in session.queues)  # LOG_ALL came while running
    high_buffer = HIGH.gpa + 0x10000
    rx.post(rx.chain([(high_buffer, 4096, 2)]))
    assert session.queues[RX_QUEUE].push_frame_untrusted([b"z" * 1000]) == 1
    assert _bits(log) == {high_buffer >> 12, rx.used >> 12}
    log[:] = bytes(len(log))
    tx.post(tx.chain([(BUF, 60, 0)]))
    vq = session.queues[TX_QUEUE]
    got = vq.pop_readable_untrusted(memoryview(bytearray(100)))
    assert got is not None
    vq.push_used(got[0], 0)
    assert _bits(log) == {tx.used >> 12}  # tx writes only its used ring
    # logging off again: nothing is marked
    qemu.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES), ack=True)
    log[:] = bytes(len(log))
    rx.post(rx.chain([(high_buffer, 4096, 2)]))
    assert session.queues[RX_QUEUE].push_frame_untrusted([b"z" * 1000]) == 1
    assert _bits(log) == set()


def test_log_all_on_and_off_are_told_once_each() -> None:
    """LOG_ALL is QEMU's first sign of a migration (its RAM pre-copy starts): the
    adapter hears of it (ferryd caps its queues then) and of its end, once each."""
    _mapper, _, _session, qemu = _device()

    def told(features: int) -> list[DirtyLogging]:
        actions = qemu.send(Request.SET_FEATURES, pack_u64(features), ack=True)
        return [a for a in actions if isinstance(a, DirtyLogging)]

    assert told(ACKED_FEATURES | bit(VHOST_F_LOG_ALL)) == [DirtyLogging(True)]
    assert told(ACKED_FEATURES | bit(VHOST_F_LOG_ALL)) == []
    assert told(ACKED_FEATURES) == [DirtyLogging(False)]
    assert told(ACKED_FEATURES) == []


def _suspend(qemu: Qemu) -> None:
    for i in (RX_QUEUE, TX_QUEUE):
        qemu.send(Request.GET_VRING_BASE, pack_vring_state(i, 0))


def test_save_device_state_then_check() -> None:
    _, _, session, qemu = _device()
    _suspend(qemu)
    assert session.suspended
    actions = qemu.send(Request.SET_DEVICE_STATE_FD, pack_device_state(0, 0), (77,))
    assert isinstance(actions[0], SendReply)  # first: QEMU waits with the VM stopped
    assert actions[1:] == [TransferDeviceState(TransferDirection.SAVE, 77)]
    assert u64_reply(actions) == VRING_NOFD  # success, ferryd uses QEMU's pipe
    actions = qemu.send(Request.CHECK_DEVICE_STATE)
    assert actions == [CheckDeviceState(TransferDirection.SAVE)]
    assert session.phase is Phase.CHECKING
    with pytest.raises(VhostUserProtocolError, match="out of order"):
        qemu.send(Request.GET_FEATURES)
    assert u64_reply(session.device_state_checked(False)) == 1
    assert _phase(session) is Phase.OWNED
    with pytest.raises(RuntimeError):
        session.device_state_checked(True)
    # the controller said no: QEMU restarts the device, nothing to roll back here
    actions = qemu.ring(qemu.rx, base=session.queues[RX_QUEUE].last_avail)
    assert not any(isinstance(a, DeviceResumed) for a in actions)
    assert session.queues[RX_QUEUE].ready


def test_rings_restarting_after_a_confirmed_save_mean_rollback() -> None:
    """QEMU resumes the source VM (the target died after the device state was sent)."""
    _, _, session, qemu = _device()
    _suspend(qemu)
    qemu.send(Request.SET_DEVICE_STATE_FD, pack_device_state(0, 0), (77,))
    qemu.send(Request.CHECK_DEVICE_STATE)
    assert u64_reply(session.device_state_checked(True)) == 0
    qemu.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES))
    qemu.set_mem_table([LOW, HIGH])
    actions = qemu.ring(qemu.rx, base=session.queues[RX_QUEUE].last_avail)
    assert isinstance(actions[0], DeviceResumed) and isinstance(actions[1], SetKick)
    actions = qemu.ring(qemu.tx, base=session.queues[TX_QUEUE].last_avail)
    assert not any(isinstance(a, DeviceResumed) for a in actions)  # once


def test_the_vm_stopped_while_migrating_is_told_once_and_its_restart_means_rollback() -> None:
    """vm_stop with LOG_ALL on: QEMU ends its migration (SAVE follows). Restarted
    with no SAVE instead, the migration failed: roll back before frames flow."""
    _, _, session, qemu = _device()
    qemu.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES | bit(VHOST_F_LOG_ALL)), ack=True)
    first = qemu.send(Request.GET_VRING_BASE, pack_vring_state(RX_QUEUE, 0))
    assert not any(isinstance(a, DeviceSuspended) for a in first)  # tx still runs
    last = qemu.send(Request.GET_VRING_BASE, pack_vring_state(TX_QUEUE, 0))
    assert [a for a in last if isinstance(a, DeviceSuspended)] == [DeviceSuspended()]
    again = qemu.send(Request.GET_VRING_BASE, pack_vring_state(TX_QUEUE, 0))
    assert not any(isinstance(a, DeviceSuspended) for a in again)  # already stopped
    actions = qemu.ring(qemu.rx, base=session.queues[RX_QUEUE].last_avail)
    assert isinstance(actions[0], DeviceResumed) and isinstance(actions[1], SetKick)
    actions = qemu.ring(qemu.tx, base=session.queues[TX_QUEUE].last_avail)
    assert not any(isinstance(a, DeviceResumed) for a in actions)  # once
    # Not migrating: a stop and a start are only that.
    qemu.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES), ack=True)
    _suspend(qemu)
    actions = qemu.ring(qemu.rx, base=session.queues[RX_QUEUE].last_avail)
    assert not any(isinstance(a, (DeviceSuspended, DeviceResumed)) for a in actions)


def test_load_device_state_on_the_target() -> None:
    mapper = FileMapper()
    session = VhostUserSession(mapper)
    qemu = Qemu(session)
    qemu.send(Request.SET_PROTOCOL_FEATURES, pack_u64(OFFERED_PROTOCOL_FEATURES))
    qemu.send(Request.SET_OWNER)
    actions = qemu.send(Request.SET_DEVICE_STATE_FD, pack_device_state(1, 0), (78,))
    assert actions[1:] == [TransferDeviceState(TransferDirection.LOAD, 78)]
    assert qemu.send(Request.CHECK_DEVICE_STATE) == [CheckDeviceState(TransferDirection.LOAD)]
    assert u64_reply(session.device_state_checked(True)) == 0


def test_device_state_needs_its_protocol_feature() -> None:
    _session, qemu = _fresh()
    qemu.send(Request.SET_PROTOCOL_FEATURES, pack_u64(bit(VHOST_USER_PROTOCOL_F_LOG_SHMFD)))
    qemu.send(Request.SET_OWNER)
    with pytest.raises(VhostUserProtocolError, match="protocol feature"):
        qemu.send(Request.SET_DEVICE_STATE_FD, pack_device_state(0, 0), (5,))


def test_reset_device_unconfigures_the_rings_and_keeps_memory_and_calls() -> None:
    mapper, _, session, qemu = _device()
    _start_logging(mapper, session, qemu)
    actions = qemu.send(Request.RESET_DEVICE)
    assert RingChanged(0, False, False) in actions and SetKick(1, None) in actions
    assert not any(isinstance(a, SetCall) for a in actions)
    assert session.features is None
    assert all(vq.num == 0 and not vq.attached and vq.log is None for vq in session.queues)
    assert session.memory is not None and session.log is not None
    # QEMU starts the device again, as after any virtio reset
    qemu.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES))
    qemu.set_mem_table([LOW, HIGH])
    for driver in (qemu.rx, qemu.tx):
        qemu.ring(driver)
        qemu.send(Request.SET_VRING_ENABLE, pack_vring_state(driver.index, 1))
    assert all(vq.ready for vq in session.queues)


def test_close_unmaps_everything() -> None:
    mapper, _, session, qemu = _device()
    _start_logging(mapper, session, qemu)
    assert len(mapper.live) == 3
    session.close()
    assert mapper.live == {}


# -- any sequence -----------------------------------------------------------------------

_STATE_REQUESTS = (
    Request.SET_VRING_NUM,
    Request.SET_VRING_BASE,
    Request.GET_VRING_BASE,
    Request.SET_VRING_ENABLE,
)
_FILE_REQUESTS = (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR)


@st.composite
def _messages(draw: st.DrawFn) -> tuple[Request, bytes, tuple[int, ...], bool]:
    """A request QEMU could send, with plausible (and some wrong) values."""
    request = draw(st.sampled_from(list(Request)))
    index = draw(st.integers(0, 2))
    fds: tuple[int, ...] = ()
    if request in _STATE_REQUESTS:
        num = draw(st.sampled_from([0, 1, 2, 16, 100, 0xFFFF, 0x10000]))
        payload = pack_vring_state(index, num)
    elif request in _FILE_REQUESTS:
        has_fd = draw(st.booleans())
        payload = pack_vring_file(index, has_fd)
        fds = (1000,) if has_fd else ()
    elif request is Request.SET_FEATURES:
        payload = pack_u64(
            draw(st.sampled_from([ACKED_FEATURES, ACKED_FEATURES | bit(VHOST_F_LOG_ALL), 0, 1]))
        )
    elif request is Request.SET_PROTOCOL_FEATURES:
        payload = pack_u64(draw(st.sampled_from([OFFERED_PROTOCOL_FEATURES, 0, 1])))
    elif request is Request.SET_VRING_ADDR:
        base = draw(st.sampled_from([0x10000, 0x20000, 0x10008, LOW.size - 0x100]))
        flags = draw(st.sampled_from([0, VHOST_VRING_F_LOG, 2]))
        uva = LOW.uva + base
        payload = pack_vring_address(
            VringAddress(index, flags, uva, uva + 0x2000, uva + 0x1000, base + 0x2000)
        )
    elif request is Request.SET_MEM_TABLE:
        regions = draw(st.sampled_from([[LOW, HIGH], [HIGH], [LOW]]))
        payload = pack_memory_table([r.spec for r in regions])
        fds = tuple(r.fd for r in regions)
    elif request is Request.SET_LOG_BASE:
        payload = pack_log_area(draw(st.sampled_from([0, 4096, 1 << 17])), 0)
        fds = (LOG_FD,)
    elif request is Request.SET_DEVICE_STATE_FD:
        payload = pack_device_state(draw(st.integers(0, 2)), draw(st.integers(0, 1)))
        fds = (1001,)
    elif request is Request.SET_LOG_FD:
        payload, fds = b"", (1002,)
    else:
        payload = b""
    if draw(st.integers(0, 9)) == 0:
        fds = (*fds, 1003)  # one descriptor too many
    return request, payload, fds, draw(st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.lists(_messages(), max_size=25))
def test_any_message_sequence_only_ever_raises_the_protocol_error(
    messages: list[tuple[Request, bytes, tuple[int, ...], bool]],
) -> None:
    """Requests in any order, after a normal start, with plausible and wrong values:
    each is handled, every descriptor handed on once, or refused with the declared
    error and nothing changed; in the end everything mapped is unmapped."""
    mapper, _, session, _qemu = _device(num=16)
    mapper.add(LOG_FD, 1 << 17)
    for request, payload, fds, ack in messages:
        before = _state(session)
        live = dict(mapper.live)
        data = build_request(request, payload, need_reply=ack)
        try:
            actions = session.receive_untrusted(data, fds)
        except VhostUserProtocolError:
            assert _state(session) == before
            assert mapper.live == live
            continue
        assert sorted(_fds_in(actions)) == sorted(fds)
        for a in actions:
            if isinstance(a, SendReply):
                assert struct.unpack_from("=III", a.data)[:2] == (request, 0x5)
        for vq in session.queues:
            # The data path on whatever was set up: nothing to move (no buffers were
            # posted), or the one error of the guest's (a base QEMU set ahead of the
            # guest's available index looks like a driver running 65535 entries ahead).
            # A base just behind it (0xffff against the zeroed index 0) makes zeroed
            # entries look posted: they read as descriptor 0, empty, and nothing else.
            with contextlib.suppress(GuestDriverError):
                assert vq.push_frame_untrusted([b"x" * 60]) == 0
            with contextlib.suppress(GuestDriverError):
                assert vq.pop_readable_untrusted(memoryview(bytearray(100))) in (None, (0, 0))
        if session.phase is Phase.CHECKING:
            session.device_state_checked(True)
    session.close()
    assert mapper.live == {}


def test_feature_bits_are_what_the_issue_asks_for() -> None:
    assert OFFERED_FEATURES & bit(VHOST_USER_F_PROTOCOL_FEATURES)
    assert OFFERED_FEATURES & bit(VHOST_F_LOG_ALL)
    assert OFFERED_FEATURES & bit(VIRTIO_NET_F_MRG_RXBUF)
    assert not OFFERED_FEATURES & bit(VIRTIO_NET_F_MQ)


def test_memory_regions_helper_is_consistent() -> None:
    assert MemoryRegion(LOW.gpa, LOW.size, LOW.uva, LOW.offset) == LOW.spec


@pytest.mark.parametrize(("size", "offset"), [(8192, 0), (4096, 1 << 63), (0, 0)])
def test_a_log_the_descriptor_cannot_back_is_refused(size: int, offset: int) -> None:
    """With the daemon's real mapper and a memfd, as QEMU's vhost_log_alloc() makes."""
    fd = os.memfd_create("vhost-log")
    try:
        os.ftruncate(fd, 4096)
        session = VhostUserSession(MmapMapper())
        qemu = Qemu(session)
        qemu.send(Request.SET_PROTOCOL_FEATURES, pack_u64(OFFERED_PROTOCOL_FEATURES))
        qemu.send(Request.SET_OWNER)
        with pytest.raises(VhostUserProtocolError, match="SET_LOG_BASE"):
            qemu.send(Request.SET_LOG_BASE, pack_log_area(size, offset), (fd,))
        assert session.log is None
    finally:
        os.close(fd)
