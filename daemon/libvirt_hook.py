"""ferry-libvirt-hook: libvirt's qemu hook that starts and stops a domain's ferryd.

Installed as ``/etc/libvirt/hooks/qemu.d/ferry`` (a link to this console
script). libvirt runs every executable there as ``HOOK DOMAIN OPERATION
SUBOPERATION EXTRA`` with the domain's XML on stdin, in alphabetical order,
synchronously (libvirt's docs/hooks.rst). What it does:

``prepare begin``
    the first call before a domain starts (also on the target of an
    incoming migration, and before a restore): start the domain's ferryd and
    return only once it is ready, because QEMU connects to its socket right
    after. A failure exits 1 with one line on stderr, which libvirt puts in
    its error: the domain does not start, which is what an operator wants
    rather than a guest without network.
``start begin``
    libvirt has chosen QEMU's user (the domain's DAC ``<seclabel>``): make
    it the owner of ferryd's socket (mode 0600), which QEMU must connect to
    and libvirt does not relabel (:func:`admit_qemu`).
``release end``
    the last call after a domain stopped: stop its ferryd. Not when the
    shutoff reason (EXTRA, libvirt >= 10.5) is ``migrated``: that ferryd
    handed its connections to the target and keeps their frozen sockets
    for ``--linger`` seconds so that nothing the peer still sends here is
    answered by a reset; it exits by itself (ferryd.migration_device_state).
everything else
    nothing (``started``, ``stopped``, ``reconnect``, ``attach``,
    ``migrate`` and ``restore``, and any operation a later libvirt adds).

Whatever the operation, the XML read from stdin is written back to stdout
unchanged: for ``migrate begin`` and ``restore begin`` libvirt takes the
hook's output as the domain's new XML, and in qemu.d each script's output is
the next one's input. Output identical to the input changes nothing in
every case, so the hook never alters a domain.

Which domains: only those that opt in, by naming ferry's vhost-user socket.
A domain opts in when one ``<interface type='vhostuser'>`` has ``<source
type='unix' path='RUNTIME/NAME/vhost-user.sock' mode='client'/>``, RUNTIME
being :data:`RUNTIME_DIR` (``/run/ferry``; ``FERRY_RUNTIME_DIR`` overrides
it, for tests) and NAME the domain's name: QEMU is the client, ferryd the
server. Domain metadata is not a second way in: ferry needs that socket path
in the XML anyway, and one source of truth cannot disagree with itself. A
domain that names a socket under RUNTIME in any other way (another name, QEMU
as the server, two interfaces) is refused at ``prepare`` with the reason;
every other domain, and XML that does not parse, is let through untouched
with exit status 0: the hook must never fail a domain it does not serve.

How ferryd runs: as the systemd unit ``ferryd@NAME.service`` where systemd
is the init system (``/run/systemd/system`` exists, sd_booted(3)):
``systemctl restart`` (``Type=notify``: it returns once ferryd is ready;
restart rather than start, so that a migrated source still lingering under
that name is replaced) and ``systemctl stop``. Without systemd, the hook
starts ferryd itself with the unit's command line -- ``ferryd --vhost-user
--socket RUNTIME/NAME/vhost-user.sock --control RUNTIME/NAME/control.sock``,
``--repair-socket RUNTIME/repair.sock`` when that exists, then the words of
``FERRYD_ARGS`` from ``CONFIG/NAME.conf`` (CONFIG is ``/etc/ferry``,
``FERRY_CONFIG_DIR`` overrides it) -- in its own session, its output
appended to ``RUNTIME/NAME/ferryd.log``, its pid in ``RUNTIME/NAME/ferryd.pid``,
and waits until its control socket answers ready. Stopping sends SIGTERM to
that pid (SIGKILL after :data:`STOP_TIMEOUT`), but only if
``/proc/PID/cmdline`` is this domain's ferryd: a stale pid file whose pid now
belongs to another process is removed, that process is not touched.

An incoming migration needs nothing else: the target's ferryd is started by
``prepare begin`` with the same command line, and becomes the target when
QEMU sends it the device state (vhost-user LOAD).
"""

from __future__ import annotations

import enum
import grp
import itertools
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from xml.parsers import expat

from ferryd.control import ControlClientError, DaemonNotRunning, request

