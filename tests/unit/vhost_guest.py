"""A guest and a QEMU in memory, for the vhost-user unit tests.

:class:`FileMapper` is the memory port over bytearrays ("files" named by
fake descriptor numbers); :class:`GuestRam` reads and writes guest-physical
addresses the way the guest's CPU would; :class:`GuestDriver` plays the
virtio driver of one split ring (descriptor table, available ring, used
ring laid out in guest RAM); :func:`start_device` replays QEMU's start-up
sequence against a session and returns the two drivers.
"""

from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass
from typing import Protocol

from ferryd.frontends.vhost_user.actions import Action, SendReply
from ferryd.frontends.vhost_user.features import (
    OFFERED_FEATURES,
    OFFERED_PROTOCOL_FEATURES,
    RX_QUEUE,
    TX_QUEUE,
    VHOST_F_LOG_ALL,
    bit,
)
from ferryd.frontends.vhost_user.messages import (
    MemoryRegion,
    Request,
    VringAddress,
    build_request,
    pack_memory_table,
    pack_u64,
    pack_vring_address,
    pack_vring_file,
    pack_vring_state,
    parse_reply,
)
from ferryd.frontends.vhost_user.session import VhostUserSession
from ferryd.frontends.vhost_user.virtqueue import ring_sizes

PAGE = 4096


class FileMapper:
    """The memory port over bytearrays; counts what is mapped so tests see leaks."""

    def __init__(self) -> None:
        self.files: dict[int, bytearray] = {}
        self.live: dict[int, memoryview] = {}
        self.fail_fds: set[int] = set()

    def add(self, fd: int, size: int) -> bytearray:
        self.files[fd] = bytearray(size)
        return self.files[fd]

    def map(self, fd: int, offset: int, length: int) -> memoryview:
        if fd in self.fail_fds or fd not in self.files:
            raise OSError(9, "Bad file descriptor")
        data = self.files[fd]
        if offset + length > len(data):
            raise OSError(22, "mapping beyond the end of the file")
        view = memoryview(data)[offset : offset + length]
        self.live[id(view)] = view
        return view

    def unmap(self, view: memoryview) -> None:
        del self.live[id(view)]

    def address(self, view: memoryview) -> int | None:
        return None  # bytearrays: the dirty log's plain read-modify-write


@dataclass(frozen=True)
class RamRegion:
    fd: int
    gpa: int
    size: int
    uva: int
    offset: int

    @property
    def spec(self) -> MemoryRegion:
        return MemoryRegion(self.gpa, self.size, self.uva, self.offset)


class GuestRam:
    """Guest-physical memory over the mapper's files: what the guest's CPU sees."""

    def __init__(self, mapper: FileMapper, regions: list[RamRegion]) -> None:
        self.mapper = mapper
        self.regions = regions
        for r in regions:
            if r.fd not in mapper.files:
                mapper.add(r.fd, r.offset + r.size)

    def _at(self, gpa: int, length: int) -> tuple[bytearray, int]:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return self.mapper.files[r.fd], r.offset + gpa - r.gpa
        raise AssertionError(f"test bug: {gpa:#x} not in guest RAM")

    def write(self, gpa: int, data: bytes) -> None:
        buf, at = self._at(gpa, len(data))
        buf[at : at + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        buf, at = self._at(gpa, length)
        return bytes(buf[at : at + length])

    def uva(self, gpa: int) -> int:
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.uva + gpa - r.gpa
        raise AssertionError(f"test bug: {gpa:#x} not in guest RAM")

    def snapshot(self) -> dict[int, bytes]:
        return {fd: bytes(buf) for fd, buf in self.mapper.files.items()}


#: Two regions, like a PC's RAM below and above the 4 GiB hole, in one file.
LOW = RamRegion(fd=100, gpa=0, size=1 << 20, uva=0x7F00_0000_0000, offset=0)
HIGH = RamRegion(fd=101, gpa=1 << 32, size=2 << 20, uva=0x7F00_1000_0000, offset=0x2000)


class Ram(Protocol):
    """What the guest's driver needs of guest RAM (GuestRam, or a real memfd's)."""

    def write(self, gpa: int, data: bytes) -> None: ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def uva(self, gpa: int) -> int: ...


class MemfdRam:
    """One region of guest RAM in a real memfd, as QEMU's memory-backend-memfd makes."""

    def __init__(self, region: RamRegion) -> None:
        self.region = region
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, region.offset + region.size)

    def write(self, gpa: int, data: bytes) -> None:
        os.pwrite(self.fd, data, self.region.offset + gpa - self.region.gpa)

    def read(self, gpa: int, length: int) -> bytes:
        return os.pread(self.fd, length, self.region.offset + gpa - self.region.gpa)

    def uva(self, gpa: int) -> int:
        return self.region.uva + gpa - self.region.gpa

    def close(self) -> None:
        os.close(self.fd)


