"""What the guest is told about its link: ferryd's MAC, the MTU, addresses.

One frozen :class:`LinkConfig` is built at start (from the host's own
configuration, passt-style, or from command-line overrides: see
``ferryd.config``) and handed to the services that answer ARP, NDP, DHCP and
DHCPv6 and to the stack. It is never modified, only replaced whole: an
incoming ferryd takes the source's link from the migration stream's header
and rebuilds its stack and flow tables around it (migration/target.py). So
the services can be plain functions of (config, frame, now).

Addressing model (passt's, REFERENCE.md "Guest link conventions"): the guest
gets the host's own address and prefix and the host's gateway, so the whole
subnet looks on-link to it and ferryd answers ARP and neighbour solicitation
for every address but the guest's own.
"""

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address


@dataclass(frozen=True, slots=True)
class Ip4Config:
    address: IPv4Address
    """The guest's address (by default the host's)."""
    prefixlen: int
    gateway: IPv4Address
    """The guest's default router; ferryd answers for it."""
    dns: tuple[IPv4Address, ...] = ()


@dataclass(frozen=True, slots=True)
class Ip6Config:
    address: IPv6Address
    """The guest's address handed out by DHCPv6 (by default the host's)."""
    prefixlen: int
    gateway: IPv6Address
    """Link-local router address ferryd sends router advertisements from,
    and the guest's default route (RFC 4861 §6.1.2: routers use link-local
    sources)."""
    dns: tuple[IPv6Address, ...] = ()


@dataclass(frozen=True, slots=True)
class LinkConfig:
    mac: bytes
    """ferryd's own MAC address on the guest link."""
    mtu: int = 65520
    ipv4: Ip4Config | None = None
    ipv6: Ip6Config | None = None