__all__ = [
    "CONFIG_DIR",
    "RUNTIME_DIR",
    "Action",
    "DomainPaths",
    "DomainXml",
    "DomainXmlError",
    "HookCall",
    "HookError",
    "Misconfigured",
    "VhostUserSource",
    "action_for",
    "domain_xml_untrusted",
    "ferryd_argv",
    "is_ferryd_of",
    "main",
    "opted_in",
    "parse_arguments",
    "qemu_identity",
    "read_ferryd_args",
]

#: ferry's runtime directory: each domain's sockets, and ferry-repair's socket.
RUNTIME_DIR = Path("/run/ferry")
#: ferry's configuration directory: ``NAME.conf`` holds a domain's ``FERRYD_ARGS``.
CONFIG_DIR = Path("/etc/ferry")
#: The environment variables that move those two (tests; libvirt passes no
#: environment of its own to hooks, so a wrapper script sets them).
RUNTIME_DIR_ENV = "FERRY_RUNTIME_DIR"
CONFIG_DIR_ENV = "FERRY_CONFIG_DIR"
#: The systemd unit that runs one domain's ferryd.
UNIT = "ferryd@{}.service"
#: sd_booted(3): systemd is the init system when this directory exists.
SYSTEMD_RUNNING = Path("/run/systemd/system")

#: How long ferryd may take to become ready, and to stop after SIGTERM.
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
#: How often the readiness and exit waits look again.
POLL_INTERVAL = 0.05
#: sun_path holds 108 bytes, the terminating NUL included (unix(7)).
MAX_SOCKET_PATH = 107
#: Domain names that make a safe systemd instance name and directory name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class HookError(Exception):
    """The hook cannot do what the domain asks; the message is one line for libvirt's error."""


class Misconfigured(HookError):
    """The domain names ferry's runtime directory but not in a way ferry can serve."""


class DomainXmlError(Exception):
    """The domain XML on stdin is not well-formed XML, or declares a DTD or entities."""


class UsageError(Exception):
    """The hook was not called the way libvirt calls it."""


# ---------------------------------------------------------------------------
# What libvirt says


class Action(enum.Enum):
    START = "start"
    #: Give QEMU's user the socket (ferryd's user made it, mode 0600).
    ADMIT_QEMU = "admit-qemu"
    STOP = "stop"
    NOTHING = "nothing"


#: (operation, sub-operation) -> what to do for an opted-in domain; every
#: other pair is NOTHING (libvirt's docs/hooks.rst lists them).
ACTIONS = {
    ("prepare", "begin"): Action.START,
    ("start", "begin"): Action.ADMIT_QEMU,
    ("release", "end"): Action.STOP,
}
#: release's EXTRA when the domain left by migration (libvirt >= 10.5).
SHUTOFF_MIGRATED = "migrated"


@dataclass(frozen=True)
class HookCall:
    """One invocation: ``HOOK DOMAIN OPERATION SUBOPERATION EXTRA`` ('-' for none)."""

    domain: str
    operation: str
    suboperation: str
    extra: str


def parse_arguments(argv: Sequence[str]) -> HookCall:
    """libvirt's four arguments (after the program's name), or UsageError."""
    if len(argv) != 4:
        raise UsageError(
            f"expected DOMAIN OPERATION SUBOPERATION EXTRA (libvirt's hook call), got {len(argv)}"
            " arguments"
        )
    return HookCall(*argv)


def action_for(call: HookCall) -> Action:
    """What the call asks of an opted-in domain's ferryd (module docstring)."""
    action = ACTIONS.get((call.operation, call.suboperation), Action.NOTHING)
    if action is Action.STOP and call.extra == SHUTOFF_MIGRATED:
        return Action.NOTHING
    return action


# ---------------------------------------------------------------------------
# The domain XML


@dataclass(frozen=True)
class VhostUserSource:
    """The ``<source>`` of one ``<interface type='vhostuser'>`` (attributes as written)."""

    type: str | None
    path: str | None
    mode: str | None


@dataclass(frozen=True)
class DomainXml:
    """What the hook needs of a domain's XML."""

    #: The sources of its vhost-user interfaces, in document order.
    sources: tuple[VhostUserSource, ...]
    #: Its DAC label (``<seclabel model='dac'><label>``): the ``user:group``
    #: QEMU runs as, ``+UID:+GID`` once libvirt assigned it (``start begin``).
    qemu_label: str | None


