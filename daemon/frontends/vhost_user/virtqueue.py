"""Split virtqueues and the virtio-net header: frames out of and into guest memory.

Theory of operation
-------------------

A split virtqueue (virtio 1.x, 2.7) is three arrays in guest memory, all
little-endian, for a queue of ``num`` entries (a power of two, at most
32768)::

    descriptor table   num × (addr u64, len u32, flags u16, next u16)   align 16
    available ring     flags u16, idx u16, ring[num] u16                 align 2
    used ring          flags u16, idx u16, ring[num] × (id u32, len u32) align 4

The guest's driver chains descriptors (VIRTQ_DESC_F_NEXT), each naming a
buffer by guest-physical address, device-readable or device-writable
(VIRTQ_DESC_F_WRITE); it puts the chain's head in the available ring and
bumps ``avail.idx``. ferryd takes heads from ``last_avail`` on (the "base"
QEMU sets and asks back, SET/GET_VRING_BASE), and gives each chain back in
the used ring with the bytes it wrote, bumping ``used.idx``. Both indexes
are free-running 16-bit counters; ``slot = idx % num``.

Everything in those arrays is written by the guest and read while it runs,
so every value is read once (an item of a memoryview cast to ``H`` or
``Q``: one load, copied into a Python int) and checked before use: a
head or ``next`` beyond the table, an available index more than ``num``
ahead, a chain longer than the queue (the only way a loop
shows), an INDIRECT descriptor (VIRTIO_RING_F_INDIRECT_DESC is not
negotiated), a device-writable buffer in a transmit chain or a readable
one in a receive chain, a buffer outside guest memory or straddling a
region's end (:mod:`.memory`): each raises :class:`GuestDriverError`
before the ring's indexes or the used ring change. What the adapter does
then (stop the ring until QEMU restarts it) is its business.

Memory ordering: the guest's CPUs write these arrays while ferryd reads
them. ferryd reads ``avail.idx`` before the ring entries and writes used
entries before ``used.idx``, which x86-64's store and load ordering (TSO)
keeps in order without fences; Python cannot issue one, so this module
relies on running on x86-64.

One store per published value: ``used.idx`` is written through a
memoryview cast to ``H`` (CPython's memoryview item assignment is one
2-byte memcpy, a single x86 store), never with ``struct.pack_into``, which
clears its whole target first (``memset`` in _struct.c's
s_pack_internal) and then writes it: the guest's driver, polling
``used.idx``, could read that transient 0 as "65,000 more used entries"
and consume stale ones (Linux: "output.0:id N is not a head!", the ring
then dead). ``struct`` stays fine for the used entries themselves: the
driver reads none of them before the index that publishes them.

Notifications: VIRTIO_RING_F_EVENT_IDX is not negotiated, so ferryd
signals the call eventfd after a frame to the guest or a batch of its
frames unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT
(:meth:`SplitVirtqueue.should_notify`).

The virtio-net header
---------------------

Every frame in either direction follows a 12-byte ``struct
virtio_net_hdr_mrg_rxbuf`` (virtio 1.x, 5.1.6; with VIRTIO_F_VERSION_1 it
always has ``num_buffers``)::

    flags u8   NEEDS_CSUM (1): the L4 checksum is partial, from csum_start,
               stored at csum_start + csum_offset; DATA_VALID (2)
    gso_type u8, hdr_len u16, gso_size u16   a segment larger than the MTU
    csum_start u16, csum_offset u16
    num_buffers u16   receive only: how many buffers the frame spans

Transmit (ring 1): :meth:`SplitVirtqueue.pop_readable_untrusted` copies a chain's
bytes (header and frame) into the caller's buffer. The copy is on purpose:
the guest can rewrite its buffer while ferryd parses it, and one memcpy of
at most 64 KiB into a preallocated buffer is what the tap frontend's
``readv`` costs too.

Receive (ring 0): :meth:`SplitVirtqueue.push_frame_untrusted` scatters a header and
a frame into as many buffers as it needs when VIRTIO_NET_F_MRG_RXBUF is
negotiated (Linux posts buffers of about a page; a 64 KiB frame takes
~17), writes ``num_buffers``, returns them in the used ring, and marks
every page written in the dirty log while QEMU migrates. It first plans the
whole write (chains, their buffers, the log's coverage) and only then
writes, so a frame that does not fit (no buffers yet) or a bad chain
changes nothing.
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ferryd.frontends.vhost_user.errors import (
    GuestDriverError,
    GuestMemoryError,
    VhostUserProtocolError,
)
from ferryd.frontends.vhost_user.memory import DirtyLog, GuestMemory
from ferryd.frontends.vhost_user.messages import VHOST_VRING_F_LOG, VringAddress

U16 = struct.Struct("<H")

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
#: Heads :meth:`SplitVirtqueue._take_lone_untrusted` reads from the available ring at once.
LONE_BATCH = 64

NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4


@dataclass(frozen=True, slots=True)
class NetHeader:
    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 1

    def pack(self) -> bytes:
        return NET_HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        )


def parse_net_header(data: bytes | memoryview) -> NetHeader:
    """The header in front of a frame (the caller checked there are 12 bytes)."""
    return NetHeader(*NET_HDR.unpack_from(data))


def ring_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring (no event fields)."""
    return 16 * num, 4 + 2 * num, 4 + 8 * num


