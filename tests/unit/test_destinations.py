"""The destination policy (flows/destinations.py), the ICMP refusal it answers with,
and the migration target's admission of records (migration/admission.py)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from ferryd.flows.destinations import DestinationPolicy, Destinations, RateLimit, Refusal
from ferryd.migration.admission import Admission, check_record
from ferryd.migration.kernel_state import TcpKernelState
from ferryd.migration.records import (
    IcmpFlowRecord,
    ListenerRecord,
    StreamError,
    TcpFlowRecord,
    UdpFlowRecord,
)
from ferryd.wire.icmp import build_admin_prohibited, parse_icmp_untrusted
from ferryd.wire.ip import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_UDP,
    IpAddress,
    build_ip,
)
from ferryd.wire.udp import build_udp
from tests.unit.test_flows_helpers import GUEST4, GUEST6, GW4, GW6, LINK, parse_ip

HOST_OTHER4 = IPv4Address("192.0.2.10")
"""Another address of the host's namespace (not the guest's)."""
HOSTS: frozenset[IpAddress] = frozenset(
    {GUEST4, GUEST6, HOST_OTHER4, IPv4Address("127.0.0.1"), IPv6Address("::1")}
)
POLICY = DestinationPolicy(LINK).with_host_addresses(HOSTS)
MAPPED = replace(POLICY, map_gateway=True)
NO_LINK_LOCAL = replace(POLICY, refuse_link_local=True)


@pytest.mark.parametrize(
    ("dst", "why"),
    [
        ("127.0.0.1", Refusal.LOOPBACK),
        ("127.3.2.1", Refusal.LOOPBACK),
        ("::1", Refusal.LOOPBACK),
        ("::ffff:127.0.0.1", Refusal.LOOPBACK),
        ("::ffff:127.9.9.9", Refusal.LOOPBACK),
        ("0.0.0.0", Refusal.UNSPECIFIED),
        ("0.1.2.3", Refusal.UNSPECIFIED),
        ("::", Refusal.UNSPECIFIED),
        ("::ffff:0.0.0.0", Refusal.UNSPECIFIED),
        (str(GUEST4), Refusal.HOST),  # passt's addressing: the guest's is the host's
        (str(GUEST6), Refusal.HOST),
        (str(HOST_OTHER4), Refusal.HOST),
        (f"::ffff:{HOST_OTHER4}", Refusal.HOST),
        ("224.0.0.251", Refusal.GROUP),
        ("255.255.255.255", Refusal.GROUP),
        ("10.0.2.255", Refusal.GROUP),  # the guest subnet's broadcast
        ("ff02::1", Refusal.GROUP),
        ("::ffff:224.0.0.1", Refusal.GROUP),
    ],
)
def test_refused_without_map_gw(dst: str, why: Refusal) -> None:
    assert POLICY.route(ip_address(dst)) is why
    assert MAPPED.route(ip_address(dst)) is why  # --map-gw maps the gateway, nothing else


@pytest.mark.parametrize(
    "dst", ["198.51.100.7", "2001:db8::99", "10.0.2.3", "169.254.169.254", "fe80::99"]
)
def test_other_destinations_used_as_they_are(dst: str) -> None:
    assert POLICY.route(ip_address(dst)) == ip_address(dst)


def test_gateway_reaches_the_host_only_with_map_gw() -> None:
    assert POLICY.route(GW4) == GW4
    assert POLICY.route(GW6) == GW6
    assert MAPPED.route(GW4) == IPv4Address("127.0.0.1")
    assert MAPPED.route(GW6) == IPv6Address("::1")


@pytest.mark.parametrize(
    "dst", ["169.254.169.254", "169.254.0.1", "fe80::1:2", "::ffff:169.254.1.1"]
)
def test_link_local_refused_on_request(dst: str) -> None:
    assert NO_LINK_LOCAL.route(ip_address(dst)) is Refusal.LINK_LOCAL
    assert POLICY.route(ip_address(dst)) != Refusal.LINK_LOCAL


def test_link_local_gateway_still_mapped() -> None:
    """fe80:: is where IPv6 routers live: --map-gw's mapping comes first."""
    policy = replace(MAPPED, refuse_link_local=True)
    assert policy.route(GW6) == IPv6Address("::1")


def test_host_addresses_follow_changes() -> None:
    dest = Destinations(POLICY)
    new = IPv4Address("203.0.113.5")
    assert dest.policy.route(new) == new
    dest.set_host_addresses(HOSTS | frozenset({new}))
    assert dest.policy.route(new) is Refusal.HOST
    dest.set_host_addresses(frozenset())
    assert dest.policy.route(HOST_OTHER4) == HOST_OTHER4
    assert dest.policy.route(IPv4Address("127.0.0.1")) is Refusal.LOOPBACK  # always


