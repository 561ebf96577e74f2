"""vhost-user's wire format: QEMU's requests in, ferryd's replies out (no I/O).

QEMU's docs/interop/vhost-user.rst, "Message Specification". A message is a
12-byte header and a payload, all numbers in the machine's byte order
(x86-64 here: little-endian)::

    request   u32   the request code (VHOST_USER_GET_FEATURES = 1, ...)
    flags     u32   bits 0-1 version (1), bit 2 reply, bit 3 need_reply
    size      u32   payload bytes that follow

File descriptors travel alongside in SCM_RIGHTS (the memory regions of
SET_MEM_TABLE, the log of SET_LOG_BASE, the eventfds of SET_VRING_KICK /
CALL / ERR, the pipe of SET_DEVICE_STATE_FD). The adapter reads the header,
asks :func:`payload_size_untrusted` how much more to read (refused at once
above :data:`MAX_PAYLOAD_SIZE`, before reading anything of it), reads that,
and hands header, payload and descriptors to :func:`parse_message_untrusted`,
which returns a :class:`Message` or raises :class:`VhostUserProtocolError`
and nothing else. Every request ferryd handles has a fixed payload size and
a fixed number of descriptors; a request code ferryd does not handle is
refused here (the session refuses what is valid but not negotiated).

Payloads handled (the spec's names):

- ``u64``: SET_FEATURES, SET_PROTOCOL_FEATURES, and the vring file of
  SET_VRING_KICK / CALL / ERR (bits 0-7 the ring, bit 8 "no fd").
- vring state ``(index u32, num u32)``: SET_VRING_NUM / BASE / ENABLE,
  GET_VRING_BASE.
- vring address ``(index u32, flags u32, desc, used, avail, log: u64)``.
- multiple memory regions ``(nregions u32, padding u32, region × n)``, a
  region being ``(guest_phys_addr, size, user_addr, mmap_offset: u64)``; at
  most :data:`MAX_REGIONS` (VHOST_MEMORY_BASELINE_NREGIONS: 8, as
  CONFIGURE_MEM_SLOTS is not offered), one descriptor per region.
- log ``(mmap_size, mmap_offset: u64)`` with one descriptor (LOG_SHMFD).
- device state transfer ``(direction u32, phase u32)`` with one descriptor.
- none: GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER,
  RESET_OWNER, RESET_DEVICE, CHECK_DEVICE_STATE; SET_LOG_FD carries one
  descriptor and nothing else.

Left out (never negotiated, so refused as unknown): IOTLB, config space,
crypto sessions, postcopy, inflight descriptors (GET/SET_INFLIGHT_FD need
INFLIGHT_SHMFD), ADD/REM_MEM_REG and GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS),
SEND_RARP, NET_SET_MTU, SET_BACKEND_REQ_FD, SET_STATUS / GET_STATUS, shared
objects.

Replies: QEMU checks that a reply's flags are exactly ``version | reply``
(hw/virtio/vhost-user.c, vhost_user_read_header()) and that its request
code is the request's; the builders below do both.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ferryd.frontends.vhost_user.errors import VhostUserProtocolError

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
VRING_ADDRESS = struct.Struct("=IIQQQQ")
MEMORY_HEADER = struct.Struct("=II")
MEMORY_REGION = struct.Struct("=QQQQ")
LOG_AREA = struct.Struct("=QQ")
DEVICE_STATE = struct.Struct("=II")

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

MAX_REGIONS = 8
"""VHOST_MEMORY_BASELINE_NREGIONS: the regions one SET_MEM_TABLE may carry."""
MAX_PAYLOAD_SIZE = MEMORY_HEADER.size + MAX_REGIONS * MEMORY_REGION.size
"""The largest payload of any request ferryd handles (a full memory table)."""

VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100
"""Bit 8 of a vring file's u64 (and of SET_DEVICE_STATE_FD's reply): no descriptor."""


class Request(enum.IntEnum):
    """The front-end requests ferryd handles (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    RESET_DEVICE = 34
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class TransferDirection(enum.IntEnum):
    """SET_DEVICE_STATE_FD's direction: who writes the pipe."""

    SAVE = 0
    """The source: ferryd writes its migration stream into QEMU's fd."""
    LOAD = 1
    """The destination: ferryd reads the stream QEMU writes."""


class TransferPhase(enum.IntEnum):
    STOPPED = 0
    """The only phase defined: the guest stopped, the device suspended."""


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddress:
    """Where a split ring lives: QEMU user addresses, and the used ring's guest address."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


VHOST_VRING_F_LOG = 0x1
"""VringAddress.flags: log writes to this used ring at log_guest_addr."""


@dataclass(frozen=True, slots=True)
class VringFile:
    """SET_VRING_KICK / CALL / ERR: a ring's eventfd, or None ("no fd": polling)."""

    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class MemoryTable:
    regions: tuple[MemoryRegion, ...]
    fds: tuple[int, ...]
    """One descriptor per region, in the same order."""


@dataclass(frozen=True, slots=True)
class LogArea:
    size: int
    offset: int
    fd: int


@dataclass(frozen=True, slots=True)
class DeviceStateFd:
    direction: TransferDirection
    phase: TransferPhase
    fd: int


Payload = int | VringState | VringAddress | VringFile | MemoryTable | LogArea | DeviceStateFd | None


@dataclass(frozen=True, slots=True)
class Message:
    """One request from QEMU, parsed; ``fds`` are every descriptor it came with."""

    request: Request
    need_reply: bool
    payload: Payload
    fds: tuple[int, ...]


class _Shape(enum.Enum):
    NONE = enum.auto()
    U64 = enum.auto()
    STATE = enum.auto()
    ADDRESS = enum.auto()
    FILE = enum.auto()
    MEMORY = enum.auto()
    LOG = enum.auto()
    LOG_FD = enum.auto()
    DEVICE_STATE = enum.auto()


_SHAPES: dict[Request, _Shape] = {
    Request.GET_FEATURES: _Shape.NONE,
    Request.SET_FEATURES: _Shape.U64,
    Request.SET_OWNER: _Shape.NONE,
    Request.RESET_OWNER: _Shape.NONE,
    Request.SET_MEM_TABLE: _Shape.MEMORY,
    Request.SET_LOG_BASE: _Shape.LOG,
    Request.SET_LOG_FD: _Shape.LOG_FD,
    Request.SET_VRING_NUM: _Shape.STATE,
    Request.SET_VRING_ADDR: _Shape.ADDRESS,
    Request.SET_VRING_BASE: _Shape.STATE,
    Request.GET_VRING_BASE: _Shape.STATE,
    Request.SET_VRING_KICK: _Shape.FILE,
    Request.SET_VRING_CALL: _Shape.FILE,
    Request.SET_VRING_ERR: _Shape.FILE,
    Request.GET_PROTOCOL_FEATURES: _Shape.NONE,
    Request.SET_PROTOCOL_FEATURES: _Shape.U64,
    Request.GET_QUEUE_NUM: _Shape.NONE,
    Request.SET_VRING_ENABLE: _Shape.STATE,
    Request.RESET_DEVICE: _Shape.NONE,
    Request.SET_DEVICE_STATE_FD: _Shape.DEVICE_STATE,
    Request.CHECK_DEVICE_STATE: _Shape.NONE,
}

_FIXED_SIZE = {
    _Shape.NONE: 0,
    _Shape.U64: U64.size,
    _Shape.STATE: VRING_STATE.size,
    _Shape.ADDRESS: VRING_ADDRESS.size,
    _Shape.FILE: U64.size,
    _Shape.LOG: LOG_AREA.size,
    _Shape.LOG_FD: 0,
    _Shape.DEVICE_STATE: DEVICE_STATE.size,
}


def request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


def payload_size_untrusted(header: bytes | bytearray | memoryview) -> int:
    """The payload size a header announces; refused before any payload is read.

    Checks the version, that a request does not claim to be a reply, that
    ferryd handles the request at all, and the size bound.
    """
    if len(header) != HEADER_SIZE:
        raise VhostUserProtocolError(f"truncated message header: {len(header)} of 12 bytes")
    code, flags, size = HEADER.unpack(header)
    if flags & VERSION_MASK != VERSION:
        raise VhostUserProtocolError(
            f"{request_name(code)}: protocol version {flags & VERSION_MASK}, ferryd speaks 1"
        )
    if flags & FLAG_REPLY:
        raise VhostUserProtocolError(f"{request_name(code)}: a request with the reply flag")
    if code not in _SHAPES:
        raise VhostUserProtocolError(f"unknown or unsupported vhost-user request {code}")
    if size > MAX_PAYLOAD_SIZE:
        raise VhostUserProtocolError(
            f"{request_name(code)}: payload of {size} bytes, at most {MAX_PAYLOAD_SIZE}"
        )
    return int(size)


def parse_message_untrusted(data: bytes | memoryview, fds: Sequence[int]) -> Message:
    """Header and payload (exactly), and the descriptors that came with them.

    Raises :class:`VhostUserProtocolError` for anything but a well-formed
    request ferryd handles: a truncated or overlong message, a bad version,
    an unknown request, a payload of the wrong size, the wrong number of
    descriptors, a reserved bit set. Takes no ownership of ``fds``.
    """
    size = payload_size_untrusted(data[:HEADER_SIZE])
    code, flags, _ = HEADER.unpack_from(data)
    request = Request(code)
    name = request.name
    if len(data) != HEADER_SIZE + size:
        raise VhostUserProtocolError(
            f"{name}: header announces {size} payload bytes, {len(data) - HEADER_SIZE} came"
        )
    shape = _SHAPES[request]
    body = memoryview(data)[HEADER_SIZE:]
    fds = tuple(fds)
    payload: Payload
    if shape is _Shape.MEMORY:
        payload = _memory_table(name, body, fds)
    else:
        expected = _FIXED_SIZE[shape]
        if size != expected:
            raise VhostUserProtocolError(f"{name}: payload of {size} bytes, expected {expected}")
        payload = _fixed(name, shape, body, fds)
    return Message(request, bool(flags & FLAG_NEED_REPLY), payload, fds)


def _want_fds(name: str, fds: tuple[int, ...], count: int) -> None:
    if len(fds) != count:
        raise VhostUserProtocolError(f"{name}: {len(fds)} file descriptors, expected {count}")


def _fixed(name: str, shape: _Shape, body: memoryview, fds: tuple[int, ...]) -> Payload:
    if shape is _Shape.NONE:
        _want_fds(name, fds, 0)
        return None
    if shape is _Shape.U64:
        _want_fds(name, fds, 0)
        return int(U64.unpack(body)[0])
    if shape is _Shape.STATE:
        _want_fds(name, fds, 0)
        return VringState(*VRING_STATE.unpack(body))
    if shape is _Shape.ADDRESS:
        _want_fds(name, fds, 0)
        return VringAddress(*VRING_ADDRESS.unpack(body))
    if shape is _Shape.FILE:
        (value,) = U64.unpack(body)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise VhostUserProtocolError(f"{name}: reserved bits set in {value:#x}")
        nofd = bool(value & VRING_NOFD)
        _want_fds(name, fds, 0 if nofd else 1)
        return VringFile(value & VRING_INDEX_MASK, None if nofd else fds[0])
    if shape is _Shape.LOG:
        _want_fds(name, fds, 1)
        size, offset = LOG_AREA.unpack(body)
        return LogArea(size, offset, fds[0])
    if shape is _Shape.LOG_FD:
        _want_fds(name, fds, 1)
        return None
    assert shape is _Shape.DEVICE_STATE
    _want_fds(name, fds, 1)
    direction, phase = DEVICE_STATE.unpack(body)
    try:
        return DeviceStateFd(TransferDirection(direction), TransferPhase(phase), fds[0])
    except ValueError:
        raise VhostUserProtocolError(
            f"{name}: unknown direction {direction} or phase {phase}"
        ) from None


def _memory_table(name: str, body: memoryview, fds: tuple[int, ...]) -> MemoryTable:
    if len(body) < MEMORY_HEADER.size:
        raise VhostUserProtocolError(f"{name}: payload of {len(body)} bytes, no region count")
    count, _padding = MEMORY_HEADER.unpack_from(body)
    if not 1 <= count <= MAX_REGIONS:
        raise VhostUserProtocolError(f"{name}: {count} regions, expected 1 to {MAX_REGIONS}")
    expected = MEMORY_HEADER.size + count * MEMORY_REGION.size
    if len(body) != expected:
        raise VhostUserProtocolError(
            f"{name}: payload of {len(body)} bytes for {count} regions, expected {expected}"
        )
    _want_fds(name, fds, count)
    regions = tuple(
        MemoryRegion(*MEMORY_REGION.unpack_from(body, MEMORY_HEADER.size + i * MEMORY_REGION.size))
        for i in range(count)
    )
    return MemoryTable(regions, fds)


# Builders. Replies go to QEMU; requests are what a front-end sends (the
# tests play QEMU with them).


def build_reply(request: Request, payload: bytes = b"") -> bytes:
    """A reply: QEMU wants flags exactly ``version | reply`` and the request's code."""
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload


def reply_u64(request: Request, value: int) -> bytes:
    return build_reply(request, U64.pack(value))


def reply_vring_state(request: Request, index: int, num: int) -> bytes:
    return build_reply(request, VRING_STATE.pack(index, num))


def build_request(
    request: int, payload: bytes = b"", *, need_reply: bool = False, flags: int | None = None
) -> bytes:
    """A front-end's request (``flags`` overrides the computed flags, for hostile tests)."""
    if flags is None:
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def pack_u64(value: int) -> bytes:
    return U64.pack(value)


def pack_vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def pack_vring_address(address: VringAddress) -> bytes:
    a = address
    return VRING_ADDRESS.pack(
        a.index, a.flags, a.desc_user_addr, a.used_user_addr, a.avail_user_addr, a.log_guest_addr
    )


def pack_vring_file(index: int, has_fd: bool) -> bytes:
    return U64.pack(index | (0 if has_fd else VRING_NOFD))


def pack_memory_table(regions: Sequence[MemoryRegion]) -> bytes:
    out = MEMORY_HEADER.pack(len(regions), 0)
    for r in regions:
        out += MEMORY_REGION.pack(r.guest_phys_addr, r.size, r.user_addr, r.mmap_offset)
    return out


def pack_log_area(size: int, offset: int) -> bytes:
    return LOG_AREA.pack(size, offset)


def pack_device_state(direction: int, phase: int) -> bytes:
    return DEVICE_STATE.pack(direction, phase)


def parse_reply(data: bytes) -> tuple[int, int, bytes]:
    """(request, flags, payload) of a reply: what QEMU reads (tests check replies with it)."""
    request, flags, size = HEADER.unpack_from(data)
    payload = data[HEADER_SIZE:]
    if len(payload) != size:
        raise ValueError(f"reply announces {size} bytes, carries {len(payload)}")
    return request, flags, payload
