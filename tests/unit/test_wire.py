"""Property tests for ferryd.wire: round trips, checksums, and hostile input.

The checksum is checked against a naive RFC 1071 implementation (a loop over
16-bit words with end-around carry), the independent oracle for the fast
one. Every ``*_untrusted`` parser is fed random bytes and mutated valid
frames: the only exception allowed out is MalformedPacket.
"""

import contextlib
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferryd.wire import checksum as csum
from ferryd.wire.arp import ArpPacket, build_arp, parse_arp_untrusted
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ethernet import (
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    build_ethernet,
    format_mac,
    parse_ethernet_untrusted,
    parse_mac,
)
from ferryd.wire.icmp import build_icmp, echo_rest, parse_icmp_untrusted
from ferryd.wire.ip import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MAX_EXTENSION_HEADERS,
    IpAddress,
    IpPacket,
    build_ip,
    ipv6_header,
    parse_ipv4_untrusted,
    parse_ipv6_untrusted,
)
from ferryd.wire.tcp import (
    ACK,
    NO_OPTIONS,
    SYN,
    TcpOptions,
    build_tcp,
    encode_options,
    parse_tcp_untrusted,
)
from ferryd.wire.udp import build_udp, parse_udp_untrusted

props = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

macs = st.binary(min_size=6, max_size=6)
ipv4s = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
ipv6s = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
address_pairs = st.one_of(st.tuples(ipv4s, ipv4s), st.tuples(ipv6s, ipv6s))
ports = st.integers(0, 65535)
payloads = st.binary(max_size=300)