def test_rate_limit_with_explicit_time() -> None:
    limit = RateLimit(rate=4.0, burst=3)
    assert [limit.allow(100.0) for _ in range(5)] == [True, True, True, False, False]
    assert limit.allow(100.125) is False  # half a token
    assert limit.allow(100.25) is True
    assert [limit.allow(1000.0) for _ in range(4)] == [True, True, True, False]  # capped burst
    assert limit.allow(999.0) is False  # time going backwards earns nothing


def test_refusals_counted_and_answers_limited() -> None:
    dest = Destinations(POLICY)
    answers = [dest.refuse("udp", GUEST4, HOST_OTHER4, 53, Refusal.HOST, 5.0) for _ in range(60)]
    assert answers.count(True) == 50  # the burst
    assert dest.counters.udp == 60
    assert dest.counters.unanswered == 10
    assert dest.refuse("tcp", GUEST4, IPv4Address("224.0.0.1"), 1, Refusal.GROUP, 5.0) is False
    assert dest.counters.tcp == 0  # a group destination is dropped, not refused


# --------------------------------------------------------------------------- the answer


@pytest.mark.parametrize(("src", "dst", "gw"), [(GUEST4, IPv4Address("127.0.0.1"), GW4),
                                                 (GUEST6, IPv6Address("::1"), GW6)])  # fmt: skip
def test_admin_prohibited_quotes_the_datagram(
    src: IpAddress, dst: IpAddress, gw: IpAddress
) -> None:
    payload = bytes(range(256)) * 8
    packet = parse_ip(build_ip(src, dst, IPPROTO_UDP, build_udp(src, dst, 4000, 6379, payload)))
    proto, message = build_admin_prohibited(packet, gw)
    error = parse_ip(build_ip(gw, src, proto, message))
    icmp = parse_icmp_untrusted(error)  # checks the checksum (with the pseudo-header for v6)
    quote = bytes(icmp.body)
    if src.version == 4:
        assert (proto, icmp.type, icmp.code) == (IPPROTO_ICMP, 3, 13)
        assert len(quote) == 20 + 8  # RFC 792: the header and 64 bits
        assert (ip_address(quote[12:16]), ip_address(quote[16:20])) == (src, dst)
        assert quote[20:24] == (4000).to_bytes(2, "big") + (6379).to_bytes(2, "big")
    else:
        assert (proto, icmp.type, icmp.code) == (IPPROTO_ICMPV6, 1, 1)
        assert 40 + 8 + len(quote) == 1280  # RFC 4443 §2.4 (c): fills the minimum MTU
        assert (ip_address(quote[8:24]), ip_address(quote[24:40])) == (src, dst)
        assert quote[6] == IPPROTO_UDP
        assert quote[40:44] == (4000).to_bytes(2, "big") + (6379).to_bytes(2, "big")


# --------------------------------------------------------------------------- migration


def _kernel(local: IpAddress, remote: IpAddress, remote_port: int) -> TcpKernelState:
    return TcpKernelState(
        local_addr=local, local_port=40000, remote_addr=remote,
        remote_port=remote_port, tcp_state=1, mss=1460, snd_wscale=7, rcv_wscale=7, options=7,
        timestamp=1, snd_wl1=1, snd_wnd=65535, max_window=65535, rcv_wnd=65535, rcv_wup=1,
        send_seq=1, recv_seq=1,
    )  # fmt: skip


def _tcp(remote: IpAddress, port: int, socket_remote: IpAddress | None = None) -> TcpFlowRecord:
    guest = GUEST4 if remote.version == 4 else GUEST6
    return TcpFlowRecord(
        guest_addr=guest, guest_port=50000, remote_addr=remote, remote_port=port,
        kernel=_kernel(guest, socket_remote or remote, port), seq_to_guest=1,
        seq_ack_from_guest=1, seq_from_guest=1, seq_ack_to_guest=1,
        guest_window=65535, guest_wscale=7, our_wscale=7, guest_mss=1460, flags=0, state=0,
    )  # fmt: skip


LOCAL4 = IPv4Address("127.0.0.1")
PEER4 = IPv4Address("198.51.100.7")


