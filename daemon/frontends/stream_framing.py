"""QEMU's stream framing: each Ethernet frame behind its length, sans-IO.

QEMU's ``-netdev stream`` (and ``-netdev socket`` before it) carries the
guest's frames over a byte stream, each one preceded by its length as a
32-bit big-endian integer and nothing else: no checksum offload, no
segmentation offload, no header of its own (passt calls this its default
mode). A byte stream has no frame boundaries, so the reader must find them
from the lengths alone: one read may hold many frames, and one frame may
arrive over many reads (QEMU writes a frame as it can; a 64 KiB frame
crosses a Unix socket in pieces).

:class:`FrameReader` does that without owning a socket: the caller reads
into :meth:`FrameReader.space` and reports how much arrived with
:meth:`FrameReader.received_untrusted`, which returns the frames completed
so far as views of the reader's buffer (no copy), valid until the next
:meth:`~FrameReader.space`. Bytes of a frame not complete yet stay in the
buffer; that is the only state. A length no frame can have (0, or more
than :meth:`max_frame_for_mtu` allows) means the two ends no longer agree
on where frames begin: nothing after it can be trusted, so the reader
raises :class:`StreamFramingError`, its one declared exception, and is of
no further use until :meth:`~FrameReader.reset` (the caller drops the
connection: QEMU's own reader does the same with a length beyond its
buffer, net/stream.c).

The other direction needs no parser, only the rule that a frame is written
whole or not at all: :func:`frame_parts` prefixes the length, and
:func:`unsent_tail` is what is left of a frame a non-blocking write took
only part of (ferryd.frontends.stream finishes it before the next frame).
"""

from __future__ import annotations

import struct

from ferryd.wire.ethernet import ETH_HLEN

__all__ = [
    "LENGTH_SIZE",
    "MAX_FRAME",
    "FrameReader",
    "StreamFramingError",
    "frame_parts",
    "max_frame_for_mtu",
    "unsent_tail",
]

_LENGTH = struct.Struct(">I")
#: The 4-byte big-endian length in front of every frame.
LENGTH_SIZE = _LENGTH.size
#: An 802.1Q tag a guest may put in front of its ethertype (IEEE 802.1Q §9).
VLAN_HLEN = 4
#: No frame is longer: the largest IP packet (a 16-bit total length, RFC 791
#: §3.1; an IPv6 payload without jumbograms, RFC 8200 §3) behind an Ethernet header.
MAX_FRAME = 65535 + ETH_HLEN
#: Room for many frames per read, and always for at least one whole frame.
_CAPACITY = (256 << 10) + LENGTH_SIZE + MAX_FRAME


class StreamFramingError(Exception):
    """QEMU's side of the stream sent a length no frame can have: its fault.

    Frame boundaries are lost from there on; the connection cannot be used.
    """


def max_frame_for_mtu(mtu: int) -> int:
    """The longest frame a guest with this link MTU sends (a VLAN tag included)."""
    return min(MAX_FRAME, mtu + ETH_HLEN + VLAN_HLEN)


class FrameReader:
    """Finds length-prefixed frames in a stream that arrives in arbitrary pieces."""

    def __init__(self, max_frame: int = MAX_FRAME, capacity: int = _CAPACITY) -> None:
        if not 0 < max_frame <= MAX_FRAME:
            raise ValueError(f"max_frame must be 1 to {MAX_FRAME}, not {max_frame}")
        if capacity < LENGTH_SIZE + max_frame:
            raise ValueError("the buffer must hold at least one whole frame")
        self.max_frame = max_frame
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._start = 0
        """Where the first byte not yet returned as (part of) a frame is."""
        self._end = 0
        """Where the next byte read goes."""
        self._broken: str | None = None

    @property
    def pending(self) -> int:
        """Bytes held of a frame not complete yet (its length included)."""
        return self._end - self._start

    def reset(self) -> None:
        """Forget everything: a new connection starts at a frame boundary."""
        self._start = self._end = 0
        self._broken = None

    def space(self) -> memoryview:
        """Where to read the next bytes into; invalidates the frames returned before.

        The start of an incomplete frame is moved to the front first, so
        the space always has room for the rest of the longest frame.
        """
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = 0
        elif start and len(self._buf) - end < LENGTH_SIZE + self.max_frame:
            tail = bytes(self._view[start:end])  # at most one frame: cheap, and no overlap
            self._view[: len(tail)] = tail
            self._start, self._end = 0, len(tail)
        return self._view[self._end :]

    def received_untrusted(self, n: int) -> list[memoryview]:
        """``n`` bytes were read into :meth:`space`; the frames they complete.

        Raises :class:`StreamFramingError` on a length no frame can have
        (and again on every call until :meth:`reset`).
        """
        if self._broken is not None:
            raise StreamFramingError(self._broken)
        if not 0 <= n <= len(self._buf) - self._end:
            raise ValueError(f"{n} bytes cannot have been read into the space given")
        self._end += n
        frames: list[memoryview] = []
        buf, view, start, end, limit = self._buf, self._view, self._start, self._end, self.max_frame
        while end - start >= LENGTH_SIZE:
            (length,) = _LENGTH.unpack_from(buf, start)
            if length == 0 or length > limit:
                self._start = start
                self._broken = (
                    f"a frame length of {length} bytes (a frame is 1 to {limit} bytes on this link)"
                )
                raise StreamFramingError(self._broken)
            if end - start - LENGTH_SIZE < length:
                break
            start += LENGTH_SIZE
            frames.append(view[start : start + length])
            start += length
        self._start = start
        return frames

    def feed_untrusted(self, data: bytes | bytearray | memoryview) -> list[memoryview]:
        """Copy ``data`` in (for callers that hold bytes already); the frames it completes.

        The frames returned are copies when ``data`` needs more than one
        :meth:`space` (their views would be moved under them otherwise).
        """
        data = memoryview(data)
        frames: list[memoryview] = []
        while True:
            space = self.space()
            n = min(len(space), len(data))
            space[:n] = data[:n]
            data = data[n:]
            frames.extend(self.received_untrusted(n))
            if not len(data):
                return frames
            frames = [memoryview(bytes(f)) for f in frames]  # before space() moves them


def frame_parts(parts: list[bytes | memoryview]) -> tuple[list[bytes | memoryview], int]:
    """The frame made of ``parts`` behind its length, and its size on the stream."""
    length = sum(len(p) for p in parts)
    return [_LENGTH.pack(length), *parts], LENGTH_SIZE + length


def unsent_tail(parts: list[bytes | memoryview], sent: int) -> bytes:
    """What is left of ``parts`` after a write took their first ``sent`` bytes (a copy)."""
    out = bytearray()
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
            continue
        out += part[sent:]
        sent = 0
    return bytes(out)
