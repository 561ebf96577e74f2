"""The addresses of ferryd's host network namespace, kept current.

The destination policy (ferryd.flows.destinations) refuses the host's own
addresses, so it must know them: every address of every interface of the
namespace ferryd's host sockets are created in (a socket sending to one of
them is delivered locally). They can change while ferryd runs (DHCP, an
operator adding an address), so ferryd follows them on one rtnetlink
socket (rtnetlink(7)) opened at start:

- it joins the address notification groups (RTMGRP_IPV4_IFADDR,
  RTMGRP_IPV6_IFADDR) and then asks for a dump of every address
  (RTM_GETADDR with NLM_F_DUMP), read to its end before ferryd serves the
  guest;
- from then on every RTM_NEWADDR / RTM_DELADDR the kernel multicasts is
  applied as it is read (between the change and the read, microseconds,
  the old set applies);
- if notifications were lost (the socket's queue overflowed: ENOBUFS), or
  a datagram could not be parsed (it may have held a dump's end), a new
  dump is asked for on the same socket and replaces the set when it ends;
  it supersedes any dump still under way, whose late replies (our port,
  an older sequence number) are then ignored. Notifications never carry
  our port: the kernel sends them with the port of whoever made the change
  (rtmsg_ifa()).

Only recv() and send() on that one descriptor are needed after start (no
new socket, no library underneath), so a seccomp allow-list has little to
allow. An address is kept per interface (:class:`AddressSet`): one that
two interfaces carry stays while either does. A notification read while a
dump is under way is applied to both the current set and the dump's (the
dump may have been taken before or after it).

The messages are the kernel's, but they are parsed as carefully as
anything else (:func:`parse_addr_messages_untrusted`).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

import trio

from ferryd.exits import StartupError
from ferryd.wire.ip import IpAddress

__all__ = [
    "AddrEvent",
    "AddressSet",
    "AddressWatch",
    "NetlinkError",
    "parse_addr_messages_untrusted",
]

log = logging.getLogger("ferryd.host")

_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV6_IFADDR = 0x100
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("=HH")  # length, type
_AF_INET, _AF_INET6 = 2, 10
_RECV_SIZE = 1 << 16


class NetlinkError(Exception):
    """A netlink message that does not parse, or an error the kernel answered."""


@dataclass(frozen=True, slots=True)
class AddrEvent:
    added: bool
    index: int
    """The interface's index."""
    address: IpAddress
    seq: int
    port: int
    """With ``seq``: the request a message answers. A notification carries those of
    the request that made the change (someone else's), a dump's messages ours."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_addr_messages_untrusted(data: bytes) -> tuple[list[AddrEvent], list[int]]:
    """Address events in one netlink datagram, and the sequence numbers of the dumps
    that ended in it (NLMSG_DONE). Raises :class:`NetlinkError` and nothing else."""
    events: list[AddrEvent] = []
    done: list[int] = []
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, port = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            raise NetlinkError(f"netlink message of length {length} at {pos} of {len(data)}")
        body = data[pos + _NLMSGHDR.size : pos + length]
        pos += _align(length)
        if kind == NLMSG_DONE:
            done.append(seq)
        elif kind == NLMSG_ERROR:
            code = struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
            if code:
                raise NetlinkError(
                    f"netlink request {seq} failed: {errno.errorcode.get(-code, code)}"
                )
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            event = _addr_event(kind == RTM_NEWADDR, seq, port, body)
            if event is not None:
                events.append(event)
    return events, done


def _addr_event(added: bool, seq: int, port: int, body: bytes) -> AddrEvent | None:
    if len(body) < _IFADDRMSG.size:
        raise NetlinkError(f"address message of {len(body)} bytes")
    family, _plen, _flags, _scope, index = _IFADDRMSG.unpack_from(body)
    size = {_AF_INET: 4, _AF_INET6: 16}.get(family)
    if size is None:
        return None
    attrs: dict[int, bytes] = {}
    pos = _IFADDRMSG.size
    while pos + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, pos)
        if length < _RTATTR.size or pos + length > len(body):
            raise NetlinkError(f"address attribute of length {length}")
        attrs[kind] = body[pos + _RTATTR.size : pos + length]
        pos += _align(length)
    # IFA_LOCAL is the interface's own address; IFA_ADDRESS the peer's on a
    # point-to-point link, the own one otherwise (if_addr.h).
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None:
        return None
    if len(raw) != size:
        raise NetlinkError(f"address of {len(raw)} bytes for family {family}")
    address: IpAddress = IPv4Address(raw) if size == 4 else IPv6Address(raw)
    return AddrEvent(added, index, address, seq, port)


class AddressSet:
    """The host's addresses, per interface. Pure."""

    def __init__(self) -> None:
        self._held: set[tuple[int, IpAddress]] = set()

    def apply(self, event: AddrEvent) -> None:
        key = (event.index, event.address)
        if event.added:
            self._held.add(key)
        else:
            self._held.discard(key)

    @property
    def addresses(self) -> frozenset[IpAddress]:
        return frozenset(addr for _index, addr in self._held)


