"""The to-guest header fast paths (ipv4_header's per-flow template, the
timestamp-only TCP options, the cached pseudo-header sum, the stack's
Ethernet header) build exactly the bytes the general construction builds,
whatever the order of flows, MACs and families."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

from hypothesis import given
from hypothesis import strategies as st

from ferryd.stack import Stack
from ferryd.wire.checksum import checksum, fold, pseudo_header_sum
from ferryd.wire.ethernet import BROADCAST, ETH_P_IP, ETH_P_IPV6
from ferryd.wire.ip import IPPROTO_TCP, ipv4_header
from ferryd.wire.tcp import TcpOptions, build_tcp_header_partial, encode_options
from tests.unit.frames_sink import RecordingFrontend
from tests.unit.test_flows_helpers import LINK

v4 = st.integers(0, 2**32 - 1).map(IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(IPv6Address)


def _reference_v4(src: IPv4Address, dst: IPv4Address, proto: int, length: int, ttl: int) -> bytes:
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, ttl, proto, 0, src.packed, dst.packed
        )
    )
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr)


@given(
    st.lists(
        st.tuples(v4, v4, st.sampled_from([1, 6, 17]), st.integers(0, 65515), st.integers(1, 255)),
        min_size=1,
        max_size=6,
    )
)
def test_ipv4_header_is_the_checksummed_header_for_any_sequence_of_flows(
    packets: list[tuple[IPv4Address, IPv4Address, int, int, int]],
) -> None:
    for src, dst, proto, length, ttl in packets + packets:  # twice: templates reused
        hdr = ipv4_header(src, dst, proto, length, ttl)
        assert hdr == _reference_v4(src, dst, proto, length, ttl)
        assert checksum(hdr) == 0


def test_an_equal_address_that_is_another_object_gets_its_own_header() -> None:
    a, b = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    ipv4_header(a, b, 6, 100)
    c = IPv4Address("10.0.0.3")
    assert ipv4_header(a, c, 6, 100) == _reference_v4(a, c, 6, 100, 64)


options = st.builds(
    TcpOptions,
    mss=st.none() | st.integers(0, 0xFFFF),
    wscale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
    timestamp=st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)


@given(st.lists(st.tuples(v4 | v6, options, st.integers(0, 65000)), min_size=1, max_size=5), v4)
def test_tcp_header_matches_the_general_encoding(
    segments: list[tuple[IPv4Address | IPv6Address, TcpOptions, int]], v4dst: IPv4Address
) -> None:
    for src, opts, length in segments + segments:
        dst: IPv4Address | IPv6Address = v4dst if src.version == 4 else IPv6Address(int(v4dst))
        hdr = build_tcp_header_partial(src, dst, 1, 2, 3, 4, 0x10, 5, opts, length)
        encoded = encode_options(opts)
        assert hdr[20:] == encoded
        assert hdr[12] >> 4 == (20 + len(encoded)) // 4
        partial = fold(pseudo_header_sum(src, dst, IPPROTO_TCP, 20 + len(encoded) + length))
        assert struct.unpack_from("!H", hdr, 16)[0] == partial


def test_the_stack_addresses_each_frame_to_the_guest_mac_of_the_moment() -> None:
    """The Ethernet header the stack keeps follows the guest's MAC and the family."""
    frontend = RecordingFrontend()
    stack = Stack(LINK, frontend, 0.0)
    src, dst = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    src6, dst6 = IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2")
    macs = [b"\x02" * 6, b"\x02" * 5 + b"\x03"]
    stack.send_ip(src, dst, 17, b"12345678")
    for mac in macs + macs:
        stack.guest_mac = bytes(mac)  # a new object, as every frame's parse makes
        stack.send_ip(src, dst, 17, b"12345678")
        stack.send_ip(src6, dst6, 17, b"12345678")
    expected = [(BROADCAST, ETH_P_IP)]
    for mac in macs + macs:
        expected += [(mac, ETH_P_IP), (mac, ETH_P_IPV6)]
    got = [(f[:6], struct.unpack_from("!H", f, 12)[0]) for f in frontend.sent]
    assert got == expected
    assert all(f[6:12] == LINK.mac for f in frontend.sent)
