"""ferryd: the per-guest daemon's entry point.

Start-up order matters, because privilege is only held during setup:

1. parse options and work out the guest's addressing (ferryd.config);
   an impossible configuration exits 2 with a one-line message;
2. raise the open-file soft limit to the hard one (every flow is a socket);
3. create/attach the tap in the guest's namespace (privileged), or attach
   the /dev/net/tun descriptor we were given, opened in that namespace by
   our caller (--tap-fd, socket activation: no privilege needed at all);
   or, with --socket, listen for QEMU's stream netdev or (--vhost-user) its
   vhost-user device (no privilege);
4. bind forwarded ports and the control socket (ports < 1024 need
   CAP_NET_BIND_SERVICE); the control socket stays the starting user's
   (mode 0600), so the user ferryd becomes next cannot drive it;
5. drop privileges (ferryd.privileges): become ``--runas`` (nobody by
   default) when started as root, keep no capability but
   CAP_NET_BIND_SERVICE when a forward needs it (a migration binds
   forwards again), no_new_privs, non-dumpable;
6. install the seccomp allow-list (ferryd.syscall_filter);
7. run the data path until SIGTERM/SIGINT, then exit 0.

With ``--daemonize`` (passt's way, for libvirt: ferryd.background) the
process forks before step 1, and the starting process exits once step 7
is reached (or with the child's status if it fails first); ``--pid``
is written then.

Readiness is reported through the control socket: ``status`` answers
``ready: true`` once the frontend is up and the addresses are known, which is
what ``ferryctl status --wait`` polls for; under a ``Type=notify`` unit
systemd hears it too (``READY=1``, ferryd.sd_notify).
"""

import logging
import os
import resource
import signal
import stat
from typing import Any

import trio

from ferryd import migration_control
from ferryd.background import Background
from ferryd.collector import freeze_imports
from ferryd.config import (
    ConfigError,
    Options,
    make_link_config,
    netns_path,
    parse_options,
)
from ferryd.control import ControlAddressInUse, ControlBindError, ControlServer
from ferryd.counters import Registry, Snapshot
from ferryd.datapath import DataPath
from ferryd.descriptors import DescriptorBudget, presize_fd_table
from ferryd.exits import EXIT_RUNTIME, EXIT_USAGE, StartupError, exit_on_failure
from ferryd.flows.destinations import DestinationPolicy, Destinations
from ferryd.flows.portspec import ForwardError
from ferryd.frontends.base import Frontend
from ferryd.frontends.stream import StreamAddressInUse, StreamFrontend, StreamSetupError
from ferryd.frontends.tap import TapFrontend, TapGone, TapSetupError
from ferryd.frontends.tap_fd import TapFdError, inherited_tap_fd
from ferryd.frontends.vhost_user.frontend import VhostUserFrontend
from ferryd.host_addresses import AddressWatch
from ferryd.http_metrics import MetricsServer
from ferryd.link import LinkConfig
from ferryd.logformat import configure as configure_logging
from ferryd.metrics import MetricsView, render
from ferryd.migration.controller import MigrationController
from ferryd.migration.repair_source import RepairSource
from ferryd.migration.roles import Role
from ferryd.migration_device_state import DeviceStateMigration
from ferryd.pcap import CapturingFrontend, PcapFile
from ferryd.privileges import (
    Identity,
    PrivilegeError,
    drop_privileges,
    needs_bind_service,
    resolve_runas,
)
from ferryd.sd_notify import Notifier
from ferryd.syscall_filter import install_syscall_filter
from ferryd.wire.ethernet import format_mac

log = logging.getLogger("ferryd")

#: How long a target stopped between restore and resume waits for its discard
#: (a pre-copied socket goes back into repair mode through ferry-repair first).
STOP_DISCARD_TIMEOUT = 10.0


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
    stack, refusals, frontend = snapshot["stack"], snapshot["refusals"], snapshot["frontend"]
    return {
        "frames_in": frontend["frames_in"],
        # Every frame sent toward the guest, delivered or dropped.
        "frames_out": frontend["frames_out"] + frontend["dropped_out"],
        "malformed": stack["malformed"],
        "frame_errors": stack["frame_errors"],
        "flow_errors": sum(snapshot[p]["flow_errors"] for p in ("tcp", "udp", "icmp")),
        "ignored": stack["ignored"],
        "dropped_out": frontend["dropped_out"],
        "refused": {p: refusals[p] for p in ("tcp", "udp", "icmp")},
        "refusals_unanswered": refusals["unanswered"],
    }


