"""The flow table: one entry per guest conversation, sans-IO.

Theory of operation
-------------------
A flow is what the guest sees as one conversation: a protocol and the two
endpoints *as the guest knows them*, ``(proto, guest_addr, guest_port,
remote_addr, remote_port)`` (:class:`FlowKey`). For ICMP echo the "port" is
the echo identifier and ``remote_port`` is 0. The table maps that key to a
:class:`Flow`, which carries the bookkeeping every protocol shares: when the
flow was last active, how many bytes went each way, the host socket's local
address (what the control socket shows) and an opaque ``handle`` owned by
the protocol adapter (its socket, its reader task's cancel scope, ...).

The table does no I/O and never reads a clock: every call that depends on
time takes ``now`` (seconds, the caller's monotonic clock, in ferryd
``trio.current_time()``), so it is tested with explicit times.

Invariants
----------
- At most ``limit`` flows exist; :meth:`FlowTable.add` beyond that raises
  :class:`FlowLimitReached` (a resource limit, nobody's bug: the adapter
  refuses the flow, logs and counts) and changes nothing.
- Flows that hold a descriptor of their own (all but inbound UDP flows,
  which share their listener's socket) also draw on a descriptor budget
  shared by every protocol's table (:mod:`ferryd.descriptors`); when
  it is spent, :meth:`FlowTable.add` raises :class:`DescriptorsSpent`, a
  :class:`FlowLimitReached`, so adapters refuse such flows the same way.
- A key is in the table at most once; adding an existing key is a bug of the
  caller (``KeyError``).
- No payload is ever stored here: only counters and addresses.
- ``counters.flows`` is the table's size; ``opened`` and ``closed`` count
  every :meth:`FlowTable.add` and every :meth:`FlowTable.remove` that found
  its flow (so ``flows == opened - closed``), read by ferryd's counters
  registry through the protocol's counters, which extend
  :class:`FlowCounters`.
"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, Protocol, TypeVar

from ferryd.descriptors import DescriptorsSpent, FlowLimitReached
from ferryd.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IpAddress

__all__ = [
    "DescriptorsSpent",
    "Flow",
    "FlowCounters",
    "FlowKey",
    "FlowLimitReached",
    "FlowTable",
    "proto_name",
]

H = TypeVar("H")

_PROTO_NAMES = {
    IPPROTO_TCP: "tcp",
    IPPROTO_UDP: "udp",
    IPPROTO_ICMP: "icmp",
    IPPROTO_ICMPV6: "icmpv6",
}


def proto_name(proto: int) -> str:
    return _PROTO_NAMES.get(proto, str(proto))


class Budget(Protocol):
    def check(self) -> None:
        """Raise :class:`DescriptorsSpent` if no descriptor is left for a new flow."""


class FlowKey(NamedTuple):
    """A flow as the guest sees it (ICMP echo: ports are id and 0).

    A named tuple rather than a frozen dataclass: every guest frame builds
    one and looks it up, and a tuple is built, hashed and compared in C
    (a frozen dataclass's __init__ sets each field through
    object.__setattr__ in Python: 2.4 µs more per frame).
    """

    proto: int
    guest_addr: IpAddress
    guest_port: int
    remote_addr: IpAddress
    remote_port: int


@dataclass(slots=True, eq=False)
class Flow(Generic[H]):
    key: FlowKey
    handle: H
    """Whatever the protocol adapter keeps for this flow (its socket, ...)."""
    state: str
    last_activity: float
    host_addr: IpAddress | None = None
    """Local address of the host socket carrying the flow, if any."""
    host_port: int = 0
    bytes_to_guest: int = 0
    bytes_from_guest: int = 0
    packets_to_guest: int = 0
    packets_from_guest: int = 0
    dropped: int = 0
    """Packets of this flow dropped (full socket buffer, guest link full...)."""
    holds_descriptor: bool = True
    """The flow has a socket of its own (counted against the descriptor budget)."""

    def to_guest(self, nbytes: int, now: float) -> None:
        self.bytes_to_guest += nbytes
        self.packets_to_guest += 1
        self.last_activity = now

    def from_guest(self, nbytes: int, now: float) -> None:
        self.bytes_from_guest += nbytes
        self.packets_from_guest += 1
        self.last_activity = now

    def snapshot(self) -> dict[str, object]:
        key = self.key
        return {
            "proto": proto_name(key.proto),
            "guest_addr": str(key.guest_addr),
            "guest_port": key.guest_port,
            "remote_addr": str(key.remote_addr),
            "remote_port": key.remote_port,
            "host_addr": None if self.host_addr is None else str(self.host_addr),
            "host_port": self.host_port,
            "state": self.state,
            "bytes_to_guest": self.bytes_to_guest,
            "bytes_from_guest": self.bytes_from_guest,
        }


@dataclass(kw_only=True)
class FlowCounters:
    """What a flow table counts; each protocol's counters extend it."""

    flows: int = field(default=0, metadata={"gauge": True})
    """Flows in the table now (a level: ferryd.counters)."""
    opened: int = 0
    """Flows added to the table since it was made."""
    closed: int = 0
    """Flows removed from it since."""


