"""The migration stream codec: round trips, chunking, truncation, corruption, refusals."""

from __future__ import annotations

import socket
import subprocess
import sys
import zlib
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferryd.link import Ip4Config, Ip6Config
from ferryd.migration import migration_pb2 as pb
from ferryd.migration.kernel_state import SUPPORTED_STATES, TcpKernelState, TcpState
from ferryd.migration.records import (
    FlowRecord,
    IcmpFlowRecord,
    ListenerRecord,
    StreamHeader,
    TcpFlowRecord,
    UdpFlowRecord,
    flow_from_proto_untrusted,
    flow_to_proto,
)
from ferryd.migration.stream import (
    MAGIC,
    STREAM_VERSION,
    FlowReceived,
    HeaderReceived,
    StreamDecoder,
    StreamEncoder,
    StreamEnded,
    StreamError,
    StreamEvent,
    _frame,
)
from ferryd.wire.ip import IpAddress

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- strategies

u32 = st.integers(0, 2**32 - 1)
port = st.integers(1, 65535)
wscale = st.integers(0, 14)
idle = st.integers(0, 2**32 - 1).map(lambda ms: ms / 1000)
v4 = st.ip_addresses(v=4).map(lambda a: IPv4Address(int(a)))
v6 = st.ip_addresses(v=6).map(lambda a: IPv6Address(int(a)))


def addresses(version: int) -> st.SearchStrategy[IpAddress]:
    return v4 if version == 4 else v6


any_address = addresses(4) | addresses(6)


@st.composite
def headers(draw: st.DrawFn) -> StreamHeader:
    ipv4 = draw(
        st.none()
        | st.builds(Ip4Config, v4, st.integers(0, 32), v4, st.lists(v4, max_size=3).map(tuple))
    )
    ipv6 = draw(
        st.none()
        | st.builds(Ip6Config, v6, st.integers(0, 128), v6, st.lists(v6, max_size=3).map(tuple))
    )
    return StreamHeader(
        ferry_mac=draw(st.binary(min_size=6, max_size=6)),
        mtu=draw(st.integers(68, 65535)),
        ipv4=ipv4,
        ipv6=ipv6,
        guest_mac=draw(st.none() | st.binary(min_size=6, max_size=6)),
        flow_count_hint=draw(u32),
        software_version=draw(st.text(max_size=40)),
        frozen_at_ns=draw(st.none() | st.integers(1, 2**64 - 1)),
    )


def _address(draw: st.DrawFn, version: int, header: StreamHeader) -> IpAddress:
    """Often the header's guest address (the case the wire leaves out)."""
    config = header.ipv4 if version == 4 else header.ipv6
    if config is not None and draw(st.booleans()):
        return config.address
    return draw(addresses(version))


@st.composite
def kernel_states(
    draw: st.DrawFn, guest: IpAddress, remote: IpAddress, rport: int
) -> TcpKernelState:
    family = draw(st.sampled_from([4, 6]))
    addrs = addresses(family)
    local = guest if guest.version == family and draw(st.booleans()) else draw(addrs)
    peer = remote if remote.version == family and draw(st.booleans()) else draw(addrs)
    tcp_state = draw(st.sampled_from(sorted(SUPPORTED_STATES)))
    # FIN_WAIT2: our FIN was acknowledged, so was every byte before it.
    send_queue = b"" if tcp_state == TcpState.FIN_WAIT2 else draw(st.binary(max_size=300))
    return TcpKernelState(
        local_addr=local,
        local_port=draw(port),
        remote_addr=peer,
        remote_port=draw(st.just(rport) | port),
        tcp_state=tcp_state,
        mss=draw(st.integers(0, 65535)),
        snd_wscale=draw(wscale),
        rcv_wscale=draw(wscale),
        options=draw(st.integers(0, 255)),
        timestamp=draw(u32),
        snd_wl1=draw(u32),
        snd_wnd=draw(u32),
        max_window=draw(u32),
        rcv_wnd=draw(u32),
        rcv_wup=draw(u32),
        send_seq=draw(u32),
        recv_seq=draw(u32),
        send_queue=send_queue,
        unsent=draw(st.integers(0, len(send_queue))),
        recv_queue=draw(st.binary(max_size=300)),
    )


