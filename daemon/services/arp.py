"""ARP responder: ferryd answers for every IPv4 address on the guest's link.

Theory of operation (REFERENCE.md "Guest link conventions", as passt does):
the guest is given the host's own address and prefix, so every other address
of its subnet, the gateway included, looks on-link and the guest ARPs for it
directly. All of those are reached through ferryd, so every ARP request is
answered with ferryd's MAC, except:

- anything but a request (RFC 826 opcode 1): replies, RARP, InARP;
- a gratuitous announcement (RFC 5227 §2.3: sender address == target
  address), which asks nothing. A probe (RFC 5227 §2.1.1: sender address
  0.0.0.0) is a question and is answered unless excepted below;
- a request for the guest's own address. This covers the guest's duplicate
  address detection probe for its own (tentative) address: staying silent
  is what lets the detection succeed.

The reply goes unicast to the requester (RFC 826 "swap" step): Ethernet
destination and target hardware address are the requester's, sender
addresses are ferryd's MAC and the address asked for.

Pure function, no state: the guest's neighbour cache does all remembering.
"""

from ipaddress import IPv4Address

from ferryd.link import LinkConfig
from ferryd.wire.arp import ARP_REPLY, ARP_REQUEST, ArpPacket, build_arp
from ferryd.wire.ethernet import ETH_P_ARP, EthernetFrame, build_ethernet, is_multicast

_UNSPECIFIED = IPv4Address(0)


def answer_arp(link: LinkConfig, eth: EthernetFrame, arp: ArpPacket) -> bytes | None:
    """The Ethernet frame answering ``arp``, or None if it gets no answer."""
    if link.ipv4 is None or arp.op != ARP_REQUEST:
        return None
    if arp.spa == arp.tpa and arp.spa != _UNSPECIFIED:
        return None  # announcement (RFC 5227 §2.3), not a question
    if arp.tpa == link.ipv4.address or arp.tpa == _UNSPECIFIED:
        return None  # the guest's own address: let its DAD succeed
    if is_multicast(eth.src):
        return None  # no unicast reply can go to a group address
    reply = ArpPacket(ARP_REPLY, link.mac, arp.tpa, arp.sha, arp.spa)
    return build_ethernet(eth.src, link.mac, ETH_P_ARP, build_arp(reply))
