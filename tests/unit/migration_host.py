"""An in-memory MigrationHost, and doubles of the kernel's TCP repair and of the
repair helper, for driving the migration layer without root (no tests here).

Real flow tables (ferryd.flows) on recording guests (FakeGuest, and
tcp_conn_support's RecordingGuest for TCP), no frontend and no data-path
tasks: :meth:`MemoryHost.stop`, :meth:`~MemoryHost.start` and the handover
only record what migration asked for, in order, in :attr:`MemoryHost.calls`.
A fake is fine here: the migration source, target and controller are state
machines over this interface (ferryd.migration.host), and what they write or
read is checked byte for byte through a real stream.

Without CAP_NET_ADMIN no socket ever enters repair mode, so the kernel's
side (ferryd.migration.ports.KernelDump) and the repair helper
(RepairPort) are doubles that record what they were asked, in order; the
sockets under the connections are real loopback ones.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from ipaddress import ip_address
from typing import Any, TypeVar

import trio

from ferry_repair.protocol import RepairCommand as RepairMode
from ferryd.flows.destinations import DestinationPolicy
from ferryd.flows.icmp import IcmpFlows
from ferryd.flows.portspec import PortForward
from ferryd.flows.tcp import TcpFlows
from ferryd.flows.udp import UdpFlows
from ferryd.link import LinkConfig
from ferryd.migration.kernel_state import TcpKernelState
from ferryd.migration.ports import RepairPort, RepairSupply
from ferryd.migration.repair_source import RepairSource
from ferryd.migration.roles import Role, RoleMachine
from ferryd.migration.session import MigrationCounters, Session
from ferryd.migration.sockstate import PortInUse
from ferryd.migration.source import SourceMigration
from ferryd.migration.stream import StreamDecoder
from ferryd.migration.stream_events import StreamEvent
from ferryd.migration.target import TargetMigration
from tests.unit.tcp_conn_support import RecordingGuest
from tests.unit.test_flows_helpers import LINK, FakeGuest, destinations


class MemoryHost:
    """ferryd.migration.host.MigrationHost over real flow tables, in memory."""

    def __init__(
        self,
        nursery: trio.Nursery,
        link: LinkConfig = LINK,
        forwards: Sequence[tuple[str, PortForward]] = (),
    ) -> None:
        self.nursery = nursery
        self.configured_link = link
        self.forwards = list(forwards)
        """The command line's forwards, ("tcp" or "udp", forward), bound again by reset."""
        self.destinations = destinations()
        self.stranded: list[socket.socket] = []
        self.calls: list[str] = []
        """What migration asked of the data path, in order."""
        self.running = False
        self.holds_guest = True
        """Whether the guest's frames come here (the frontend's queue)."""
        self.exited = trio.Event()
        """Set when a committed source's linger is over (Session.handed_over)."""
        self._build(link)

    def _build(self, link: LinkConfig) -> None:
        self.link = link
        self.guest = FakeGuest()
        self.tcp_guest = RecordingGuest()
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
        self.tcp.close(now)  # as DataPath.rebuild: nothing of the old tables stays open
        self.udp.close()
        self.icmp.close()
        self._build(link)

    async def reset(self, now: float) -> None:
        self.rebuild(self.configured_link, now)
        self.calls[-1] = "reset"
        for kind, fwd in self.forwards:
            await (self.tcp if kind == "tcp" else self.udp).add_forward(fwd)

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
    repair: RepairSupply | None = None,
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


def kernel_state_of(sock: socket.socket, **changes: Any) -> TcpKernelState:
    """A plausible dump of the connected ``sock`` (its addresses; the rest made up)."""
    local, remote = sock.getsockname(), sock.getpeername()
    fields: dict[str, Any] = dict(
        local_addr=ip_address(local[0]), local_port=local[1],
        remote_addr=ip_address(remote[0]), remote_port=remote[1],
        tcp_state=1, mss=1460, snd_wscale=7, rcv_wscale=7, options=7,
        timestamp=1, snd_wl1=1, snd_wnd=65535, max_window=65535, rcv_wnd=65535, rcv_wup=1,
        send_seq=1, recv_seq=1,
    )  # fmt: skip
    fields.update(changes)
    return TcpKernelState(**fields)


S = TypeVar("S", bound=socket.socket)


class FakeKernel:
    """ferryd.migration.ports.KernelDump: records each call as ``"what fd"``.

    ``new_socket_for`` hands out the sockets given, in order; ``dump_tcp``
    dumps :func:`kernel_state_of` the socket; ``segment_counts`` says
    :attr:`segments` (a test changes it to make traffic happen).
    """

    def __init__(self, socks: list[socket.socket] | None = None) -> None:
        self.socks = socks or []
        self.calls: list[str] = []
        self.segments = (1, 1)
        self.port_in_use = 0
        """The next binds that find their port held (PortInUse)."""

    def new_socket_for(self, state: TcpKernelState, cls: type[S]) -> S:
        if self.port_in_use:
            self.port_in_use -= 1
            self.calls.append("bind EADDRINUSE")
            raise PortInUse(state.describe(), "bind", "Address already in use")
        sock = self.socks.pop(0)
        assert isinstance(sock, cls), f"a test gave {sock!r} where the restorer wants {cls}"
        self.calls.append(f"new {sock.fileno()}")
        return sock

    def restore_in_repair(self, sock: socket.socket, state: TcpKernelState) -> None:
        self.calls.append(f"restore {sock.fileno()}")

    def finish_restore(self, sock: socket.socket, state: TcpKernelState) -> int:
        self.calls.append(f"finish {sock.fileno()}")
        return state.unsent

    def close_silently(self, sock: socket.socket) -> None:
        self.calls.append(f"close_silently {sock.fileno()}")
        sock.close()

    def reuse_after_repair_off(self, socks: list[socket.socket]) -> None:
        self.calls.append("reuse " + ",".join(str(s.fileno()) for s in socks))

    def dump_tcp(self, sock: socket.socket) -> TcpKernelState:
        self.calls.append(f"dump {sock.fileno()}")
        return kernel_state_of(sock)

    def reopen_send_window(self, sock: socket.socket, snd_wnd: int) -> None:
        self.calls.append(f"reopen {sock.fileno()} {snd_wnd}")

    def segment_counts(self, sock: socket.socket) -> tuple[int, int]:
        self.calls.append(f"segments {sock.fileno()}")
        return self.segments


class FakeRepair:
    """The repair helper (RepairPort and its RepairSupply): records each batch's mode and fds."""

    def __init__(self) -> None:
        self.calls: list[tuple[RepairMode, list[int]]] = []
        self.reconnects = 0
        self.can_arm = False

    async def freeze_armed(self, count: int) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((RepairMode.FREEZE_ARMED, [count]))

    async def disarm(self) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((RepairMode.DISARM, []))

    async def set_repair(
        self,
        socks: Sequence[socket.socket],
        mode: RepairMode,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((mode, [s.fileno() for s in socks]))
        if progress is not None:
            progress(len(socks))

    async def get(self) -> RepairPort:
        await trio.lowlevel.checkpoint()
        return self


async def read_all(sock: socket.socket) -> bytes:
    """Everything a migration wrote into ``sock``'s peer, until it closed."""
    tsock = trio.socket.from_stdlib_socket(sock)
    data = bytearray()
    while chunk := await tsock.recv(65536):
        data += chunk
    return bytes(data)


def decode_stream(data: bytes) -> list[StreamEvent]:
    """A whole migration stream's events; raises unless it ended with its trailer."""
    decoder = StreamDecoder()
    events = decoder.feed_untrusted(data)
    decoder.eof()
    return events