class GuestDriver:
    """The guest's virtio driver for one split ring at ``base`` (guest-physical)."""

    def __init__(self, ram: Ram, index: int, num: int, base: int) -> None:
        self.ram, self.index, self.num = ram, index, num
        desc_size, avail_size, _ = ring_sizes(num)
        self.desc = base
        self.avail = base + desc_size
        self.used = (self.avail + avail_size + 3) & ~3
        self.avail_idx = 0
        self.used_seen = 0
        self._free = itertools.cycle(range(num))

    @property
    def address(self) -> VringAddress:
        uva = self.ram.uva
        return VringAddress(
            self.index, 0, uva(self.desc), uva(self.used), uva(self.avail), self.used
        )

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.ram.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, buffers: list[tuple[int, int, int]]) -> int:
        """Descriptors for (gpa, length, flags) buffers, linked with NEXT; the head."""
        ids = [next(self._free) for _ in buffers]
        for k, (addr, length, flags) in enumerate(buffers):
            last = k == len(buffers) - 1
            self.write_desc(
                ids[k], addr, length, flags | (0 if last else 1), 0 if last else ids[k + 1]
            )
        return ids[0]

    def post(self, head: int) -> None:
        slot = self.avail + 4 + 2 * (self.avail_idx % self.num)
        self.ram.write(slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail, struct.pack("<H", flags))

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.ram.read(self.used + 2, 2))[0])

    def take_used(self) -> list[tuple[int, int]]:
        """The (head, length) entries the device returned since the last call."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            slot = self.used + 4 + 8 * (self.used_seen % self.num)
            out.append(struct.unpack("<II", self.ram.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


def replies(actions: list[Action]) -> list[tuple[int, int, bytes]]:
    return [parse_reply(a.data) for a in actions if isinstance(a, SendReply)]


def u64_reply(actions: list[Action]) -> int:
    (reply,) = replies(actions)
    return int(struct.unpack("=Q", reply[2])[0])


class Qemu:
    """Sends requests as QEMU does and hands out fake descriptor numbers."""

    rx: GuestDriver
    tx: GuestDriver
    """The guest's drivers of the two rings, once :func:`start_device` made them."""

    def __init__(self, session: VhostUserSession) -> None:
        self.session = session
        self._fds = itertools.count(500)

    def fd(self) -> int:
        return next(self._fds)

    def send(
        self,
        request: Request,
        payload: bytes = b"",
        fds: tuple[int, ...] = (),
        *,
        ack: bool = False,
    ) -> list[Action]:
        return self.session.receive_untrusted(build_request(request, payload, need_reply=ack), fds)

    def set_mem_table(self, regions: list[RamRegion], *, ack: bool = True) -> list[Action]:
        payload = pack_memory_table([r.spec for r in regions])
        return self.send(Request.SET_MEM_TABLE, payload, tuple(r.fd for r in regions), ack=ack)

    def ring(self, driver: GuestDriver, base: int = 0) -> list[Action]:
        """vhost_virtqueue_start: NUM, BASE, ADDR, KICK, CALL."""
        i = driver.index
        out = self.send(Request.SET_VRING_NUM, pack_vring_state(i, driver.num))
        out += self.send(Request.SET_VRING_BASE, pack_vring_state(i, base))
        out += self.send(Request.SET_VRING_ADDR, pack_vring_address(driver.address))
        out += self.send(Request.SET_VRING_KICK, pack_vring_file(i, True), (self.fd(),))
        out += self.send(Request.SET_VRING_CALL, pack_vring_file(i, True), (self.fd(),))
        return out


#: What a Linux guest acks of ferryd's offer; QEMU adds LOG_ALL only while migrating.
ACKED_FEATURES = OFFERED_FEATURES & ~bit(VHOST_F_LOG_ALL)


def start_device(
    session: VhostUserSession, ram: GuestRam, num: int = 256, features: int = ACKED_FEATURES
) -> tuple[Qemu, GuestDriver, GuestDriver]:
    """QEMU 10's order from connection to running rings; returns (qemu, rx, tx)."""
    qemu = Qemu(session)
    assert u64_reply(qemu.send(Request.GET_FEATURES)) == OFFERED_FEATURES
    assert u64_reply(qemu.send(Request.GET_PROTOCOL_FEATURES)) == OFFERED_PROTOCOL_FEATURES
    qemu.send(Request.SET_PROTOCOL_FEATURES, pack_u64(OFFERED_PROTOCOL_FEATURES))
    qemu.send(Request.SET_OWNER)
    qemu.send(Request.GET_FEATURES)
    for i in (RX_QUEUE, TX_QUEUE):
        qemu.send(Request.SET_VRING_CALL, pack_vring_file(i, True), (qemu.fd(),))
        qemu.send(Request.SET_VRING_ERR, pack_vring_file(i, True), (qemu.fd(),))
    qemu.send(Request.SET_FEATURES, pack_u64(features))
    qemu.set_mem_table(ram.regions)
    rx = qemu.rx = GuestDriver(ram, RX_QUEUE, num, base=0x10000)
    tx = qemu.tx = GuestDriver(ram, TX_QUEUE, num, base=0x20000)
    for driver in (rx, tx):
        qemu.ring(driver)
    for i in (RX_QUEUE, TX_QUEUE):
        qemu.send(Request.SET_VRING_ENABLE, pack_vring_state(i, 1), ack=True)
    return qemu, rx, tx
