"""Guest memory: translation of both address spaces, bounds, remapping, the dirty log."""

from __future__ import annotations

import os

import pytest

from ferryd.frontends.vhost_user.errors import GuestMemoryError, VhostUserProtocolError
from ferryd.frontends.vhost_user.memory import ATOMIC_FETCH_OR, DirtyLog, GuestMemory, MmapMapper
from ferryd.frontends.vhost_user.messages import MemoryRegion
from tests.unit.vhost_guest import HIGH, LOW, FileMapper, GuestRam


def _mapped() -> tuple[FileMapper, GuestRam, GuestMemory]:
    mapper = FileMapper()
    ram = GuestRam(mapper, [LOW, HIGH])
    memory = GuestMemory.map_table_untrusted([LOW.spec, HIGH.spec], [LOW.fd, HIGH.fd], mapper)
    return mapper, ram, memory


def test_guest_and_qemu_addresses_reach_the_same_bytes() -> None:
    _, ram, memory = _mapped()
    ram.write(HIGH.gpa + 0x1234, b"ferry")
    view, offset = memory.gpa(HIGH.gpa + 0x1234, 5)
    assert bytes(view[offset : offset + 5]) == b"ferry"
    view, offset = memory.uva(HIGH.uva + 0x1234, 5)
    assert bytes(view[offset : offset + 5]) == b"ferry"
    # mmap_offset: the region starts 0x2000 into its file
    assert bytes(ram.mapper.files[HIGH.fd][0x3234:0x3239]) == b"ferry"
    memory.gpa_view(LOW.gpa + 10, 3)[:] = b"abc"
    assert ram.read(LOW.gpa + 10, 3) == b"abc"
    assert memory.end == HIGH.gpa + HIGH.size


@pytest.mark.parametrize(
    ("addr", "length", "says"),
    [
        (LOW.gpa + LOW.size, 1, "in no memory region"),
        (LOW.gpa + LOW.size - 4, 8, "run past the end"),
        (HIGH.gpa - 1, 2, "in no memory region"),
        (HIGH.gpa + HIGH.size - 1, 2, "run past the end"),
        (1 << 63, 16, "in no memory region"),
    ],
)
def test_ranges_outside_or_straddling_a_region_are_refused(
    addr: int, length: int, says: str
) -> None:
    _, _, memory = _mapped()
    with pytest.raises(GuestMemoryError, match=says):
        memory.gpa(addr, length)


def test_qemu_addresses_outside_the_table_are_refused() -> None:
    _, _, memory = _mapped()
    with pytest.raises(GuestMemoryError):
        memory.uva(LOW.uva - 1, 1)
    with pytest.raises(GuestMemoryError):
        memory.uva(LOW.uva + LOW.size - 1, 2)


@pytest.mark.parametrize(
    ("regions", "says"),
    [
        ([MemoryRegion(0, 0, 0, 0)], "empty"),
        ([MemoryRegion((1 << 64) - 4096, 8192, 0, 0)], "wraps around"),
        ([MemoryRegion(0, 8192, 0, 0), MemoryRegion(4096, 8192, 1 << 30, 0)], "overlap"),
        ([MemoryRegion(0, 8192, 0, 0), MemoryRegion(1 << 30, 8192, 4096, 0)], "overlap"),
    ],
)
def test_bad_tables_are_refused_and_nothing_stays_mapped(
    regions: list[MemoryRegion], says: str
) -> None:
    mapper = FileMapper()
    for fd in range(len(regions)):
        mapper.add(fd, 1 << 16)
    with pytest.raises(VhostUserProtocolError, match=says):
        GuestMemory.map_table_untrusted(regions, list(range(len(regions))), mapper)
    assert mapper.live == {}


