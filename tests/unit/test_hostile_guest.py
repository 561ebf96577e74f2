"""What a hostile guest sends: replies stay bounded, and a bug costs one frame.

Issue 9 item 2: a DHCPv6 Solicit with thousands of IA_NA options made a
reply larger than an IP packet and the exception stopped ferryd. Each
service's reply must be bounded whatever the request holds, and the stack
must contain any exception raised while one frame is handled.
"""

import socket
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from ferryd.flows.table import FlowKey
from ferryd.flows.tcp import TcpFlows
from ferryd.flows.tcp_conn import TcpConn
from ferryd.flows.udp import UdpFlows
from ferryd.services import dhcpv6
from ferryd.services.dhcp import parse_dhcp_untrusted
from ferryd.services.dhcpv6 import answer_dhcpv6_untrusted
from ferryd.stack import Stack
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ethernet import BROADCAST
from ferryd.wire.ip import IPPROTO_TCP, IPPROTO_UDP, IpPacket, build_ip
from ferryd.wire.tcp import ACK, RST, SYN, TcpSegment, build_tcp, parse_tcp_untrusted
from ferryd.wire.udp import UdpDatagram
from testbed.wait import until
from tests.unit.frames_sink import RecordingFrontend
from tests.unit.tcp_conn_support import RecordingGuest
from tests.unit.test_flows_helpers import (
    GUEST4,
    GW4,
    FakeGuest,
    destinations,
    parse_ip,
    udp_from_guest,
)
from tests.unit.test_flows_helpers import LINK as FLOW_LINK
from tests.unit.test_services import (
    ALL_DHCP,
    CID,
    FERRY_MAC,
    GUEST_LL,
    GUEST_MAC,
    LINK,
    SID,
    fuzz,
    ia_na,
    parse_udp_frame,
    udp_frame,
    v6msg,
    v6opt,
)

#: A reply must fit a minimum-MTU link whatever the request asked for.
BOUND = 1280


def dhcpv6_answer(payload: bytes) -> bytes | None:
    frame = udp_frame(GUEST_MAC, FERRY_MAC, GUEST_LL, ALL_DHCP, 546, 547, payload)
    return answer_dhcpv6_untrusted(LINK, *parse_udp_frame(frame))


def test_dhcpv6_solicit_with_thousands_of_ia_na_gets_one() -> None:
    """The frame that killed ferryd: 3,000 IA_NAs (48 KB) in one Solicit."""
    payload = v6msg(1, CID, *(ia_na(i) for i in range(3000)))
    reply = dhcpv6_answer(payload)
    assert reply is not None and len(reply) < BOUND
    msg = dhcpv6.parse_dhcpv6_untrusted(parse_udp_frame(reply)[2].payload)
    assert [c for c, _ in msg.options].count(dhcpv6.OPT_IA_NA) == 1


@pytest.mark.parametrize("mtype", [3, 5, 6])
def test_dhcpv6_ia_na_listing_thousands_of_addresses(mtype: int) -> None:
    addresses = [IPv6Address(0x20010DB8_0099 << 80 | i) for i in range(2000)]
    ids = (CID, SID) if mtype != 6 else (CID,)
    reply = dhcpv6_answer(v6msg(mtype, *ids, ia_na(7, *addresses)))
    assert reply is not None and len(reply) < BOUND
    msg = dhcpv6.parse_dhcpv6_untrusted(parse_udp_frame(reply)[2].payload)
    ia = dict(msg.options)[dhcpv6.OPT_IA_NA]
    subs = dhcpv6.parse_dhcpv6_options_untrusted(ia[12:])
    assert len(subs) == 1 + dhcpv6.MAX_STALE_ADDRESSES


@pytest.mark.parametrize("length", [0, 2, 131, 60000])
def test_dhcpv6_client_identifier_of_impossible_length_is_malformed(length: int) -> None:
    with pytest.raises(MalformedPacket):
        dhcpv6_answer(v6msg(1, v6opt(1, bytes(length)), ia_na(7)))