class SplitVirtqueue:
    """One ring: its configuration (set by the session) and its data path."""

    __slots__ = (
        "_avail",
        "_avail_h",
        "_desc",
        "_desc_q",
        "_mask",
        "_memory",
        "_used",
        "_used_index",
        "address",
        "enabled",
        "index",
        "last_avail",
        "log",
        "log_used",
        "mergeable",
        "num",
        "started",
        "used_gpa",
        "used_idx",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.reset()

    def reset(self) -> None:
        """The state of a ring QEMU has not configured yet: stopped, disabled, unmapped."""
        self.num = 0
        self._mask = 0
        self.last_avail = 0
        self.used_idx = 0
        self.started = False
        self.enabled = False
        self.mergeable = False
        self.address: VringAddress | None = None
        self.log: DirtyLog | None = None
        """The dirty log to mark, set while LOG_ALL is on and a log is mapped."""
        self.log_used = False
        self.used_gpa = 0
        self._memory: GuestMemory | None = None
        self._desc = self._avail = self._used = memoryview(b"")
        self._desc_q = self._avail_h = self._used_index = memoryview(b"").cast("H")
        """``used.idx`` as one ``H`` item: its only writer (see the module docstring)."""

    # -- configuration (the session) ----------------------------------------

    def set_num(self, num: int) -> None:
        self.num = num
        self._mask = num - 1
        self.detach()

    def detach(self) -> None:
        self.address = None
        self._memory = None
        self._desc = self._avail = self._used = memoryview(b"")
        self._desc_q = self._avail_h = self._used_index = memoryview(b"").cast("H")

    def views_for(
        self, memory: GuestMemory, address: VringAddress
    ) -> tuple[memoryview, memoryview, memoryview]:
        """The three arrays in ``memory`` (raises VhostUserProtocolError; changes nothing)."""
        if self.num == 0:
            raise VhostUserProtocolError(f"ring {self.index}: addresses before its size")
        sizes = ring_sizes(self.num)
        addrs = (address.desc_user_addr, address.avail_user_addr, address.used_user_addr)
        views = []
        for name, addr, size, align in zip(
            ("descriptor table", "available ring", "used ring"),
            addrs,
            sizes,
            (16, 2, 4),
            strict=True,
        ):
            if addr % align:
                raise VhostUserProtocolError(
                    f"ring {self.index}: {name} at {addr:#x} is not {align}-byte aligned"
                )
            try:
                view, offset = memory.uva(addr, size)
            except GuestMemoryError as exc:
                raise VhostUserProtocolError(f"ring {self.index}: {name}: {exc}") from None
            views.append(view[offset : offset + size])
        return views[0], views[1], views[2]

    def attach(
        self,
        memory: GuestMemory,
        address: VringAddress,
        views: tuple[memoryview, memoryview, memoryview],
    ) -> None:
        self._memory = memory
        self.address = address
        self._desc, self._avail, self._used = views
        self._used_index = self._used[2:4].cast("H")
        # Item views for the data path: one load per value, no tuple per descriptor.
        self._desc_q = self._desc.cast("Q")  # [2i]: addr; [2i + 1]: len | flags << 32 | next << 48
        self._avail_h = self._avail.cast("H")  # [0]: flags, [1]: idx, [2 + slot]: head
        self.log_used = bool(address.flags & VHOST_VRING_F_LOG)
        self.used_gpa = address.log_guest_addr

    @property
    def attached(self) -> bool:
        return self.address is not None

    def start(self) -> None:
        """Start processing: the next used index is the one in guest memory (vhost-user.rst,
        SET_VRING_BASE: "the device is supposed to read the next index in the Used Ring")."""
        self.used_idx = U16.unpack_from(self._used, 2)[0]
        self.started = True

    @property
    def ready(self) -> bool:
        """Started and enabled: frames may flow (a started, disabled ring is left alone)."""
        return self.started and self.enabled

    # -- data path ------------------------------------------------------------

    def pending_untrusted(self) -> int:
        """Heads the driver made available that ferryd has not taken."""
        n: int = (self._avail_h[1] - self.last_avail) & 0xFFFF
        if n > self.num:
            raise GuestDriverError(
                f"ring {self.index}: available index {n} entries ahead of a queue of {self.num}"
            )
        return n

    def _take_untrusted(
        self,
        write: int,
        need: int,
        limit: int,
        heads: list[int],
        sizes: list[int],
        buffers: list[Any],
    ) -> int:
        """Check and translate chains from ``last_avail`` on (not taken yet): their bytes.

        Walks at least one chain and at most ``limit``, stopping once they hold
        ``need`` bytes; appends each head and its bytes to ``heads`` and
        ``sizes``, and four items per buffer to the flat list ``buffers``:
        region view, offset in it, guest address, length. Buffers that follow
        each other in guest memory are one entry (Linux carves its ~4 KiB
        receive buffers in order out of 32 KiB pages, add_recvbuf_mergeable():
        a 64 KiB frame is then ~3 copies, not ~17). ``write`` is
        VIRTQ_DESC_F_WRITE for receive chains, 0 for transmit ones: every
        buffer must have exactly that.

        This runs for every ~4 KiB of a frame to the guest, so it is written
        for the interpreter: the rings are read through item views (one load
        and no tuple per value, see :meth:`attach`), the ring and the last
        region are locals, one test sends every descriptor but a lone buffer
        of the right direction to the checks, and the flat list grows by
        four items or extends its last length. Receive chains of one buffer
        take :meth:`_take_lone_untrusted` first.
        """
        num, mask, index = self.num, self._mask, self.index
        desc, avail = self._desc_q, self._avail_h
        memory = self._memory
        assert memory is not None
        append = buffers.append
        view, start, end = memoryview(b""), 0, 0  # the region of the last buffer
        follows = -1  # the guest address right after the last buffer
        position, capacity = self.last_avail, 0
        wrong = VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE
        while True:
            head: int = avail[2 + (position & mask)]
            if head >= num:
                raise GuestDriverError(f"ring {index}: head {head} beyond a queue of {num}")
            i, count, size = head, 0, 0
            while True:
                addr: int = desc[i << 1]
                word: int = desc[(i << 1) | 1]  # len u32, flags u16, next u16
                length = word & 0xFFFFFFFF
                flags = (word >> 32) & 0xFFFF
                if flags & wrong != write:
                    if flags & VIRTQ_DESC_F_INDIRECT:
                        raise GuestDriverError(
                            f"ring {index}: indirect descriptor (INDIRECT_DESC not negotiated)"
                        )
                    raise GuestDriverError(
                        f"ring {index}: device-writable descriptor in a transmit chain"
                        if write == 0
                        else f"ring {index}: device-readable descriptor in a receive chain"
                    )
                if addr == follows < end and addr + length <= end:
                    buffers[-1] += length  # right after the last buffer: one copy for both
                else:
                    if not (start <= addr < end and addr + length <= end):
                        view, start, end = memory.gpa_region(addr, length)
                    append(view)
                    append(addr - start)
                    append(addr)
                    append(length)
                follows = addr + length
                size += length
                if not flags & VIRTQ_DESC_F_NEXT:
                    break
                count += 1
                if count >= num:
                    raise GuestDriverError(
                        f"ring {index}: descriptor chain from {head} longer than the queue (a loop)"
                    )
                i = word >> 48
                if i >= num:
                    raise GuestDriverError(f"ring {index}: next descriptor {i} beyond the table")
            heads.append(head)
            sizes.append(size)
            capacity += size
            position += 1
            if capacity >= need or len(heads) >= limit:
                return capacity

    def _take_lone_untrusted(
        self, need: int, limit: int, heads: list[int], sizes: list[int], buffers: list[Any]
    ) -> int:
        """:meth:`_take_untrusted` for receive chains of one buffer each, or -1.

        Linux's driver posts exactly those with MRG_RXBUF (~17 per 64 KiB
        frame), and this walks them with about half the interpreter's work:
        the heads come in one slice of the available ring, a head beyond the
        table is the descriptor view's own IndexError, each descriptor costs
        two loads and one test, and the length of a run of buffers that
        follow each other stays in a local until the run ends. At the first
        head beyond the table or descriptor that is not a lone
        device-writable buffer it returns -1, with the lists half filled: the
        caller clears them and walks again with :meth:`_take_untrusted`,
        which takes any chain and says what is wrong with a bad one.
        """
        num, mask, desc, avail = self.num, self._mask, self._desc_q, self._avail_h
        memory = self._memory
        assert memory is not None
        append, size = buffers.append, sizes.append
        view, start, end = memoryview(b""), 0, 0  # the region of the last buffer
        after = -1  # the guest address right after the last buffer
        run = 0  # the bytes of the last buffer and those merged into it (not appended yet)
        position, capacity = self.last_avail, 0
        checked = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE
        try:
            while True:
                slot = position & mask
                # At most LONE_BATCH heads at a time (a 64 KiB frame takes 17 of
                # Linux's buffers, 44 of its smallest): not the whole ring per frame.
                count = min(limit - len(heads), num - slot, LONE_BATCH)
                batch: list[int] = avail[2 + slot : 2 + slot + count].tolist()
                for head in batch:
                    word: int = desc[(head << 1) | 1]  # len u32, flags u16, next u16
                    if (word >> 32) & checked != VIRTQ_DESC_F_WRITE:
                        return -1
                    addr: int = desc[head << 1]
                    length = word & 0xFFFFFFFF
                    if addr == after < end and addr + length <= end:
                        run += length  # right after the last buffer: one copy for both
                    else:
                        if not (start <= addr < end and addr + length <= end):
                            view, start, end = memory.gpa_region(addr, length)
                        if after >= 0:
                            append(run)
                        append(view)
                        append(addr - start)
                        append(addr)
                        run = length
                    after = addr + length
                    size(length)
                    capacity += length
                    if capacity >= need:
                        heads.extend(batch[: len(sizes) - len(heads)])
                        append(run)
                        return capacity
                heads.extend(batch)
                position += count
                if len(heads) >= limit:
                    append(run)
                    return capacity
        except IndexError:  # a head beyond the table (2 items per descriptor)
            return -1

    def pop_readable_untrusted(self, out: memoryview) -> tuple[int, int] | None:
        """Copy the next chain's bytes into ``out``: ``(head, length)``, or None if none.

        ``length`` is the chain's whole length; more than ``len(out)`` means the
        frame was too long and only ``len(out)`` bytes were copied (the caller
        drops it). The head is taken; give it back with :meth:`push_used`. A
        stopped ring gives nothing (vhost-user.rst: "the back-end must not
        process the ring at all"); a started, disabled one is read and its
        frames discarded by the caller.
        """
        if not self.started or not self.pending_untrusted():
            return None
        heads: list[int] = []
        buffers: list[Any] = []
        total = self._take_untrusted(0, 0, 1, heads, [], buffers)
        at, capacity = 0, len(out)
        for k in range(0, len(buffers), 4):
            if at >= capacity:
                break
            view, offset, length = buffers[k], buffers[k + 1], buffers[k + 3]
            n = min(length, capacity - at)
            out[at : at + n] = view[offset : offset + n]
            at += n
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return heads[0], total

    def push_used(self, head: int, written: int) -> None:
        """Give a chain back with the bytes written into it, and publish it."""
        self._publish_used([head, written])

    def push_used_batch(self, entries: Sequence[tuple[int, int]]) -> None:
        """Give chains back: every entry first, then ``used.idx`` once.

        Once: the driver may read the used ring while ferryd writes it, and a
        merged frame whose later buffers it cannot see yet is one it drops
        (Linux: "rx error: %d buffers out of %d missing").
        """
        self._publish_used(list(itertools.chain.from_iterable(entries)))

    def _publish_used(self, values: list[int]) -> None:
        """:meth:`push_used_batch` of the flat ``[head, written, head, written, ...]``."""
        log = self.log if self.log_used else None
        base, num, used, idx = self.used_gpa, self.num, self._used, self.used_idx
        if log is not None:
            log.check(base, 4 + 8 * num)
        # One struct call per run of consecutive slots (two when the ring wraps).
        done, count = 0, len(values) >> 1
        while done < count:
            slot = (idx + done) & self._mask
            run = min(count - done, num - slot)
            _used_entries(run).pack_into(used, 4 + 8 * slot, *values[2 * done : 2 * (done + run)])
            if log is not None:
                log.mark(base + 4 + 8 * slot, 8 * run)
            done += run
        idx = (idx + count) & 0xFFFF
        self.used_idx = idx
        self._used_index[0] = idx  # one store: not U16.pack_into (see the module docstring)
        if log is not None:
            log.mark(base + 2, 2)

    def should_notify(self) -> bool:
        """Signal the call eventfd? Yes unless the driver asked not to (no EVENT_IDX)."""
        return not self._avail_h[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def push_frame_untrusted(
        self,
        parts: Sequence[bytes | memoryview],
        *,
        csum: tuple[int, int] | None = None,
    ) -> int:
        """Write a header and ``parts`` into the guest's next buffers; the buffers used.

        ``csum``: (csum_start, csum_offset) of a partial L4 checksum
        (NEEDS_CSUM; only with VIRTIO_NET_F_GUEST_CSUM). Returns 0, having
        changed nothing, if the frame does not fit in the buffers available
        now (one chain without MRG_RXBUF), or if the ring is stopped or
        disabled ("must not supply any new RX packets"); the caller drops and
        counts it.
        """
        if not (self.started and self.enabled):
            return 0
        total = NET_HDR_SIZE
        for p in parts:
            total += len(p)
        available = self.pending_untrusted()
        if not available:
            return 0
        heads: list[int] = []
        sizes: list[int] = []
        buffers: list[Any] = []  # view, offset, guest address, length; per buffer
        limit = available if self.mergeable else 1
        capacity = self._take_lone_untrusted(total, limit, heads, sizes, buffers)
        if capacity < 0:  # a chain of another kind (or a bad one): the general walk
            heads.clear()
            sizes.clear()
            buffers.clear()
            capacity = self._take_untrusted(VIRTQ_DESC_F_WRITE, total, limit, heads, sizes, buffers)
        if capacity < total:
            return 0
        log = self.log
        if log is not None:
            for k in range(0, len(buffers), 4):
                log.check(buffers[k + 2], buffers[k + 3])
            if self.log_used:  # before writing any buffer (_publish_used checks again)
                log.check(self.used_gpa, 4 + 8 * self.num)
        count = len(heads)
        if csum is None:
            header = NET_HDR.pack(0, 0, 0, 0, 0, 0, count)
        else:
            header = NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, csum[0], csum[1], count)
        # The copy: each source in turn over the buffers, which fill in order.
        # Every buffer before the last one touched is full, so what each chain
        # and each page got follows from ``total`` alone (below).
        k = 0
        view, at, room = buffers[0], buffers[1], buffers[3]
        for part in (header, *parts):
            source = memoryview(part).cast("B")
            end = len(source)
            pos = 0
            while pos < end:
                if not room:
                    k += 4
                    view, at, room = buffers[k], buffers[k + 1], buffers[k + 3]
                    continue
                n = end - pos
                if room < n:
                    n = room
                view[at : at + n] = source[pos : pos + n]
                at += n
                room -= n
                pos += n
        if log is not None:
            left = total
            for k in range(0, len(buffers), 4):
                length = buffers[k + 3]
                n = length if length < left else left
                log.mark(buffers[k + 2], n)
                left -= n
        # The walk stopped at the first chain that made the room enough: every
        # chain before it is full, and it holds the rest.
        sizes[-1] -= capacity - total
        values = [0] * (2 * count)
        values[0::2] = heads
        values[1::2] = sizes
        self.last_avail = (self.last_avail + count) & 0xFFFF
        self._publish_used(values)
        return count


@functools.lru_cache(maxsize=64)
def _used_entries(run: int) -> struct.Struct:
    """The used ring's ``run`` consecutive (id u32, len u32) entries, for one pack_into."""
    return struct.Struct(f"<{2 * run}I")