def naive_checksum(data: bytes, initial_words: tuple[int, ...] = ()) -> int:
    """RFC 1071 §4.1 literally: add 16-bit words, fold carries, complement."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for word in (*initial_words, *struct.unpack(f"!{len(data) // 2}H", data)):
        total += word
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_words(src: IpAddress, dst: IpAddress, proto: int, length: int) -> tuple[int, ...]:
    raw = src.packed + dst.packed
    if isinstance(src, IPv4Address):
        raw += struct.pack("!BBH", 0, proto, length)
    else:
        raw += struct.pack("!IxxxB", length, proto)
    return struct.unpack(f"!{len(raw) // 2}H", raw)


def parse_ip(data: bytes | memoryview, version: int) -> IpPacket:
    return parse_ipv4_untrusted(data) if version == 4 else parse_ipv6_untrusted(data)


def parse_frame(frame: bytes) -> IpPacket:
    eth = parse_ethernet_untrusted(frame)
    return parse_ip(eth.payload, 4 if eth.ethertype == ETH_P_IP else 6)


def ip_frame(src: IpAddress, dst: IpAddress, proto: int, payload: bytes, ttl: int = 64) -> bytes:
    ethertype = ETH_P_IP if isinstance(src, IPv4Address) else ETH_P_IPV6
    return build_ethernet(b"\2" * 6, b"\4" * 6, ethertype, build_ip(src, dst, proto, payload, ttl))


# --- checksum ----------------------------------------------------------------------


@props
@given(st.binary(max_size=2000))
def test_checksum_matches_naive_rfc1071(data: bytes) -> None:
    assert csum.checksum(data) == naive_checksum(data)
    assert csum.checksum(memoryview(data)) == naive_checksum(data)
    assert csum.checksum(bytearray(data)) == naive_checksum(data)


@props
@given(st.sampled_from([b"\0", b"\xff", b"\xff\xff", b"\x00\x01"]), st.integers(0, 3000))
def test_checksum_matches_naive_on_extremes(unit: bytes, count: int) -> None:
    data = unit * count
    assert csum.checksum(data) == naive_checksum(data)


@props
@given(address_pairs, st.integers(0, 255), st.binary(max_size=600))
def test_checksum_with_pseudo_header_matches_naive(
    pair: tuple[IpAddress, IpAddress], proto: int, data: bytes
) -> None:
    src, dst = pair
    initial = csum.pseudo_header_sum(src, dst, proto, len(data))
    assert csum.checksum(data, initial) == naive_checksum(
        data, pseudo_words(src, dst, proto, len(data))
    )


@props
@given(st.binary(max_size=500).map(lambda b: b + b"\0\0"), st.integers(0, 2**40))
def test_checksum_verifies_after_insertion(data: bytes, initial: int) -> None:
    buf = bytearray(data if len(data) % 2 == 0 else data + b"\0")
    buf[-2:] = b"\0\0"
    struct.pack_into("!H", buf, len(buf) - 2, csum.checksum(buf, initial))
    assert csum.verify(buf, initial)


@props
@given(st.binary(min_size=1, max_size=300), st.binary(max_size=300))
def test_checksum_sums_of_even_parts_add(head: bytes, tail: bytes) -> None:
    head = head if len(head) % 2 == 0 else head + b"\x5a"
    assert csum.checksum(tail, csum.raw_sum(head)) == csum.checksum(head + tail)


# --- round trips -------------------------------------------------------------------


@props
@given(macs, macs, st.integers(0, 65535), payloads)
def test_ethernet_round_trip(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> None:
    eth = parse_ethernet_untrusted(build_ethernet(dst, src, ethertype, payload))
    assert (eth.dst, eth.src, eth.ethertype, bytes(eth.payload)) == (dst, src, ethertype, payload)


@props
@given(macs)
def test_mac_text_round_trip(mac: bytes) -> None:
    assert parse_mac(format_mac(mac)) == mac


@props
@given(st.integers(0, 65535), macs, ipv4s, macs, ipv4s, st.binary(max_size=20))
def test_arp_round_trip(
    op: int, sha: bytes, spa: IPv4Address, tha: bytes, tpa: IPv4Address, trailer: bytes
) -> None:
    packet = ArpPacket(op, sha, spa, tha, tpa)
    assert parse_arp_untrusted(build_arp(packet) + trailer) == packet


@props
@given(address_pairs, st.integers(0, 255), st.integers(0, 255), payloads, st.binary(max_size=30))
def test_ip_round_trip(
    pair: tuple[IpAddress, IpAddress], proto: int, ttl: int, payload: bytes, padding: bytes
) -> None:
    src, dst = pair
    if isinstance(src, IPv6Address) and proto in (0, 43, 44, 51, 60):
        proto = IPPROTO_UDP  # extension headers are covered below
    version = 4 if isinstance(src, IPv4Address) else 6
    # Trailing bytes (Ethernet padding, RFC 894) are cut off by the length field.
    packet = parse_ip(build_ip(src, dst, proto, payload, ttl) + padding, version)
    assert (packet.version, packet.src, packet.dst) == (version, src, dst)
    assert (packet.proto, packet.ttl, packet.fragment) == (proto, ttl, False)
    assert bytes(packet.payload) == payload


@props
@given(address_pairs, ports, ports, payloads)
def test_udp_round_trip(
    pair: tuple[IpAddress, IpAddress], sport: int, dport: int, payload: bytes
) -> None:
    src, dst = pair
    packet = parse_frame(
        ip_frame(src, dst, IPPROTO_UDP, build_udp(src, dst, sport, dport, payload))
    )
    udp = parse_udp_untrusted(packet)
    assert (udp.sport, udp.dport, bytes(udp.payload)) == (sport, dport, payload)


def test_udp_zero_checksum_rules() -> None:
    v4 = build_udp(IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), 1, 2, b"x")
    no_sum = v4[:6] + b"\0\0" + v4[8:]
    packet = parse_ipv4_untrusted(
        build_ip(IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), IPPROTO_UDP, no_sum)
    )
    assert bytes(parse_udp_untrusted(packet).payload) == b"x"
    a, b = IPv6Address("fe80::1"), IPv6Address("fe80::2")
    v6 = build_udp(a, b, 1, 2, b"x")
    packet6 = parse_ipv6_untrusted(build_ip(a, b, IPPROTO_UDP, v6[:6] + b"\0\0" + v6[8:]))
    with pytest.raises(MalformedPacket):
        parse_udp_untrusted(packet6)


tcp_options = st.builds(
    TcpOptions,
    mss=st.none() | st.integers(0, 65535),
    wscale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
    timestamp=st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)


@props
@given(
    address_pairs,
    ports,
    ports,
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 0x3F),
    st.integers(0, 65535),
    tcp_options,
    payloads,
)
def test_tcp_round_trip(
    pair: tuple[IpAddress, IpAddress],
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: TcpOptions,
    payload: bytes,
) -> None:
    src, dst = pair
    segment = build_tcp(src, dst, sport, dport, seq, ack, flags, window, options, payload)
    tcp = parse_tcp_untrusted(parse_frame(ip_frame(src, dst, IPPROTO_TCP, segment)))
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (sport, dport, seq, ack)
    assert (tcp.flags, tcp.window, bytes(tcp.payload)) == (flags, window, payload)
    assert tcp.options == options
    assert len(encode_options(options)) % 4 == 0


@props
@given(address_pairs, st.integers(0, 255), st.integers(0, 255), st.binary(min_size=4, max_size=4))
def test_icmp_round_trip(
    pair: tuple[IpAddress, IpAddress], mtype: int, code: int, rest: bytes
) -> None:
    src, dst = pair
    body = rest * 3
    proto = IPPROTO_ICMP if isinstance(src, IPv4Address) else IPPROTO_ICMPV6
    packet = parse_frame(ip_frame(src, dst, proto, build_icmp(src, dst, mtype, code, rest, body)))
    icmp = parse_icmp_untrusted(packet)
    assert (icmp.type, icmp.code, icmp.rest, bytes(icmp.body)) == (mtype, code, rest, body)


@props
@given(st.integers(0, 65535), st.integers(0, 65535))
def test_echo_rest_round_trip(ident: int, seq: int) -> None:
    src, dst = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    msg = build_icmp(src, dst, 8, 0, echo_rest(ident, seq))
    icmp = parse_icmp_untrusted(parse_ipv4_untrusted(build_ip(src, dst, IPPROTO_ICMP, msg)))
    assert icmp.echo_id_seq == (ident, seq)


def test_ipv4_options_and_fragments() -> None:
    src, dst = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    header = bytearray(build_ip(src, dst, IPPROTO_UDP, b"")[:20])
    header[0] = 0x46  # 24-byte header with one 4-byte option (NOPs)
    header[3] += 4 + 3
    header[6] = 0x20  # MF
    header[10:12] = b"\0\0"
    header += b"\x01\x01\x01\x00"
    struct.pack_into("!H", header, 10, csum.checksum(header))
    packet = parse_ipv4_untrusted(bytes(header) + b"abc" + b"pad")
    assert bytes(packet.payload) == b"abc" and packet.fragment


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b"\x55" + b[1:],  # version 5
        lambda b: b"\x44" + b[1:],  # IHL 16 bytes
        lambda b: b[:2] + b"\xff\xff" + b[4:],  # total length past the data
        lambda b: b[:2] + b"\x00\x10" + b[4:],  # total length below the header
        lambda b: b[:10] + bytes([b[10] ^ 1]) + b[11:],  # header checksum
        lambda b: b[:19],
    ],
)
def test_ipv4_malformed(mutate: Callable[[bytes], bytes]) -> None:
    packet = build_ip(IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), IPPROTO_UDP, b"data")
    with pytest.raises(MalformedPacket):
        parse_ipv4_untrusted(mutate(packet))


# --- IPv6 extension header chains --------------------------------------------------

ext_headers = st.lists(
    st.tuples(st.sampled_from([0, 43, 44, 51, 60]), st.integers(0, 3)),
    max_size=MAX_EXTENSION_HEADERS,
)


def ext_chain(headers: list[tuple[int, int]], upper: int) -> tuple[int, bytes]:
    """The first next-header value and the encoded chain ending in ``upper``."""
    out = b""
    kinds = [h for h, _ in headers] + [upper]
    for (kind, units), nxt in zip(headers, kinds[1:], strict=True):
        if kind == 44:
            out += struct.pack("!BBHI", nxt, 0, 0, 0)
        elif kind == 51:  # AH: (len + 2) × 4 bytes, here a multiple of 8
            size = 8 * (units + 1) + 4
            out += bytes((nxt, size // 4 - 2)) + bytes(size - 2)
        else:
            out += bytes((nxt, units)) + bytes(8 * (units + 1) - 2)
    return kinds[0], out


@props
@given(ext_headers, st.binary(max_size=64))
def test_ipv6_extension_chain(headers: list[tuple[int, int]], payload: bytes) -> None:
    first, chain = ext_chain(headers, IPPROTO_UDP)
    src, dst = IPv6Address("fe80::1"), IPv6Address("fe80::2")
    data = ipv6_header(src, dst, first, len(chain) + len(payload)) + chain + payload
    packet = parse_ipv6_untrusted(data)
    assert packet.proto == IPPROTO_UDP
    assert bytes(packet.payload) == payload
    assert packet.fragment == any(h == 44 for h, _ in headers)


@props
@given(st.lists(st.sampled_from([0, 60, 44]), min_size=MAX_EXTENSION_HEADERS + 1, max_size=20))
def test_ipv6_extension_chain_too_long(kinds: list[int]) -> None:
    first, chain = ext_chain([(k, 0) for k in kinds], IPPROTO_UDP)
    src, dst = IPv6Address("fe80::1"), IPv6Address("fe80::2")
    with pytest.raises(MalformedPacket, match="too long"):
        parse_ipv6_untrusted(ipv6_header(src, dst, first, len(chain)) + chain)


@props
@given(st.lists(st.tuples(st.sampled_from([0, 43, 60]), st.integers(0, 3)), min_size=1, max_size=4))
def test_ipv6_extension_chain_truncated(headers: list[tuple[int, int]]) -> None:
    first, chain = ext_chain(headers, IPPROTO_UDP)
    src, dst = IPv6Address("fe80::1"), IPv6Address("fe80::2")
    cut = chain[:-1]
    with pytest.raises(MalformedPacket):
        parse_ipv6_untrusted(ipv6_header(src, dst, first, len(cut)) + cut)


def test_ipv6_payload_length_past_frame() -> None:
    src, dst = IPv6Address("fe80::1"), IPv6Address("fe80::2")
    with pytest.raises(MalformedPacket):
        parse_ipv6_untrusted(ipv6_header(src, dst, IPPROTO_UDP, 9) + bytes(8))
    with pytest.raises(MalformedPacket):
        parse_ipv6_untrusted(b"\x40" + ipv6_header(src, dst, IPPROTO_UDP, 0)[1:])


# --- TCP options -------------------------------------------------------------------


def tcp_with_raw_options(raw: bytes) -> IpPacket:
    src, dst = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    raw += b"\0" * (-len(raw) % 4)
    hdr = struct.pack("!HHIIBBHHH", 1, 2, 3, 4, ((20 + len(raw)) // 4) << 4, SYN, 5, 0, 0)
    segment = bytearray(hdr + raw + b"payload")
    pseudo = csum.pseudo_header_sum(src, dst, IPPROTO_TCP, len(segment))
    struct.pack_into("!H", segment, 16, csum.checksum(segment, pseudo))
    return parse_ipv4_untrusted(build_ip(src, dst, IPPROTO_TCP, segment))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", NO_OPTIONS),
        (b"\x02\x04\x05\xb4", TcpOptions(mss=1460)),
        (b"\x01\x03\x03\x0f", TcpOptions(wscale=14)),  # RFC 7323 §2.3: clamped
        (b"\x04\x02", TcpOptions(sack_permitted=True)),
        (b"\x08\x0a" + struct.pack("!II", 7, 9), TcpOptions(timestamp=(7, 9))),
        (b"\x00\x02\x04\x05\xb4", NO_OPTIONS),  # after EOL nothing counts
        (b"\x02\x03\x05\x02\x04\x05\xb4", TcpOptions(mss=1460)),  # wrong-length MSS skipped
        (b"\x03\x04\x01\x01", NO_OPTIONS),  # wrong-length window scale ignored
        (b"\x1e\x06abcd\x04\x02", TcpOptions(sack_permitted=True)),  # unknown kind skipped
        (b"\x05\x0a" + bytes(8) + b"\x04\x02", TcpOptions(sack_permitted=True)),  # SACK blocks
    ],
)
def test_tcp_options_parsed(raw: bytes, expected: TcpOptions) -> None:
    tcp = parse_tcp_untrusted(tcp_with_raw_options(raw))
    assert tcp.options == expected
    assert bytes(tcp.payload) == b"payload"


@pytest.mark.parametrize(
    "raw",
    [b"\x01\x01\x01\x02", b"\x02\x01\x00\x00", b"\x02\x00\x00\x00", b"\x08\x0a\x00\x00"],
)
def test_tcp_options_truncated(raw: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse_tcp_untrusted(tcp_with_raw_options(raw))


@props
@given(tcp_options, st.integers(1, 40))
def test_tcp_options_truncation_never_escapes(options: TcpOptions, cut: int) -> None:
    raw = encode_options(options)[:-cut] if cut < len(encode_options(options)) else b""
    with contextlib.suppress(MalformedPacket):
        parse_tcp_untrusted(tcp_with_raw_options(raw))


def test_tcp_data_offset_checks() -> None:
    src, dst = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    good = bytearray(build_tcp(src, dst, 1, 2, 3, 4, ACK, 5))
    for offset in (0x40, 0xF0):
        good[12] = offset
        with pytest.raises(MalformedPacket):
            parse_tcp_untrusted(parse_ipv4_untrusted(build_ip(src, dst, IPPROTO_TCP, good)))


# --- hostile input -----------------------------------------------------------------

fuzz = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse_everything_untrusted(frame: bytes | bytearray, verify: bool = True) -> None:
    """Run a frame through every parser that could apply, as the stack would."""
    eth = parse_ethernet_untrusted(frame)
    if eth.ethertype == ETH_P_ARP:
        parse_arp_untrusted(eth.payload)
        return
    packet = parse_ip(eth.payload, 4 if eth.ethertype == ETH_P_IP else 6)
    if packet.proto == IPPROTO_TCP:
        parse_tcp_untrusted(packet, verify_checksum=verify)
    elif packet.proto == IPPROTO_UDP:
        parse_udp_untrusted(packet)
    else:
        parse_icmp_untrusted(packet)


@fuzz
@given(st.binary(max_size=200))
def test_random_bytes_only_malformed(data: bytes) -> None:
    parsers: list[Callable[[bytes], object]] = [
        parse_ethernet_untrusted,
        parse_arp_untrusted,
        parse_ipv4_untrusted,
        parse_ipv6_untrusted,
    ]
    for parse in parsers:
        with contextlib.suppress(MalformedPacket):
            parse(data)
    for version, src, dst in (
        (4, IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")),
        (6, IPv6Address("fe80::1"), IPv6Address("fe80::2")),
    ):
        for proto in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP):
            packet = IpPacket(version, src, dst, proto, 64, memoryview(data))
            for upper in (parse_udp_untrusted, parse_icmp_untrusted, parse_tcp_untrusted):
                with contextlib.suppress(MalformedPacket):
                    upper(packet)
            with contextlib.suppress(MalformedPacket):
                parse_tcp_untrusted(packet, verify_checksum=False)


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    src, dst = draw(address_pairs)
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "arp", "ext"]))
    payload = draw(st.binary(max_size=40))
    if kind == "arp":
        arp = ArpPacket(1, b"\1" * 6, IPv4Address("10.0.0.1"), bytes(6), IPv4Address("10.0.0.2"))
        return build_ethernet(b"\xff" * 6, b"\1" * 6, ETH_P_ARP, build_arp(arp))
    if kind == "tcp":
        seg = build_tcp(src, dst, 1, 2, 3, 4, SYN, 5, draw(tcp_options), payload)
        return ip_frame(src, dst, IPPROTO_TCP, seg)
    if kind == "udp":
        return ip_frame(src, dst, IPPROTO_UDP, build_udp(src, dst, 1, 2, payload))
    if kind == "icmp" or isinstance(src, IPv4Address):
        proto = IPPROTO_ICMP if isinstance(src, IPv4Address) else IPPROTO_ICMPV6
        return ip_frame(src, dst, proto, build_icmp(src, dst, 8, 0, bytes(4), payload))
    assert isinstance(dst, IPv6Address)
    first, chain = ext_chain(draw(ext_headers), IPPROTO_UDP)
    udp = build_udp(src, dst, 1, 2, payload)
    packet = ipv6_header(src, dst, first, len(chain) + len(udp)) + chain + udp
    return build_ethernet(b"\2" * 6, b"\4" * 6, ETH_P_IPV6, packet)


@fuzz
@given(valid_frames(), st.data())
def test_mutated_frames_only_malformed(frame: bytes, data: st.DataObject) -> None:
    parse_everything_untrusted(frame)  # the unmutated frame is valid
    mutated = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    for verify in (True, False):
        with contextlib.suppress(MalformedPacket):
            parse_everything_untrusted(mutated, verify)