@st.composite
def tcp_flows(draw: st.DrawFn, header: StreamHeader) -> TcpFlowRecord:
    version = draw(st.sampled_from([4, 6]))
    guest = _address(draw, version, header)
    remote = draw(addresses(version))
    rport = draw(port)
    handshake = draw(st.booleans())
    kernel = draw(st.none() if handshake and draw(st.booleans()) else st.just(None))
    if kernel is None and not (handshake and draw(st.booleans())):
        kernel = draw(kernel_states(guest, remote, rport))
    if kernel is None:
        handshake = True
    return TcpFlowRecord(
        guest_addr=guest,
        guest_port=draw(port),
        remote_addr=remote,
        remote_port=rport,
        kernel=kernel,
        seq_to_guest=draw(u32),
        seq_ack_from_guest=draw(u32),
        seq_from_guest=draw(u32),
        seq_ack_to_guest=draw(u32),
        guest_window=draw(st.integers(0, 65535)),
        guest_wscale=draw(wscale),
        our_wscale=draw(wscale),
        guest_mss=draw(st.integers(0, 65535)),
        flags=draw(u32),
        state=draw(u32),
        handshake=handshake,
    )


@st.composite
def udp_flows(draw: st.DrawFn, header: StreamHeader) -> UdpFlowRecord:
    version = draw(st.sampled_from([4, 6]))
    addrs = addresses(version)
    inbound = draw(st.booleans())
    return UdpFlowRecord(
        guest_addr=_address(draw, version, header),
        guest_port=draw(port),
        remote_addr=draw(addrs),
        remote_port=draw(port),
        idle=draw(idle),
        listener_port=draw(port) if inbound else None,
        listener_addr=draw(st.none() | any_address) if inbound else None,
        host_port=None if inbound else draw(st.none() | port),
        host_addr=None if inbound else draw(st.none() | addrs),
    )


@st.composite
def icmp_flows(draw: st.DrawFn, header: StreamHeader) -> IcmpFlowRecord:
    version = draw(st.sampled_from([4, 6]))
    return IcmpFlowRecord(
        guest_addr=_address(draw, version, header),
        echo_id=draw(st.integers(0, 65535)),
        remote_addr=draw(addresses(version)),
        idle=draw(idle),
    )


listeners = st.builds(
    ListenerRecord,
    proto=st.sampled_from([socket.IPPROTO_TCP, socket.IPPROTO_UDP]),
    bind_addr=st.none() | any_address,
    host_port=port,
    guest_port=port,
)


def flows(header: StreamHeader) -> st.SearchStrategy[FlowRecord]:
    return tcp_flows(header) | udp_flows(header) | icmp_flows(header) | listeners


@st.composite
def streams(draw: st.DrawFn, max_flows: int = 6) -> tuple[StreamHeader, list[FlowRecord]]:
    header = draw(headers())
    return header, draw(st.lists(flows(header), max_size=max_flows))


# --------------------------------------------------------------------------- helpers

HEADER = StreamHeader(
    ferry_mac=bytes.fromhex("9a5500000001"),
    mtu=65520,
    ipv4=Ip4Config(IPv4Address("10.77.0.1"), 24, IPv4Address("10.77.0.254")),
    ipv6=Ip6Config(IPv6Address("2001:db8::1"), 64, IPv6Address("fe80::1")),
    guest_mac=bytes.fromhex("525400000001"),
    flow_count_hint=1,
    software_version="ferryd 0.1.0",
)


