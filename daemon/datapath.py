"""The data path: one guest's frontend, stack and flow tables, and their tasks.

Theory of operation. Frames from the guest arrive through the frontend
(ferryd.frontends.base.Frontend: a tap today) and are dispatched by the
stack (ferryd.stack) to the services and the flow tables (ferryd.flows),
which map them onto host sockets; what comes back from the sockets leaves
through the stack and the frontend again. All of it runs as one
*generation* of tasks: the frontend's reader, the timers (NDP, datagram
expiry), the TCP reactor and listeners, every UDP and ICMP flow's task.

A live migration needs four things of this, and only these
(ferryd.migration.host.MigrationHost names them): :meth:`DataPath.stop`
cancels the generation, after which no frame and no socket event is handled
(the freeze); :meth:`DataPath.start` runs a new generation on the same
tables (a rollback, or a target's resume); :meth:`DataPath.rebuild` makes a
fresh stack and empty tables for a link (a target learns the guest's link
from the stream's header); and the handover of the guest's frames between
two frontends (:meth:`DataPath.hand_over`, :meth:`DataPath.take_over`).

The tables are kept between generations (their sockets stay open while
frozen), so a stopped data path still owns every flow; its generations run
in a nursery of its own (:meth:`DataPath.run`), which lives as long as the
daemon does.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Any

import trio

from ferryd.counters import Registry
from ferryd.descriptors import DescriptorBudget
from ferryd.flows.destinations import DestinationPolicy, Destinations
from ferryd.flows.icmp import IcmpFlows
from ferryd.flows.portspec import ForwardError, PortForward
from ferryd.flows.tcp import TcpFlows, new_peek_buffer
from ferryd.flows.udp import UdpFlows
from ferryd.frontends.base import Frontend
from ferryd.link import LinkConfig
from ferryd.stack import Stack

log = logging.getLogger("ferryd")

#: UDP and ICMP flows are looked at for expiry this often (seconds); TCP
#: connections' idle limit less often (TcpFlows.expire).
EXPIRY_INTERVAL = 1.0


class DataPath:
    """Owns the frontend, the stack and the flow tables of one guest."""

    def __init__(
        self,
        frontend: Frontend,
        link: LinkConfig,
        destinations: Destinations,
        budget: DescriptorBudget,
        max_flows: int,
        now: float,
        counters: Registry,
        *,
        tcp_forwards: Sequence[PortForward] = (),
        udp_forwards: Sequence[PortForward] = (),
        max_queue: int = 0,
    ) -> None:
        self.frontend = frontend
        self.configured_link = link
        """The link this ferryd was started with (a migration's stream may bring another)."""
        self.tcp_forwards, self.udp_forwards = tuple(tcp_forwards), tuple(udp_forwards)
        """The forwards of the command line (bound by :meth:`bind_forwards`)."""
        self.counters = counters
        """Where this data path's components are counted (``ferryctl status``)."""
        counters.add("frontend", frontend.counters)
        counters.add("refusals", destinations.counters)
        counters.add("descriptors", budget.counters)
        self.destinations = destinations
        """Where the guest may send (all protocols), and the refusals' counters."""
        self.budget = budget
        self.max_flows = max_flows
        self.max_queue = max_queue
        """--max-queue: every TCP socket's buffers capped at this (0: autotuning)."""
        self.stranded: list[socket.socket] = []
        """Sockets a failed migration could not close silently: kept open, unused."""
        self._home: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()
        self._done.set()
        self._peek_buffer = new_peek_buffer()
        """Every TcpFlows built here peeks into it (see new_peek_buffer)."""
        self._build(link, now)

    def rebuild(self, link: LinkConfig, now: float) -> None:
        """A stack and empty flow tables for ``link`` (no tasks yet; stopped).

        The old tables' listeners and sockets are closed, not left behind: a
        target started running (QEMU's LOAD, ferryd.migration.target) bound
        its forwards, and the stream's listeners bind the same ports. A
        connection still there is reset (nothing will serve it; a discarded
        restore took its own out of the table first, silently).
        """
        self.tcp.close(now)
        self.udp.close()
        self.icmp.close()
        self.tcp.close_reactor()
        self._build(link, now)

    async def bind_forwards(self) -> None:
        """Bind the command line's forwards; ForwardError names the first that fails."""
        for fwd in self.udp_forwards:
            await self.udp.add_forward(fwd)
        for fwd in self.tcp_forwards:
            await self.tcp.add_forward(fwd)

    async def reset(self, now: float) -> None:
        """The stack and tables this ferryd started with (stopped), its forwards bound
        again (ferryd.migration.host.MigrationHost.reset).

        A forward whose port was taken meanwhile is left out, logged: the
        guest is served without it rather than not at all.
        """
        self.rebuild(self.configured_link, now)
        for flows, forwards in ((self.udp, self.udp_forwards), (self.tcp, self.tcp_forwards)):
            for fwd in forwards:
                try:
                    await flows.add_forward(fwd)
                except ForwardError as exc:
                    log.error("serving a new guest without a forward: %s", exc)

    def _build(self, link: LinkConfig, now: float) -> None:
        self.link = link
        self.stack = Stack(link, self.frontend, now)
        self.destinations.set_link(link)
        kw: dict[str, Any] = {
            "destinations": self.destinations,
            "limit": self.max_flows,
            "budget": self.budget,
        }
        self.udp = UdpFlows(self.stack, link, None, **kw)
        self.icmp = IcmpFlows(self.stack, link, None, **kw)
        self.tcp = TcpFlows(
            self.stack,
            link,
            None,
            max_queue=self.max_queue or None,
            peek_buffer=self._peek_buffer,
            **kw,
        )
        self.budget.track(f.table for f in (self.tcp, self.udp, self.icmp))
        self.stack.udp, self.stack.icmp, self.stack.tcp = self.udp, self.icmp, self.tcp
        # Registered again: the counts start over with the new components.
        self.counters.add("stack", self.stack.counters)
        for name, flows in (("tcp", self.tcp), ("udp", self.udp), ("icmp", self.icmp)):
            self.counters.add(name, flows.counters)

    # --- what migration reads and sets (ferryd.migration.host) ------------

    @property
    def guest_mac(self) -> bytes | None:
        return self.stack.guest_mac

    @guest_mac.setter
    def guest_mac(self, mac: bytes | None) -> None:
        self.stack.guest_mac = mac

    @property
    def policy(self) -> DestinationPolicy:
        return self.destinations.policy

    # --- the tasks ----------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the data path's generations until cancelled (see the module docstring)."""
        async with trio.open_nursery() as home:
            self._home = home
            task_status.started()
            await trio.sleep_forever()

    async def start(self) -> None:
        """Run a generation: frames and socket events are handled from now on."""
        assert self._home is not None, "DataPath.run() first"
        self._scope = await self._home.start(self._generation)

    async def stop(self) -> None:
        """Freeze: no frame from the guest, no socket event is handled after this."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        await self._done.wait()

    async def _generation(self, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        self._done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    for flows in (self.tcp, self.udp, self.icmp):
                        flows.attach(nursery)
                    nursery.start_soon(self._frames)
                    nursery.start_soon(self._timers)
                    task_status.started(scope)
        finally:
            for flows in (self.tcp, self.udp, self.icmp):
                flows.attach(None)
            self._done.set()

    async def _frames(self) -> None:
        stack, clock = self.stack, trio.current_time
        await self.frontend.run(
            lambda frame, trusted: stack.receive_frame(frame, clock(), trusted),
            lambda: stack.flush(clock()),
        )

    async def _timers(self) -> None:
        next_expiry = trio.current_time() + EXPIRY_INTERVAL
        while True:
            now = trio.current_time()
            if now >= next_expiry:
                self.udp.expire(now)
                self.icmp.expire(now)
                self.tcp.expire(now)
                next_expiry = now + EXPIRY_INTERVAL
            self.stack.handle_timer(now)
            deadline = next_expiry
            ndp = self.stack.next_timer()
            if ndp is not None:
                deadline = min(deadline, ndp)
            await trio.sleep_until(deadline)

    # --- the guest's handover -------------------------------------------------

    def hand_over(self, *, drain: bool) -> None:
        """Give the guest's frames up to the other ferryd (a source at its freeze).

        With ``drain`` (the data path just stopped), what the guest already
        queued for us is handled first (Frontend.drain): giving the queue up
        drops it, and for the guest that is data already sent.
        Without (a target giving up a migration), what was queued is dropped:
        the source owns the guest's connections again.
        """
        if drain:
            stack, now = self.stack, trio.current_time()
            self.frontend.drain(
                lambda frame, trusted: stack.receive_frame(frame, now, trusted),
                lambda: stack.flush(now),
            )
        self.frontend.hand_over()

    def take_over(self) -> None:
        """Take the guest's frames from now on (held unread until :meth:`start`)."""
        self.frontend.take_over()
