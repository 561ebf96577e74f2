"""QEMU live migration with a vhost-user back-end: ferryd against passt, in the same run.

Run as root: ``python -m bench.qemu_migration [--backend passt|ferryd|both]
[--sizes 1 100 1000] [--runs 3] [--seconds 5]``.

Two back-ends serve the guest's virtio-net device over vhost-user, and
QEMU alone drives the migration (QMP; no ferryctl):

* **passt** + **passt-repair**, the reference: Debian's newest passt source
  package built into the cache (bench/passt_build.py), ``passt
  --vhost-user --socket PATH --foreground``; passt listens on
  ``PATH.repair`` and a passt-repair (root) connects there, one per side;
* **ferryd**: ``ferryd --socket PATH --vhost-user --control CTL
  --repair-socket R`` (the control socket only tells when it is ready),
  served by the bed's ferry-repair. The target is started with the same
  command line; QEMU's LOAD of the device state makes it the target. A
  ferryd without ``--vhost-user`` is reported as not measured.

The bed is the integration tests' two-host bed (testbed/migrationbed.py):
host A and host B with the same address and MAC, the peer on a fabric.
Both QEMUs run in the root namespace (a vhost-user socket is a path);
the source back-end runs in host A, the target's in host B.

**Migration rows**, per back-end, per N (``--sizes``), ``--runs`` times,
back-ends alternating so that they share the machine's moods: the source
VM boots (shared-memory RAM, vhost-user netdev) and takes its lease by
DHCP; in the guest ``guest_conns`` (testbed/guest_conns.c) opens N
connections to an echo server on the peer, each echoes a first checked
chunk, and ``--busy`` of them keep streaming both ways (``--busy-rate``
bytes/s in all). The target back-end and the target QEMU (``-incoming``)
start. QEMU migrates with ``pause-before-switchover`` and a downtime limit
of ``--downtime-limit`` ms (10: with QEMU's default 300 ms the final RAM
pass dominates the figure). When the source waits in ``pre-switchover``
(the guest stopped, the back-end not yet asked for its state; QEMU's
MIGRATION event says so the moment it happens: the bench waits on QMP
events, it does not poll, so QEMU answers no command during its
downtime) host A leaves the fabric, so that nothing reaches the source
after its back-end froze its sockets (passt's repair-mode sockets would
ACK and lose it);
then ``migrate-continue``; when QEMU reports ``completed`` host B joins the
fabric. In the guest, now on the target, every connection sends another
checked chunk, waits for the echo of everything it ever sent, half-closes
and waits for the server's EOF: a connection survives if every byte came
back in order and the close then completed both ways ("data echoed"
counts those whose bytes all came back, whatever their close did).
Reported: QEMU's ``downtime`` and ``total-time``
(query-migrate on the source), the bench's own work in the pause
(unplugging host A, migrate-continue; the pause is part of QEMU's
downtime, and the same work for both back-ends), the connections that
survived, and from QEMU's own trace events
(``vmstate_downtime_save``/``_load``, microseconds per device) the
virtio-net device's save on the source, which is the back-end's part of
QEMU's downtime (SET_DEVICE_STATE_FD, the stream read to EOF,
CHECK_DEVICE_STATE), and its load on the target, which QEMU does not
count (no return path: the source's downtime ends when it sent
everything) but which the guest waits for before it runs there. A second
table cuts the source's downtime at QEMU's own checkpoints
(:func:`downtime_phases`): the VM's stop (each ring's GET_VRING_BASE),
the pause in pre-switchover as QEMU saw it, RAM's last pass, the other
devices, the virtio-net device, the end; so a difference between
back-ends shows where it arises. A third cuts out each wait for the back-end's answers, from QEMU's
vhost-user trace events (:func:`backend_answers`): the two
GET_VRING_BASE, SET_DEVICE_STATE_FD, the stream to EOF and
CHECK_DEVICE_STATE; what is left of the phases is QEMU's own work on a
machine the back-end shares (ferryd's early freeze runs during the pause
and RAM's last pass).

**Late-failure rows** (``--late-failure-sizes``, default 100): the same
up to ``completed``, without touching the fabric; then the target QEMU is
killed before it runs and the source resumed with ``cont``, as a manager
does when the target dies: the source back-end, which saved its state
(froze its sockets), must carry on, and the connections are checked on
the source. passt does not (it leaves its sockets in repair mode); the
issue requires ferryd to.

**Throughput rows**, ``--runs`` rounds, each back-end once per round: a
fresh VM; ``iperf3 -c`` in the guest against ``iperf3 -s`` on the peer,
``--seconds`` long, guest→peer and peer→guest (``-R``). Gbit/s is iperf3's goodput
at the receiver; CPU s/GB is the back-end process's utime+stime
(/proc/PID/stat) during the run divided by the GB delivered.

Guests run under TCG unless the host has usable VMX/SVM (testbed/vm.py,
choose_accel); the report says which. Under TCG the guest's CPU, not the
back-end, bounds throughput; compare the ratios printed for the same run.
Nothing is asserted: failures are rows, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from bench.common import cpu_seconds, end_on_signals, wait_listening
from bench.passt_build import PasstBinaries, PasstBuildError, build_passt
from ferryd.netns import run_in_netns
from testbed.ferryd_process import FerrydFailed, FerrydProcess, launch
from testbed.guest_image import GuestImage, GuestImageError, build_guest_image
from testbed.guest_traffic import finish_conns, start_conns, wait_conns_ready
from testbed.migrationbed import MigrationBed, two_host_bed
from testbed.netns import Netns
from testbed.paths import FERRYD, TCPTOOL
from testbed.repair import raise_fd_limit
from testbed.vm import (
    MIGRATION_ENDED,
    Vm,
    VmError,
    choose_accel,
    qemu_unavailable,
    qemu_version,
    vhost_user_netdev,
)
from testbed.wait import WaitTimeout, wait_for

SIZES = (1, 100, 1000)
BACKENDS = ("passt", "ferryd")
ECHO_PORT = 7000
IPERF_PORT = 5201
#: rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/if.h).
RTM_NEWLINK, NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR, IFF_UP = 16, 1, 4, 2, 1
#: How long the guest's connections may take, after the migration, to finish their check.
CHECK_TIMEOUT = 60
#: After ``migrate-continue`` only device states are left; seconds, not minutes.
SWITCHOVER_TIMEOUT = 60
#: The most one row may take, all its own deadlines included (see _row_deadline).
ROW_TIMEOUT = 900.0


class BackendUnavailable(Exception):
    """A back-end cannot run here: the message says why (a row, not a crash)."""


class Running(Protocol):
    """A started back-end: its socket for QEMU, its PID (CPU accounting), its log."""

    socket_path: Path

    @property
    def pid(self) -> int: ...

    def log(self) -> str: ...
    def stop(self) -> None: ...


class Backend(Protocol):
    name: str

    def check(self) -> None:
        """Raise BackendUnavailable if this back-end cannot run here."""

    def start(self, bed: MigrationBed, host: Netns, name: str) -> Running:
        """Start it in *host* for QEMU; return once its socket is there."""


# -- passt


@dataclass
class _PasstRunning:
    socket_path: Path
    proc: subprocess.Popen[bytes]
    repair: subprocess.Popen[bytes]
    #: passt's standard error (until it logs to its file), and its log file (--log-file).
    log_path: Path
    passt_log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        text = ""
        for path in (self.log_path, self.passt_log):
            with contextlib.suppress(FileNotFoundError):
                text += path.read_text(errors="replace")
        return text[-4000:]

    def stop(self) -> None:
        for proc in (self.repair, self.proc):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(self.passt_log, self.log_path.with_suffix(".file.log"))
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)


class PasstBackend:
    """passt --vhost-user and passt-repair, built from Debian's source (bench/passt_build.py)."""

    name = "passt"

    def __init__(self) -> None:
        self.binaries: PasstBinaries | None = None

    def check(self) -> None:
        try:
            self.binaries = build_passt()
        except PasstBuildError as e:
            raise BackendUnavailable(str(e)) from None
        result = subprocess.run(
            [str(self.binaries.passt), "--help"], capture_output=True, text=True, check=False
        )
        if "--vhost-user" not in result.stdout + result.stderr:
            raise BackendUnavailable(f"{self.binaries.passt} has no --vhost-user")

    def start(self, bed: MigrationBed, host: Netns, name: str) -> Running:
        assert self.binaries is not None
        # passt started as root drops to nobody before it binds: a directory nobody may write.
        socket_dir = Path(tempfile.mkdtemp(prefix=f"passt-{name}-", dir=bed.tmp))
        os.chown(socket_dir, pwd.getpwnam("nobody").pw_uid, -1)
        socket_dir.chmod(0o755)
        socket_path = socket_dir / "s"
        log_path = bed.tmp / f"passt-{name}.log"
        # Its own log file: once isolated, a foreground passt no longer writes to stderr.
        passt_log = socket_dir / "log"
        argv = [str(self.binaries.passt), "--vhost-user", "--socket", str(socket_path),
                "--foreground", "--log-file", str(passt_log)]  # fmt: skip
        with log_path.open("wb") as log:
            proc = host.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        repair_path = Path(f"{socket_path}.repair")
        try:
            wait_for(
                lambda: (
                    (socket_path.is_socket() and repair_path.is_socket()) or proc.poll() is not None
                ),
                timeout=15,
                what="passt's sockets",
            )
        except WaitTimeout:
            proc.kill()
            proc.wait()
            raise BackendUnavailable(
                f"passt made no sockets in 15 s:\n{log_path.read_text()}"
            ) from None
        if proc.poll() is not None:
            raise BackendUnavailable(
                f"passt exited with status {proc.returncode}:\n{log_path.read_text()}"
            )
        running = _PasstRunning(socket_path, proc, self._repair(host, repair_path, bed.tmp, name),
                                log_path, passt_log)  # fmt: skip
        try:
            self._wait_helper(running, host, repair_path, bed.tmp, name)
        except BaseException:
            running.stop()
            raise
        return running

    def _repair(
        self, host: Netns, repair_path: Path, tmp: Path, name: str
    ) -> subprocess.Popen[bytes]:
        assert self.binaries is not None
        with (tmp / f"passt-repair-{name}.log").open("ab") as log:
            return host.popen(
                [str(self.binaries.passt_repair), str(repair_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip

    def _wait_helper(
        self, running: _PasstRunning, host: Netns, repair_path: Path, tmp: Path, name: str
    ) -> None:
        """Until passt says it accepted passt-repair; start it again if it found no listener.

        passt's ``.repair`` socket exists (bound) a moment before it listens:
        a passt-repair started in that moment is refused and exits, and passt
        then migrates without moving a single socket (and says "Migration
        complete"; seen here: 0 of 100 connections survived).
        """

        def accepted() -> bool:
            if "Accepted TCP_REPAIR helper" in running.log():
                return True
            if running.proc.poll() is not None:
                raise BackendUnavailable(f"passt exited:\n{running.log()}")
            if running.repair.poll() is not None:
                running.repair = self._repair(host, repair_path, tmp, name)
            return False

        try:
            wait_for(accepted, timeout=15, interval=0.05, what="passt to accept passt-repair")
        except WaitTimeout:
            raise BackendUnavailable(
                f"passt never accepted passt-repair:\n{running.log()}"
            ) from None


# -- ferryd


@dataclass
class _FerrydRunning:
    ferryd: FerrydProcess
    socket_path: Path

    @property
    def pid(self) -> int:
        return self.ferryd.pid

    def log(self) -> str:
        return self.ferryd.log()[-4000:]

    def stop(self) -> None:
        self.ferryd.stop()


class FerrydBackend:
    """``ferryd --socket PATH --vhost-user`` with the bed's ferry-repair.

    *binary* is this checkout's ferryd by default; ``--ferryd PATH`` measures
    another build (another branch's venv) with the same bench.
    """

    name = "ferryd"

    def __init__(self, binary: Path = FERRYD) -> None:
        self.binary = binary

    def check(self) -> None:
        if not self.binary.exists():
            raise BackendUnavailable(f"{self.binary} is missing (run scripts/bootstrap.sh)")
        result = subprocess.run(
            [str(self.binary), "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        if "--vhost-user" not in result.stdout:
            raise BackendUnavailable(f"this ferryd has no --vhost-user ({self.binary} --help)")

    def start(self, bed: MigrationBed, host: Netns, name: str) -> Running:
        socket_path = bed.tmp / f"{name}.qemu"
        control = str(bed.tmp / f"{name}.ctl")
        # The target's command line is the source's: QEMU's LOAD makes it the target.
        argv = [str(self.binary), "--socket", str(socket_path), "--vhost-user",
                "--control", control, "--repair-socket", bed.repair_socket]  # fmt: skip
        try:
            ferryd = launch(host, argv, control, bed.tmp / f"ferryd-{name}.log", bed.ferryds)
        except FerrydFailed as e:
            raise BackendUnavailable(str(e)[-3000:]) from None
        return _FerrydRunning(ferryd, socket_path)


def make_backend(name: str, ferryd: Path = FERRYD) -> Backend:
    return PasstBackend() if name == "passt" else FerrydBackend(ferryd)


# -- one migration


#: The scenarios: a migration that succeeds, and one that fails after the device state was sent.
MIGRATE = "migrate"
LATE_FAILURE = "late failure"


@dataclass
class MigrationRun:
    backend: str
    n: int
    scenario: str = MIGRATE
    downtime_ms: float | None = None
    total_ms: float | None = None
    #: The bench's own work in pre-switchover: host A unplugged, migrate-continue sent.
    pause_ms: float | None = None
    #: The virtio-net device's save (source) and load (target), from QEMU's trace events.
    save_ms: float | None = None
    load_ms: float | None = None
    #: The source's downtime phase by phase (downtime_phases), ms.
    phases: dict[str, float] | None = None
    #: How long the source QEMU waited for its back-end's answers (backend_answers), ms.
    answers: dict[str, float] | None = None
    #: Connections that survived: every byte echoed in order, then a clean close both ways.
    ok: int = 0
    failed: int = 0
    #: Connections that got every byte back (whether or not their close then completed).
    echoed: int = 0
    error: str | None = None
    details: list[str] = field(default_factory=list)


#: ``--keep``: leave each bed's directory (logs, consoles) behind and say where.
KEEP = False


@contextlib.contextmanager
def _bed() -> Iterator[MigrationBed]:
    tmp = Path(tempfile.mkdtemp(prefix="fq-"))
    try:
        with two_host_bed(tmp) as bed:
            yield bed
    finally:
        if KEEP:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _started(backend: Backend, bed: MigrationBed, host: Netns, name: str) -> Iterator[Running]:
    running = backend.start(bed, host, name)
    try:
        yield running
    finally:
        running.stop()


#: QEMU's trace events with each device's save and load time (trace-events in
#: QEMU's migration/: "downtime=" in microseconds), the downtime's
#: checkpoints, and every vhost-user message QEMU writes and every reply it
#: reads (hw/virtio/trace-events: ``vhost_user_write req:N``, a few dozen in
#: a VM's life: the data path never crosses that socket), written to its
#: log, each line stamped ``PID@SECONDS:`` (-msg timestamp=on; the stamp is
#: taken when the event is logged).
DEVICE_TRACES = (
    "-trace", "enable=vmstate_downtime_save", "-trace", "enable=vmstate_downtime_load",
    "-trace", "enable=vmstate_downtime_checkpoint",
    "-trace", "enable=vhost_user_write", "-trace", "enable=vhost_user_read",
    "-trace", "enable=migrate_set_state", "-msg", "timestamp=on",
)  # fmt: skip
_NET_DEVICE_TIME = re.compile(
    r"vmstate_downtime_(save|load) type=non-iterable idstr=\S*/virtio-net \S+ downtime=(\d+)"
)
_STAMPED = re.compile(
    r"^\d+@(\d+\.\d+):(?:vmstate_downtime_(?:checkpoint (\S+)"
    r"|save type=non-iterable idstr=\S*/virtio-net \S+ downtime=(\d+))"
    r"|migrate_set_state new state (\S+))",
    re.MULTILINE,
)

#: Where the source's downtime went, in order (:func:`downtime_phases`).
PHASES = ("stop", "pause", "RAM", "devices", "net", "end")


def net_device_ms(qemu_log: str, what: str) -> float | None:
    """The virtio-net device's last ``save`` or ``load`` time in ms, from QEMU's log."""
    times = [int(us) for kind, us in _NET_DEVICE_TIME.findall(qemu_log) if kind == what]
    return times[-1] / 1000 if times else None


def downtime_phases(qemu_log: str) -> dict[str, float] | None:
    """The source QEMU's last downtime cut at its checkpoints (ms), or None.

    QEMU 10's migration_completion_precopy() logs src-downtime-start, stops
    the VM (vhost_dev_stop: the back-end answers GET_VRING_BASE for each
    ring) and logs src-vm-stopped, waits in pre-switchover (the bench's
    pause: migration_maybe_pause() moves to ``device`` once
    migrate-continue came, trace event migrate_set_state) and sends RAM's
    last pass (src-iterable-saved), then saves every other device, the
    virtio-net device among them (SET_DEVICE_STATE_FD, the back-end's
    stream read to EOF, CHECK_DEVICE_STATE: its own trace event, logged
    when its save ends), and logs src-non-iterable-saved and
    src-downtime-end. So: ``stop`` (start to vm-stopped), ``pause`` (to
    the state ``device``: the bench noticing pre-switchover, unplugging
    host A, migrate-continue reaching QEMU), ``RAM`` (to iterable-saved),
    ``devices`` (the other devices), ``net`` (the virtio-net device),
    ``end`` (from the device states to downtime-end). Only the first and
    the fifth wait for the back-end; the others are QEMU's (and the
    bench's), but they share the machine with what the back-end does
    meanwhile (ferryd's early freeze runs during ``pause`` and ``RAM``).
    """
    marks: dict[str, float] = {}
    net: tuple[float, float] | None = None
    for stamp, checkpoint, net_us, state in _STAMPED.findall(qemu_log):
        if checkpoint == "src-downtime-start":  # the last migration's, if there were several
            marks, net = {}, None
        if checkpoint:
            marks[checkpoint] = float(stamp)
        elif state:
            if marks and state == "device":
                marks["device"] = float(stamp)
        elif marks:
            net = (float(stamp), int(net_us) / 1e6)
    points = (
        "src-downtime-start", "src-vm-stopped", "device", "src-iterable-saved", "src-downtime-end"
    )  # fmt: skip
    if net is None or any(p not in marks for p in points):
        return None
    start, stopped, resumed, ram, end = (marks[p] for p in points)
    net_end, net_s = net
    bounds = (start, stopped, resumed, ram, net_end - net_s, net_end, end)
    return {
        phase: max(0.0, (b - a) * 1e3)
        for phase, a, b in zip(PHASES, bounds, bounds[1:], strict=False)
    }


#: The back-end's part of the source's downtime, as QEMU waits for it
#: (:func:`backend_answers`), in order.
ANSWERS = ("vring base", "state fd", "stream", "check")
_GET_VRING_BASE, _SET_DEVICE_STATE_FD, _CHECK_DEVICE_STATE = 11, 42, 43
_MESSAGE = re.compile(
    r"^\d+@(\d+\.\d+):(?:vhost_user_(write|read) req:(\d+)"
    r"|vmstate_downtime_checkpoint (src-downtime-start|src-downtime-end))",
    re.MULTILINE,
)


def backend_answers(qemu_log: str) -> dict[str, float] | None:
    """How long the source QEMU waited for its back-end in its last downtime (ms), or None.

    QEMU blocks on each of these with the VM stopped (vhost-user.rst; the
    ``vhost_user_write``/``_read`` trace events stamp each request and its
    reply): ``vring base``, both rings' GET_VRING_BASE round trips added up
    (the VM's stop); ``state fd``, SET_DEVICE_STATE_FD's; ``stream``, from
    its reply to QEMU's CHECK_DEVICE_STATE, which it sends once it read the
    back-end's stream to EOF (the back-end's freeze and dump as QEMU sees
    them); ``check``, CHECK_DEVICE_STATE's. What the phases do not say: a
    back-end's slow answer and a machine busy elsewhere look alike there.
    """
    sent: dict[int, float] = {}  # per request: when QEMU wrote it, until its reply
    rounds: dict[int, list[tuple[float, float]]] = {}  # per request: (written, answered)
    state = ""  # the last checkpoint: messages count only between start and end
    for stamp, way, request, checkpoint in _MESSAGE.findall(qemu_log):
        t = float(stamp)
        if checkpoint:
            state = checkpoint
            if checkpoint == "src-downtime-start":  # the last migration's, if several
                sent, rounds = {}, {}
        elif state == "src-downtime-start":
            req = int(request)
            if way == "write":
                sent[req] = t
            elif req in sent:
                rounds.setdefault(req, []).append((sent.pop(req), t))
    needed = (_GET_VRING_BASE, _SET_DEVICE_STATE_FD, _CHECK_DEVICE_STATE)
    if state != "src-downtime-end" or any(req not in rounds for req in needed):
        return None
    fd_asked, fd_answered = rounds[_SET_DEVICE_STATE_FD][-1]
    check_asked, check_answered = rounds[_CHECK_DEVICE_STATE][-1]
    return {
        "vring base": sum(answered - asked for asked, answered in rounds[_GET_VRING_BASE]) * 1e3,
        "state fd": (fd_answered - fd_asked) * 1e3,
        "stream": max(0.0, (check_asked - fd_answered) * 1e3),
        "check": (check_answered - check_asked) * 1e3,
    }


@contextlib.contextmanager
def _vm(image: GuestImage, tmp: Path, socket: Path, **kwargs: Any) -> Iterator[Vm]:
    vm = Vm(
        image, tmp, vhost_user_netdev(socket), shared_memory=True, qemu_args=DEVICE_TRACES,
        **kwargs,
    )  # fmt: skip
    try:
        yield vm.start()
    finally:
        vm.stop()


def _echo_server(peer: Netns, address: str) -> None:
    peer.popen(
        [sys.executable, TCPTOOL, "echo", address, str(ECHO_PORT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_listening(peer, ECHO_PORT)


@contextlib.contextmanager
def _unplugger(host: Netns, ifname: str) -> Iterator[Callable[[], Callable[[], None]]]:
    """A function that sets *ifname* down in *host* at once: one netlink request.

    The pause in ``pre-switchover`` is part of QEMU's downtime: an ``ip``
    command costs tens of milliseconds (and deleting a veth about 20 ms in
    the kernel), a netlink request on a socket opened beforehand in the
    namespace (ferryd.netns.run_in_netns) well under one. Down is enough: no
    frame crosses a veth without carrier either way. The link is down once
    the request is sent (rtnetlink handles it in the sender's send(2),
    under the RTNL lock, and queues the answer before returning), so the
    function returns at once, and what it returns reads and checks the
    answer: the bench's migrate-continue goes out in between.
    """

    def open_there() -> tuple[socket.socket, int]:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        return sock, socket.if_nametoindex(ifname)

    sock, index = run_in_netns(host.path, open_there)
    sock.settimeout(5)
    # struct nlmsghdr + struct ifinfomsg (linux/rtnetlink.h): clear IFF_UP.
    request = struct.pack("=IHHII", 32, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0)
    request += struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, IFF_UP)

    def confirm() -> None:
        reply = sock.recv(4096)
        kind, error = struct.unpack_from("=H", reply, 4)[0], struct.unpack_from("=i", reply, 16)[0]
        if kind != NLMSG_ERROR or error != 0:
            raise AssertionError(f"setting {ifname} down in {host.name}: netlink error {error}")

    def down() -> Callable[[], None]:
        sock.send(request)
        return confirm

    try:
        yield down
    finally:
        sock.close()


def _ram_figures(info: dict[str, Any]) -> str:
    """What query-migrate says about RAM: why a migration does not converge."""
    ram = info.get("ram", {})
    keys = ("transferred", "remaining", "dirty-pages-rate", "dirty-sync-count", "mbps")
    figures = {k: ram[k] for k in keys if k in ram}
    if "expected-downtime" in info:
        figures["expected-downtime"] = info["expected-downtime"]
    return json.dumps(figures)


class RowTimeout(AssertionError):
    """A row took longer than ROW_TIMEOUT: where it was stuck, as a row's error."""


@contextlib.contextmanager
def _row_deadline(seconds: float = 0) -> Iterator[None]:
    """A last resort against a wait without a deadline: SIGALRM ends the row, cleanly.

    Every wait here has its own deadline; should one be missed, the row
    fails with the place it was stuck, its ``with`` blocks clean up, and
    the bench goes on.
    """

    def expired(signum: int, frame: FrameType | None) -> None:
        where = "".join(traceback.format_stack(frame, limit=4)) if frame else "?"
        raise RowTimeout(f"the row took more than {seconds or ROW_TIMEOUT:g} s; stuck at\n{where}")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds or ROW_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def migrate_once(
    backend: Backend, image: GuestImage, n: int, args: argparse.Namespace, scenario: str = MIGRATE
) -> MigrationRun:
    """One migration of a VM holding *n* connections; never raises for the back-end's faults."""
    row = MigrationRun(backend.name, n, scenario)
    try:
        with _row_deadline():
            _migrate(backend, image, n, args, row)
    except (BackendUnavailable, VmError, WaitTimeout, AssertionError) as e:
        row.error = f"{type(e).__name__}: {str(e).strip()[:1500]}"
    return row


def _migrate(
    backend: Backend, image: GuestImage, n: int, args: argparse.Namespace, row: MigrationRun
) -> None:
    busy = min(args.busy, n)
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(_bed())
        assert bed.fabric is not None
        _echo_server(bed.peer, bed.peer_v4)
        source_backend = stack.enter_context(_started(backend, bed, bed.host_a, "a"))
        source = stack.enter_context(
            _vm(image, bed.tmp, source_backend.socket_path, name="src", memory_mb=args.memory)
        )
        source.wait_ready()
        source.wait_lease()
        start_conns(source, bed.peer_v4, n, busy, args.busy_rate, CHECK_TIMEOUT, ECHO_PORT)
        wait_conns_ready(source, n, timeout=120 + n * 0.2)

        target_backend = stack.enter_context(_started(backend, bed, bed.host_b, "b"))
        channel = bed.tmp / "mig.sock"
        target = stack.enter_context(
            _vm(image, bed.tmp, target_backend.socket_path, name="dst",
                memory_mb=args.memory, incoming=f"unix:{channel}")
        )  # fmt: skip
        assert source.qmp is not None and target.qmp is not None
        unplug = stack.enter_context(_unplugger(bed.host_a, bed.fabric.uplink))
        source.qmp.execute(
            "migrate-set-capabilities",
            capabilities=[
                {"capability": "pause-before-switchover", "state": True},
                # The state's change as an event: the pause (QEMU's downtime)
                # starts when QEMU enters pre-switchover, not at the next poll.
                {"capability": "events", "state": True},
            ],
        )
        source.qmp.set_downtime_limit(args.downtime_limit)
        source.qmp.migrate(f"unix:{channel}")
        try:
            status = source.wait_migration_event(
                ("pre-switchover", "failed", "cancelled"),
                timeout=args.converge_timeout,
                what="pre-switchover",
            )
        except WaitTimeout:
            info = source.qmp.query_migrate()
            source.qmp.migrate_cancel()
            raise AssertionError(
                f"QEMU's migration did not converge in {args.converge_timeout:g} s "
                f"(status {info.get('status')}, ram {_ram_figures(info)}); cancelled\n"
                f"--- source back-end ---\n{source_backend.log()}"
            ) from None
        if status != "pre-switchover":
            info = source.qmp.query_migrate()
            raise AssertionError(f"QEMU's migration {status}: {info.get('error-desc')}")
        late_failure = row.scenario == LATE_FAILURE
        paused = time.monotonic()
        # Nothing reaches the source once its back-end has frozen: host A is
        # down before QEMU reads migrate-continue. Both answers are read after.
        unplugged = None if late_failure else unplug()
        continued = source.qmp.send("migrate-continue", state="pre-switchover")
        row.pause_ms = (time.monotonic() - paused) * 1000
        if unplugged is not None:
            unplugged()
        source.qmp.answer(continued)
        try:
            # An event, not a poll: no command for QEMU to answer during its downtime.
            source.wait_migration_event(
                MIGRATION_ENDED, timeout=SWITCHOVER_TIMEOUT, what="the migration's end"
            )
            info = source.qmp.query_migrate()
        except WaitTimeout:
            # The guest is stopped: only the device states (the back-end's among them) are left.
            info = source.qmp.query_migrate()
            info["error-desc"] = (
                f"still {info.get('status')} {SWITCHOVER_TIMEOUT:g} s after pre-switchover"
            )
        if info["status"] != "completed":
            raise AssertionError(
                f"QEMU's migration {info['status']}: {info.get('error-desc')}\n"
                f"--- source back-end ---\n{source_backend.log()}\n"
                f"--- target back-end ---\n{target_backend.log()}"
            )
        row.downtime_ms = float(info["downtime"])
        row.total_ms = float(info["total-time"])
        row.save_ms = net_device_ms(source.qemu_log(), "save")
        row.phases = downtime_phases(source.qemu_log())
        row.answers = backend_answers(source.qemu_log())
        if late_failure:
            # The target dies before it runs: a manager resumes the source, whose
            # back-end has saved its state (frozen its sockets) and must carry on.
            assert target.proc is not None
            target.proc.kill()
            target.proc.wait()
            source.qmp.cont()
            guest, host = source, bed.host_a
        else:
            bed.fabric.switch_to_b()
            guest, host = target, bed.host_b
        wait_for(lambda: guest.qmp is not None and guest.qmp.query_status() == "running",
                 timeout=60, what=f"the {guest.name} VM to run")  # fmt: skip
        if not late_failure:
            row.load_ms = net_device_ms(target.qemu_log(), "load")
        result = finish_conns(guest, timeout=CHECK_TIMEOUT + 60)
        row.ok, row.failed, row.echoed = result.ok, result.failed, result.echoed
        if row.failed:
            row.details = result.errors[:5]
            row.details += [
                f"TCP states on port {ECHO_PORT}: peer {_tcp_states(bed.peer)}, "
                f"{host.name} {_tcp_states(host)}, guest {_guest_tcp_states(guest)}"
            ]


def _tcp_states(ns: Netns) -> str:
    """How many connections to or from the echo port are in each TCP state (``ss``)."""
    out = ns.run(["ss", "-Htan", f"( sport = :{ECHO_PORT} or dport = :{ECHO_PORT} )"]).stdout
    states = Counter(line.split()[0] for line in out.splitlines() if line.strip())
    return ", ".join(f"{count} {state}" for state, count in sorted(states.items())) or "none"


def _guest_tcp_states(vm: Vm) -> str:
    """The same in the guest (busybox netstat: the state is the last column)."""
    out = vm.run(f"netstat -tn 2>/dev/null | grep ':{ECHO_PORT} '").output
    states = Counter(line.split()[-1] for line in out.splitlines() if line.strip())
    return ", ".join(f"{count} {state}" for state, count in sorted(states.items())) or "none"


# -- throughput


@dataclass
class ThroughputRun:
    backend: str
    direction: str
    gbps: float | None = None
    cpu_s_per_gb: float | None = None
    error: str | None = None


def throughput(
    backend: Backend, image: GuestImage, args: argparse.Namespace
) -> list[ThroughputRun]:
    """iperf3 once each way through a fresh VM on *backend*."""
    rows: list[ThroughputRun] = []
    try:
        with _row_deadline(), contextlib.ExitStack() as stack:
            bed = stack.enter_context(_bed())
            bed.peer.popen(
                ["iperf3", "-s", "-p", str(IPERF_PORT), "-B", bed.peer_v4],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            wait_listening(bed.peer, IPERF_PORT)
            running = stack.enter_context(_started(backend, bed, bed.host_a, "a"))
            vm = stack.enter_context(
                _vm(image, bed.tmp, running.socket_path, name="tp", memory_mb=args.memory)
            )
            vm.wait_ready()
            vm.wait_lease()
            for direction, flag in (("guest→peer", ""), ("peer→guest", " -R")):
                rows.append(_iperf3(vm, running, bed.peer_v4, flag, direction, args))
    except (BackendUnavailable, VmError, WaitTimeout, AssertionError) as e:
        rows.append(ThroughputRun(backend.name, "both", error=f"{type(e).__name__}: {e}"[:1500]))
    for row in rows:
        row.backend = backend.name
    return rows


def _iperf3(
    vm: Vm, running: Running, peer: str, flag: str, direction: str, args: argparse.Namespace
) -> ThroughputRun:
    before = cpu_seconds(running.pid)
    result = vm.run(
        f"iperf3 -c {peer} -p {IPERF_PORT} -t {args.seconds:g} --json{flag}",
        timeout=args.seconds + 60,
    )
    spent = cpu_seconds(running.pid) - before
    try:
        report = json.loads(result.output)
        received = report["end"]["sum_received"]
    except (ValueError, KeyError):
        tail = result.output.strip().splitlines()[-3:]
        return ThroughputRun("", direction, error=f"iperf3 exit {result.status}: {tail}")
    gb = received["bytes"] / 1e9
    return ThroughputRun(
        "",
        direction,
        gbps=received["bits_per_second"] / 1e9,
        cpu_s_per_gb=spent / gb if gb else None,
    )


# -- the report


def _spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    median = fmt.format(statistics.median(values))
    if len(values) == 1:
        return median
    return f"{median} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def format_migrations(
    rows: list[MigrationRun], backends: Sequence[str], sizes: Sequence[int], scenario: str
) -> str:
    header = ("back-end", "N", "runs", "QEMU downtime ms", "total ms", "unplug+go ms",
              "net save ms", "net load ms", "survived", "data echoed")  # fmt: skip
    lines: list[tuple[str, ...]] = [header]
    notes: list[str] = []
    for name in backends:
        for n in sizes:
            mine = [r for r in rows if r.backend == name and r.n == n and r.scenario == scenario]
            if not mine:
                continue
            done = [r for r in mine if r.error is None]
            survived = " ".join(f"{r.ok}/{n}" for r in done) or "-"
            echoed = " ".join(f"{r.echoed}/{n}" for r in done) or "-"
            lines.append((
                name, str(n), f"{len(done)}/{len(mine)}",
                _spread([r.downtime_ms for r in done if r.downtime_ms is not None]),
                _spread([r.total_ms for r in done if r.total_ms is not None]),
                _spread([r.pause_ms for r in done if r.pause_ms is not None], "{:.1f}"),
                _spread([r.save_ms for r in done if r.save_ms is not None], "{:.1f}"),
                _spread([r.load_ms for r in done if r.load_ms is not None], "{:.1f}"),
                survived, echoed,
            ))  # fmt: skip
            for r in mine:
                if r.error:
                    notes.append(f"  {name} N={n}: failed: {r.error}")
                for d in r.details:
                    notes.append(f"  {name} N={n}: {d}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(table + notes) + "\n"


def format_phases(rows: list[MigrationRun], backends: Sequence[str], sizes: Sequence[int]) -> str:
    """Medians of each downtime phase (downtime_phases) per back-end and N, migrations only."""
    return _medians(rows, backends, sizes, PHASES, lambda r: r.phases, "{:.1f}")


#: An ``end`` phase at least this long (ms) is a source that waited for its target.
WAIT_MS = 5.0


def format_waits(rows: list[MigrationRun], backends: Sequence[str], sizes: Sequence[int]) -> str:
    """The migrations whose source waited after its last device (``end`` ≥ WAIT_MS), one
    line each; empty if none did.

    Without a return path that phase is the stream's last flush, ~0.1 ms. A long one is
    the source asleep on a full migration socket: the target QEMU does not read the
    stream while it waits for its back-end's CHECK_DEVICE_STATE answer (the restore),
    so a device state too large for what the socket still holds makes the source wait
    for the target's whole restore (README, known issues). A median hides such a run.
    """
    notes = []
    for name in backends:
        for n in sizes:
            mine = [r for r in rows if r.backend == name and r.n == n and r.scenario == MIGRATE]
            for run, r in enumerate(mine, 1):
                if r.phases is not None and r.phases["end"] >= WAIT_MS:
                    downtime = "?" if r.downtime_ms is None else f"{r.downtime_ms:g}"
                    notes.append(
                        f"  {name} N={n} run {run}: {r.phases['end']:.1f} ms of its"
                        f" {downtime} ms downtime after its last device"
                    )
    return "\n".join(notes) + "\n" if notes else ""


def format_answers(rows: list[MigrationRun], backends: Sequence[str], sizes: Sequence[int]) -> str:
    """Medians of each wait for the back-end (backend_answers) per back-end and N."""
    return _medians(rows, backends, sizes, ANSWERS, lambda r: r.answers, "{:.2f}")


def _medians(
    rows: list[MigrationRun],
    backends: Sequence[str],
    sizes: Sequence[int],
    columns: Sequence[str],
    cut: Callable[[MigrationRun], dict[str, float] | None],
    fmt: str,
) -> str:
    """A table of the medians of ``cut``'s ``columns`` per back-end and N, migrations only
    (rows without the cut left out); empty if no row has it."""
    header = ("back-end", "N", "runs", *columns)
    lines: list[tuple[str, ...]] = [header]
    for name in backends:
        for n in sizes:
            mine = [
                c
                for r in rows
                if r.backend == name and r.n == n and r.scenario == MIGRATE
                and (c := cut(r)) is not None
            ]  # fmt: skip
            if mine:
                lines.append((
                    name, str(n), str(len(mine)),
                    *(fmt.format(statistics.median(p[k] for p in mine)) for k in columns),
                ))  # fmt: skip
    if len(lines) == 1:
        return ""
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(table) + "\n"


def format_throughput(rows: list[ThroughputRun], backends: Sequence[str]) -> str:
    header = ("back-end", "direction", "runs", "Gbit/s", "CPU s/GB")
    lines: list[tuple[str, ...]] = [header]
    notes: list[str] = []
    for name in backends:
        for direction in ("guest→peer", "peer→guest"):
            mine = [r for r in rows if r.backend == name and r.direction == direction]
            done = [r for r in mine if r.gbps is not None]
            lines.append((
                name, direction, f"{len(done)}/{len(mine)}",
                _spread([r.gbps for r in done if r.gbps is not None], "{:.2f}"),
                _spread([r.cpu_s_per_gb for r in done if r.cpu_s_per_gb is not None], "{:.2f}"),
            ))  # fmt: skip
        for r in rows:
            if r.backend == name and r.error:
                notes.append(f"  {name} {r.direction}: failed: {r.error}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(table + notes) + "\n"


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def format_ratios(
    migrations: list[MigrationRun], tput: list[ThroughputRun], sizes: Sequence[int]
) -> str:
    """ferryd/passt in this run, against the issue's targets."""
    out = ["ferryd / passt (medians, this run):"]
    for n in sizes if migrations else ():
        values = _per_backend(migrations, n, lambda r: r.downtime_ms)
        target = " (target ≤ 1.0)" if n >= 100 else ""
        out.append(f"  QEMU downtime, N={n}: {_ratio(values['ferryd'], values['passt'])}{target}")
        # query-migrate gives whole milliseconds (QEMU's ms clock), where a
        # millisecond is 10-15% of the downtime at 1 and 100 connections; the
        # same interval from its checkpoints' microsecond stamps says more.
        stamped = _per_backend(
            migrations, n, lambda r: sum(r.phases.values()) if r.phases else None
        )
        if stamped["ferryd"] is not None and stamped["passt"] is not None:
            out.append(
                f"    from its checkpoints: {_ratio(stamped['ferryd'], stamped['passt'])}"
                f" ({stamped['ferryd']:.1f} / {stamped['passt']:.1f} ms)"
            )
    for direction in ("guest→peer", "peer→guest") if tput else ():
        values = {
            b: _median([r.gbps for r in tput if r.backend == b and r.direction == direction])
            for b in BACKENDS
        }
        out.append(
            f"  throughput {direction}: {_ratio(values['ferryd'], values['passt'])} (target ≥ 0.8)"
        )
    return "\n".join(out) + "\n"


def _per_backend(
    migrations: list[MigrationRun], n: int, cut: Callable[[MigrationRun], float | None]
) -> dict[str, float | None]:
    """Per back-end, the median of ``cut`` over its migrations of ``n`` (late failures and
    runs without the figure left out)."""
    return {
        b: _median(
            [cut(r) for r in migrations if r.backend == b and r.n == n and r.scenario == MIGRATE]
        )
        for b in BACKENDS
    }


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "not measured"
    return f"{a / b:.2f}"


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.qemu_migration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", choices=("passt", "ferryd", "both"), default="both")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES), metavar="N")
    parser.add_argument(
        "--late-failure-sizes",
        type=int,
        nargs="*",
        default=[100],
        metavar="N",
        help="late-failure rows (default 100; none: no such rows)",
    )
    parser.add_argument("--runs", type=int, default=3, help="migrations per size, iperf3 runs")
    parser.add_argument("--busy", type=int, default=4, help="connections streaming both ways")
    parser.add_argument(
        "--busy-rate",
        type=float,
        default=1e6,
        help="the busy connections' rate together, bytes/s (0: no limit)",
    )
    parser.add_argument("--downtime-limit", type=int, default=10, metavar="MS")
    parser.add_argument(
        "--converge-timeout",
        type=float,
        default=120,
        metavar="S",
        help="cancel a migration not in pre-switchover by then (a back-end dirtying"
        " guest pages faster than they move), with QEMU's RAM figures",
    )
    parser.add_argument("--seconds", type=float, default=5, help="each iperf3 run")
    parser.add_argument("--memory", type=int, default=256, help="guest RAM, MiB")
    parser.add_argument("--no-migration", action="store_true", help="throughput rows only")
    parser.add_argument("--no-throughput", action="store_true", help="migration rows only")
    parser.add_argument("--keep", action="store_true", help="keep each bed's logs")
    parser.add_argument("--ferryd", type=Path, default=FERRYD,
                        help=f"the ferryd to measure (default {FERRYD})")  # fmt: skip
    args = parser.parse_args(argv)
    global KEEP
    KEEP = args.keep
    if os.geteuid() != 0:
        print("bench.qemu_migration needs root (namespaces, passt-repair)", file=sys.stderr)
        return 2
    if (why := qemu_unavailable()) is not None:
        print(f"bench.qemu_migration: {why}", file=sys.stderr)
        return 2
    try:
        image = build_guest_image()
    except GuestImageError as e:
        print(f"bench.qemu_migration: the guest could not be built: {e}", file=sys.stderr)
        return 2
    raise_fd_limit()
    end_on_signals()
    names = BACKENDS if args.backend == "both" else (args.backend,)
    backends: list[Backend] = []
    unavailable: list[str] = []
    for name in names:
        backend = make_backend(name, args.ferryd)
        try:
            backend.check()
            backends.append(backend)
        except BackendUnavailable as e:
            unavailable.append(f"{name}: not measured ({e})")
    for line in unavailable:
        print(line, file=sys.stderr)
    migrations: list[MigrationRun] = []
    tput: list[ThroughputRun] = []
    interrupted = False
    try:
        plan = [] if args.no_migration else [
            *((MIGRATE, n) for n in args.sizes),
            *((LATE_FAILURE, n) for n in args.late_failure_sizes),
        ]  # fmt: skip
        for scenario, n in plan:
            for run in range(args.runs):
                for backend in backends:
                    row = migrate_once(backend, image, n, args, scenario)
                    migrations.append(row)
                    failure = f"; {row.error[:300]}" if row.error else ""
                    result = f"downtime {row.downtime_ms} ms, survived {row.ok}/{n}{failure}"
                    _progress(f"{backend.name} {scenario} N={n} run {run + 1}: {result}")
        if not args.no_throughput:
            for run in range(args.runs):
                for backend in backends:
                    tput += throughput(backend, image, args)
                    _progress(f"{backend.name}: throughput run {run + 1} done")
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; what was measured:", file=sys.stderr)
    accel = choose_accel()
    measured = [b.name for b in backends]
    print(
        f"QEMU {'.'.join(map(str, qemu_version() or ('?',)))}, guests under "
        f"{'TCG (no usable KVM here: emulated CPU, slow guest)' if accel == 'tcg' else accel}, "
        f"{os.cpu_count()} host CPUs; downtime limit {args.downtime_limit} ms; "
        f"{args.busy} busy connections at {args.busy_rate / 1e6:g} MB/s in all"
    )
    for line in unavailable:
        print(line)
    if migrations:
        print("\nmigration (median (min–max) over runs; survived: per run, byte-exact both ways)")
        sys.stdout.write(format_migrations(migrations, measured, args.sizes, MIGRATE))
        if phases := format_phases(migrations, measured, args.sizes):
            print(
                "\nwhere the source's downtime went (medians, ms, from QEMU's checkpoints): stop ="
                " the VM stopped, each ring's\nGET_VRING_BASE answered; pause = pre-switchover, to"
                " migrate-continue\nreaching QEMU; RAM = RAM's last pass; devices = the other"
                " devices; net = the virtio-net device's\nsave (the back-end's stream); end ="
                " to QEMU's end of downtime"
            )
            sys.stdout.write(phases)
        if waits := format_waits(migrations, measured, args.sizes):
            print(
                f"\nsources that waited for their target after the last device (end ≥ {WAIT_MS:g}"
                " ms: the migration socket\nfull while the target QEMU waits for its back-end's"
                " CHECK_DEVICE_STATE answer, the restore)"
            )
            sys.stdout.write(waits)
        if answers := format_answers(migrations, measured, args.sizes):
            print(
                "\nthe back-end's answers in the source's downtime (medians, ms, from QEMU's"
                " vhost-user trace): vring base =\nboth GET_VRING_BASE round trips; state fd ="
                " SET_DEVICE_STATE_FD's; stream = from its reply to\nCHECK_DEVICE_STATE (the"
                " stream read to EOF); check = CHECK_DEVICE_STATE's"
            )
            sys.stdout.write(answers)
    if any(r.scenario == LATE_FAILURE for r in migrations):
        print(
            "\nlate failure: the target QEMU killed once the migration completed, the source"
            " resumed (cont);\nsurvived: on the source, byte-exact both ways"
        )
        sizes = args.late_failure_sizes
        sys.stdout.write(format_migrations(migrations, measured, sizes, LATE_FAILURE))
    if tput:
        print(f"\nguest iperf3, one stream, {args.seconds:g} s (median (min–max) over runs)")
        sys.stdout.write(format_throughput(tput, measured))
    if migrations or tput:
        print()
        sys.stdout.write(format_ratios(migrations, tput, args.sizes))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