def idle_tcp(version: int = 4, *, loopback: bool = False) -> TcpFlowRecord:
    """An idle connection with empty queues, values as a real dump gives them."""
    guest: IpAddress = IPv4Address("10.77.0.1") if version == 4 else IPv6Address("2001:db8::1")
    remote: IpAddress = (
        IPv4Address("93.184.216.34") if version == 4 else IPv6Address("2606:2800:220:1::1")
    )
    mss = 65483 if loopback else 1448
    wnd = 524288 if loopback else 64128
    kernel = TcpKernelState(
        local_addr=guest,
        local_port=41234,
        remote_addr=remote,
        remote_port=443,
        tcp_state=1,
        mss=mss,
        snd_wscale=7,
        rcv_wscale=7,
        options=7,
        timestamp=0xDEADBEEF,
        snd_wl1=0x9ABCDEF0,
        snd_wnd=wnd,
        max_window=wnd,
        rcv_wnd=654830 if loopback else 64256,
        rcv_wup=0x9ABCDEF0,
        send_seq=0x12345678,
        recv_seq=0x9ABCDEF0,
    )
    return TcpFlowRecord(
        guest_addr=guest,
        guest_port=41234,
        remote_addr=remote,
        remote_port=443,
        kernel=kernel,
        seq_to_guest=0xCAFEBABE,
        seq_ack_from_guest=0xCAFEBABE,
        seq_from_guest=0x0BADF00D,
        seq_ack_to_guest=0x0BADF00D,
        guest_window=1022 if loopback else 502,
        guest_wscale=7,
        our_wscale=8,
        guest_mss=65480 if loopback else 1460,
        flags=0x10,
        state=3,
    )


def encode(header: StreamHeader, flow_list: list[FlowRecord]) -> bytes:
    enc = StreamEncoder()
    return enc.header(header) + b"".join(enc.flow(f) for f in flow_list) + enc.trailer()


def decode_chunks(chunks: list[bytes]) -> list[StreamEvent]:
    dec = StreamDecoder()
    events: list[StreamEvent] = []
    for chunk in chunks:
        events += dec.feed_untrusted(chunk)
    dec.eof()
    return events


def check_events(
    events: list[StreamEvent], header: StreamHeader, flow_list: list[FlowRecord]
) -> None:
    assert events[0] == HeaderReceived(header, STREAM_VERSION, 1)
    assert events[1:-1] == [FlowReceived(f, i) for i, f in enumerate(flow_list)]
    assert events[-1] == StreamEnded(len(flow_list))


def header_bytes(**fields: object) -> bytes:
    """A header record with the given protobuf fields (defaults: a valid v1 header)."""
    values: dict[str, object] = {
        "magic": MAGIC,
        "version": 1,
        "min_compatible_version": 1,
        "ferry_mac": b"\x9a" * 6,
        "mtu": 1500,
    }
    values.update(fields)
    return _frame(1, pb.Header(**values).SerializeToString())  # type: ignore[arg-type]


def trailer_for(body: bytes, count: int) -> bytes:
    return _frame(15, pb.Trailer(flow_count=count, crc32=zlib.crc32(body)).SerializeToString())


def refused(data: bytes, match: str, *, max_record_size: int | None = None) -> list[StreamEvent]:
    """Feed ``data`` and expect a StreamError matching ``match``; the events before it."""
    dec = (
        StreamDecoder()
        if max_record_size is None
        else StreamDecoder(max_record_size=max_record_size)
    )
    events: list[StreamEvent] = []
    with pytest.raises(StreamError, match=match):
        for i in range(len(data)):
            events += dec.feed_untrusted(data[i : i + 1])
        dec.eof()
    with pytest.raises(StreamError, match="already failed"):
        dec.feed_untrusted(b"x")
    return events


# --------------------------------------------------------------------------- round trips


