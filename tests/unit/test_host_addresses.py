"""The host's addresses from rtnetlink: the parser on crafted messages, the per-interface
set, and one real dump of this namespace (reading it needs no privilege)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest

from ferryd.host_addresses import (
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


def message(kind: int, body: bytes, seq: int = 0, port: int = 0) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, 0, seq, port) + body + bytes(-length % 4)


def addr_message(
    kind: int, family: int, index: int, *attrs: bytes, seq: int = 0, port: int = 0
) -> bytes:
    body = struct.pack("=BBBBI", family, 24, 0, 0, index) + b"".join(attrs)
    return message(kind, body, seq, port)


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


def pending(watch: AddressWatch) -> bool:
    """A call, so that mypy does not keep a narrowed property across _handle()."""
    return watch.dump_pending


def _dump_reply(watch: AddressWatch, seq: int, *addresses: IPv4Address) -> bytes:
    """What the kernel answers our dump number ``seq`` (our port), DONE included."""
    port = watch._port
    msgs = [
        addr_message(RTM_NEWADDR, 2, 1, attr(IFA_LOCAL, a.packed), seq=seq, port=port)
        for a in addresses
    ]
    return b"".join(msgs) + message(NLMSG_DONE, struct.pack("=i", 0), seq=seq, port=port)


def test_a_lost_datagram_during_a_dump_is_recovered_by_a_new_dump() -> None:
    # The datagram holding the dump's end may be the one that did not parse:
    # resync() starts a dump that supersedes it, whose late replies are ignored.
    watch = AddressWatch()
    try:
        watch.resync()
        first = watch._dumping[0] if watch._dumping else -1
        with pytest.raises(NetlinkError):
            watch._handle(message(NLMSG_ERROR, struct.pack("=i", -12), seq=first))
        assert pending(watch)
        watch.resync()  # what watch() does after an unparsable datagram
        second = watch._dumping[0] if watch._dumping else -1
        assert second != first
        # A notification meanwhile (another process's port) counts at once.
        assert watch._handle(addr_message(RTM_NEWADDR, 2, 5, attr(IFA_LOCAL, A4.packed), seq=9))
        assert A4 in watch.addresses
        # The superseded dump's late end changes nothing and ends nothing.
        assert not watch._handle(_dump_reply(watch, first, PEER4))
        assert pending(watch) and PEER4 not in watch.addresses
        # The new dump's end replaces the set; the notification stays in it.
        assert watch._handle(_dump_reply(watch, second, IPv4Address("127.0.0.1")))
        assert not pending(watch)
        assert watch.addresses == frozenset({IPv4Address("127.0.0.1"), A4})
    finally:
        watch.close()