class Daemon:
    """Composes one guest's data path, its migration controller and the control socket.

    The layers, each knowing only those below it: the frontend (a tap:
    ferryd.frontends) under the data path (ferryd.datapath: the stack, the
    flow tables and their tasks), which the migration controller
    (ferryd.migration) drives through the narrow interface it defines
    (ferryd.migration.host); the control socket (ferryd.control) reaches
    the controller through ferryd.migration_control. Only this class knows
    them all, and nothing imports this module.

    Task lifetimes: what lives as long as the process (the address watch,
    the control socket, the migrations' background tasks) runs in the outer
    nursery; the data path's tasks run in generations inside it
    (DataPath.run), cancelled when a migration freezes the guest and
    started again on rollback, or on a target when it resumes.
    """

    def __init__(
        self, opts: Options, link: LinkConfig, frontend: Frontend, runas: Identity | None = None
    ) -> None:
        self.opts = opts
        self.runas = runas
        # Every flow's socket counts against RLIMIT_NOFILE (ferryd.descriptors).
        listeners = sum(
            1 if fwd.bind is not None else 2
            for spec in (*opts.tcp_forwards, *opts.udp_forwards)
            for fwd in spec
        )
        budget = DescriptorBudget.from_rlimit(listeners)
        budget.warn_if_short(opts.max_flows)
        self.host_addresses = AddressWatch()
        policy = DestinationPolicy(link, opts.map_gw, opts.no_link_local)
        destinations = Destinations(policy.with_host_addresses(self.host_addresses.addresses))
        self.counters = Registry()
        """Everything ferryd counts, by component (``ferryctl status``, ``counters``)."""
        # --pcap: opened now, before the privilege drop (ferryd.pcap).
        self.pcap = _open_capture(opts.pcap)
        if self.pcap is not None:
            self.counters.add("pcap", self.pcap.counters)
        self.data = DataPath(
            frontend if self.pcap is None else CapturingFrontend(frontend, self.pcap),
            link,
            destinations,
            budget,
            opts.max_flows,
            trio.current_time(),
            self.counters,
            tcp_forwards=[fwd for spec in opts.tcp_forwards for fwd in spec],
            udp_forwards=[fwd for spec in opts.udp_forwards for fwd in spec],
            max_queue=opts.max_queue,
        )
        self.exit_requested = trio.Event()
        self.migration = MigrationController(
            self.data,
            RepairSource(opts.repair_socket, opts.repair_listen),
            incoming=opts.incoming,
            linger=opts.linger,
            handed_over=self.exit_requested.set,
            precopy_quiet=opts.precopy_quiet,
        )
        self.counters.add("migration", self.migration.counters)
        # vhost-user: QEMU drives the migration through the device state.
        self.vhost_user = frontend if isinstance(frontend, VhostUserFrontend) else None
        if self.vhost_user is not None:
            self.vhost_user.handler = DeviceStateMigration(self.migration)
        self.ready = False
        self.host_netns = os.stat("/proc/self/ns/net").st_ino
        # --metrics: bound now, before the privilege drop and the seccomp filter.
        self.metrics_server: MetricsServer | None = None
        if opts.metrics is not None:
            self.metrics_server = MetricsServer(opts.metrics, self.metrics_text)
            self.metrics_server.bind()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        data = self.data
        async with trio.open_nursery() as outer:
            outer.start_soon(self._watch_addresses)
            await outer.start(data.run)
            if not self.opts.incoming:
                await data.bind_forwards()
            if self.opts.control:
                control = ControlServer(self.opts.control)
                control.register("status", self._status, max_fds=0)
                control.register("flows", self._flows, max_fds=0)
                control.register("counters", self._counters, max_fds=0)
                control.register("metrics", self._metrics, max_fds=0)
                control.register("history", self._history, max_fds=0)
                migration_control.register(control, self.migration)
                await outer.start(control.serve)
            await outer.start(self.migration.run)
            if self.metrics_server is not None:
                await outer.start(self.metrics_server.serve)
            forwards = self.opts.tcp_forwards + self.opts.udp_forwards
            drop_privileges(
                self.runas,
                keep_bind_service=needs_bind_service(f.host_port for s in forwards for f in s),
            )
            install_syscall_filter()
            if self.vhost_user is not None:
                # QEMU's control connection outlives the data path's generations;
                # served only now, unprivileged and filtered (it maps QEMU's memory).
                await outer.start(self.vhost_user.serve)
            if not self.opts.incoming:
                await data.start()
            self.ready = True
            log.info("ready (%s): %s", self.migration.role, link_summary(data.link))
            task_status.started()

    async def _watch_addresses(self) -> None:
        """Keep the policy's view of the host's own addresses current."""
        try:
            await self.host_addresses.watch(self.data.destinations.set_host_addresses)
        finally:
            self.host_addresses.close()

    # --- control ----------------------------------------------------------

    async def _status(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        data = self.data
        counters = self.counters.snapshot()
        return {
            "ready": self.ready,
            "role": str(self.migration.role),
            "host_netns": self.host_netns,
            "frontend": data.frontend.describe(),
            "link": link_summary(data.link),
            "guest_mac": format_mac(data.stack.guest_mac) if data.stack.guest_mac else None,
            "counters": {**status_counters(counters), **counters},
            "flows": {p: counters[p]["flows"] for p in ("tcp", "udp", "icmp")},
            "descriptors": data.budget.snapshot(),
            # A source's pending rollback and why (SourceMigration.status).
            "migration": self.migration.status(),
        }

    async def _counters(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"counters": self.counters.snapshot()}

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of everything counted now (ferryd.metrics)."""
        return render(
            MetricsView(
                counters=self.counters.snapshot(),
                gauges=self.counters.gauges(),
                role=str(self.migration.role),
                ready=self.ready,
                descriptors=self.data.budget.snapshot(),
                history=self.migration.history.records(),
            )
        )

    async def _metrics(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"text": self.metrics_text().decode()}

    async def _history(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"history": [r.as_dict() for r in self.migration.history.records()]}

    async def _flows(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        data = self.data
        return {"flows": data.tcp.snapshot() + data.udp.snapshot() + data.icmp.snapshot()}


async def serve(
    opts: Options,
    link: LinkConfig,
    frontend: Frontend,
    runas: Identity | None = None,
    background: Background | None = None,
) -> None:
    daemon = Daemon(opts, link, frontend, runas)
    systemd = Notifier.from_environ()  # Type=notify units: ferryd@, ferryd-netns@
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            systemd.ready(f"serving the guest ({daemon.migration.role})")
            if background is not None:
                background.ready()  # --pid, --daemonize
            if opts.one_off:
                assert isinstance(frontend, StreamFrontend | VhostUserFrontend)  # parse_options
                nursery.start_soon(_exit_when_qemu_left, daemon, frontend, nursery.cancel_scope)
            nursery.start_soon(_exit_on_request, daemon, nursery.cancel_scope)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                role = daemon.migration.role
                if role is Role.RUNNING:
                    # Reset every TCP connection both ways: a guest or a peer
                    # left waiting on a connection nobody serves would hang.
                    # (A migrated source's frozen sockets close silently.)
                    daemon.data.tcp.close(trio.current_time())
                elif role is Role.RESTORED:
                    # Restored, not resumed: the source still owns the guest's
                    # connections (in one namespace, the very sockets) and rolls
                    # back when this one is gone. Let go of them as migrate-abort
                    # does, without a word to either side.
                    try:
                        with trio.move_on_after(STOP_DISCARD_TIMEOUT):
                            await daemon.migration.abort()
                    except Exception as exc:  # shutting down anyway: say so, go on
                        log.error("discarding the restored connections: %s", exc)
                else:
                    # A migrated source: its frozen sockets must close silently.
                    with trio.move_on_after(STOP_DISCARD_TIMEOUT) as waited:
                        await daemon.migration.before_exit()
                    if waited.cancelled_caught:
                        log.error(
                            "exiting with migrated connections not in repair mode: their"
                            " sockets here close with a FIN (no repair helper answered)"
                        )
                nursery.cancel_scope.cancel()
                break
        systemd.stopping("shutting down")


async def _exit_on_request(daemon: Daemon, scope: trio.CancelScope) -> None:
    """A migrated source exits once its linger time is over."""
    await daemon.exit_requested.wait()
    scope.cancel()


async def _exit_when_qemu_left(
    daemon: Daemon, frontend: StreamFrontend | VhostUserFrontend, scope: trio.CancelScope
) -> None:
    """``--one-off``: the first QEMU's connection ended, so the VM is gone: exit 0 (passt's
    tap_sock_reset()). A guest that ran here has its TCP connections reset both ways, as
    at SIGTERM; a target whose VM never ran here (its restored sockets still in repair
    mode) closes them silently. A migration source that is handing over or has handed
    over stays: passt's --one-off has no effect after a migration either, and the
    source's linger ends it (exiting now would reset connections the target owns)."""
    await frontend.first_qemu_ended.wait()
    role = daemon.migration.role
    if role is Role.RUNNING:
        daemon.data.tcp.close(trio.current_time())
    elif role not in (Role.INCOMING, Role.MIGRATING_IN, Role.RESTORED):
        log.info("QEMU left while this ferryd was %s: --one-off defers to the migration", role)
        return
    log.info("QEMU left (ferryd was %s): exiting (--one-off)", role)
    scope.cancel()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``ferryd``; exit statuses as ``--help`` documents them."""
    opts = parse_options(argv)
    level = logging.WARNING - 10 * min(opts.verbose + 1, 2)
    if opts.quiet:
        level = logging.WARNING
    configure_logging(level)
    exit_on_failure(
        "ferryd",
        lambda: _run(opts),
        {
            ConfigError: EXIT_USAGE,
            TapSetupError: EXIT_USAGE,
            TapFdError: EXIT_USAGE,
            PrivilegeError: EXIT_USAGE,
            TapGone: EXIT_RUNTIME,
            StreamAddressInUse: EXIT_USAGE,
            StreamSetupError: EXIT_RUNTIME,
            ControlAddressInUse: EXIT_USAGE,
            ControlBindError: EXIT_RUNTIME,
            ForwardError: EXIT_RUNTIME,
            StartupError: EXIT_RUNTIME,
        },
        verbose=opts.verbose > 0,
    )


def _run(opts: Options) -> None:
    # First: with --daemonize the caller's process waits here for the fork's readiness.
    background = Background.start(opts.pid_file, opts.daemonize, opts.log_file)
    try:
        link = make_link_config(opts)
        runas = resolve_runas(opts.runas)
        raise_file_limit()
        # Before any thread starts (ferryd.descriptors): a target's restore
        # must not wait for the kernel to grow the table in the downtime.
        presize_fd_table(opts.max_flows)
        if opts.repair_socket is not None:
            warn_if_nobody_listens(opts.repair_socket)
        frontend = _frontend(opts, link)
        # Everything alive now lives until exit: out of every full collection.
        freeze_imports()
        try:
            trio.run(serve, opts, link, frontend, runas, background)
        finally:
            frontend.close()
    finally:
        background.close()


def _frontend(opts: Options, link: LinkConfig) -> Frontend:
    """The guest's link: QEMU's vhost-user or stream socket (--socket), or the tap (--netns)."""
    if opts.socket is not None and opts.vhost_user:
        return VhostUserFrontend.listen(opts.socket)
    if opts.socket is not None:
        return StreamFrontend.listen(opts.socket, link.mtu, incoming=opts.incoming)
    assert opts.netns is not None  # parse_options: one of the two
    given = inherited_tap_fd(os.environ, opts.tap_fd)
    if given is not None:
        if opts.config_net:
            raise ConfigError(
                "--config-net needs ferryd to configure the tap itself; with a tap descriptor"
                " (--tap-fd or socket activation) whoever created the tap configures it"
            )
        return TapFrontend.adopt(given, opts.tap, incoming=opts.incoming, netns=opts.netns)
    return TapFrontend.open(
        netns_path(opts.netns),
        opts.tap,
        link,
        opts.config_net and not opts.incoming,
        incoming=opts.incoming,
    )


def _open_capture(path: str | None) -> PcapFile | None:
    if path is None:
        return None
    try:
        return PcapFile.create(path)
    except OSError as exc:
        raise StartupError(f"--pcap {path}: cannot create it: {exc.strerror or exc}") from exc


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