class AddressWatch:
    """One rtnetlink socket: the address dump at start, then every change."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        try:
            self._sock.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
            self._port: int = self._sock.getsockname()[0]
            self._seq = 0
            self.current = AddressSet()
            self._dumping: tuple[int, AddressSet] | None = self._request_dump()
            self._sock.settimeout(timeout)
            while self.dump_pending:  # read the first dump to its end
                self._handle(self._sock.recv(_RECV_SIZE))
            self._sock.setblocking(False)
        except (OSError, NetlinkError) as exc:
            self._sock.close()
            raise StartupError(f"cannot read the host's addresses (rtnetlink): {exc}") from exc
        except BaseException:
            self._sock.close()
            raise

    @property
    def addresses(self) -> frozenset[IpAddress]:
        return self.current.addresses

    @property
    def dump_pending(self) -> bool:
        return self._dumping is not None

    def close(self) -> None:
        self._sock.close()

    def _request_dump(self) -> tuple[int, AddressSet]:
        """Ask for every address; the dump's messages will carry the returned number."""
        self._seq += 1
        request = _NLMSGHDR.pack(
            _NLMSGHDR.size + 4, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0
        ) + bytes(4)  # struct rtgenmsg: AF_UNSPEC, padded
        self._sock.send(request)
        return self._seq, AddressSet()

    def _handle(self, data: bytes) -> bool:
        """Apply one datagram; True if the set may have changed."""
        events, done = parse_addr_messages_untrusted(data)
        dump = None if self._dumping is None else self._dumping[0]
        changed = False
        for event in events:
            if event.port == self._port:  # a reply to one of our dumps
                if self._dumping is not None and event.seq == dump:
                    self._dumping[1].apply(event)
                continue  # a superseded dump's: what it says may be stale
            self.current.apply(event)  # a notification: true of now
            changed = True
            if self._dumping is not None:
                self._dumping[1].apply(event)
        if self._dumping is not None and dump in done:
            self.current = self._dumping[1]
            self._dumping = None
            return True
        return changed

    def resync(self) -> None:
        """Something was lost: dump everything again (superseding a dump under way)."""
        self._dumping = self._request_dump()

    async def watch(self, changed: Callable[[frozenset[IpAddress]], None]) -> None:
        """Call ``changed`` with the new set after each burst of netlink messages.

        Never raises for what the kernel sends or fails to: a lost or
        unreadable datagram costs a new dump; a socket that stops working
        ends the watch with an error line (the addresses known by then stay
        refused).
        """
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            dirty = lost = False
            while True:
                try:
                    dirty |= self._handle(self._sock.recv(_RECV_SIZE))
                except BlockingIOError:
                    break
                except NetlinkError as exc:
                    log.warning("host address notifications: %s; reading them all again", exc)
                    lost = True
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        log.error(
                            "host address notifications stopped (%s): addresses the host"
                            " gains from now on are not refused to the guest",
                            exc,
                        )
                        return
                    log.info("host address notifications were lost: reading them all again")
                    lost = True
            if lost:
                try:
                    self.resync()
                except OSError as exc:
                    log.error("host address notifications stopped (cannot dump: %s)", exc)
                    return
            if dirty:
                changed(self.current.addresses)
