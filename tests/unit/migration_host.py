"""An in-memory MigrationHost for driving the migration layer without root (no tests here).

Real flow tables (ferryd.flows) on recording guests (FakeGuest, TcpGuest), no
frontend and no data-path tasks: :meth:`MemoryHost.stop`,
:meth:`~MemoryHost.start` and the handover only record what migration asked
for, in order, in :attr:`MemoryHost.calls`. A fake is fine here: the
migration source, target and controller are state machines over this
interface (ferryd.migration.host), and what they write or read is checked
byte for byte through a real stream.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

import trio

from ferryd.flows.destinations import DestinationPolicy
from ferryd.flows.icmp import IcmpFlows
from ferryd.flows.tcp import TcpFlows
from ferryd.flows.udp import UdpFlows
from ferryd.link import LinkConfig
from ferryd.migration.repair_source import RepairSource
from ferryd.migration.roles import Role, RoleMachine
from ferryd.migration.session import MigrationCounters, Session
from ferryd.migration.source import SourceMigration
from ferryd.migration.target import TargetMigration
from ferryd.wire.ip import IpAddress
from tests.unit.test_flows_helpers import LINK, FakeGuest, destinations, guest_of


@dataclass(frozen=True)
class Segment:
    """One TCP segment sent to the guest, as the guest reads it."""

    seq: int
    ack: int
    flags: int
    payload: bytes


class TcpGuest:
    """The TCP flows' GuestPort: records every segment."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def send_ip(
        self,
        src: IpAddress,
        dst: IpAddress,
        proto: int,
        l4: bytes,
        payload: bytes | memoryview = b"",
        csum_offset: int | None = None,
    ) -> None:
        seq, ack = struct.unpack_from("!II", l4, 4)
        self.segments.append(Segment(seq, ack, l4[13], bytes(l4[(l4[12] >> 4) * 4 :]) + payload))

    def guest_address(self, version: int) -> IpAddress | None:
        return guest_of(version)


class MemoryHost:
    """ferryd.migration.host.MigrationHost over real flow tables, in memory."""

    def __init__(self, nursery: trio.Nursery, link: LinkConfig = LINK) -> None:
        self.nursery = nursery
        self.destinations = destinations()
        self.stranded: list[socket.socket] = []
        self.calls: list[str] = []
        """What migration asked of the data path, in order."""
        self.running = False
        self.holds_guest = True
        """Whether the guest's frames come here (the frontend's queue)."""
        self.sent: list[tuple[IpAddress, IpAddress, int, bytes]] = []
        self.exited = trio.Event()
        """Set when a committed source's linger is over (Session.handed_over)."""
        self._build(link)

    def _build(self, link: LinkConfig) -> None:
        self.link = link
        self.guest = FakeGuest()
        self.tcp_guest = TcpGuest()
        self.guest_mac: bytes | None = None
        kw: dict[str, Any] = {"destinations": self.destinations}
        self.tcp = TcpFlows(self.tcp_guest, link, self.nursery, **kw)
        self.udp = UdpFlows(self.guest, link, self.nursery, **kw)
        self.icmp = IcmpFlows(self.guest, link, self.nursery, **kw)

    @property
    def policy(self) -> DestinationPolicy:
        return self.destinations.policy

    def rebuild(self, link: LinkConfig, now: float) -> None:
        self.calls.append("rebuild")
        self._build(link)

    async def start(self) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append("start")
        self.running = True

    async def stop(self) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append("stop")
        self.running = False

    def hand_over(self, *, drain: bool) -> None:
        self.calls.append("hand_over(drain)" if drain else "hand_over")
        self.holds_guest = False

    def take_over(self) -> None:
        self.calls.append("take_over")
        self.holds_guest = True

    def send_ip(self, src: IpAddress, dst: IpAddress, proto: int, l4: bytes) -> None:
        self.sent.append((src, dst, proto, l4))

    def exit(self) -> None:
        self.calls.append("exit")
        self.exited.set()

    async def aclose(self) -> None:
        await self.udp.aclose()
        await self.icmp.aclose()
        self.tcp.close_listeners()


def role_of(migration: SourceMigration | TargetMigration) -> Role:
    """The role now (a call, so that mypy does not narrow it across awaits)."""
    return migration.s.roles.role


def session(
    host: MemoryHost,
    nursery: trio.Nursery,
    role: Role,
    *,
    repair: RepairSource | None = None,
    linger: float = 0.0,
    precopy_quiet: float = 0.001,
) -> Session:
    """A Session as the controller makes one (no repair helper unless given)."""
    return Session(
        host=host,
        roles=RoleMachine(role),
        repair=repair or RepairSource(None, None),
        nursery=nursery,
        counters=MigrationCounters(),
        linger=linger,
        handed_over=host.exit,
        precopy_quiet=precopy_quiet,
    )