@fuzz
@given(
    st.integers(0, 255),
    st.integers(0, 1500),
    st.integers(0, 600),
    st.booleans(),
    st.binary(min_size=3, max_size=130),
)
def test_dhcpv6_reply_is_bounded(
    mtype: int, n_ias: int, n_addrs: int, with_sid: bool, duid: bytes
) -> None:
    addresses = [IPv6Address(0x20010DB8 << 96 | i) for i in range(n_addrs)]
    options = [v6opt(1, duid), *([SID] if with_sid else []), ia_na(1, *addresses)]
    options += [ia_na(i) for i in range(n_ias)]
    reply = dhcpv6_answer(v6msg(mtype, *options))
    assert reply is None or len(reply) < BOUND


def test_dhcp_thousands_of_repeated_options_concatenate_in_linear_time() -> None:
    """RFC 3396 concatenation of 20,000 one-byte repeats (a 60 KB request)."""
    fixed = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 1, 0, 0, *[bytes(4)] * 4, GUEST_MAC, b"", b""
    )
    options = b"\x35\x01\x01" + b"\x0c\x01a" * 20000 + b"\xff"
    msg = parse_dhcp_untrusted(fixed + b"\x63\x82\x53\x63" + options)
    assert msg.options[12] == b"a" * 20000


class _Exploding:
    """A flow handler with a bug the guest can reach."""

    def from_guest(self, ip: IpPacket, udp: UdpDatagram, now: float) -> None:
        raise struct.error("a bug of ours")


def test_stack_contains_a_bug_reached_by_one_frame() -> None:
    frontend = RecordingFrontend()
    stack = Stack(LINK, frontend, 0.0)
    stack.udp = _Exploding()
    peer = IPv6Address("2001:db8:99::1")
    frame = udp_frame(GUEST_MAC, FERRY_MAC, IPv6Address("2001:db8:77::5"), peer, 5000, 53, b"x")
    for i in range(3):
        stack.receive_frame(memoryview(frame), float(i))
    assert stack.counters.frame_errors == 3
    assert stack.counters.malformed == 0
    # The stack still answers the next frame.
    stack.receive_frame(
        memoryview(
            udp_frame(GUEST_MAC, FERRY_MAC, GUEST_LL, ALL_DHCP, 546, 547, v6msg(1, CID, ia_na(1)))
        ),
        3.0,
    )
    assert len(frontend.sent) == 1


def test_stack_lets_cancellation_through() -> None:
    """BaseException (trio.Cancelled, KeyboardInterrupt) is not the stack's to catch."""

    class _Interrupting:
        def from_guest(self, ip: IpPacket, udp: UdpDatagram, now: float) -> None:
            raise KeyboardInterrupt

    stack = Stack(LINK, RecordingFrontend(), 0.0)
    stack.udp = _Interrupting()
    peer = IPv6Address("2001:db8:99::1")
    frame = udp_frame(GUEST_MAC, FERRY_MAC, IPv6Address("2001:db8:77::5"), peer, 5000, 53, b"x")
    with pytest.raises(KeyboardInterrupt):
        stack.receive_frame(memoryview(frame), 0.0)


# --- a bug reached through one flow costs that flow --------------------------------


def _tcp_from_guest(dport: int, seq: int, ack: int, flags: int) -> tuple[IpPacket, TcpSegment]:
    l4 = build_tcp(GUEST4, GW4, 40000, dport, seq, ack, flags, 65535)
    ip = parse_ip(build_ip(GUEST4, GW4, IPPROTO_TCP, l4))
    return ip, parse_tcp_untrusted(ip)


async def test_tcp_bug_costs_one_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    guest = RecordingGuest()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        async with trio.open_nursery() as nursery:
            flows = TcpFlows(guest, FLOW_LINK, nursery, destinations=destinations())
            flows.attach(nursery)
            flows.from_guest(*_tcp_from_guest(port, 1000, 0, SYN), trio.current_time())
            flows.flush(trio.current_time())
            await until(lambda: any(s.flags == SYN | ACK for s in guest.segments), what="a SYN-ACK")
            (flow,) = list(flows.table)
            conn = flow.handle

            handle = TcpConn.on_guest_segment

            def bug(self: TcpConn, seg: TcpSegment, now: float) -> None:
                if self is conn:  # (TcpConn has __slots__: patched on the class)
                    raise IndexError("a bug of ours")
                handle(self, seg, now)

            monkeypatch.setattr(TcpConn, "on_guest_segment", bug)
            ack = (conn.isn + 1) & 0xFFFFFFFF
            flows.from_guest(*_tcp_from_guest(port, 1001, ack, ACK), trio.current_time())
            flows.flush(trio.current_time())
            assert flows.counters.flow_errors == 1 and len(flows.table) == 0
            assert guest.segments[-1].flags & RST
            # The next connection is served as usual.
            flows.from_guest(*_tcp_from_guest(port, 5000, 0, SYN), trio.current_time())
            flows.flush(trio.current_time())
            await until(
                lambda: sum(s.flags == SYN | ACK for s in guest.segments) == 2,
                what="a second SYN-ACK",
            )
            flows.close(trio.current_time())
            nursery.cancel_scope.cancel()


