"""Guest memory as QEMU shares it: regions, address translation, the dirty log.

Theory of operation
-------------------

SET_MEM_TABLE gives ferryd up to eight regions of the guest's RAM, each a
file descriptor (QEMU's memory backend with ``share=on``: a memfd or a file
in /dev/shm or hugetlbfs) and four numbers (vhost-user.rst, "Memory region
description")::

    guest_phys_addr   where the region starts in the guest's physical space
    size              its length
    user_addr         where it starts in QEMU's own virtual address space
    mmap_offset       where it starts in the file

A region's size must not exceed its file (Python's mmap refuses that; a
page past the end of a file would raise SIGBUS on access). A front-end
that shrinks the file afterwards can still crash ferryd that way, as it
can crash any vhost-user back-end: QEMU is trusted not to, the guest
cannot.

Two address spaces point into them: the guest's physical addresses (every
descriptor's ``addr``: the guest's driver wrote them) and QEMU's user
addresses (SET_VRING_ADDR's ring addresses, since VIRTIO_F_ACCESS_PLATFORM
is not negotiated; vhost-user.rst, "Memory access"). :class:`GuestMemory`
translates either to ``(region view, offset)``, and refuses (with
:class:`GuestMemoryError`) any range that is not wholly inside one region:
outside every region, or straddling a region's end. Nothing reads or writes
guest memory except through a slice of a region's view, so a bad address is
an exception, never an access outside the mapping.

The mapping itself is behind :class:`MemoryMapper`, a port (map, unmap,
and the address of a mapping): the daemon's :class:`MmapMapper` maps the
file (shared, read and write; the offset rounded down to a page as mmap(2)
requires), the tests map bytearrays. A new table is mapped and checked
whole before the old one is dropped
(:meth:`GuestMemory.map_table_untrusted`): a table that fails leaves the
old one in place. The descriptors themselves stay the caller's; a mapping
outlives the close of its descriptor (mmap(2)).

Dirty log
---------

While QEMU migrates the guest's RAM it must know which pages ferryd wrote
(vhost-user.rst, "Migration"): with VHOST_F_LOG_ALL negotiated, every guest
page ferryd writes (received frames, used-ring entries) gets its bit set in
a bitmap QEMU shares through SET_LOG_BASE, one bit per 4 KiB page of
guest-physical address space (``log[page // 8] |= 1 << page % 8``).
:class:`DirtyLog` sets them; a page beyond the bitmap is an error raised
*before* ferryd writes the page (:meth:`DirtyLog.check`), so a write is
never left unlogged. The spec asks for an atomic OR: QEMU clears the bits
it has synced (atomic exchange) while back-ends set them, and other vhost
back-ends of the same VM may share the bitmap (QEMU's vhost_log_get() shares
one log per back-end type). A read-modify-write could lose another
writer's bit set in the same byte in between (QEMU's own clearing only
costs a spurious resend), and Python has no atomic OR on shared memory; so
:class:`MmapMapper` gives the mapping's address, and :class:`DirtyLog`
sets each bit with libatomic's ``__atomic_fetch_or_1`` (through ctypes,
loaded at import, before the sandbox), after the same bounds check.
Without libatomic1, or over a bytearray (the tests), it falls back to the
read-modify-write.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import mmap
from collections.abc import Callable, Sequence
from typing import Protocol

from ferryd.frontends.vhost_user.errors import GuestMemoryError, VhostUserProtocolError
from ferryd.frontends.vhost_user.messages import MemoryRegion

LOG_PAGE_SHIFT = 12
"""VHOST_LOG_PAGE is 0x1000."""
_MAX_ADDR = 1 << 64
_SEQ_CST = 5  # __ATOMIC_SEQ_CST


def _load_atomic_or() -> Callable[[int, int, int], int] | None:
    """libatomic's ``uint8_t __atomic_fetch_or_1(void *, uint8_t, int)``, if installed."""
    try:
        lib = ctypes.CDLL("libatomic.so.1")
    except OSError:
        return None
    fetch_or = getattr(lib, "__atomic_fetch_or_1")
    fetch_or.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int]
    fetch_or.restype = ctypes.c_uint8
    return fetch_or  # type: ignore[no-any-return]


