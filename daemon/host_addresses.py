"""The addresses of ferryd's host network namespace, kept current.

The destination policy (daemon.flows.destinations) refuses the host's own
addresses, so it must know them: every address of every interface of the
namespace ferryd's host sockets are created in (where a socket sending to
one of them would be delivered locally). They are read through rtnetlink
(pyroute2) at start. They can change while ferryd runs (DHCP renews, an
operator adds an address): a netlink socket subscribed to the kernel's
address notifications (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR; rtnetlink(7))
is opened at start, while ferryd may still open anything, and each burst of
notifications makes :func:`watch` read the whole set again (a dump costs
one netlink round trip; notifications are rare). Between the change and the
re-read (microseconds) the old set applies; if a re-read fails, the old set
stays and the failure is logged.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from ipaddress import ip_address

import trio

from daemon.wire.ip import IpAddress

__all__ = ["AddressWatch", "read_host_addresses"]

log = logging.getLogger("ferryd.host")

_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV6_IFADDR = 0x100


def read_host_addresses() -> frozenset[IpAddress]:
    """Every address (IFA_LOCAL, else IFA_ADDRESS) of this namespace's interfaces."""
    from pyroute2 import IPRoute

    found: set[IpAddress] = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            text = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if text:
                found.add(ip_address(str(text).partition("%")[0]))
    return frozenset(found)


class AddressWatch:
    """A netlink socket told of every address change in this namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        self._sock.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))

    def close(self) -> None:
        self._sock.close()

    async def watch(self, changed: Callable[[frozenset[IpAddress]], None]) -> None:
        """Call ``changed`` with the new set after each burst of notifications."""
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            while True:  # the content is not needed: the set is read again
                try:
                    self._sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError as exc:  # ENOBUFS: notifications were lost; re-read anyway
                    log.debug("address notifications: %s", exc)
                    break
            try:
                addresses = read_host_addresses()
            except Exception as exc:  # pyroute2 raises its own types as well as OSError
                log.warning("cannot re-read the host's addresses (keeping the old set): %s", exc)
                continue
            changed(addresses)
