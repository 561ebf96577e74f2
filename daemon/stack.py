"""The guest link's stack: every frame from the guest is dispatched here.

Theory of operation. ferryd is not a router and keeps no IP stack of its
own: each frame is parsed just far enough to know who answers it.

- ARP, NDP (router and neighbour solicitations), DHCP and DHCPv6 are
  answered by the services (pure functions of the link configuration).
- UDP and ICMP echo go to their flow tables, which map them onto host
  sockets; TCP goes to the TCP flows once they exist (until then the guest
  gets a RST, so its connect() fails at once instead of timing out).
- Everything else (other ethertypes, fragments, multicast that no service
  wants, frames for another MAC) is dropped and counted.

Parsing is done with the ``*_untrusted`` parsers; :class:`MalformedPacket`
is the only exception they raise, and it is caught here, counted and logged
at debug level. Any other exception raised while one frame is handled is a
bug of ours the guest reached (issue 9: one DHCPv6 Solicit once killed the
daemon): it is caught here too, the frame is dropped, counted as a
``frame_errors`` and logged (rate-limited, see :mod:`ferryd.bugs`). Nothing
the guest sends can stop the daemon.

The stack is also the flows' :class:`~ferryd.guest.GuestPort`: it adds IP
and Ethernet headers to what flows send and learns the guest's MAC and
addresses from what the guest sends (the configured ones until then).
"""

import logging
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from ferryd.bugs import describe_bug
from ferryd.flows.tcp import reset_for
from ferryd.frontends.base import FrameSink
from ferryd.link import LinkConfig
from ferryd.logthrottle import LogThrottle
from ferryd.services.arp import answer_arp
from ferryd.services.dhcp import answer_dhcp_untrusted
from ferryd.services.dhcpv6 import answer_dhcpv6_untrusted
from ferryd.services.ndp import NdpResponder
from ferryd.wire.arp import parse_arp_untrusted
from ferryd.wire.checksum import complete_partial
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ethernet import (
    BROADCAST,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    EthernetFrame,
    ethernet_header,
    is_multicast,
    parse_ethernet_untrusted,
)
from ferryd.wire.icmp import (
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_NEIGHBOUR_SOLICIT,
    ICMPV6_ROUTER_SOLICIT,
    IcmpMessage,
    parse_icmp_untrusted,
)
from ferryd.wire.ip import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IpAddress,
    IpPacket,
    ip_header,
    parse_ipv4_untrusted,
    parse_ipv6_untrusted,
)
from ferryd.wire.tcp import TcpSegment, parse_tcp_untrusted
from ferryd.wire.udp import UdpDatagram, parse_udp_untrusted

log = logging.getLogger("ferryd.stack")

_ETHERTYPE_OF_VERSION = {4: ETH_P_IP, 6: ETH_P_IPV6}
_BROADCAST4 = IPv4Address("255.255.255.255")


class UdpHandler(Protocol):
    def from_guest(self, ip: IpPacket, udp: UdpDatagram, now: float) -> None: ...


class IcmpHandler(Protocol):
    def from_guest(self, ip: IpPacket, icmp: IcmpMessage, now: float) -> None: ...


class TcpHandler(Protocol):
    def from_guest(self, ip: IpPacket, seg: TcpSegment, now: float) -> None: ...

    def flush(self, now: float) -> None: ...


@dataclass
class StackCounters:
    """What the stack counts; the frames themselves the frontend counts (FrontendCounters)."""

    malformed: int = 0
    frame_errors: int = 0
    """Frames whose handling raised an unexpected exception (a ferryd bug), dropped."""
    ignored: int = 0


