"""ferryd: the per-guest daemon's entry point.

Start-up order matters, because privilege is only held during setup:

1. parse options and work out the guest's addressing (ferryd.config);
   an impossible configuration exits 2 with a one-line message;
2. raise the open-file soft limit to the hard one (every flow is a socket);
3. create/attach the tap in the guest's namespace (privileged), or attach
   the /dev/net/tun descriptor we were given, opened in that namespace by
   our caller (--tap-fd, socket activation: no privilege needed at all);
4. bind forwarded ports and the control socket (ports < 1024 need
   CAP_NET_BIND_SERVICE); the control socket stays the starting user's
   (mode 0600), so the user ferryd becomes next cannot drive it;
5. drop privileges (ferryd.privileges): become ``--runas`` (nobody by
   default) when started as root, keep no capability but
   CAP_NET_BIND_SERVICE when a forward needs it (a migration binds
   forwards again), no_new_privs, non-dumpable;
6. install the seccomp allow-list (ferryd.syscall_filter);
7. run the data path until SIGTERM/SIGINT, then exit 0.

Readiness is reported through the control socket: ``status`` answers
``ready: true`` once the frontend is up and the addresses are known, which is
what ``ferryctl status --wait`` polls for.
"""

import logging
import os
import resource
import signal
import socket
import stat
from typing import Any

import trio

from ferryd.config import (
    ConfigError,
    Options,
    make_link_config,
    netns_path,
    parse_options,
)
from ferryd.control import ControlAddressInUse, ControlBindError, ControlError, ControlServer
from ferryd.counters import Registry, Snapshot
from ferryd.descriptors import DescriptorBudget
from ferryd.exits import EXIT_RUNTIME, EXIT_USAGE, StartupError, exit_on_failure
from ferryd.flows.destinations import DestinationPolicy, Destinations
from ferryd.flows.icmp import IcmpFlows
from ferryd.flows.portspec import ForwardError
from ferryd.flows.tcp import TcpFlows
from ferryd.flows.udp import UdpFlows
from ferryd.frontends.tap import TapFrontend, TapGone, TapSetupError
from ferryd.frontends.tap_fd import TapFdError, inherited_tap_fd
from ferryd.host_addresses import AddressWatch
from ferryd.link import LinkConfig
from ferryd.privileges import (
    Identity,
    PrivilegeError,
    drop_privileges,
    needs_bind_service,
    resolve_runas,
)
from ferryd.stack import Stack
from ferryd.syscall_filter import install_syscall_filter
from ferryd.wire.ethernet import format_mac

log = logging.getLogger("ferryd")

EXPIRY_INTERVAL = 1.0


def raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def link_summary(link: LinkConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"mac": format_mac(link.mac), "mtu": link.mtu}
    if link.ipv4 is not None:
        v4 = link.ipv4
        out["ipv4"] = {
            "address": f"{v4.address}/{v4.prefixlen}",
            "gateway": str(v4.gateway),
            "dns": [str(d) for d in v4.dns],
        }
    if link.ipv6 is not None:
        v6 = link.ipv6
        out["ipv6"] = {
            "address": f"{v6.address}/{v6.prefixlen}",
            "gateway": str(v6.gateway),
            "dns": [str(d) for d in v6.dns],
        }
    return out


def status_counters(snapshot: Snapshot) -> dict[str, Any]:
    """The flat counters ``status`` has always shown, from the registry's groups.

    Scripts and tests read these keys; the groups themselves follow them
    in ``status["counters"]`` (their names never clash with these).
    """
    stack, refusals = snapshot["stack"], snapshot["refusals"]
    return {
        "frames_in": stack["frames_in"],
        "frames_out": stack["frames_out"],
        "malformed": stack["malformed"],
        "frame_errors": stack["frame_errors"],
        "flow_errors": sum(snapshot[p]["flow_errors"] for p in ("tcp", "udp", "icmp")),
        "ignored": stack["ignored"],
        "dropped_out": snapshot["tap"]["dropped_out"],
        "refused": {p: refusals[p] for p in ("tcp", "udp", "icmp")},
        "refusals_unanswered": refusals["unanswered"],
    }