ATOMIC_FETCH_OR = _load_atomic_or()


class MemoryMapper(Protocol):
    """How guest memory gets into ferryd: the one port of this module."""

    def map(self, fd: int, offset: int, length: int) -> memoryview:
        """``length`` writable bytes of ``fd`` from ``offset`` (raises OSError)."""
        ...

    def unmap(self, view: memoryview) -> None:
        """Release a view :meth:`map` returned."""
        ...

    def address(self, view: memoryview) -> int | None:
        """The view's address in ferryd's memory, for atomic operations (None: unknown)."""
        ...


class MmapMapper:
    """The real port: a shared read-write mmap(2) of QEMU's memory descriptor."""

    def __init__(self) -> None:
        self._maps: dict[int, tuple[mmap.mmap, memoryview, int]] = {}

    def map(self, fd: int, offset: int, length: int) -> memoryview:
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(
            fd,
            length + offset - aligned,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=aligned,
        )
        whole = memoryview(m)
        view = whole[offset - aligned :]
        pointer = ctypes.c_char.from_buffer(m, offset - aligned)
        address = ctypes.addressof(pointer)
        del pointer  # releases its export; the mapping does not move until closed
        self._maps[id(view)] = (m, whole, address)
        return view

    def address(self, view: memoryview) -> int | None:
        return self._maps[id(view)][2]

    def unmap(self, view: memoryview) -> None:
        m, whole, _ = self._maps.pop(id(view))
        view.release()
        whole.release()
        # A slice still exported (a frame being handled): unmapped when it goes.
        with contextlib.suppress(BufferError):
            m.close()


class _Region:
    __slots__ = ("gpa", "gpa_end", "size", "spec", "uva", "uva_end", "view")

    def __init__(self, spec: MemoryRegion, view: memoryview) -> None:
        self.spec = spec
        self.gpa = spec.guest_phys_addr
        self.gpa_end = spec.guest_phys_addr + spec.size
        self.uva = spec.user_addr
        self.uva_end = spec.user_addr + spec.size
        self.size = spec.size
        self.view = view


def check_table_untrusted(regions: Sequence[MemoryRegion]) -> None:
    """A table QEMU may send: non-empty regions that fit in 64 bits and do not overlap.

    Overlapping regions would make a translation ambiguous: refused.
    """
    for r in regions:
        if r.size == 0:
            raise VhostUserProtocolError(f"memory region at {r.guest_phys_addr:#x} is empty")
        for start in (r.guest_phys_addr, r.user_addr, r.mmap_offset):
            if start + r.size > _MAX_ADDR:
                raise VhostUserProtocolError(
                    f"memory region at {r.guest_phys_addr:#x} of {r.size:#x} bytes wraps around"
                )
    for key in ("guest_phys_addr", "user_addr"):
        spans = sorted((getattr(r, key), getattr(r, key) + r.size) for r in regions)
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise VhostUserProtocolError(f"memory regions overlap at {key} {start:#x}")


