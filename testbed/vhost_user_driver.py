"""QEMU and a guest's virtio driver, played from Python against a vhost-user back-end.

What ``-netdev vhost-user`` and a Linux guest do, without a VM: the guest's
RAM is a real memfd (as QEMU's memory-backend-memfd makes it), the two
split rings live in it, and the control messages travel with real
eventfds and the memfd over a real Unix socket, in QEMU 10's order
(hw/virtio/vhost.c, vhost_dev_start). Frames go in and out through the
rings as a guest's driver moves them: transmit chains posted and kicked,
receive buffers posted and read back from the used ring (mergeable
buffers joined by the header's num_buffers).

For the hostile cases the test sends its own bytes (:meth:`VhostUserQemu.raw`)
and checks that the back-end hung up (:meth:`VhostUserQemu.wait_closed`).
Blocking I/O with timeouts: a test calls it directly.
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import struct
import time
from pathlib import Path

from ferryd.frontends.vhost_user.features import (
    OFFERED_FEATURES,
    OFFERED_PROTOCOL_FEATURES,
    RX_QUEUE,
    TX_QUEUE,
    VHOST_F_LOG_ALL,
    bit,
)
from ferryd.frontends.vhost_user.messages import (
    HEADER_SIZE,
    VHOST_VRING_F_LOG,
    MemoryRegion,
    Request,
    VringAddress,
    build_request,
    pack_log_area,
    pack_memory_table,
    pack_u64,
    pack_vring_address,
    pack_vring_file,
    pack_vring_state,
)

__all__ = ["RAM_SIZE", "VhostUserQemu"]

RAM_SIZE = 4 << 20
#: Where the test's "QEMU" pretends to have mapped the guest's RAM (SET_VRING_ADDR uses it).
UVA_BASE = 0x7F00_0000_0000
NUM = 256
RX_RING, TX_RING = 0x10000, 0x20000
RX_BUFFERS = 0x100000
"""RX buffer i at RX_BUFFERS + i * RX_BUFFER_SIZE (one per descriptor: 1 MiB)."""
RX_BUFFER_SIZE = 4096
TX_BUFFERS = 0x200000
TX_SLOTS, TX_SLOT_SIZE = 16, 65536
NET_HDR = struct.Struct("<BBHHHHH")
VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE = 1, 2
#: What a Linux guest acks of the offer (LOG_ALL only while QEMU migrates).
ACKED_FEATURES = OFFERED_FEATURES & ~bit(VHOST_F_LOG_ALL)


class _Ring:
    """One split ring's layout in guest RAM and the driver's indexes."""

    def __init__(self, index: int, base: int) -> None:
        self.index = index
        self.desc = base
        self.avail = base + 16 * NUM
        self.used = (self.avail + 4 + 2 * NUM + 3) & ~3
        self.avail_idx = 0
        self.used_seen = 0
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def address(self, flags: int = 0) -> VringAddress:
        return VringAddress(
            self.index, flags, UVA_BASE + self.desc, UVA_BASE + self.used,
            UVA_BASE + self.avail, self.used,
        )  # fmt: skip

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.call)


class VhostUserQemu:
    """One connection to the back-end at ``path``, with its own guest RAM and rings."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.ram_fd = os.memfd_create("vhost-test-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, RAM_SIZE)
        self.ram = mmap.mmap(self.ram_fd, RAM_SIZE)
        self._words = memoryview(self.ram).cast("H")
        """The RAM as u16s: an index the back-end polls is stored in one go through it
        (struct.pack_into writes zeros first, which the back-end could read as an
        index ~65,000 entries off)."""
        self.rx = _Ring(RX_QUEUE, RX_RING)
        self.tx = _Ring(TX_QUEUE, TX_RING)
        self.sent = 0

    def close(self) -> None:
        self.sock.close()
        self._words.release()
        self.ram.close()
        os.close(self.ram_fd)
        self.rx.close()
        self.tx.close()

    def __enter__(self) -> VhostUserQemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the control socket ----------------------------------------------------

    def raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.sock.sendmsg([data], rights if fds else [])

    def send(
        self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (), *, ack: bool = False
    ) -> None:
        """A request; with ``ack`` (REPLY_ACK) wait for its u64 0, as QEMU does."""
        self.raw(build_request(request, payload, need_reply=ack), fds)
        if ack:
            assert self.reply() == (request, 0x5, pack_u64(0)), f"no ack for {request}"

    def reply(self) -> tuple[int, int, bytes]:
        request, flags, size = struct.unpack("=III", self._exactly(HEADER_SIZE))
        return request, flags, self._exactly(size)

    def u64(self, request: int) -> int:
        self.send(request)
        got, flags, payload = self.reply()
        assert (got, flags) == (request, 0x5)
        return int(struct.unpack("=Q", payload)[0])

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            more = self.sock.recv(n - len(out))
            if not more:
                raise ConnectionError("the back-end closed the connection")
            out += more
        return out

    def wait_closed(self) -> bool:
        """True once the back-end hung up (whatever it sent before is skipped)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(4096):
                    return True
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False
        return False

    def memory_region(self) -> MemoryRegion:
        return MemoryRegion(0, RAM_SIZE, UVA_BASE, 0)

    def negotiate(self) -> None:
        """vhost_user_backend_init and vhost_dev_init: up to the rings' call eventfds."""
        assert self.u64(Request.GET_FEATURES) == OFFERED_FEATURES
        assert self.u64(Request.GET_PROTOCOL_FEATURES) == OFFERED_PROTOCOL_FEATURES
        self.send(Request.SET_PROTOCOL_FEATURES, pack_u64(OFFERED_PROTOCOL_FEATURES))
        self.send(Request.SET_OWNER)
        self.u64(Request.GET_FEATURES)
        for ring in (self.rx, self.tx):
            self.send(Request.SET_VRING_CALL, pack_vring_file(ring.index, True), (ring.call,))

    def start(self) -> None:
        """The whole start-up, to both rings running and enabled."""
        self.negotiate()
        self.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES), ack=True)
        self.send(
            Request.SET_MEM_TABLE,
            pack_memory_table([self.memory_region()]),
            (self.ram_fd,),
            ack=True,
        )
        for ring in (self.rx, self.tx):
            self.start_ring(ring)
        for ring in (self.rx, self.tx):
            self.send(Request.SET_VRING_ENABLE, pack_vring_state(ring.index, 1), ack=True)

    def start_ring(self, ring: _Ring, base: int = 0) -> None:
        i = ring.index
        self.send(Request.SET_VRING_NUM, pack_vring_state(i, NUM))
        self.send(Request.SET_VRING_BASE, pack_vring_state(i, base))
        self.send(Request.SET_VRING_ADDR, pack_vring_address(ring.address()))
        self.send(Request.SET_VRING_KICK, pack_vring_file(i, True), (ring.kick,))
        self.send(Request.SET_VRING_CALL, pack_vring_file(i, True), (ring.call,))

    def start_dirty_log(self) -> mmap.mmap:
        """What QEMU does when a migration starts: share a dirty log (one bit per 4 KiB
        page of guest RAM), turn LOG_ALL on, and have each used ring logged. Returns the
        log as QEMU sees it."""
        size = RAM_SIZE // 4096 // 8
        fd = os.memfd_create("vhost-test-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            log = mmap.mmap(fd, size)
            self.send(Request.SET_LOG_BASE, pack_log_area(size, 0), (fd,))
        finally:
            os.close(fd)
        assert self.reply() == (Request.SET_LOG_BASE, 0x5, pack_u64(0))
        self.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES | bit(VHOST_F_LOG_ALL)), ack=True)
        for ring in (self.rx, self.tx):
            # QEMU waits for these (vhost_user_set_vring_addr: "wait_for_reply" with the log)
            address = pack_vring_address(ring.address(VHOST_VRING_F_LOG))
            self.send(Request.SET_VRING_ADDR, address, ack=True)
        return log

    def stop_ring(self, ring: _Ring) -> int:
        """GET_VRING_BASE: the ring stops; the next available index the back-end would take."""
        self.send(Request.GET_VRING_BASE, pack_vring_state(ring.index, 0))
        request, _, payload = self.reply()
        assert request == Request.GET_VRING_BASE
        index, base = struct.unpack("=II", payload)
        assert index == ring.index
        return int(base)

    # --- the guest's driver ------------------------------------------------------

    def _write_desc(self, ring: _Ring, i: int, addr: int, length: int, flags: int) -> None:
        struct.pack_into("<QIHH", self.ram, ring.desc + 16 * i, addr, length, flags, 0)

    def _post(self, ring: _Ring, head: int) -> None:
        # One store each (x86-64, little-endian like the ring): see _words.
        self._words[(ring.avail + 4 + 2 * (ring.avail_idx % NUM)) // 2] = head
        ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
        self._words[(ring.avail + 2) // 2] = ring.avail_idx

    def _used(self, ring: _Ring) -> list[tuple[int, int]]:
        out = []
        idx = struct.unpack_from("<H", self.ram, ring.used + 2)[0]
        while ring.used_seen != idx:
            slot = ring.used + 4 + 8 * (ring.used_seen % NUM)
            out.append(struct.unpack_from("<II", self.ram, slot))
            ring.used_seen = (ring.used_seen + 1) & 0xFFFF
        return out

    def rx_interrupts(self, on: bool) -> None:
        """The receive ring's VIRTQ_AVAIL_F_NO_INTERRUPT cleared (``on``) or set, as
        Linux's NAPI does around its poll (virtqueue_disable_cb / enable_cb)."""
        self._words[self.rx.avail // 2] = 0 if on else 1

    def post_rx(self, count: int = NUM) -> None:
        """``count`` receive buffers of a page, one descriptor each."""
        for _ in range(count):
            head = self.rx.avail_idx % NUM
            addr = RX_BUFFERS + head * RX_BUFFER_SIZE
            self._write_desc(self.rx, head, addr, RX_BUFFER_SIZE, VIRTQ_DESC_F_WRITE)
            self._post(self.rx, head)
        os.eventfd_write(self.rx.kick, 1)

    def transmit(self, frame: bytes, *, flags: int = 0, addr: int | None = None) -> None:
        """One frame behind a virtio-net header, in one descriptor, kicked.

        ``addr`` puts the descriptor elsewhere than its buffer (a broken driver).
        """
        slot = self.sent % TX_SLOTS
        buffer = TX_BUFFERS + slot * TX_SLOT_SIZE
        data = NET_HDR.pack(flags, 0, 0, 0, 0, 0, 0) + frame
        assert len(data) <= TX_SLOT_SIZE
        self.ram[buffer : buffer + len(data)] = data
        head = self.tx.avail_idx % NUM
        self._write_desc(self.tx, head, buffer if addr is None else addr, len(data), 0)
        self._post(self.tx, head)
        self.sent += 1
        os.eventfd_write(self.tx.kick, 1)

    def transmitted(self) -> int:
        """Transmit chains the back-end gave back so far."""
        return len(self._used(self.tx))

    def receive(self, until: int = 1, timeout: float | None = None) -> list[bytes]:
        """Frames from the receive ring (the virtio-net header removed), waiting on the
        call eventfd until ``until`` frames came or ``timeout`` passed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        frames: list[bytes] = []
        pending: list[tuple[int, int]] = []
        poller = select.poll()
        poller.register(self.rx.call, select.POLLIN)
        while True:
            pending += self._used(self.rx)
            while pending:
                head, length = pending[0]
                first = self._read_rx(head, length)
                count = NET_HDR.unpack_from(first)[6]
                if len(pending) < count:
                    break
                data = first + b"".join(self._read_rx(h, n) for h, n in pending[1:count])
                frames.append(data[NET_HDR.size :])
                del pending[:count]
            left = deadline - time.monotonic()
            if len(frames) >= until or left <= 0:
                return frames
            if poller.poll(min(left, 0.1) * 1000):
                os.eventfd_read(self.rx.call)

    def _read_rx(self, head: int, length: int) -> bytes:
        addr = RX_BUFFERS + head * RX_BUFFER_SIZE
        return bytes(self.ram[addr : addr + length])