#: Where the sources sit: /domain/devices/interface[@type='vhostuser']/source.
_SOURCE_PATH = ("domain", "devices", "interface", "source")
#: Where QEMU's identity sits: /domain/seclabel[@model='dac']/label.
_LABEL_PATH = ("domain", "seclabel", "label")
#: A label longer than this is no user:group (LOGIN_NAME_MAX is 256).
_MAX_LABEL = 1024


def domain_xml_untrusted(xml: bytes) -> DomainXml:
    """Read the vhost-user sources and the DAC label of a domain's XML.

    The XML comes from libvirt, but anyone who may define a domain wrote
    it, so it is parsed as hostile: expat without a DTD (one is refused,
    as are entity declarations: no expansion, no external fetch), keeping
    only what is needed. Raises DomainXmlError and nothing else.
    """
    found: list[VhostUserSource] = []
    stack: list[str] = []
    # The type of each open <interface>, to know a vhostuser one's <source>;
    # the model of each open <seclabel>, to know the DAC one's <label>.
    interface_type: list[str | None] = []
    seclabel_model: list[str | None] = []
    label: list[str] = []
    labels: list[str] = []

    # Only the first four levels are compared (a length check first): work
    # per element stays constant however deep a hostile document nests.
    def start(tag: str, attrs: dict[str, str]) -> None:
        stack.append(tag)
        if len(stack) == 2 and tuple(stack) == _LABEL_PATH[:2]:
            seclabel_model.append(attrs.get("model"))
        elif len(stack) == 3 and tuple(stack) == _SOURCE_PATH[:3]:
            interface_type.append(attrs.get("type"))
        elif len(stack) == 4 and tuple(stack) == _SOURCE_PATH and interface_type[-1] == "vhostuser":
            found.append(VhostUserSource(attrs.get("type"), attrs.get("path"), attrs.get("mode")))

    def in_dac_label() -> bool:
        return len(stack) == 3 and tuple(stack) == _LABEL_PATH and seclabel_model[-1] == "dac"

    def text(data: str) -> None:
        if in_dac_label():
            label.append(data)
            if sum(map(len, label)) > _MAX_LABEL:
                raise DomainXmlError("the domain's DAC label is too long to be user:group")

    def end(tag: str) -> None:
        if in_dac_label():
            labels.append("".join(label).strip())
            label.clear()
        elif len(stack) == 2 and tuple(stack) == _LABEL_PATH[:2]:
            seclabel_model.pop()
        elif len(stack) == 3 and tuple(stack) == _SOURCE_PATH[:3]:
            interface_type.pop()
        stack.pop()

    def refuse_dtd(*_: object) -> None:
        raise DomainXmlError("the domain XML declares a DTD (libvirt never writes one)")

    parser = expat.ParserCreate()
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_dtd
    try:
        parser.Parse(xml, True)
    except expat.ExpatError as e:
        raise DomainXmlError(f"the domain XML is not well-formed: {e}") from None
    except (RecursionError, MemoryError, ValueError) as e:
        raise DomainXmlError(f"the domain XML cannot be read: {e}") from None
    if len(labels) > 1:
        raise DomainXmlError(f"the domain XML has {len(labels)} DAC labels")
    return DomainXml(tuple(found), labels[0] if labels else None)


def qemu_identity(label: str) -> tuple[int, int]:
    """A DAC label's ``(uid, gid)``: ``+UID:+GID`` as libvirt writes it, or names
    (a static ``<seclabel>`` may use them). HookError if it names no one."""
    user, sep, group = label.partition(":")
    if not sep:
        raise HookError(f"QEMU's DAC label {label!r} is not user:group")
    try:
        uid = _id_of(user, lambda name: pwd.getpwnam(name).pw_uid)
        gid = _id_of(group, lambda name: grp.getgrnam(name).gr_gid)
    except (KeyError, ValueError):
        raise HookError(f"QEMU's DAC label {label!r} names no user:group here") from None
    if not (0 <= uid < 2**32 - 1 and 0 <= gid < 2**32 - 1):
        raise HookError(f"QEMU's DAC label {label!r} is out of range")
    return uid, gid