class GuestMemory:
    """The regions of one memory table, mapped; every access is bounds-checked."""

    def __init__(self, regions: Sequence[tuple[MemoryRegion, memoryview]] = ()) -> None:
        self._regions = [_Region(spec, view) for spec, view in regions]
        self._by_gpa = sorted(self._regions, key=lambda r: r.gpa)

    @classmethod
    def map_table_untrusted(
        cls, regions: Sequence[MemoryRegion], fds: Sequence[int], mapper: MemoryMapper
    ) -> GuestMemory:
        """Check and map a whole table, or map nothing (raises VhostUserProtocolError)."""
        check_table_untrusted(regions)
        mapped: list[tuple[MemoryRegion, memoryview]] = []
        try:
            for spec, fd in zip(regions, fds, strict=True):
                view = mapper.map(fd, spec.mmap_offset, spec.size)
                mapped.append((spec, view))
                if len(view) != spec.size:
                    raise VhostUserProtocolError(
                        f"memory region at {spec.guest_phys_addr:#x}: mapped {len(view)}"
                        f" bytes of {spec.size}"
                    )
        except (OSError, ValueError, OverflowError) as exc:
            for _, view in mapped:
                mapper.unmap(view)
            if isinstance(exc, VhostUserProtocolError):
                raise
            raise VhostUserProtocolError(f"cannot map guest memory: {exc}") from None
        return cls(mapped)

    def unmap(self, mapper: MemoryMapper) -> None:
        for r in self._regions:
            mapper.unmap(r.view)
        self._regions = []
        self._by_gpa = []

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(r.spec for r in self._regions)

    @property
    def end(self) -> int:
        """One past the highest guest-physical address (what the dirty log must cover)."""
        return max((r.gpa_end for r in self._regions), default=0)

    def gpa(self, addr: int, length: int) -> tuple[memoryview, int]:
        """The region view and offset holding guest-physical ``[addr, addr + length)``."""
        view, start, _ = self.gpa_region(addr, length)
        return view, addr - start

    def gpa_region(self, addr: int, length: int) -> tuple[memoryview, int, int]:
        """The view and guest-physical ``[start, end)`` of the region holding ``[addr,
        addr + length)``: a caller translating many buffers checks the next against
        these bounds first, as this does, and asks again only when it falls outside."""
        for r in self._by_gpa:
            if r.gpa <= addr < r.gpa_end:
                if addr + length > r.gpa_end:
                    raise GuestMemoryError(
                        f"{length} bytes at guest address {addr:#x} run past the end of"
                        f" their memory region ({r.gpa_end:#x})"
                    )
                return r.view, r.gpa, r.gpa_end
        raise GuestMemoryError(f"guest address {addr:#x} is in no memory region")

    def uva(self, addr: int, length: int) -> tuple[memoryview, int]:
        """The region view and offset holding QEMU user addresses ``[addr, addr + length)``."""
        for r in self._regions:
            if r.uva <= addr < r.uva_end:
                if addr + length > r.uva_end:
                    raise GuestMemoryError(
                        f"{length} bytes at QEMU address {addr:#x} run past their region"
                    )
                return r.view, addr - r.uva
        raise GuestMemoryError(f"QEMU address {addr:#x} is in no memory region")

    def gpa_view(self, addr: int, length: int) -> memoryview:
        view, offset = self.gpa(addr, length)
        return view[offset : offset + length]


class DirtyLog:
    """The bitmap of guest pages ferryd wrote, shared with QEMU (see the module doc)."""

    __slots__ = ("_address", "_bits", "_view")

    def __init__(self, view: memoryview, address: int | None = None) -> None:
        """``address``: where ``view`` is in ferryd's memory, to set bits atomically."""
        self._view = view
        self._bits = len(view) * 8
        self._address = address if ATOMIC_FETCH_OR is not None else None

    @property
    def view(self) -> memoryview:
        return self._view

    def covers(self, gpa: int, length: int) -> bool:
        if length <= 0:
            return True
        return (gpa + length - 1) >> LOG_PAGE_SHIFT < self._bits

    def check(self, gpa: int, length: int) -> None:
        """Raise unless every page of the range has a bit (before writing the range)."""
        if not self.covers(gpa, length):
            raise GuestMemoryError(
                f"guest address {gpa + length - 1:#x} is beyond the dirty log ({self._bits} pages)"
            )

    def mark(self, gpa: int, length: int) -> None:
        """Set the bit of every page ``[gpa, gpa + length)`` touches (checked first)."""
        if length <= 0:
            return
        last = (gpa + length - 1) >> LOG_PAGE_SHIFT
        if last >= self._bits:
            self.check(gpa, length)
        page = gpa >> LOG_PAGE_SHIFT
        address = self._address
        if address is not None and ATOMIC_FETCH_OR is not None:
            fetch_or = ATOMIC_FETCH_OR
            while page <= last:
                fetch_or(address + (page >> 3), 1 << (page & 7), _SEQ_CST)
                page += 1
            return
        view = self._view
        while page <= last:
            view[page >> 3] |= 1 << (page & 7)
            page += 1
