"""The descriptor budget shared by the flow tables (issue 9 item 4).

Sans-IO parts with explicit numbers; the adapters' refusals with real
sockets on loopback (a guest datagram or echo request refused gets an ICMP
"administratively prohibited" quoting it).
"""

import resource
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address

import pytest
import trio

from ferryd.counters import Registry
from ferryd.descriptors import RESERVE, DescriptorBudget
from ferryd.flows.icmp import IcmpFlows
from ferryd.flows.table import DescriptorsSpent, FlowKey, FlowLimitReached, FlowTable
from ferryd.flows.udp import UdpFlows
from ferryd.wire.icmp import build_admin_prohibited, parse_icmp_untrusted
from ferryd.wire.ip import IPPROTO_UDP, IpAddress, build_ip
from tests.unit.test_flows_helpers import (
    GUEST4,
    GW4,
    LINK,
    FakeGuest,
    destinations,
    echo_from_guest,
    guest_of,
    parse_ip,
    udp_from_guest,
)


def key(port: int) -> FlowKey:
    return FlowKey(IPPROTO_UDP, GUEST4, port, IPv4Address("192.0.2.1"), 53)


def test_tables_share_one_budget() -> None:
    budget = DescriptorBudget(3)
    a: FlowTable[None] = FlowTable(10, budget)
    b: FlowTable[None] = FlowTable(10, budget)
    budget.track([a, b])
    a.add(key(1), None, 0.0, state="x")
    b.add(key(1), None, 0.0, state="x")
    a.add(key(2), None, 0.0, state="x", holds_descriptor=False)  # shares a listener
    a.add(key(3), None, 0.0, state="x")
    assert budget.in_use == 3
    with pytest.raises(DescriptorsSpent) as info:
        b.add(key(2), None, 0.0, state="x")
    assert isinstance(info.value, FlowLimitReached)
    assert budget.counters.refused == 1 and len(b) == 1
    # A flow without its own socket still fits; a freed descriptor is reusable.
    b.add(key(3), None, 0.0, state="x", holds_descriptor=False)
    a.remove(key(1))
    b.add(key(2), None, 0.0, state="x")
    assert budget.in_use == 3 and budget.counters.refused == 1


def test_the_snapshot_is_the_budget_not_its_counters() -> None:
    # `ferryctl status` shows the refusals once, under counters.descriptors
    # (the registry reads budget.counters); the snapshot beside it is the budget.
    budget = DescriptorBudget(1, limit=66, reserved=65)
    table: FlowTable[None] = FlowTable(10, budget)
    budget.track([table])
    table.add(key(1), None, 0.0, state="x")
    with pytest.raises(DescriptorsSpent):
        table.add(key(2), None, 0.0, state="x")
    assert budget.snapshot() == {"limit": 66, "reserved": 65, "for_flows": 1, "in_use": 1}
    registry = Registry()
    registry.add("descriptors", budget.counters)  # as the data path does
    assert registry.snapshot()["descriptors"] == {"refused": 1, "exhausted": 0}


def test_tracking_new_tables_forgets_the_old() -> None:
    """A migration target rebuilds its tables after a failed restore."""
    budget = DescriptorBudget(1)
    old: FlowTable[None] = FlowTable(10, budget)
    budget.track([old])
    old.add(key(1), None, 0.0, state="x")
    new: FlowTable[None] = FlowTable(10, budget)
    budget.track([new])
    new.add(key(1), None, 0.0, state="x")
    assert budget.in_use == 1


def test_from_rlimit_keeps_the_reserve() -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = DescriptorBudget.from_rlimit(listeners=4)
    assert budget.capacity == soft - RESERVE - 4
    assert budget.snapshot()["limit"] == soft


def test_warns_when_max_flows_cannot_be_honoured(caplog: pytest.LogCaptureFixture) -> None:
    DescriptorBudget(1000, limit=1064, reserved=64).warn_if_short(16384)
    assert "--max-flows 16384 cannot be reached: RLIMIT_NOFILE 1064 leaves 1000" in caplog.text
    caplog.clear()
    DescriptorBudget(1000).warn_if_short(1000)  # three protocols may share it: no warning
    assert caplog.text == ""