def _id_of(word: str, by_name: Callable[[str], int]) -> int:
    """``+N`` is the number N (libvirt's form), anything else a name to look up."""
    number = re.fullmatch(r"\+([0-9]{1,10})", word)
    if number is not None:
        return int(number.group(1))
    if word.startswith("+") or not word:
        raise ValueError(word)
    return by_name(word)


# ---------------------------------------------------------------------------
# Where a domain's ferryd lives


def runtime_dir() -> Path:
    return Path(os.environ.get(RUNTIME_DIR_ENV) or RUNTIME_DIR)


def config_dir() -> Path:
    return Path(os.environ.get(CONFIG_DIR_ENV) or CONFIG_DIR)


@dataclass(frozen=True)
class DomainPaths:
    """The files of one domain's ferryd, under the runtime directory (module docstring)."""

    name: str
    runtime: Path
    config: Path

    @property
    def directory(self) -> Path:
        return self.runtime / self.name

    @property
    def socket(self) -> Path:
        return self.directory / "vhost-user.sock"

    @property
    def control(self) -> Path:
        return self.directory / "control.sock"

    @property
    def pid_file(self) -> Path:
        return self.directory / "ferryd.pid"

    @property
    def log(self) -> Path:
        return self.directory / "ferryd.log"

    @property
    def repair_socket(self) -> Path:
        return self.runtime / "repair.sock"

    @property
    def conf(self) -> Path:
        return self.config / f"{self.name}.conf"

    @property
    def unit(self) -> str:
        return UNIT.format(self.name)


def opted_in(sources: Sequence[VhostUserSource], paths: DomainPaths) -> bool:
    """True if the domain asks for ferry (module docstring); Misconfigured if it
    names ferry's runtime directory in a way ferry cannot serve."""
    ours = [
        source
        for source in sources
        if source.path is not None and _is_under(Path(source.path), paths.runtime)
    ]
    if not ours:
        return False
    if not _NAME.fullmatch(paths.name):
        raise Misconfigured(
            f"domain name {paths.name!r} cannot name a ferryd (letters, digits, '_', '.', '-';"
            " not starting with '_', '.' or '-')"
        )
    if len(os.fsencode(paths.socket)) > MAX_SOCKET_PATH:
        raise Misconfigured(f"{paths.socket} is longer than a Unix socket path can be")
    if len(ours) > 1:
        raise Misconfigured(
            f"{len(ours)} vhostuser interfaces name sockets under {paths.runtime};"
            " one ferryd serves one interface"
        )
    (source,) = ours
    if source.type != "unix" or Path(os.path.normpath(source.path or "")) != paths.socket:
        raise Misconfigured(
            f"the vhostuser interface's source must be type='unix' path='{paths.socket}'"
            f" (got type={source.type!r} path={source.path!r})"
        )
    if source.mode != "client":
        raise Misconfigured(
            f"the vhostuser interface's source must have mode='client' (QEMU connects to"
            f" ferryd), got mode={source.mode!r}"
        )
    return True


def _is_under(path: Path, directory: Path) -> bool:
    normal = Path(os.path.normpath(path))
    return normal != directory and normal.is_relative_to(directory)


# ---------------------------------------------------------------------------
# ferryd's command line


def read_ferryd_args(conf: Path) -> list[str]:
    """The words of ``FERRYD_ARGS`` in *conf*, read as systemd's EnvironmentFile=
    reads it (``KEY=VALUE`` lines, '#' and ';' comments, one level of quotes)
    and split at whitespace as an unquoted ``$FERRYD_ARGS`` in ExecStart= is.
    A missing file is no options; an unreadable one is a HookError."""
    try:
        text = conf.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise HookError(f"cannot read {conf}: {e}") from None
    words: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, _, value = line.partition("=")
        if key.strip() != "FERRYD_ARGS":
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        words = value.split()
    return words


def ferryd_program() -> str:
    """The ferryd installed beside this hook (same installation), else the one on PATH."""
    here = Path(sys.argv[0]).resolve().parent / "ferryd"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("ferryd")
    if found is None:
        raise HookError(f"no ferryd beside {sys.argv[0]} nor on PATH")
    return found


def ferryd_argv(program: str, paths: DomainPaths, options: Sequence[str]) -> list[str]:
    """The unit's command line for this domain (module docstring)."""
    repair = ["--repair-socket", str(paths.repair_socket)] if paths.repair_socket.exists() else []
    return [
        program,
        "--vhost-user",
        "--socket",
        str(paths.socket),
        "--control",
        str(paths.control),
        *repair,
        *options,
    ]


