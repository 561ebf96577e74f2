"""ferryd.counters: the registry reads every component's counter dataclass at snapshot time."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ferryd.counters import Registry
from ferryd.descriptors import DescriptorCounters
from ferryd.flows.datagram import DatagramCounters
from ferryd.flows.destinations import RefusalCounters
from ferryd.flows.table import FlowKey, FlowTable
from ferryd.flows.tcp import TcpCounters
from ferryd.frontends.base import FrontendCounters
from ferryd.main import status_counters
from ferryd.stack import StackCounters
from ferryd.wire.ip import IPPROTO_TCP
from tests.unit.test_flows_helpers import GUEST4, GW4


@dataclass
class Things:
    seen: int = 0
    ratio: float = 0.0
    label: str = "not a counter"
    enabled: bool = True


def test_snapshot_reads_the_fields_as_they_are_now() -> None:
    registry = Registry()
    things = Things()
    registry.add("things", things)
    assert registry.snapshot() == {"things": {"seen": 0, "ratio": 0.0}}
    things.seen += 3
    things.ratio = 0.5
    assert registry.snapshot() == {"things": {"seen": 3, "ratio": 0.5}}


def test_a_group_added_again_is_replaced() -> None:
    """A migration target rebuilds its stack: the new one's counters are read."""
    registry = Registry()
    registry.add("stack", StackCounters(malformed=7))
    registry.add("stack", StackCounters(malformed=1))
    assert registry.snapshot()["stack"]["malformed"] == 1


@pytest.mark.parametrize("counters", [object(), {"seen": 1}, Things, 3])
def test_only_dataclass_instances_are_counters(counters: object) -> None:
    with pytest.raises(TypeError, match="dataclass instance"):
        Registry().add("bad", counters)


def test_a_group_needs_a_name() -> None:
    with pytest.raises(ValueError, match="name"):
        Registry().add("", Things())


def test_status_keeps_its_flat_keys() -> None:
    """The keys ``ferryctl status`` has always shown, computed from the groups ferryd registers."""
    registry = Registry()
    stack = StackCounters(malformed=5, frame_errors=6, ignored=7)
    tap = FrontendCounters(frames_in=3, frames_out=2, dropped_out=2)
    tcp, udp, icmp = TcpCounters(flow_errors=1), DatagramCounters(2), DatagramCounters(4)
    refusals = RefusalCounters(tcp=1, udp=2, icmp=3, unanswered=9)
    for name, group in [
        ("frontend", tap),
        ("refusals", refusals),
        ("descriptors", DescriptorCounters()),
        ("stack", stack),
        ("tcp", tcp),
        ("udp", udp),
        ("icmp", icmp),
    ]:
        registry.add(name, group)
    assert status_counters(registry.snapshot()) == {
        "frames_in": 3,
        "frames_out": 4,
        "malformed": 5,
        "frame_errors": 6,
        "flow_errors": 7,
        "ignored": 7,
        "dropped_out": 2,
        "refused": {"tcp": 1, "udp": 2, "icmp": 3},
        "refusals_unanswered": 9,
    }


def test_refusals_count_by_protocol() -> None:
    refusals = RefusalCounters()
    for proto in ("udp", "udp", "icmp"):
        refusals.count(proto)
    assert (refusals.tcp, refusals.udp, refusals.icmp) == (0, 2, 1)


def test_the_flow_tables_are_counted_by_protocol() -> None:
    """Each protocol's group shows its table: flows now, opened and closed since."""
    registry = Registry()
    tcp, udp = TcpCounters(), DatagramCounters()
    registry.add("tcp", tcp)
    registry.add("udp", udp)
    table: FlowTable[str] = FlowTable(10, counters=tcp)
    for port in (1, 2, 3):
        table.add(FlowKey(IPPROTO_TCP, GUEST4, port, GW4, 80), "conn", 0.0, state="ESTABLISHED")
    table.remove(FlowKey(IPPROTO_TCP, GUEST4, 2, GW4, 80))
    table.remove(FlowKey(IPPROTO_TCP, GUEST4, 2, GW4, 80))  # gone already: not counted again
    snapshot = registry.snapshot()
    assert (snapshot["tcp"]["flows"], snapshot["tcp"]["opened"], snapshot["tcp"]["closed"]) == (
        2,
        3,
        1,
    )
    assert snapshot["tcp"]["flows"] == len(table)
    assert (snapshot["udp"]["flows"], snapshot["udp"]["opened"]) == (0, 0)