@given(streams())
def test_round_trip_whole(stream: tuple[StreamHeader, list[FlowRecord]]) -> None:
    header, flow_list = stream
    check_events(decode_chunks([encode(header, flow_list)]), header, flow_list)


@given(headers().flatmap(lambda h: st.tuples(st.just(h), flows(h))))
def test_record_round_trip(pair: tuple[StreamHeader, FlowRecord]) -> None:
    header, flow = pair
    assert flow_from_proto_untrusted(flow_to_proto(flow, header), header) == flow


@given(streams(), st.data())
def test_round_trip_random_chunks(
    stream: tuple[StreamHeader, list[FlowRecord]], data: st.DataObject
) -> None:
    header, flow_list = stream
    raw = encode(header, flow_list)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=20)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    check_events(decode_chunks(chunks), header, flow_list)


@settings(max_examples=20)
@given(streams(max_flows=3))
def test_round_trip_byte_by_byte(stream: tuple[StreamHeader, list[FlowRecord]]) -> None:
    header, flow_list = stream
    raw = encode(header, flow_list)
    check_events(decode_chunks([raw[i : i + 1] for i in range(len(raw))]), header, flow_list)


def test_events_arrive_as_soon_as_each_record_is_complete() -> None:
    enc = StreamEncoder()
    records = [enc.header(HEADER), enc.flow(idle_tcp()), enc.flow(idle_tcp(6)), enc.trailer()]
    dec = StreamDecoder()
    for record, kind in zip(
        records, [HeaderReceived, FlowReceived, FlowReceived, StreamEnded], strict=True
    ):
        assert dec.feed_untrusted(record[:-1]) == []
        (event,) = dec.feed_untrusted(record[-1:])
        assert isinstance(event, kind)
    assert dec.ended
    dec.eof()
    assert dec.bytes_consumed == enc.bytes_written == sum(map(len, records))


def test_large_queues() -> None:
    base = idle_tcp()
    assert base.kernel is not None
    kernel = replace(
        base.kernel,
        send_queue=bytes(range(256)) * 16384,
        unsent=1000,
        recv_queue=b"r" * 3_000_000,
    )
    big = replace(base, kernel=kernel)
    raw = encode(HEADER, [big])
    check_events(
        decode_chunks([raw[i : i + 65536] for i in range(0, len(raw), 65536)]), HEADER, [big]
    )


# --------------------------------------------------------------------------- size


def test_bytes_per_idle_tcp_flow(capsys: pytest.CaptureFixture[str]) -> None:
    enc = StreamEncoder()
    enc.header(HEADER)
    sizes = {
        "IPv4, internet-like": len(enc.flow(idle_tcp(4))),
        "IPv4, loopback-like": len(enc.flow(idle_tcp(4, loopback=True))),
        "IPv6, internet-like": len(enc.flow(idle_tcp(6))),
    }
    with capsys.disabled():
        for what, size in sizes.items():
            print(f"\nstream bytes per idle TCP flow ({what}, empty queues): {size}", end="")
        print()
    assert sizes["IPv4, internet-like"] <= 80
    assert sizes["IPv4, loopback-like"] <= 80


# ------------------------------------------------------------------ truncation and corruption


def test_truncated_at_every_offset() -> None:
    raw = encode(HEADER, [idle_tcp(), idle_tcp(6), _listener()])
    for cut in range(len(raw)):
        dec = StreamDecoder()
        events = dec.feed_untrusted(raw[:cut])
        assert not any(isinstance(e, StreamEnded) for e in events)
        with pytest.raises(StreamError, match="stream ended early"):
            dec.eof()


