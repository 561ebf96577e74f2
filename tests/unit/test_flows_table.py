"""The sans-IO flow table, with explicit time."""

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryd.flows.table import FlowKey, FlowLimitReached, FlowTable
from ferryd.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

GUEST = IPv4Address("10.0.2.15")
REMOTE = IPv4Address("192.0.2.1")


def udp_key(port: int, remote_port: int = 53) -> FlowKey:
    return FlowKey(IPPROTO_UDP, GUEST, port, REMOTE, remote_port)


def test_add_get_remove() -> None:
    table: FlowTable[str] = FlowTable(10)
    key = udp_key(1000)
    flow = table.add(key, "sock", 5.0, state="outbound", host_addr=IPv4Address("10.0.0.1"))
    assert table.get(key) is flow
    assert key in table
    assert len(table) == 1
    assert flow.handle == "sock"
    assert flow.last_activity == 5.0
    assert table.remove(key) is flow
    assert table.get(key) is None
    assert table.remove(key) is None
    assert len(table) == 0


def test_duplicate_key_is_a_caller_bug() -> None:
    table: FlowTable[None] = FlowTable(10)
    table.add(udp_key(1), None, 0.0, state="x")
    with pytest.raises(KeyError):
        table.add(udp_key(1), None, 0.0, state="x")


def test_limit() -> None:
    table: FlowTable[int] = FlowTable(3)
    for i in range(3):
        table.check_room()
        table.add(udp_key(i + 1), i, 0.0, state="x")
    with pytest.raises(FlowLimitReached, match="3 flows"):
        table.check_room()
    with pytest.raises(FlowLimitReached) as info:
        table.add(udp_key(99), 99, 0.0, state="x")
    assert info.value.limit == 3
    assert len(table) == 3
    assert udp_key(99) not in table
    table.remove(udp_key(1))
    table.add(udp_key(99), 99, 0.0, state="x")


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        FlowTable[None](0)


def test_counters_and_activity() -> None:
    table: FlowTable[None] = FlowTable(10)
    flow = table.add(udp_key(1), None, 1.0, state="outbound")
    flow.from_guest(100, 2.0)
    flow.to_guest(30, 3.0)
    flow.to_guest(20, 4.0)
    assert (flow.bytes_from_guest, flow.packets_from_guest) == (100, 1)
    assert (flow.bytes_to_guest, flow.packets_to_guest) == (50, 2)
    assert flow.last_activity == 4.0


def test_expired_by_protocol() -> None:
    table: FlowTable[str] = FlowTable(10)
    udp = table.add(udp_key(1), "udp", 0.0, state="outbound")
    icmp_key = FlowKey(IPPROTO_ICMP, GUEST, 77, REMOTE, 0)
    icmp = table.add(icmp_key, "icmp", 0.0, state="echo")
    tcp = table.add(FlowKey(IPPROTO_TCP, GUEST, 5, REMOTE, 80), "tcp", 0.0, state="ESTABLISHED")
    timeouts = {IPPROTO_UDP: 180.0, IPPROTO_ICMP: 60.0}
    assert table.expired(60.0, timeouts) == []  # not *longer* than 60 s yet
    assert table.expired(60.5, timeouts) == [icmp]
    udp.from_guest(1, 100.0)
    assert table.expired(200.0, timeouts) == [icmp]
    assert set(map(id, table.expired(280.5, timeouts))) == {id(udp), id(icmp)}
    # TCP has no entry in the mapping: never expired here.
    assert tcp not in table.expired(10_000.0, timeouts)
    # expired() does not remove.
    assert len(table) == 3


def test_snapshot() -> None:
    table: FlowTable[None] = FlowTable(10)
    flow = table.add(
        udp_key(1000),
        None,
        0.0,
        state="outbound",
        host_addr=IPv4Address("10.0.0.1"),
        host_port=40000,
    )
    flow.from_guest(12, 1.0)
    flow.to_guest(34, 1.0)
    v6 = FlowKey(IPPROTO_ICMPV6, IPv6Address("2001:db8::2"), 9, IPv6Address("2001:db8::1"), 0)
    table.add(v6, None, 0.0, state="echo")
    assert table.snapshot() == [
        {
            "proto": "udp",
            "guest_addr": "10.0.2.15",
            "guest_port": 1000,
            "remote_addr": "192.0.2.1",
            "remote_port": 53,
            "host_addr": "10.0.0.1",
            "host_port": 40000,
            "state": "outbound",
            "bytes_to_guest": 34,
            "bytes_from_guest": 12,
        },
        {
            "proto": "icmpv6",
            "guest_addr": "2001:db8::2",
            "guest_port": 9,
            "remote_addr": "2001:db8::1",
            "remote_port": 0,
            "host_addr": None,
            "host_port": 0,
            "state": "echo",
            "bytes_to_guest": 0,
            "bytes_from_guest": 0,
        },
    ]


def test_iteration_tolerates_removal() -> None:
    table: FlowTable[None] = FlowTable(10)
    for i in range(5):
        table.add(udp_key(i + 1), None, 0.0, state="x")
    for flow in table:
        table.remove(flow.key)
    assert len(table) == 0


@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "remove", "touch"]), st.integers(1, 8), st.floats(0, 50)),
        max_size=60,
    ),
    st.integers(1, 6),
)
def test_table_matches_a_model(ops: list[tuple[str, int, float]], limit: int) -> None:
    """Any sequence of operations keeps the table equal to a plain dict model."""
    table: FlowTable[int] = FlowTable(limit)
    model: dict[int, float] = {}
    now = 0.0
    for op, port, dt in ops:
        now += dt
        key = udp_key(port)
        if op == "add":
            if port in model:
                with pytest.raises(KeyError):
                    table.add(key, port, now, state="x")
            elif len(model) >= limit:
                with pytest.raises(FlowLimitReached):
                    table.add(key, port, now, state="x")
            else:
                table.add(key, port, now, state="x")
                model[port] = now
        elif op == "remove":
            assert (table.remove(key) is None) == (port not in model)
            model.pop(port, None)
        else:
            flow = table.get(key)
            assert (flow is None) == (port not in model)
            if flow is not None:
                flow.to_guest(1, now)
                model[port] = now
        assert len(table) <= limit
        assert {f.key.guest_port for f in table} == set(model)
        expired = {f.key.guest_port for f in table.expired(now, {IPPROTO_UDP: 30.0})}
        assert expired == {p for p, t in model.items() if now - t > 30.0}