@pytest.mark.parametrize(
    "region",
    [
        MemoryRegion(0, 8192, 1 << 40, 0),  # larger than the file
        MemoryRegion(0, 1 << 63, 1 << 40, 0),  # larger than mmap can say
        MemoryRegion(0, 4096, 1 << 40, (1 << 64) - 8192),  # an offset mmap cannot say
    ],
)
def test_a_region_the_file_cannot_back_is_refused(region: MemoryRegion) -> None:
    fd = os.memfd_create("guest-ram")
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(VhostUserProtocolError, match="cannot map guest memory"):
            GuestMemory.map_table_untrusted([region], [fd], MmapMapper())
    finally:
        os.close(fd)


def test_a_region_that_cannot_be_mapped_unmaps_the_others() -> None:
    mapper = FileMapper()
    GuestRam(mapper, [LOW, HIGH])
    mapper.fail_fds.add(HIGH.fd)
    with pytest.raises(VhostUserProtocolError, match="cannot map guest memory"):
        GuestMemory.map_table_untrusted([LOW.spec, HIGH.spec], [LOW.fd, HIGH.fd], mapper)
    assert mapper.live == {}


def test_real_mmap_of_a_memfd_at_an_unaligned_offset() -> None:
    """The daemon's port: what QEMU's memfd looks like, written through the mapping."""
    fd = os.memfd_create("guest-ram")
    try:
        os.ftruncate(fd, 3 * 4096)
        mapper = MmapMapper()
        region = MemoryRegion(0x10_0000, 4096, 0x7F00_0000_0000, 4096 + 100)
        memory = GuestMemory.map_table_untrusted([region], [fd], mapper)
        memory.gpa_view(0x10_0000, 5)[:] = b"hello"
        assert os.pread(fd, 5, 4096 + 100) == b"hello"
        os.pwrite(fd, b"world", 4096 + 200)
        assert bytes(memory.gpa_view(0x10_0000 + 100, 5)) == b"world"
        memory.unmap(mapper)
        with pytest.raises(GuestMemoryError):
            memory.gpa(0x10_0000, 1)
    finally:
        os.close(fd)


def test_dirty_log_marks_exactly_the_pages_touched() -> None:
    log = DirtyLog(memoryview(bytearray(4)))  # 32 pages
    log.mark(0x1FFF, 2)  # pages 1 and 2
    log.mark(5 * 4096, 4096)  # page 5 only
    log.mark(31 * 4096 + 4095, 1)  # the last page
    log.mark(9 * 4096, 0)  # nothing
    bits = int.from_bytes(bytes(log.view), "little")
    assert bits == (1 << 1) | (1 << 2) | (1 << 5) | (1 << 31)


def test_a_page_beyond_the_log_is_an_error_and_no_bit_is_written() -> None:
    log = DirtyLog(memoryview(bytearray(1)))  # 8 pages
    with pytest.raises(GuestMemoryError, match="beyond the dirty log"):
        log.mark(7 * 4096, 4097)
    assert bytes(log.view) == b"\x00"
    assert log.covers(7 * 4096, 4096)
    assert not log.covers(8 * 4096, 1)


def test_dirty_log_sets_bits_atomically_through_the_real_mapping() -> None:
    """MmapMapper gives the log's address; bits go through libatomic when installed."""
    fd = os.memfd_create("vhost-log")
    try:
        os.ftruncate(fd, 4096)
        os.pwrite(fd, b"\x80", 1)  # another writer's bit, kept
        mapper = MmapMapper()
        view = mapper.map(fd, 0, 4096)
        log = DirtyLog(view, mapper.address(view))
        log.mark(8 * 4096, 3 * 4096)  # pages 8, 9, 10
        log.mark(4095 * 8 * 4096, 1)  # page 32760: byte 4095, bit 0
        assert os.pread(fd, 2, 0) == b"\x00\x87"
        assert os.pread(fd, 1, 4095) == b"\x01"
        with pytest.raises(GuestMemoryError):
            log.mark(4096 * 8 * 4096, 1)
        del log
        mapper.unmap(view)
    finally:
        os.close(fd)


def test_libatomic_is_there() -> None:
    """Debian's libatomic1 (a dependency of gcc's runtime): the atomic path is the one used."""
    assert ATOMIC_FETCH_OR is not None