class FlowTable(Generic[H]):
    """Flows by :class:`FlowKey`, with a size limit and idle expiry."""

    def __init__(
        self, limit: int, budget: Budget | None = None, counters: FlowCounters | None = None
    ) -> None:
        if limit < 1:
            raise ValueError(f"flow limit must be at least 1, not {limit}")
        self.limit = limit
        self._budget = budget
        self.counters = counters if counters is not None else FlowCounters()
        self._flows: dict[FlowKey, Flow[H]] = {}
        self.descriptors = 0
        """Flows in the table that hold a descriptor of their own."""

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: object) -> bool:
        return key in self._flows

    def __iter__(self) -> Iterator[Flow[H]]:
        return iter(list(self._flows.values()))

    def get(self, key: FlowKey) -> Flow[H] | None:
        return self._flows.get(key)

    def add(
        self,
        key: FlowKey,
        handle: H,
        now: float,
        *,
        state: str,
        host_addr: IpAddress | None = None,
        host_port: int = 0,
        holds_descriptor: bool = True,
    ) -> Flow[H]:
        """Create a flow; :class:`FlowLimitReached` if the table is full or
        (:class:`DescriptorsSpent`) the flow needs a descriptor and none is left."""
        if key in self._flows:
            raise KeyError(f"flow {key} already exists")
        self.check_room(holds_descriptor)
        flow = Flow(key, handle, state, now, host_addr, host_port)
        flow.holds_descriptor = holds_descriptor
        self._flows[key] = flow
        self.descriptors += holds_descriptor
        self.counters.flows += 1
        self.counters.opened += 1
        return flow

    def check_room(self, holds_descriptor: bool = True) -> None:
        """Raise :class:`FlowLimitReached` now if :meth:`add` would.

        Lets an adapter refuse a flow before it opens a socket for it.
        """
        if len(self._flows) >= self.limit:
            raise FlowLimitReached(self.limit)
        if holds_descriptor and self._budget is not None:
            self._budget.check()

    def remove(self, key: FlowKey) -> Flow[H] | None:
        flow = self._flows.pop(key, None)
        if flow is not None:
            self.descriptors -= flow.holds_descriptor
            self.counters.flows -= 1
            self.counters.closed += 1
        return flow

    def expired(self, now: float, timeout_by_proto: Mapping[int, float]) -> list[Flow[H]]:
        """Flows idle for longer than their protocol's timeout (not removed).

        A protocol missing from ``timeout_by_proto`` never expires here.
        """
        out = []
        for flow in self._flows.values():
            timeout = timeout_by_proto.get(flow.key.proto)
            if timeout is not None and now - flow.last_activity > timeout:
                out.append(flow)
        return out

    def snapshot(self) -> list[dict[str, object]]:
        """One dict per flow for the control socket (JSON-ready values)."""
        return [flow.snapshot() for flow in self._flows.values()]