@pytest.mark.parametrize(
    "rec",
    [
        _tcp(PEER4, 443),
        _tcp(IPv6Address("2001:db8::99"), 443),
        replace(_tcp(PEER4, 443), kernel=None, handshake=True),
        UdpFlowRecord(GUEST4, 5353, PEER4, 53, idle=1.0),
        UdpFlowRecord(GUEST4, 53, PEER4, 4000, idle=1.0, listener_port=53),
        IcmpFlowRecord(GUEST4, 7, PEER4, idle=0.5),
        ListenerRecord(6, None, 8080, 80),
        ListenerRecord(6, IPv4Address("0.0.0.0"), 8080, 80),
        ListenerRecord(6, LOCAL4, 8080, 80),
        ListenerRecord(17, HOST_OTHER4, 53, 53),
    ],
    ids=lambda r: type(r).__name__,
)
def test_target_admits_what_its_own_rules_allow(rec: object) -> None:
    check_record(POLICY, rec)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rec", "words"),
    [
        (_tcp(LOCAL4, 6379), "127.0.0.1:6379"),
        (_tcp(IPv6Address("::1"), 6379), "[::1]:6379"),
        (_tcp(IPv6Address("::ffff:127.0.0.1"), 6379), "loopback"),
        (_tcp(HOST_OTHER4, 22), "the host's own address"),
        (replace(_tcp(LOCAL4, 6379), kernel=None, handshake=True), "127.0.0.1:6379"),
        (_tcp(PEER4, 443, socket_remote=LOCAL4), "socket connected to 127.0.0.1:443"),
        (_tcp(PEER4, 443, socket_remote=IPv4Address("203.0.113.1")), "would not connect"),
        (UdpFlowRecord(GUEST4, 5353, LOCAL4, 53, idle=1.0), "UDP flow to 127.0.0.1:53"),
        (UdpFlowRecord(GUEST4, 53, LOCAL4, 4000, idle=1.0, listener_port=53), "UDP"),
        (IcmpFlowRecord(GUEST4, 7, IPv4Address("0.0.0.0"), idle=0.5), "unspecified"),
        (ListenerRecord(6, IPv4Address("203.0.113.9"), 8080, 80), "not an address of this host"),
        (ListenerRecord(6, IPv4Address("224.0.0.1"), 8080, 80), "not an address of this host"),
    ],
)
def test_target_refuses_what_its_rules_refuse(rec: object, words: str) -> None:
    with pytest.raises(StreamError, match="refused") as refused:
        check_record(POLICY, rec)  # type: ignore[arg-type]
    assert words in str(refused.value)


def test_admission_remembers_only_what_it_admitted() -> None:
    """A stream's admission skips a TCP flow whose remotes (the same objects) it just
    admitted under the same policy, and checks everything else in full: a refused
    record after admitted ones, another policy, another socket remote, UDP."""
    admission = Admission()
    for port in (443, 444):  # the same addresses: admitted again
        admission.check(POLICY, _tcp(PEER4, port))
    refusals: list[tuple[TcpFlowRecord | UdpFlowRecord, DestinationPolicy, str]] = [
        (_tcp(LOCAL4, 6379), POLICY, "127.0.0.1:6379"),
        (_tcp(PEER4, 443, socket_remote=LOCAL4), POLICY, "socket connected to 127.0.0.1:443"),
        (_tcp(GW4, 45000, socket_remote=LOCAL4), POLICY, "would not connect"),
        (UdpFlowRecord(GUEST4, 5353, LOCAL4, 53, idle=1.0), POLICY, "UDP flow"),
    ]
    for rec, policy, words in refusals:
        with pytest.raises(StreamError, match="refused") as refused:
            admission.check(policy, rec)
        assert words in str(refused.value)
    shown_as_gateway = _tcp(GW4, 45000, socket_remote=LOCAL4)
    admission.check(MAPPED, shown_as_gateway)  # admitted under --map-gw ...
    with pytest.raises(StreamError, match="would not connect"):
        admission.check(POLICY, shown_as_gateway)  # ... not by another policy
    admission.check(MAPPED, shown_as_gateway)
    with pytest.raises(StreamError, match="would not connect"):
        admission.check(POLICY, replace(shown_as_gateway, remote_port=80))


def test_link_local_flows_refused_by_a_target_that_refuses_them() -> None:
    rec = UdpFlowRecord(GUEST4, 5000, IPv4Address("169.254.169.254"), 80, idle=0.0)
    check_record(POLICY, rec)
    with pytest.raises(StreamError, match="link-local"):
        check_record(NO_LINK_LOCAL, rec)


def test_host_shown_as_gateway_only_with_map_gw() -> None:
    """An inbound connection from a client on the host is shown as the gateway;
    its socket is connected to the host, which only --map-gw makes legitimate."""
    for host in (LOCAL4, GUEST4):
        rec = _tcp(GW4, 45000, socket_remote=host)
        check_record(MAPPED, rec)
        with pytest.raises(StreamError, match="would not connect"):
            check_record(POLICY, rec)
    check_record(MAPPED, _tcp(GW4, 80))  # the real gateway behind it: as before


def test_a_dns_server_on_the_host_itself_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    dest = Destinations(POLICY)
    link = replace(LINK, ipv4=replace(LINK.ipv4, dns=(HOST_OTHER4, PEER4)))  # type: ignore[type-var]
    dest.set_link(link)
    assert f"DNS server {HOST_OTHER4}, which it may not reach" in caplog.text
    assert str(PEER4) not in caplog.text
