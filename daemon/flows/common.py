"""Addressing rules and helpers shared by the UDP and ICMP flow adapters.

Address translation follows passt's conventions (REFERENCE.md, "Guest link
conventions"):

- Outbound, where a new flow goes (the gateway mapping of ``--map-gw``,
  and which destinations are refused) is decided in one place,
  :mod:`ferryd.flows.destinations`.
- Inbound, a peer that is the host itself (a loopback address, or the
  guest's own address, which is also the host's) is shown to the guest as
  its gateway: the guest would otherwise drop a packet from 127.0.0.1 or
  from its own address as a martian.
"""

import functools
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address

from ferryd.link import LinkConfig
from ferryd.wire.ip import IpAddress

__all__ = [
    "LOOPBACK4",
    "LOOPBACK6",
    "family_of",
    "gateway_of",
    "peer_as_seen_by_guest",
    "shared_address",
    "shared_port",
    "sockaddr",
    "strip_scope",
]

LOOPBACK4 = IPv4Address("127.0.0.1")
LOOPBACK6 = IPv6Address("::1")


def family_of(version: int) -> socket.AddressFamily:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def sockaddr(addr: IpAddress, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    if isinstance(addr, IPv4Address):
        return (str(addr), port)
    return (str(addr), port, 0, 0)


@functools.lru_cache(maxsize=1024)
def strip_scope(text: str) -> IpAddress:
    """An address from a socket address string, without any ``%scope``.

    Cached: the host's few addresses come back for every connection (a
    migration target adopts a thousand in its downtime), and parsing one
    costs microseconds; the addresses are immutable values.
    """
    return ip_address(text.partition("%")[0])


@functools.lru_cache(maxsize=1024)
def shared_address(addr: IpAddress) -> IpAddress:
    """The one object kept for ``addr``, for a new flow's endpoints.

    Each guest frame parses its addresses into new objects, and a flow keeps
    those of its first frame for as long as it lives (its key and endpoints):
    80 bytes per address per flow, for values nearly every flow shares (the
    guest's address, a few remote ones). Bounded: past 1,024 distinct
    addresses the least recent ones stop being shared, nothing worse.
    """
    return addr


@functools.lru_cache(maxsize=1024)
def shared_port(port: int) -> int:
    """The one int object kept for a remote port (one of a few: 80, 443...),
    as :func:`shared_address` for addresses; ports above 256 are 32-byte objects."""
    return port


def gateway_of(link: LinkConfig, version: int) -> IpAddress | None:
    if version == 4:
        return None if link.ipv4 is None else link.ipv4.gateway
    return None if link.ipv6 is None else link.ipv6.gateway


def peer_as_seen_by_guest(
    link: LinkConfig, peer: IpAddress, guest_addr: IpAddress
) -> IpAddress | None:
    """The source address the guest is shown for an inbound ``peer``.

    None if the peer is the host itself but the link has no gateway of that
    family to stand for it.
    """
    if peer.is_loopback or peer == guest_addr:
        return gateway_of(link, peer.version)
    return peer
