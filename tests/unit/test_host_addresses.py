"""The host's addresses from rtnetlink: the parser on crafted messages, the per-interface
set, and one real dump of this namespace (reading it needs no privilege)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest

from daemon.host_addresses import (
    IFA_ADDRESS,
    IFA_LOCAL,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTM_DELADDR,
    RTM_NEWADDR,
    AddressSet,
    AddressWatch,
    AddrEvent,
    NetlinkError,
    parse_addr_messages_untrusted,
)


def attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + bytes(-length % 4)


def message(kind: int, body: bytes, seq: int = 0) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, 0, seq, 0) + body + bytes(-length % 4)


def addr_message(kind: int, family: int, index: int, *attrs: bytes, seq: int = 0) -> bytes:
    return message(kind, struct.pack("=BBBBI", family, 24, 0, 0, index) + b"".join(attrs), seq)


A4 = IPv4Address("192.0.2.10")
PEER4 = IPv4Address("192.0.2.99")
A6 = IPv6Address("2001:db8::10")


def test_new_and_deleted_addresses_and_the_end_of_a_dump() -> None:
    data = (
        addr_message(RTM_NEWADDR, 2, 3, attr(IFA_ADDRESS, PEER4.packed), attr(IFA_LOCAL, A4.packed))
        + addr_message(RTM_NEWADDR, 10, 4, attr(IFA_ADDRESS, A6.packed), seq=7)
        + addr_message(RTM_DELADDR, 2, 3, attr(IFA_LOCAL, A4.packed))
        + addr_message(RTM_NEWADDR, 17, 3, attr(IFA_LOCAL, b"\x01" * 6))  # not IP: skipped
        + message(NLMSG_DONE, struct.pack("=i", 0), seq=7)
    )
    events, done = parse_addr_messages_untrusted(data)
    assert events == [
        AddrEvent(True, 3, A4, 0, 0),  # IFA_LOCAL wins over a point-to-point peer
        AddrEvent(True, 4, A6, 7, 0),
        AddrEvent(False, 3, A4, 0, 0),
    ]
    assert done == [7]


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("=IHHII", 8, RTM_NEWADDR, 0, 0, 0),  # shorter than its header
        struct.pack("=IHHII", 64, RTM_NEWADDR, 0, 0, 0),  # longer than the datagram
        message(RTM_NEWADDR, b"\x02\x18"),  # truncated ifaddrmsg
        addr_message(RTM_NEWADDR, 2, 1, struct.pack("=HH", 40, IFA_LOCAL)),  # attribute overruns
        addr_message(RTM_NEWADDR, 2, 1, attr(IFA_LOCAL, A6.packed)),  # 16 bytes for IPv4
        message(NLMSG_ERROR, struct.pack("=i", -1) + bytes(16), seq=2),  # EPERM
    ],
)
def test_what_does_not_parse_raises_one_error(data: bytes) -> None:
    with pytest.raises(NetlinkError):
        parse_addr_messages_untrusted(data)


def test_an_address_on_two_interfaces_stays_while_either_has_it() -> None:
    held = AddressSet()
    held.apply(AddrEvent(True, 1, A4, 0, 0))
    held.apply(AddrEvent(True, 2, A4, 0, 0))
    held.apply(AddrEvent(False, 1, A4, 0, 0))
    assert held.addresses == {A4}
    held.apply(AddrEvent(False, 2, A4, 0, 0))
    assert held.addresses == frozenset()


def test_a_real_dump_has_the_loopback() -> None:
    watch = AddressWatch()
    try:
        assert IPv4Address("127.0.0.1") in watch.addresses
        assert not watch.dump_pending
    finally:
        watch.close()