class Stack:
    """Dispatches guest frames; adds headers to what flows send back."""

    def __init__(self, link: LinkConfig, frontend: FrameSink, now: float) -> None:
        self.link = link
        self._frontend = frontend
        self._send_frame = frontend.send
        self.guest_mac: bytes | None = None
        self._guest_addr: dict[int, IpAddress] = {}
        if link.ipv4 is not None:
            self._guest_addr[4] = link.ipv4.address
        if link.ipv6 is not None:
            self._guest_addr[6] = link.ipv6.address
        self.ndp = NdpResponder(link, now) if link.ipv6 is not None else None
        self.udp: UdpHandler | None = None
        self.icmp: IcmpHandler | None = None
        self.tcp: TcpHandler | None = None
        self.counters = StackCounters()
        self._eth_header: tuple[bytes, int, bytes] = (b"", 0, b"")
        """(guest MAC, IP version, the Ethernet header to the guest) last built."""
        self._learned: dict[int, IpAddress] = {}
        """The guest's source address last seen per IP version, checked usable."""
        self._trusted = False
        self._throttle = LogThrottle(log)

    # --- GuestPort ------------------------------------------------------

    def send_ip(
        self,
        src: IpAddress,
        dst: IpAddress,
        proto: int,
        l4: bytes,
        payload: bytes | memoryview = b"",
        csum_offset: int | None = None,
    ) -> bool:
        hdr = ip_header(src, dst, proto, len(l4) + len(payload))
        mac, version = self.guest_mac or BROADCAST, src.version
        cached = self._eth_header
        if cached[1] != version or cached[0] != mac:
            # Built once per guest MAC and family, not per frame.
            cached = self._eth_header = (
                mac,
                version,
                ethernet_header(mac, self.link.mac, _ETHERTYPE_OF_VERSION[version]),
            )
        eth = cached[2]
        if csum_offset is None:
            return self._send_frame(eth + hdr + l4 + payload)
        if self._frontend.csum_offload:
            start = len(eth) + len(hdr)
            return self._frontend.send_partial([eth + hdr + l4, payload], start, csum_offset)
        # No offload: complete the checksum here.
        return self._send_frame(eth + hdr + complete_partial(l4, csum_offset, payload) + payload)

    def guest_address(self, version: int) -> IpAddress | None:
        return self._guest_addr.get(version)

    # --- frames from the guest -------------------------------------------

    def receive_frame(self, frame: memoryview, now: float, trusted: bool = False) -> None:
        """Dispatch one frame; ``trusted``: its L4 checksum is not to be verified
        (the guest's kernel left it to the device, see frontends/tap.py)."""
        self._trusted = trusted
        try:
            self._dispatch_untrusted(frame, now)
        except MalformedPacket as exc:
            self.counters.malformed += 1
            log.debug("dropped a malformed frame from the guest: %s", exc)
        except Exception as exc:  # a bug the guest reached: contain it (ferryd.bugs)
            self._contain(exc, now)

    def _contain(self, exc: Exception, now: float) -> None:
        self.counters.frame_errors += 1
        self._throttle.warning(
            "bug", now, "dropped a guest frame, ferryd bug: %s", describe_bug(exc)
        )

    def _dispatch_untrusted(self, frame: memoryview, now: float) -> None:
        eth = parse_ethernet_untrusted(frame)
        if eth.dst != self.link.mac and not is_multicast(eth.dst):
            self.counters.ignored += 1
            return
        if not is_multicast(eth.src):
            self.guest_mac = eth.src
        if eth.ethertype == ETH_P_ARP:
            reply = answer_arp(self.link, eth, parse_arp_untrusted(eth.payload))
            if reply is not None:
                self._emit(reply)
        elif eth.ethertype == ETH_P_IP and self.link.ipv4 is not None:
            self._ip(eth, parse_ipv4_untrusted(eth.payload), now)
        elif eth.ethertype == ETH_P_IPV6 and self.link.ipv6 is not None:
            self._ip(eth, parse_ipv6_untrusted(eth.payload), now)
        else:
            self.counters.ignored += 1

    def _ip(self, eth: EthernetFrame, ip: IpPacket, now: float) -> None:
        if ip.fragment:
            self.counters.ignored += 1
            return
        proto = ip.proto
        if proto == IPPROTO_UDP:
            udp = parse_udp_untrusted(ip, verify_checksum=not self._trusted)
            if ip.version == 4 and udp.dport == 67:
                self._emit_opt(answer_dhcp_untrusted(self.link, eth, ip, udp))
                return
            if ip.version == 6 and udp.dport == 547:
                self._emit_opt(answer_dhcpv6_untrusted(self.link, eth, ip, udp))
                return
            if self._learn_source(ip) and not is_multicast(eth.dst) and self.udp is not None:
                self.udp.from_guest(ip, udp, now)
                return
        elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            if (proto == IPPROTO_ICMP) != (ip.version == 4):
                raise MalformedPacket(f"ICMP protocol {proto} over IPv{ip.version}")
            icmp = parse_icmp_untrusted(ip)
            if icmp.type in (ICMPV6_ROUTER_SOLICIT, ICMPV6_NEIGHBOUR_SOLICIT) and ip.version == 6:
                if self.ndp is not None:
                    for reply in self.ndp.receive_untrusted(eth, ip, icmp, now):
                        self._emit(reply)
                return
            if (
                icmp.type in (ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST)
                and self._learn_source(ip)
                and not is_multicast(eth.dst)
                and self.icmp is not None
            ):
                self.icmp.from_guest(ip, icmp, now)
                return
        elif proto == IPPROTO_TCP:
            seg = parse_tcp_untrusted(ip, verify_checksum=not self._trusted)
            if self._learn_source(ip) and not is_multicast(eth.dst):
                if self.tcp is not None:
                    self.tcp.from_guest(ip, seg, now)
                else:
                    rst = reset_for(ip, seg)
                    if rst is not None:
                        self.send_ip(ip.dst, ip.src, IPPROTO_TCP, rst)
                return
        self.counters.ignored += 1

    def _learn_source(self, ip: IpPacket) -> bool:
        """Record the guest's address; False if the source is not usable.

        An unspecified, multicast or (IPv6) link-local source cannot be the
        address of a flow on the host side.
        """
        src = ip.src
        if src == self._learned.get(ip.version):
            # The common case, every frame of every flow: the properties
            # below cost microseconds each (ipaddress builds and searches
            # networks in Python), and this address passed them already.
            return True
        if src.is_unspecified or src.is_multicast or src.is_loopback:
            return False
        if isinstance(src, IPv6Address) and src.is_link_local:
            return False
        if isinstance(src, IPv4Address) and src == _BROADCAST4:
            return False
        self._guest_addr[ip.version] = self._learned[ip.version] = src
        return True

    def flush(self, now: float) -> None:
        """The frontend has no more frames queued for now (end of a burst)."""
        if self.tcp is not None:
            try:
                self.tcp.flush(now)
            except Exception as exc:  # work deferred from the burst's frames
                self._contain(exc, now)

    # --- timers ----------------------------------------------------------

    def next_timer(self) -> float | None:
        return self.ndp.next_timer() if self.ndp is not None else None

    def handle_timer(self, now: float) -> None:
        if self.ndp is not None:
            for frame in self.ndp.handle_timer(now):
                self._emit(frame)

    def _emit_opt(self, frame: bytes | None) -> None:
        if frame is not None:
            self._emit(frame)

    def _emit(self, frame: bytes) -> None:
        self._send_frame(frame)
