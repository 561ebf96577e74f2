"""ferryd.frontends.stream_framing: QEMU's length-prefixed frames, however the bytes arrive."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryd.frontends.stream_framing import (
    LENGTH_SIZE,
    MAX_FRAME,
    FrameReader,
    StreamFramingError,
    frame_parts,
    max_frame_for_mtu,
    unsent_tail,
)


def framed(*frames: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in frames)


def frame(n: int, seed: int = 0) -> bytes:
    return bytes((seed + i) % 251 for i in range(n))


def read_in_pieces(reader: FrameReader, data: bytes, cuts: list[int]) -> list[bytes]:
    """Feed ``data`` cut at ``cuts`` the way a socket reader does (space, then received)."""
    out: list[bytes] = []
    at = 0
    for end in [*sorted(set(cuts)), len(data)]:
        while at < end:
            space = reader.space()
            n = min(len(space), end - at)
            space[:n] = data[at : at + n]
            at += n
            out.extend(bytes(f) for f in reader.received_untrusted(n))
    return out


def test_one_read_many_frames() -> None:
    frames = [frame(n, n) for n in (14, 60, 1514, 1, 9000)]
    reader = FrameReader()
    got = reader.received_untrusted(_put(reader, framed(*frames)))
    assert [bytes(f) for f in got] == frames
    assert reader.pending == 0


def _put(reader: FrameReader, data: bytes) -> int:
    space = reader.space()
    space[: len(data)] = data
    return len(data)


def test_a_frame_split_at_every_byte_arrives_once_whole() -> None:
    frames = [frame(60, 1), frame(1514, 2), frame(14, 3)]
    data = framed(*frames)
    for cut in range(1, len(data)):
        assert read_in_pieces(FrameReader(), data, [cut]) == frames, cut


def test_byte_by_byte() -> None:
    frames = [frame(200, 7), frame(15, 8)]
    data = framed(*frames)
    assert read_in_pieces(FrameReader(), data, list(range(len(data)))) == frames


def test_longest_frames_in_odd_pieces_cross_the_buffer_end() -> None:
    """The incomplete frame is moved to the front: max-size frames never stall."""
    frames = [frame(MAX_FRAME, s) for s in range(12)]  # ~800 KiB: the buffer wraps often
    data = framed(*frames)
    reader = FrameReader(capacity=LENGTH_SIZE + MAX_FRAME)  # the tightest buffer allowed
    assert read_in_pieces(reader, data, list(range(0, len(data), 40_001))) == frames


@given(
    st.lists(st.integers(1, 3000), min_size=1, max_size=20),
    st.lists(st.integers(0, 70_000), max_size=30),
)
def test_any_frames_any_pieces(sizes: list[int], cuts: list[int]) -> None:
    frames = [frame(n, i) for i, n in enumerate(sizes)]
    data = framed(*frames)
    cuts = [c % len(data) for c in cuts]
    assert read_in_pieces(FrameReader(), data, cuts) == frames


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_a_length_no_frame_can_have_breaks_the_stream(length: int) -> None:
    reader = FrameReader()
    before = reader.feed_untrusted(framed(frame(60)))
    assert [bytes(f) for f in before] == [frame(60)]
    with pytest.raises(StreamFramingError, match=f"frame length of {length} bytes"):
        reader.feed_untrusted(struct.pack(">I", length) + frame(60))
    # Broken for good: even a valid frame after it is refused, until reset.
    with pytest.raises(StreamFramingError):
        reader.feed_untrusted(framed(frame(60)))
    reader.reset()
    assert [bytes(f) for f in reader.feed_untrusted(framed(frame(61)))] == [frame(61)]


def test_the_length_alone_is_enough_to_refuse() -> None:
    """A hostile length is refused at once, not after waiting for its (huge) body."""
    reader = FrameReader()
    with pytest.raises(StreamFramingError):
        reader.feed_untrusted(struct.pack(">I", 1 << 31))


def test_the_mtu_sets_the_longest_frame() -> None:
    limit = max_frame_for_mtu(1500)
    assert limit == 1500 + 14 + 4
    reader = FrameReader(limit)
    assert [len(f) for f in reader.feed_untrusted(framed(frame(limit)))] == [limit]
    with pytest.raises(StreamFramingError, match="1 to 1518 bytes"):
        reader.feed_untrusted(framed(frame(limit + 1)))
    assert max_frame_for_mtu(65520) == 65520 + 14 + 4
    assert max_frame_for_mtu(65535) == MAX_FRAME  # never beyond what IP can carry


def test_feed_keeps_frames_of_several_spaces() -> None:
    """feed_untrusted with more than one buffer's worth returns every frame intact."""
    frames = [frame(30_000, s) for s in range(20)]
    reader = FrameReader(capacity=LENGTH_SIZE + MAX_FRAME)
    assert [bytes(f) for f in reader.feed_untrusted(framed(*frames))] == frames


def test_a_reader_refuses_impossible_settings_and_counts() -> None:
    with pytest.raises(ValueError):
        FrameReader(0)
    with pytest.raises(ValueError):
        FrameReader(MAX_FRAME + 1)
    with pytest.raises(ValueError):
        FrameReader(1000, capacity=1000)
    reader = FrameReader()
    space = reader.space()
    with pytest.raises(ValueError):
        reader.received_untrusted(len(space) + 1)


def test_frame_parts_and_what_a_short_write_leaves() -> None:
    parts: list[bytes | memoryview] = [b"abc", memoryview(b"defgh"), b"ij"]
    out, size = frame_parts(parts)
    wire = b"".join(bytes(p) for p in out)
    assert wire == struct.pack(">I", 10) + b"abcdefghij"
    assert size == len(wire)
    for sent in range(size + 1):
        assert unsent_tail(out, sent) == wire[sent:]