def is_ferryd_of(cmdline: Sequence[str], paths: DomainPaths) -> bool:
    """Whether a process's argv (/proc/PID/cmdline) is ferryd serving this domain's socket.

    A console script runs as ``python3 /usr/bin/ferryd ...`` (the kernel
    puts the interpreter first), so ferryd may be the first or second word.
    """
    program = any(Path(word).name == "ferryd" for word in cmdline[:2])
    pairs = set(itertools.pairwise(cmdline))
    return program and "--vhost-user" in cmdline and ("--socket", str(paths.socket)) in pairs


# ---------------------------------------------------------------------------
# Running ferryd: systemd's unit, or a process of our own


def systemd_running() -> bool:
    return SYSTEMD_RUNNING.is_dir()


def _systemctl(verb: str, paths: DomainPaths) -> None:
    result = subprocess.run(
        ["systemctl", verb, paths.unit],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        why = _last_line(result.stderr) or f"exit status {result.returncode}"
        raise HookError(f"systemctl {verb} {paths.unit} failed: {why} (journalctl -u {paths.unit})")


def start_direct(paths: DomainPaths, argv: Sequence[str]) -> int:
    """Start ferryd in its own session, record its pid, wait until it is ready; its pid.

    A ferryd still running under this name (a migrated source lingering, a
    leftover) is stopped first: the domain is not running, so nothing uses it.
    """
    try:
        paths.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        raise HookError(f"cannot create {paths.directory}: {e}") from None
    stop_direct(paths)
    try:
        with paths.log.open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    except OSError as e:
        raise HookError(f"cannot run {argv[0]}: {e}") from None
    temporary = paths.pid_file.with_suffix(".pid.tmp")
    temporary.write_text(f"{proc.pid}\n")
    temporary.replace(paths.pid_file)
    try:
        _wait_ready(proc, paths)
    except BaseException:
        stop_direct(paths)
        raise
    return proc.pid


def _wait_ready(proc: subprocess.Popen[bytes], paths: DomainPaths) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        status = proc.poll()
        if status is not None:
            raise HookError(
                f"ferryd exited with status {status}: {_last_line(_read(paths.log))}"
                f" (log: {paths.log})"
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise HookError(f"ferryd not ready after {READY_TIMEOUT:g} s (log: {paths.log})")
        try:
            answer = request(str(paths.control), "status", timeout=max(0.5, min(5.0, left)))
        except DaemonNotRunning:
            pass
        except ControlClientError as e:
            raise HookError(f"ferryd's control socket failed: {e} (log: {paths.log})") from None
        else:
            if answer.get("ready", True) is not False:
                return
        time.sleep(POLL_INTERVAL)


def stop_direct(paths: DomainPaths) -> None:
    """SIGTERM the pid in the pid file if it is this domain's ferryd, wait, SIGKILL if needed.

    Missing pid file: nothing to do. Once ferryd has ended (or was found
    gone) its sockets are removed. The pid file is removed in every case; a
    pid that is not this domain's ferryd is left running, and its sockets
    in place, and that is said on stderr (not a failure: libvirt's release
    cannot be undone).
    """
    try:
        pid = int(paths.pid_file.read_text().strip())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        print(f"ferry: ignoring unreadable {paths.pid_file}: {e}", file=sys.stderr)
        paths.pid_file.unlink(missing_ok=True)
        return
    cmdline = _cmdline(pid)
    if cmdline is not None and not is_ferryd_of(cmdline, paths):
        print(
            f"ferry: {paths.pid_file} names pid {pid}, which is not ferryd serving {paths.socket}"
            f" ({' '.join(cmdline)!r}); not killed",
            file=sys.stderr,
        )
    else:
        if cmdline is not None:
            _terminate(pid)
        # ferryd runs as nobody once set up and cannot unlink its sockets in
        # root's directory: the hook, which made the directory, does.
        paths.socket.unlink(missing_ok=True)
        paths.control.unlink(missing_ok=True)
    paths.pid_file.unlink(missing_ok=True)


def _terminate(pid: int) -> None:
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _gone(pid):
                return
            time.sleep(POLL_INTERVAL)
    raise HookError(f"ferryd (pid {pid}) did not end after SIGKILL")


def _cmdline(pid: int) -> list[str] | None:
    """The argv of a live process, or None when there is none (or only its zombie)."""
    if _gone(pid):
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return [os.fsdecode(word) for word in raw.split(b"\0")[:-1]]


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (ended, waiting for its new parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # proc(5): "pid (comm) state ...": comm may hold anything, so the state
    # is the first field after the last ')'.
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------
# The hook


def admit_qemu(paths: DomainPaths, label: str | None) -> None:
    """Make QEMU's user (the DAC *label*) the owner of ferryd's socket, mode 0600.

    ferryd creates its socket mode 0600 as its own user, and libvirt does
    not relabel a vhost-user socket that QEMU connects to (it does for the
    files QEMU opens): QEMU, running as libvirt-qemu, would be refused.
    At ``start begin`` libvirt has chosen QEMU's identity and written it in
    the XML. The socket is opened without following a link and must be a
    socket: where ferryd's user owns the directory (the systemd unit's
    RuntimeDirectory=), a link put there cannot make root give away a file.
    No label: QEMU runs as libvirt's own user, nothing to do.
    """
    if label is None:
        return
    uid, gid = qemu_identity(label)
    try:
        fd = os.open(paths.socket, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise HookError(f"ferryd's socket {paths.socket}: {e.strerror}") from None
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise HookError(f"{paths.socket} is not a socket")
        # fchown() refuses O_PATH descriptors; the /proc link reaches the same inode.
        os.chown(f"/proc/self/fd/{fd}", uid, gid)
    except OSError as e:
        raise HookError(f"cannot give {paths.socket} to QEMU ({label}): {e.strerror}") from None
    finally:
        os.close(fd)


def run(call: HookCall, xml: bytes) -> None:
    """Act on *call* for the domain described by *xml* (module docstring); HookError on failure."""
    action = action_for(call)
    if action is Action.NOTHING:
        return
    try:
        domain = domain_xml_untrusted(xml)
    except DomainXmlError as e:
        print(f"ferry: domain {call.domain}: {e}; not ferry's, left alone", file=sys.stderr)
        return
    paths = DomainPaths(call.domain, runtime_dir(), config_dir())
    try:
        if not opted_in(domain.sources, paths):
            return
    except Misconfigured:
        if action is Action.START:
            raise
        return  # a domain that could not start has no ferryd to stop
    if action is Action.START:
        if systemd_running():
            _systemctl("restart", paths)
        else:
            argv = ferryd_argv(ferryd_program(), paths, read_ferryd_args(paths.conf))
            start_direct(paths, argv)
    elif action is Action.ADMIT_QEMU:
        admit_qemu(paths, domain.qemu_label)
    elif systemd_running():
        _systemctl("stop", paths)
    else:
        stop_direct(paths)


USAGE = f"""\
usage: ferry-libvirt-hook DOMAIN OPERATION SUBOPERATION EXTRA < DOMAIN_XML

libvirt's qemu hook for ferry, installed as /etc/libvirt/hooks/qemu.d/ferry.
A domain opts in with a vhost-user interface on {RUNTIME_DIR}/NAME/vhost-user.sock
(QEMU the client); for it, 'prepare begin' starts ferryd (ferryd@NAME under
systemd) and waits until it is ready, 'start begin' gives the socket to QEMU's
user, 'release end' stops ferryd. Every call writes the XML back unchanged.
Options for NAME's ferryd: FERRYD_ARGS in {CONFIG_DIR}/NAME.conf."""


def main(argv: Sequence[str] | None = None, stdin: BinaryIO | None = None) -> int:
    """Read the XML, write it back, act; 0, or 1 with one line on stderr, 2 for misuse."""
    args = sys.argv[1:] if argv is None else argv
    if list(args) in (["-h"], ["--help"]):  # an operator, not libvirt: no XML to wait for
        print(USAGE)
        return 0
    xml = (stdin or sys.stdin.buffer).read()
    # libvirt takes the output as the XML in every case: pass it through first.
    sys.stdout.buffer.write(xml)
    sys.stdout.flush()
    try:
        call = parse_arguments(args)
    except UsageError as e:
        print(f"ferry-libvirt-hook: {e}", file=sys.stderr)
        return 2
    try:
        run(call, xml)
    except HookError as e:
        print(f"ferry: domain {call.domain}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