@st.composite
def corruptions(draw: st.DrawFn) -> tuple[bytes, bytes]:
    header, flow_list = draw(streams(max_flows=4))
    raw = encode(header, flow_list)
    mutated = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = draw(st.integers(0, max(len(mutated) - 1, 0)))
        if how == "flip":
            mutated[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "set":
            mutated[i] = draw(st.integers(0, 255))
        elif how == "insert":
            mutated[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del mutated[i : i + draw(st.integers(1, 8))]
    return raw, bytes(mutated)


@settings(max_examples=300)
@given(corruptions(), st.integers(1, 64))
def test_corrupted_stream_raises_only_stream_error(pair: tuple[bytes, bytes], chunk: int) -> None:
    raw, mutated = pair
    dec = StreamDecoder()
    try:
        for i in range(0, len(mutated), chunk):
            dec.feed_untrusted(mutated[i : i + chunk])
        dec.eof()
    except StreamError:
        return
    assert mutated == raw, "a corrupted stream was accepted"


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_raises_only_stream_error(data: bytes) -> None:
    dec = StreamDecoder()
    with pytest.raises(StreamError):
        dec.feed_untrusted(data)
        dec.eof()


@settings(max_examples=200)
@given(st.binary(max_size=120), st.sampled_from([2, 3, 4, 5, 15]))
def test_garbage_records_after_a_header_raise_only_stream_error(body: bytes, field: int) -> None:
    head = header_bytes()
    data = head + _frame(field, body)
    dec = StreamDecoder()
    try:
        dec.feed_untrusted(data)
        dec.feed_untrusted(trailer_for(data, 1))
        dec.eof()
    except StreamError:
        pass


# --------------------------------------------------------------------------- refusals


def test_version_too_new_is_refused_before_any_flow() -> None:
    flow = _frame(2, flow_to_proto(idle_tcp(), HEADER).SerializeToString())
    data = header_bytes(version=7, min_compatible_version=5) + flow
    dec = StreamDecoder()
    with pytest.raises(StreamError) as info:
        dec.feed_untrusted(data)
    assert str(info.value) == "stream version 7 needs a reader ≥ 5; this ferryd reads 4"


def test_newer_version_readable_by_us_is_accepted() -> None:
    head = header_bytes(version=3, min_compatible_version=1)
    data = head + trailer_for(head, 0)
    events = decode_chunks([data])
    assert isinstance(events[0], HeaderReceived)
    assert (events[0].version, events[0].min_compatible_version) == (3, 1)
    assert events[-1] == StreamEnded(0)


@pytest.mark.parametrize(
    ("version", "oldest"), [(0, 0), (1, 0), (1, 2), (0, 1)], ids=lambda v: str(v)
)
def test_invalid_versions(version: int, oldest: int) -> None:
    refused(header_bytes(version=version, min_compatible_version=oldest), "invalid versions")


def test_bad_magic() -> None:
    refused(header_bytes(magic=0x12345678), "bad magic 0x12345678")


def test_not_starting_with_a_header() -> None:
    assert refused(b"GET / HTTP/1.1\r\n", "starts with byte 0x47") == []


def test_flow_before_header() -> None:
    flow = _frame(2, flow_to_proto(idle_tcp(), HEADER).SerializeToString())
    refused(flow, "starts with byte 0x12")


def test_second_header() -> None:
    refused(header_bytes() + header_bytes(), "a header record out of place after 0 records")


def test_data_after_trailer() -> None:
    raw = encode(HEADER, [idle_tcp()])
    events = refused(raw + b"\x00", "data after the trailer")
    assert events[-1] == StreamEnded(1)
    dec = StreamDecoder()
    dec.feed_untrusted(raw)
    with pytest.raises(StreamError, match="data after the trailer"):
        dec.feed_untrusted(b"\x12")


def test_count_mismatch() -> None:
    head = header_bytes()
    body = head + _frame(5, flow_to_proto(_listener(), HEADER).SerializeToString())
    refused(body + trailer_for(body, 2), "trailer counts 2 flow records, but 1 arrived")


def test_checksum_mismatch() -> None:
    head = header_bytes()
    bad = _frame(15, pb.Trailer(flow_count=0, crc32=zlib.crc32(head) ^ 1).SerializeToString())
    refused(head + bad, "checksum mismatch")


def test_oversized_record_refused_on_its_length() -> None:
    head = header_bytes()
    # Only the tag and length of the big record are sent: refused before buffering it.
    big = b"\x12" + bytes([0x80, 0x80, 0x80, 0x40])  # length 128 MiB
    refused(head + big, "TCP flow record of 134217728 bytes exceeds the limit of 67108864")
    small = _frame(2, flow_to_proto(idle_tcp(), HEADER).SerializeToString())
    refused(head + small, "exceeds the limit of 10", max_record_size=10)


def test_oversized_header_refused() -> None:
    refused(b"\x0a\x80\x80\x08", "header record of 131072 bytes exceeds the limit of 65536")


def test_overlong_varint() -> None:
    refused(header_bytes() + b"\x12" + b"\xff" * 11, "record length is a varint longer")
    refused(header_bytes() + b"\xff" * 6, "record tag is a varint longer")


def test_wrong_wire_type() -> None:
    refused(header_bytes() + b"\x10\x01", "field 2, wire type 0")


def test_unparsable_flow() -> None:
    refused(header_bytes() + _frame(2, b"\x0a\x05ab"), r"TCP flow record 0 does not parse")


def _listener() -> ListenerRecord:
    return ListenerRecord(socket.IPPROTO_TCP, None, 8080, 80)


def _flow_record(field: int, msg: pb.TcpFlow | pb.UdpFlow | pb.IcmpFlow | pb.Listener) -> bytes:
    head = header_bytes(ipv4=pb.GuestIp(address=bytes(4), prefix_len=24, gateway=bytes(4)))
    body = head + _frame(field, msg.SerializeToString())
    return body + trailer_for(body, 1)


@pytest.mark.parametrize(
    ("field", "msg", "match"),
    [
        (2, pb.TcpFlow(remote_addr=bytes(4), guest_port=70000, remote_port=1), "guest port 70000"),
        (2, pb.TcpFlow(remote_addr=bytes(5), guest_port=1, remote_port=1), "remote address of 5"),
        (2, pb.TcpFlow(remote_addr=bytes(16), guest_port=1, remote_port=1), "header has no IPv6"),
        (
            2,
            pb.TcpFlow(remote_addr=bytes(4), guest_port=1, remote_port=1),
            "past its handshake needs its socket",
        ),
        (
            2,
            pb.TcpFlow(
                remote_addr=bytes(4),
                guest_port=1,
                remote_port=1,
                socket=pb.TcpSocket(local_port=1, wscales=0xFF),
            ),
            "snd_wscale 15",
        ),
        (
            2,
            pb.TcpFlow(
                remote_addr=bytes(4),
                guest_port=1,
                remote_port=1,
                socket=pb.TcpSocket(local_port=1, remote_addr=bytes(16)),
            ),
            "IPv4 and IPv6 addresses mixed",
        ),
        (
            2,
            pb.TcpFlow(
                remote_addr=bytes(4),
                guest_port=1,
                remote_port=1,
                socket=pb.TcpSocket(local_port=1, unsent=1),
            ),
            "1 unsent bytes in a send queue of 0",
        ),
        (3, pb.UdpFlow(remote_addr=bytes(4), guest_port=1, remote_port=0), "remote port 0"),
        (
            3,
            pb.UdpFlow(remote_addr=bytes(4), guest_port=1, remote_port=1, listener_addr=bytes(4)),
            "listener address without a listener port",
        ),
        (4, pb.IcmpFlow(remote_addr=bytes(4), echo_id=65536), "echo id 65536"),
        (5, pb.Listener(ip_proto=1, host_port=1, guest_port=1), "protocol 1"),
        (5, pb.Listener(ip_proto=6, host_port=1, guest_port=1, bind_addr=b"x"), "of 1 bytes"),
    ],
)
def test_invalid_values(
    field: int, msg: pb.TcpFlow | pb.UdpFlow | pb.IcmpFlow | pb.Listener, match: str
) -> None:
    refused(_flow_record(field, msg), "flow record 0: invalid .*" + match)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"ferry_mac": b"\x01"}, "ferryd MAC of 1 bytes"),
        ({"guest_mac": b"\x01" * 7}, "guest MAC of 7 bytes"),
        ({"mtu": 0}, "MTU 0"),
        (
            {"ipv4": pb.GuestIp(address=bytes(16), gateway=bytes(4))},
            "guest IPv4 address of 16 bytes",
        ),
        (
            {"ipv6": pb.GuestIp(address=bytes(16), gateway=bytes(16), prefix_len=129)},
            "guest IPv6 prefix length 129",
        ),
        (
            {"ipv6": pb.GuestIp(address=bytes(16), gateway=bytes(16), dns=[b"1"])},
            "guest IPv6 DNS of 1 bytes",
        ),
    ],
)
def test_invalid_header_values(fields: dict[str, object], match: str) -> None:
    refused(header_bytes(**fields), "invalid header: " + match)