class Daemon:
    """Owns the frontend, the stack and the flow tables of one guest.

    Two nurseries: the outer one holds what lives as long as the process
    (control socket, migration tasks); the data path's (tap reader, timers,
    the TCP reactor and listeners, every UDP and ICMP flow's task) is
    cancelled when a migration freezes the guest and started again on
    rollback, or on a target when it resumes.
    """

    def __init__(
        self, opts: Options, link: LinkConfig, tap: TapFrontend, runas: Identity | None = None
    ) -> None:
        self.opts = opts
        self.runas = runas
        self.tap = tap
        # Every flow's socket counts against RLIMIT_NOFILE (ferryd.descriptors).
        listeners = sum(
            1 if fwd.bind is not None else 2
            for spec in (*opts.tcp_forwards, *opts.udp_forwards)
            for fwd in spec
        )
        self.budget = DescriptorBudget.from_rlimit(listeners)
        self.budget.warn_if_short(opts.max_flows)
        self.host_addresses = AddressWatch()
        policy = DestinationPolicy(link, opts.map_gw, opts.no_link_local)
        self.destinations = Destinations(policy.with_host_addresses(self.host_addresses.addresses))
        """Where the guest may send (all protocols), and the refusals' counters."""
        self.counters = Registry()
        """Everything ferryd counts, by component (``ferryctl status``, ``counters``)."""
        self.counters.add("tap", tap.counters)
        self.counters.add("refusals", self.destinations.counters)
        self.counters.add("descriptors", self.budget.counters)
        # self.counters.add("migration", ...): the migration controller's MigrationCounters.
        self.build(link, trio.current_time())
        self.ready = False
        self.role = "incoming" if opts.incoming else "running"
        self.host_netns = os.stat("/proc/self/ns/net").st_ino
        self.outer: trio.Nursery | None = None
        self._data_scope: trio.CancelScope | None = None
        self._data_done = trio.Event()
        self._data_done.set()
        self.repair_source: Any = None
        self.migration: Any = None
        self.stranded: list[socket.socket] = []
        """Sockets a failed migration could not close silently: kept open, unused."""
        """The migration in progress (ferryd.migration.source/target), if any."""
        self.exit_requested = trio.Event()

    def build(self, link: LinkConfig, now: float) -> None:
        """A stack and empty flow tables for ``link`` (no tasks yet)."""
        self.link = link
        self.stack = Stack(link, self.tap, now)
        self.destinations.set_link(link)
        kw: dict[str, Any] = {
            "destinations": self.destinations,
            "limit": self.opts.max_flows,
            "budget": self.budget,
        }
        self.udp = UdpFlows(self.stack, link, None, **kw)
        self.icmp = IcmpFlows(self.stack, link, None, **kw)
        self.tcp = TcpFlows(self.stack, link, None, **kw)
        self.budget.track(f.table for f in (self.tcp, self.udp, self.icmp))
        self.stack.udp, self.stack.icmp, self.stack.tcp = self.udp, self.icmp, self.tcp
        self.counters.add("stack", self.stack.counters)
        for name, flows in (("tcp", self.tcp), ("udp", self.udp), ("icmp", self.icmp)):
            self.counters.add(name, flows.counters)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from ferryd.migration import control_handlers

        async with trio.open_nursery() as outer:
            self.outer = outer
            outer.start_soon(self._watch_addresses)
            if not self.opts.incoming:
                for spec in self.opts.udp_forwards:
                    for fwd in spec:
                        await self.udp.add_forward(fwd)
                for spec in self.opts.tcp_forwards:
                    for fwd in spec:
                        await self.tcp.add_forward(fwd)
            if self.opts.control:
                control = ControlServer(self.opts.control)
                control.register("status", self._status)
                control.register("flows", self._flows)
                control.register("counters", self._counters)
                control_handlers.register(control, self)
                await outer.start(control.serve)
            await control_handlers.setup(self)
            forwards = self.opts.tcp_forwards + self.opts.udp_forwards
            drop_privileges(
                self.runas,
                keep_bind_service=needs_bind_service(f.host_port for s in forwards for f in s),
            )
            install_syscall_filter()
            if not self.opts.incoming:
                await self.start_data_path()
            self.ready = True
            log.info("ready (%s): %s", self.role, link_summary(self.link))
            task_status.started()

    async def _watch_addresses(self) -> None:
        """Keep the policy's view of the host's own addresses current."""
        try:
            await self.host_addresses.watch(self.destinations.set_host_addresses)
        finally:
            self.host_addresses.close()

    # --- the data path ----------------------------------------------------

    async def start_data_path(self) -> None:
        assert self.outer is not None
        self._data_scope = await self.outer.start(self._data_path)

    async def stop_data_path(self) -> None:
        """Freeze: no frame from the guest, no socket event is handled after this."""
        if self._data_scope is not None:
            self._data_scope.cancel()
            self._data_scope = None
        await self._data_done.wait()

    async def _data_path(self, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        self._data_done = trio.Event()
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
            self._data_done.set()

    async def _frames(self) -> None:
        stack, clock = self.stack, trio.current_time
        await self.tap.run(
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
                next_expiry = now + EXPIRY_INTERVAL
            self.stack.handle_timer(now)
            deadline = next_expiry
            ndp = self.stack.next_timer()
            if ndp is not None:
                deadline = min(deadline, ndp)
            await trio.sleep_until(deadline)

    # --- control ----------------------------------------------------------

    async def _status(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        counters = self.counters.snapshot()
        return {
            "ready": self.ready,
            "role": self.role,
            "host_netns": self.host_netns,
            "frontend": {"kind": "tap", "name": self.opts.tap, "netns": self.opts.netns},
            "link": link_summary(self.link),
            "guest_mac": format_mac(self.stack.guest_mac) if self.stack.guest_mac else None,
            "counters": {**status_counters(counters), **counters},
            "flows": {
                "tcp": len(self.tcp.table),
                "udp": len(self.udp.table),
                "icmp": len(self.icmp.table),
            },
            "descriptors": self.budget.snapshot(),
            # A source's pending rollback and why (SourceMigration.status).
            "migration": self.migration.status() if hasattr(self.migration, "status") else None,
        }

    async def _counters(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"counters": self.counters.snapshot()}

    async def _flows(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        if fds:
            raise ControlError("'flows' takes no file descriptors")
        return {"flows": self.tcp.snapshot() + self.udp.snapshot() + self.icmp.snapshot()}


async def serve(
    opts: Options, link: LinkConfig, tap: TapFrontend, runas: Identity | None = None
) -> None:
    daemon = Daemon(opts, link, tap, runas)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            nursery.start_soon(_exit_on_request, daemon, nursery.cancel_scope)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                if daemon.role in ("running", "restored"):
                    # Reset every TCP connection both ways: a guest or a peer
                    # left waiting on a connection nobody serves would hang.
                    # (A migrated source's frozen sockets close silently.)
                    daemon.tcp.close()
                nursery.cancel_scope.cancel()
                break


async def _exit_on_request(daemon: Daemon, scope: trio.CancelScope) -> None:
    """A migrated source exits once its linger time is over."""
    await daemon.exit_requested.wait()
    scope.cancel()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``ferryd``; exit statuses as ``--help`` documents them."""
    opts = parse_options(argv)
    level = logging.WARNING - 10 * min(opts.verbose + 1, 2)
    logging.basicConfig(level=level, format="ferryd[%(process)d] %(name)s: %(message)s")
    exit_on_failure(
        "ferryd",
        lambda: _run(opts),
        {
            ConfigError: EXIT_USAGE,
            TapSetupError: EXIT_USAGE,
            TapFdError: EXIT_USAGE,
            PrivilegeError: EXIT_USAGE,
            TapGone: EXIT_RUNTIME,
            ControlAddressInUse: EXIT_USAGE,
            ControlBindError: EXIT_RUNTIME,
            ForwardError: EXIT_RUNTIME,
            StartupError: EXIT_RUNTIME,
        },
        verbose=opts.verbose > 0,
    )


def _run(opts: Options) -> None:
    link = make_link_config(opts)
    runas = resolve_runas(opts.runas)
    raise_file_limit()
    if opts.repair_socket is not None:
        warn_if_nobody_listens(opts.repair_socket)
    given = inherited_tap_fd(os.environ, opts.tap_fd)
    if given is not None:
        if opts.config_net:
            raise ConfigError(
                "--config-net needs ferryd to configure the tap itself; with a tap descriptor"
                " (--tap-fd or socket activation) whoever created the tap configures it"
            )
        tap = TapFrontend.adopt(given, opts.tap, incoming=opts.incoming)
    else:
        tap = TapFrontend.open(
            netns_path(opts.netns),
            opts.tap,
            link,
            opts.config_net and not opts.incoming,
            incoming=opts.incoming,
        )
    try:
        trio.run(serve, opts, link, tap, runas)
    finally:
        tap.close()


def warn_if_nobody_listens(path: str) -> None:
    """Say at start that ``--repair-socket`` leads nowhere yet.

    Not an error: ferry-repair may be socket-activated or started later, and
    it is needed only when a migration begins; but an operator who mistyped
    the path should learn it now, not at the first migration. Only looked
    at, never connected to: a connection would start a socket-activated
    ferry-repair (and write a line in its log) at every ferryd start.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        log.warning(
            "--repair-socket %s: nothing listens there yet (%s); migration needs ferry-repair"
            " there",
            path,
            exc.strerror or exc,
        )
        return
    if not stat.S_ISSOCK(mode):
        log.warning("--repair-socket %s: not a socket; migration needs ferry-repair there", path)


if __name__ == "__main__":
    main()
