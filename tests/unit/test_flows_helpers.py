"""Shared helpers for the UDP and ICMP flow tests (no tests of its own): a
recording guest, guest packet builders and the test link."""

from ipaddress import IPv4Address, IPv6Address

import trio

from ferryd.flows.destinations import DestinationPolicy, Destinations
from ferryd.link import Ip4Config, Ip6Config, LinkConfig
from ferryd.wire.icmp import IcmpMessage, build_icmp, echo_rest, parse_icmp_untrusted
from ferryd.wire.ip import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_UDP,
    IpAddress,
    IpPacket,
    build_ip,
    parse_ipv4_untrusted,
    parse_ipv6_untrusted,
)
from ferryd.wire.udp import UdpDatagram, build_udp, parse_udp_untrusted

GUEST4 = IPv4Address("10.0.2.15")
GW4 = IPv4Address("10.0.2.2")
GUEST6 = IPv6Address("2001:db8::15")
GW6 = IPv6Address("fe80::1")
LINK = LinkConfig(
    mac=b"\x02\x00\x00\x00\x00\x01",
    ipv4=Ip4Config(GUEST4, 24, GW4),
    ipv6=Ip6Config(GUEST6, 64, GW6),
)
LO4 = IPv4Address("127.0.0.1")
LO6 = IPv6Address("::1")


def destinations(*, map_gateway: bool = True) -> Destinations:
    """The policy of a ferryd on LINK whose host owns the guest's address (passt's way).

    The host's loopback is reached through the gateway (``--map-gw``): the
    one way a guest may reach it.
    """
    policy = DestinationPolicy(LINK, map_gateway=map_gateway)
    return Destinations(policy.with_host_addresses(frozenset({GUEST4, GUEST6})))


def guest_of(version: int) -> IpAddress:
    return GUEST4 if version == 4 else GUEST6


def loopback_of(version: int) -> IpAddress:
    return LO4 if version == 4 else LO6


def gateway_of(version: int) -> IpAddress:
    return GW4 if version == 4 else GW6


def parse_ip(packet: bytes) -> IpPacket:
    return parse_ipv4_untrusted(packet) if packet[0] >> 4 == 4 else parse_ipv6_untrusted(packet)


def udp_from_guest(
    src: IpAddress, dst: IpAddress, sport: int, dport: int, payload: bytes
) -> tuple[IpPacket, UdpDatagram]:
    """What the stack hands UdpFlows.from_guest for this guest datagram."""
    ip = parse_ip(build_ip(src, dst, IPPROTO_UDP, build_udp(src, dst, sport, dport, payload)))
    return ip, parse_udp_untrusted(ip)


def echo_from_guest(
    src: IpAddress, dst: IpAddress, ident: int, seq: int, body: bytes
) -> tuple[IpPacket, IcmpMessage]:
    mtype = 8 if isinstance(src, IPv4Address) else 128
    proto = IPPROTO_ICMP if isinstance(src, IPv4Address) else IPPROTO_ICMPV6
    ip = parse_ip(
        build_ip(src, dst, proto, build_icmp(src, dst, mtype, 0, echo_rest(ident, seq), body))
    )
    return ip, parse_icmp_untrusted(ip)


class FakeGuest:
    """A GuestPort that records every packet, rebuilt with its IP header."""

    def __init__(self) -> None:
        self.packets: list[IpPacket] = []
        self._changed = trio.Event()

    def send_ip(
        self,
        src: IpAddress,
        dst: IpAddress,
        proto: int,
        l4: bytes,
        payload: bytes | memoryview = b"",
        csum_offset: int | None = None,
    ) -> bool:
        # UDP and ICMP always send complete, checksummed messages.
        assert csum_offset is None
        # Parse it back: proves the builders produced a valid packet.
        self.packets.append(parse_ip(build_ip(src, dst, proto, l4 + payload)))
        self._changed.set()
        return True

    def guest_address(self, version: int) -> IpAddress | None:
        return guest_of(version)

    async def wait_for(self, count: int) -> list[IpPacket]:
        """Wait until at least ``count`` packets arrived; return them all."""
        with trio.fail_after(10):
            while len(self.packets) < count:
                event = self._changed = trio.Event()
                await event.wait()
        return self.packets
