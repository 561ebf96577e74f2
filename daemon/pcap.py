"""``ferryd --pcap FILE``: every frame the guest sends or receives, for Wireshark.

Theory of operation. Every frame passes the frontend (ferryd.frontends.base)
whatever it is (tap, QEMU stream, vhost-user): the data path hands the
frontend's reader a callback for each frame from the guest, and the stack
sends each frame for the guest through ``send`` or ``send_partial``.
:class:`CapturingFrontend` wraps the frontend and writes a copy of each
frame, both directions, to the file before passing it on; nothing else
knows the capture exists. The file is classic libpcap (the format
Wireshark, tshark and tcpdump read: a 24-byte header, then a 16-byte
record header per frame), LINKTYPE_ETHERNET, microsecond timestamps
(wall clock), snap length :data:`SNAPLEN` (262144, Wireshark's own
maximum, above the largest frame ferryd handles: 65520 + 14 bytes on a
tap, 64 KiB segments through vhost-user). A frame ferryd sends with its L4
checksum left to the guest's kernel (``send_partial``: vhost-user's
checksum offload) is written as sent, with that checksum unfilled.

ferryd holds no payload (DESIGN.md), and the capture keeps that meaning:
each frame is written with one writev() to the file as it passes, never
queued in ferryd, so a capture holds no memory however slow the disk.
The price is that the write happens on the data path: into the page cache
it costs a copy and a system call per frame (README, "Operations", gives
the measured cost), but a disk that cannot keep up makes the kernel
throttle the writer (balance_dirty_pages), which would stall the guest's
traffic. So a write that takes longer than :data:`STALL_LIMIT`, or fails
(a full disk: ENOSPC), or is short, ends the capture: the file is closed,
one line is logged, ``capture_stopped`` is counted, and the guest's
traffic goes on. A capture is a debugging aid, not a recorder.

The file is opened (created, mode 0600, truncated) at start-up, before
the privilege drop: after it ferryd's seccomp filter refuses to open a
file for writing, and the file stays its starter's.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ferryd.exits import ensure_parent_dir
from ferryd.frontends.base import Frontend, FrontendCounters, OnBurstEnd, OnFrame

__all__ = ["SNAPLEN", "CaptureCounters", "CapturingFrontend", "PcapFile", "file_header", "record"]

log = logging.getLogger("ferryd.pcap")

#: libpcap's classic magic (microsecond timestamps), written in native byte order.
MAGIC = 0xA1B2C3D4
#: LINKTYPE_ETHERNET (tcpdump.org's link-layer header types).
LINKTYPE_ETHERNET = 1
#: The longest part of a frame recorded (longer frames are cut, their length kept).
SNAPLEN = 262144
#: A write taking longer than this (seconds) ends the capture (see the module docstring):
#: far above a write into the page cache (microseconds) or a preemption on a busy host,
#: what the kernel's dirty-page throttling costs when the disk falls behind.
STALL_LIMIT = 0.2
#: A write taking longer than this (seconds) is counted (``slow_writes``).
SLOW_WRITE = 0.01

_FILE_HEADER = struct.Struct("=IHHiIII")
_RECORD_HEADER = struct.Struct("=IIII")


def file_header(snaplen: int = SNAPLEN, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    """The 24-byte pcap file header: version 2.4, GMT offset and accuracy 0."""
    return _FILE_HEADER.pack(MAGIC, 2, 4, 0, 0, snaplen, linktype)


def record_header(length: int, time_ns: int, snaplen: int = SNAPLEN) -> tuple[bytes, int]:
    """A frame's record header (time, captured and real length), and how much of it to write."""
    seconds, rest = divmod(time_ns, 1_000_000_000)
    captured = min(length, snaplen)
    return _RECORD_HEADER.pack(seconds, rest // 1000, captured, length), captured


def record(frame: bytes | memoryview, time_ns: int, snaplen: int = SNAPLEN) -> bytes:
    """One frame's record: its header, then its bytes (up to ``snaplen``)."""
    header, captured = record_header(len(frame), time_ns, snaplen)
    return header + bytes(frame[:captured])


@dataclass
class CaptureCounters:
    """What the capture wrote (registered as the ``pcap`` counters group)."""

    frames: int = 0
    bytes: int = 0
    """Bytes written to the file, headers included."""
    slow_writes: int = 0
    """Writes that took longer than SLOW_WRITE: the disk begins to hold the guest up."""
    capture_stopped: int = 0
    """1 once the capture ended (a slow or full disk); the file is closed then."""


class PcapFile:
    """A pcap file open for writing; each frame goes to it with one write()."""

    def __init__(
        self,
        fd: int,
        path: str,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fd: int | None = fd
        self.path = path
        self.counters = CaptureCounters()
        self._clock_ns = clock_ns
        self._timer = timer
        header = file_header()
        self._write([header], len(header))

    @classmethod
    def create(cls, path: str) -> PcapFile:
        """Create (or truncate) ``path``, mode 0600; OSError as open(2) raises it.

        Its directory is made if missing, as the control socket's is (StartupError).
        """
        ensure_parent_dir(path, "--pcap file")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        return cls(fd, path)

    def write_frame(self, frame: bytes | memoryview) -> None:
        self.write_parts([frame])

    def write_parts(self, parts: list[bytes | memoryview]) -> None:
        """One frame given in parts (header and payload): written with one writev(), no copy."""
        if self.fd is None:
            return
        length = sum(len(part) for part in parts)
        header, captured = record_header(length, self._clock_ns())
        if captured < length:  # beyond the snap length: cut (never, for ferryd's frames)
            parts = [b"".join(parts)[:captured]]
        if self._write([header, *parts], 16 + captured):
            self.counters.frames += 1

    def _write(self, buffers: list[bytes | memoryview], size: int) -> bool:
        """Write ``buffers`` (``size`` bytes) whole; False (and the capture stopped) if not."""
        assert self.fd is not None
        t0 = self._timer()
        try:
            written = os.writev(self.fd, buffers)
        except OSError as exc:
            self._stop(f"cannot write: {exc.strerror or exc}")
            return False
        took = self._timer() - t0
        if written != size:
            self._stop(f"short write ({written} of {size} bytes): the disk is full?")
            return False
        self.counters.bytes += written
        if took > SLOW_WRITE:
            self.counters.slow_writes += 1
        if took > STALL_LIMIT:
            self._stop(
                f"a write took {took * 1e3:.0f} ms (limit {STALL_LIMIT * 1e3:.0f} ms): the disk"
                " cannot keep up, and the guest's traffic would wait for it"
            )
        return True

    def _stop(self, why: str) -> None:
        log.error("--pcap %s: capture stopped: %s", self.path, why)
        self.counters.capture_stopped = 1
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class CapturingFrontend:
    """A frontend whose frames, both ways, are also written to a :class:`PcapFile`.

    Everything else is the wrapped frontend's (it implements
    ferryd.frontends.base.Frontend by passing each call on).
    """

    def __init__(self, inner: Frontend, pcap: PcapFile) -> None:
        self.inner = inner
        self.pcap = pcap

    @property
    def csum_offload(self) -> bool:
        return self.inner.csum_offload

    @csum_offload.setter
    def csum_offload(self, value: bool) -> None:
        self.inner.csum_offload = value

    @property
    def counters(self) -> FrontendCounters:
        return self.inner.counters

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "pcap": self.pcap.path}

    def _tee(self, on_frame: OnFrame) -> OnFrame:
        write = self.pcap.write_frame

        def frame(data: memoryview, trusted: bool) -> None:
            write(data)
            on_frame(data, trusted)

        return frame

    async def run(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        await self.inner.run(self._tee(on_frame), on_burst_end)

    def drain(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        self.inner.drain(self._tee(on_frame), on_burst_end)

    def send(self, frame: bytes) -> bool:
        self.pcap.write_frame(frame)
        return self.inner.send(frame)

    def send_partial(
        self, parts: list[bytes | memoryview], csum_start: int, csum_offset: int
    ) -> bool:
        self.pcap.write_parts(parts)
        return self.inner.send_partial(parts, csum_start, csum_offset)

    def hand_over(self) -> None:
        self.inner.hand_over()

    def take_over(self) -> None:
        self.inner.take_over()

    def close(self) -> None:
        self.inner.close()
        self.pcap.close()
