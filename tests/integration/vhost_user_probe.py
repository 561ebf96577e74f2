"""QEMU's part, run as QEMU's user: connect to ferryd's vhost-user socket and be served.

Usage: ``python -m tests.integration.vhost_user_probe SOCKET GUEST_V4 GATEWAY_V4``
(from the repository's root, as whatever user and groups the caller chose).

Prints ``served`` once ferryd answered an ARP request for the gateway
through the rings (testbed/vhost_user_driver.py plays QEMU and the guest's
driver), or ``refused: ERRNO`` if the socket could not be connected to.
Anything else is an error with a traceback (exit 1).
"""

from __future__ import annotations

import errno
import sys
from ipaddress import IPv4Address

from ferryd.wire.arp import ARP_REPLY, ARP_REQUEST, ArpPacket, build_arp, parse_arp_untrusted
from ferryd.wire.ethernet import build_ethernet, parse_ethernet_untrusted
from testbed.vhost_user_driver import VhostUserQemu

GUEST_MAC = bytes.fromhex("525400123456")
ETH_P_ARP = 0x0806


def main(socket_path: str, guest: str, gateway: str) -> None:
    try:
        qemu = VhostUserQemu(socket_path)
    except OSError as exc:
        print(f"refused: {errno.errorcode.get(exc.errno or 0, exc)}")
        return
    with qemu:
        qemu.start()
        qemu.post_rx()
        request = ArpPacket(
            ARP_REQUEST, GUEST_MAC, IPv4Address(guest), bytes(6), IPv4Address(gateway)
        )
        qemu.transmit(build_ethernet(b"\xff" * 6, GUEST_MAC, ETH_P_ARP, build_arp(request)))
        (frame,) = qemu.receive(1)
        eth = parse_ethernet_untrusted(frame)
        reply = parse_arp_untrusted(eth.payload)
        assert (eth.dst, reply.op, reply.spa) == (GUEST_MAC, ARP_REPLY, IPv4Address(gateway))
    print("served")


if __name__ == "__main__":
    main(*sys.argv[1:])
