"""The migration stream's pre-copy part (format version 2): order, indexes, refusals."""

from __future__ import annotations

import dataclasses

import pytest

from ferryd.migration import migration_pb2 as pb
from ferryd.migration.records import TcpFlowRecord, UdpFlowRecord
from ferryd.migration.stream import (
    PRECOPY_VERSION,
    STREAM_VERSION,
    FlowReceived,
    HeaderReceived,
    PrecopyEnded,
    StreamDecoder,
    StreamEncoder,
    StreamEnded,
    StreamError,
    TcpFlowsGone,
    _frame,
)
from tests.unit.test_stream import HEADER, header_bytes, idle_tcp, refused, trailer_for

PRECOPY_HEADER = dataclasses.replace(HEADER, precopy=True)


def precopy_stream() -> tuple[bytes, list[TcpFlowRecord]]:
    """Two pre-copied flows, the end, one replacement, one retired, the trailer."""
    enc = StreamEncoder()
    a, b = idle_tcp(4), dataclasses.replace(idle_tcp(4), guest_port=40001)
    a2 = dataclasses.replace(a, seq_from_guest=(a.seq_from_guest + 10) & 0xFFFFFFFF)
    data = enc.header(PRECOPY_HEADER) + enc.flow(a) + enc.flow(b) + enc.precopy_end()
    data += enc.flow(a2) + enc.tcp_gone([1]) + enc.trailer()
    return data, [a, b, a2]


def test_round_trip_with_precopy() -> None:
    data, (a, b, a2) = precopy_stream()
    dec = StreamDecoder()
    events = [e for i in range(len(data)) for e in dec.feed_untrusted(data[i : i + 1])]
    dec.eof()
    assert events[0] == HeaderReceived(PRECOPY_HEADER, STREAM_VERSION, PRECOPY_VERSION)
    assert events[1:] == [
        FlowReceived(a, 0),
        FlowReceived(b, 1),
        PrecopyEnded(2, 2),
        FlowReceived(a2, 3),
        TcpFlowsGone((1,), 4),
        StreamEnded(5),
    ]


def test_version_1_stream_has_no_precopy() -> None:
    enc = StreamEncoder()
    head = enc.header(HEADER)
    assert pb.Header.FromString(head[2:]).min_compatible_version == 1
    with pytest.raises(RuntimeError, match="no pre-copy part"):
        enc.precopy_end()


def test_encoder_keeps_the_order() -> None:
    enc = StreamEncoder()
    enc.header(PRECOPY_HEADER)
    udp = UdpFlowRecord(
        HEADER.ipv4.address,  # type: ignore[union-attr]
        5353,
        HEADER.ipv4.gateway,  # type: ignore[union-attr]
        53,
        0.0,
    )
    with pytest.raises(RuntimeError, match="only TCP"):
        enc.flow(udp)
    with pytest.raises(RuntimeError, match="before the end of the pre-copy"):
        enc.trailer()
    with pytest.raises(RuntimeError, match="TCP gone"):
        enc.tcp_gone([0])
    enc.flow(idle_tcp(4))
    enc.precopy_end()
    with pytest.raises(ValueError, match="outside"):
        enc.tcp_gone([1])
    enc.tcp_gone([0])
    with pytest.raises(RuntimeError, match="only once"):
        enc.tcp_gone([0])


def _precopy_head() -> bytes:
    return StreamEncoder().header(PRECOPY_HEADER)


def _tcp_body() -> bytes:
    enc = StreamEncoder()
    enc.header(PRECOPY_HEADER)
    return enc.flow(idle_tcp(4))


def test_precopy_header_must_need_version_2() -> None:
    refused(header_bytes(version=2, min_compatible_version=1, precopy=True), "pre-copy")


def test_only_tcp_before_the_precopy_end() -> None:
    udp = _frame(3, pb.UdpFlow(guest_port=1, remote_addr=b"\x01\x02\x03\x04").SerializeToString())
    refused(_precopy_head() + udp, "UDP flow record in the pre-copy part")


def test_trailer_before_the_precopy_end() -> None:
    head = _precopy_head()
    refused(head + trailer_for(head, 0), "trailer record in the pre-copy part")


def test_precopy_end_must_count_right() -> None:
    head = _precopy_head() + _tcp_body()
    refused(head + _frame(6, pb.PrecopyEnd(tcp_count=2).SerializeToString()), "counts 2 TCP")


def test_precopy_end_only_once_and_only_with_precopy() -> None:
    end = _frame(6, pb.PrecopyEnd(tcp_count=0).SerializeToString())
    refused(header_bytes() + end, "pre-copy end record out of place")
    refused(_precopy_head() + end + end, "pre-copy end record out of place")


@pytest.mark.parametrize(
    ("indexes", "match"), [([1], "outside"), ([0, 0], "twice"), ([5], "outside")]
)
def test_gone_indexes_are_checked(indexes: list[int], match: str) -> None:
    end = _frame(6, pb.PrecopyEnd(tcp_count=1).SerializeToString())
    gone = _frame(7, pb.TcpGone(index=indexes).SerializeToString())
    refused(_precopy_head() + _tcp_body() + end + gone, match)


def test_gone_without_precopy_or_twice() -> None:
    gone = _frame(7, pb.TcpGone(index=[]).SerializeToString())
    refused(header_bytes() + gone, "without a pre-copy")
    end = _frame(6, pb.PrecopyEnd(tcp_count=0).SerializeToString())
    refused(_precopy_head() + end + gone + gone, "twice")


def test_truncated_in_the_precopy_part() -> None:
    data, _ = precopy_stream()
    cut = data[: data.index(_frame(6, pb.PrecopyEnd(tcp_count=2).SerializeToString()))]
    dec = StreamDecoder()
    dec.feed_untrusted(cut)
    with pytest.raises(StreamError, match="in its pre-copy part"):
        dec.eof()


def test_checksum_covers_both_parts() -> None:
    data, _ = precopy_stream()
    trailer_at = data.rindex(b"\x7a")
    body = bytearray(data[:trailer_at])
    body[-3] ^= 0x01  # inside the TcpGone record
    refused(bytes(body) + data[trailer_at:], "checksum mismatch|does not parse|outside")