def test_eof_messages() -> None:
    dec = StreamDecoder()
    with pytest.raises(StreamError, match="before its header was complete"):
        dec.eof()
    dec = StreamDecoder()
    dec.feed_untrusted(header_bytes() + b"\x12\x05ab")
    with pytest.raises(StreamError, match=r"after 0 flow records, without a trailer \(4 bytes"):
        dec.eof()


# --------------------------------------------------------------------------- encoder misuse


def test_encoder_order() -> None:
    enc = StreamEncoder()
    with pytest.raises(RuntimeError, match="before the header"):
        enc.flow(_listener())
    with pytest.raises(RuntimeError, match="before the header"):
        enc.trailer()
    enc.header(HEADER)
    with pytest.raises(RuntimeError, match="already written"):
        enc.header(HEADER)
    enc.flow(_listener())
    assert enc.flow_count == 1
    enc.trailer()
    with pytest.raises(RuntimeError, match="after the trailer"):
        enc.flow(_listener())
    with pytest.raises(RuntimeError, match="already written"):
        enc.trailer()


def test_encoder_refuses_a_record_over_the_limit() -> None:
    enc = StreamEncoder(max_record_size=50)
    enc.header(HEADER)
    with pytest.raises(ValueError, match=r"TCP flow record of \d+ bytes exceeds"):
        enc.flow(idle_tcp(6))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ListenerRecord(socket.IPPROTO_TCP, None, 0, 80),
        lambda: IcmpFlowRecord(IPv4Address("10.0.0.1"), 1, IPv6Address("::1"), 0.0),
        lambda: UdpFlowRecord(IPv4Address("10.0.0.1"), 1, IPv4Address("10.0.0.2"), 1, -1.0),
        lambda: StreamHeader(ferry_mac=b"", mtu=1500, ipv4=None, ipv6=None),
    ],
)
def test_invalid_records_cannot_be_built(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


# --------------------------------------------------------------------------- generated code


def test_generated_code_is_current() -> None:
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [str(ROOT / "proto" / "generate.sh"), "--check"],
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_a_flow_from_an_older_source_with_the_guests_isn_still_decodes() -> None:
    # Field 10 (seq_init_from_guest_delta) is reserved since ferryd stopped
    # carrying the guest's ISN: an older source still sends it, and the
    # record must decode to the same flow, the field ignored.
    flow = idle_tcp()
    msg = flow_to_proto(flow, HEADER)
    assert isinstance(msg, pb.TcpFlow)
    old = msg.SerializeToString() + bytes([10 << 3, 0x86, 0x04])  # field 10, varint 518
    parsed = pb.TcpFlow.FromString(old)
    assert parsed.SerializeToString() == old  # the field arrived, kept as unknown
    assert flow_from_proto_untrusted(parsed, HEADER) == flow


# -- handover (version 3): the sockets go beside the stream, within one namespace


def _handed_tcp() -> TcpFlowRecord:
    return replace(idle_tcp(), kernel=None, handed_over=True)


GUEST4 = IPv4Address("10.77.0.1")
PEER4 = IPv4Address("93.184.216.34")


def _handed_datagrams() -> list[FlowRecord]:
    return [
        UdpFlowRecord(GUEST4, 5353, PEER4, 53, 1.5, host_port=40000, handed_over=True),
        IcmpFlowRecord(GUEST4, 7, PEER4, 0.5, handed_over=True),
        ListenerRecord(17, None, 5353, 53, 2),
    ]


def test_a_handover_round_trips_and_needs_a_version_4_reader() -> None:
    header = replace(HEADER, handover=True)
    enc = StreamEncoder()
    flows = [_handed_tcp(), *_handed_datagrams()]
    data = enc.header(header) + b"".join(enc.flow(f) for f in flows) + enc.trailer()
    dec = StreamDecoder()
    events = dec.feed_untrusted(data)
    dec.eof()
    # (Version 3 readers took TCP sockets only: they would bind the datagram ports.)
    assert events[0] == HeaderReceived(header, STREAM_VERSION, 4)
    assert events[1:-1] == [FlowReceived(f, i) for i, f in enumerate(flows)]


def test_a_version_3_handover_is_still_read() -> None:
    """A source one release older (an in-place upgrade) writes min_compatible_version 3."""
    dec = StreamDecoder()
    (event,) = dec.feed_untrusted(header_bytes(version=3, min_compatible_version=3, handover=True))
    assert isinstance(event, HeaderReceived) and event.header.handover


def test_a_handed_over_flow_outside_a_handover_is_refused() -> None:
    bare = replace(HEADER, ipv4=None, ipv6=None)  # (the guest's address written out)
    flow = _frame(2, flow_to_proto(_handed_tcp(), bare).SerializeToString())
    refused(header_bytes() + flow, "handed-over socket in a stream that is not a handover")
    for rec in _handed_datagrams()[:2]:
        field = 3 if isinstance(rec, UdpFlowRecord) else 4
        flow = _frame(field, flow_to_proto(rec, bare).SerializeToString())
        refused(header_bytes() + flow, "handed-over socket in a stream that is not a handover")


def test_a_handover_that_older_readers_could_read_is_refused() -> None:
    refused(header_bytes(version=3, min_compatible_version=2, handover=True), "handover")


def test_a_handover_carries_no_precopy_and_no_socket_state() -> None:
    with pytest.raises(ValueError, match="no pre-copy"):
        replace(HEADER, handover=True, precopy=True)
    with pytest.raises(ValueError, match="carries no socket state"):
        replace(idle_tcp(), handed_over=True)
    with pytest.raises(ValueError, match="reset, not handed over"):
        replace(idle_tcp(), kernel=None, handshake=True, handed_over=True)


def test_handed_over_listeners_only_in_a_handover() -> None:
    rec = ListenerRecord(6, None, 8080, 80, 2)
    header = replace(HEADER, handover=True)
    enc = StreamEncoder()
    dec = StreamDecoder()
    events = dec.feed_untrusted(enc.header(header) + enc.flow(rec) + enc.trailer())
    dec.eof()
    assert events[1] == FlowReceived(rec, 0)
    flow = _frame(5, flow_to_proto(rec, HEADER).SerializeToString())
    refused(header_bytes() + flow, "handed-over sockets in a stream that is not a handover")
    with pytest.raises(ValueError, match="0, 1 or 2"):
        ListenerRecord(6, None, 8080, 80, 3)
    with pytest.raises(ValueError, match="inbound flow's socket handed over"):
        UdpFlowRecord(GUEST4, 5353, PEER4, 53, 1.5, listener_port=53, handed_over=True)