async def test_tcp_bug_in_a_handshake_start_costs_that_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guest = RecordingGuest()

    def bug(self: TcpConn, seg: TcpSegment, now: float) -> None:
        raise IndexError("a bug of ours")

    monkeypatch.setattr(TcpConn, "start_outbound", bug)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        async with trio.open_nursery() as nursery:
            flows = TcpFlows(guest, FLOW_LINK, nursery, destinations=destinations())
            flows.attach(nursery)
            flows.from_guest(*_tcp_from_guest(port, 1000, 0, SYN), trio.current_time())
            flows.flush(trio.current_time())
            assert flows.counters.flow_errors == 1 and len(flows.table) == 0
            flows.close(trio.current_time())
            nursery.cancel_scope.cancel()


async def test_udp_bug_costs_one_flow() -> None:
    guest = FakeGuest()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        flows = UdpFlows(guest, FLOW_LINK, nursery, destinations=destinations())
        port = peer.getsockname()[1]
        flows.from_guest(*udp_from_guest(GUEST4, GW4, 1111, port, b"a"), trio.current_time())
        flows.from_guest(*udp_from_guest(GUEST4, GW4, 2222, port, b"b"), trio.current_time())
        first = flows.table.get(FlowKey(IPPROTO_UDP, GUEST4, 1111, GW4, port))
        assert first is not None and len(flows.table) == 2

        def bug(flow: object, payload: memoryview, now: float) -> None:
            raise ValueError("a bug of ours")

        flows._to_guest = bug  # type: ignore[method-assign]
        _data, src = peer.recvfrom(10)
        peer.sendto(b"reply", src)
        await until(lambda: flows.counters.flow_errors == 1, what="the flow's error counted")
        assert len(flows.table) == 1  # that flow only; its reader ended quietly
        await flows.aclose()
    peer.close()


@fuzz
@given(
    st.sampled_from([b"\x08\x06", b"\x08\x00", b"\x86\xdd", b"\x81\x00"]),
    st.binary(max_size=600),
)
def test_random_frames_reach_no_bug(ethertype: bytes, body: bytes) -> None:
    """Whatever the guest sends is answered, ignored or malformed: never a bug."""
    stack = Stack(LINK, RecordingFrontend(), 0.0)
    stack.receive_frame(memoryview(FERRY_MAC + GUEST_MAC + ethertype + body), 0.0)
    assert stack.counters.frame_errors == 0


@fuzz
@given(st.binary(max_size=400), st.booleans(), st.booleans())
def test_random_dhcp_payloads_reach_no_bug(payload: bytes, v6: bool, cookie: bool) -> None:
    stack = Stack(LINK, RecordingFrontend(), 0.0)
    if v6:
        frame = udp_frame(GUEST_MAC, FERRY_MAC, GUEST_LL, ALL_DHCP, 546, 547, payload)
    else:
        # A fixed BOOTP part (and magic cookie) so the option walk gets the random bytes.
        fixed = bytes((1, 1, 6, 0)) + bytes(24) + GUEST_MAC + bytes(202)
        body = fixed + (b"\x63\x82\x53\x63" if cookie else b"") + payload
        src, dst = IPv4Address(0), IPv4Address("255.255.255.255")
        frame = udp_frame(GUEST_MAC, BROADCAST, src, dst, 68, 67, body)
    stack.receive_frame(memoryview(frame), 0.0)
    assert stack.counters.frame_errors == 0