@pytest.mark.parametrize("version", [4, 6])
def test_admin_prohibited_quotes_the_refused_packet(version: int) -> None:
    dst: IpAddress = IPv4Address("192.0.2.1") if version == 4 else IPv6Address("2001:db8::1")
    src = guest_of(version)
    ip, _udp = udp_from_guest(src, dst, 4000, 53, bytes(2000))
    proto, msg = build_admin_prohibited(ip, dst)
    icmp = parse_icmp_untrusted(parse_ip(build_ip(dst, src, proto, msg)))
    quote = bytes(icmp.body)
    ports = (4000).to_bytes(2, "big") + (53).to_bytes(2, "big")
    if version == 4:
        assert (icmp.type, icmp.code) == (3, 13)
        assert (quote[9], quote[12:16], quote[16:20]) == (IPPROTO_UDP, src.packed, dst.packed)
        assert quote[20:24] == ports and len(quote) == 28  # RFC 792: header + 8 bytes
    else:
        assert (icmp.type, icmp.code) == (1, 1)
        assert (quote[6], quote[8:24], quote[24:40]) == (IPPROTO_UDP, src.packed, dst.packed)
        assert quote[40:44] == ports
        assert 40 + len(msg) == 1280  # RFC 4443 §2.4 (c): as much as fits the minimum MTU


async def test_udp_and_icmp_refuse_with_icmp_when_the_budget_is_spent() -> None:
    guest = FakeGuest()
    budget = DescriptorBudget(2)
    async with trio.open_nursery() as nursery:
        udp = UdpFlows(guest, LINK, nursery, destinations=destinations(), budget=budget)
        icmp = IcmpFlows(guest, LINK, nursery, destinations=destinations(), budget=budget)
        budget.track([udp.table, icmp.table])
        try:
            for sport in (1, 2, 3):
                udp.from_guest(*udp_from_guest(GUEST4, GW4, sport, 9, b"x"), trio.current_time())
            icmp.from_guest(*echo_from_guest(GUEST4, GW4, 7, 1, b"ping"), trio.current_time())
            assert len(udp.table) == 2 and len(icmp.table) == 0
            assert budget.counters.refused == 2
            assert udp.drops["no descriptor"] == 1 and icmp.drops["no descriptor"] == 1
            errors = [parse_icmp_untrusted(p) for p in guest.packets]
            assert [(e.type, e.code) for e in errors] == [(3, 13), (3, 13)]
        finally:
            await udp.aclose()
            await icmp.aclose()


PRESIZE = """
import os, resource, sys, threading
from ferryd.descriptors import presize_fd_table

def fd_size():
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("FDSize:")))

before = fd_size()
asked = presize_fd_table(int(sys.argv[1]))
threading.Thread(target=threading.Event().wait, daemon=True).start()
low = os.open(os.devnull, os.O_RDONLY)
print(before, asked, fd_size(), low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize("size", [4096, 10**9])
def test_presize_fd_table_grows_the_table_and_frees_the_descriptor(size: int) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PRESIZE, str(size)], check=True, capture_output=True, text=True
    ).stdout.split()
    before, asked, after, low, limit = map(int, out)
    assert asked == min(size, limit)
    assert before < asked <= after  # the kernel rounds up to a power of two
    assert low < 16  # the descriptor used to grow it is closed again


HANDED_OVER = """
import os, sys
from ferryd.descriptors import presize_fd_table

reader, writer = os.pipe()
os.dup2(reader, 4095)  # as a --tap-fd 4095 would be
presize_fd_table(4096)
os.write(writer, b"still here")
print(os.read(4095, 64).decode())
"""


def test_presize_fd_table_leaves_a_descriptor_at_that_number_open() -> None:
    out = subprocess.run(
        [sys.executable, "-c", HANDED_OVER], check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == "still here"
