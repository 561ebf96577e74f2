"""Network namespaces for integration tests: create, wire, run in, and always clean up.

Integration tests need real Linux TCP stacks on both sides of ferryd: a
"guest" namespace (ferryd puts its tap there), a "host" namespace (where
ferryd and its host sockets live) and "peer" namespaces standing for the
rest of the network, joined by veth pairs. This module builds them with the
``ip`` command (iproute2) rather than netlink libraries: every step is a
command line a developer can paste into a shell to reproduce a failure.

Cleanup is the point of the design. Engineers and CI run integration tests
concurrently on the same machine, so:

* every namespace gets a unique name, ``ft-<label>-<random>``, and tests
  only ever touch names they created;
* :class:`Netns` is a context manager whose exit kills every process still
  in the namespace (found with ``ip netns pids``, so also grandchildren the
  test never knew about) and deletes it, whether the test passed, failed or
  was interrupted;
* nothing waits a fixed time: :func:`wait_for` polls a condition with a
  deadline and reports what it was waiting for.

Each namespace is set up so tests need no waiting of their own: loopback is
up, IPv6 duplicate address detection is off (an address is usable the moment
it is added, not ~1 s later), and unprivileged ICMP echo sockets are allowed
for every group (``net.ipv4.ping_group_range`` is per namespace and defaults
to nobody; ferryd's ping flows need it).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

__all__ = [
    "NETNS_PREFIX",
    "Netns",
    "NetnsError",
    "Topology",
    "TwoHostTopology",
    "WaitTimeout",
    "build_topology",
    "ip",
    "ping_command",
    "veth",
    "wait_for",
]

#: Every namespace made here starts with this, so leaks are easy to spot.
NETNS_PREFIX = "ft-"
#: Default limit for one command run in a namespace.
DEFAULT_TIMEOUT = 30.0

T = TypeVar("T")


class NetnsError(Exception):
    """A namespace command failed: the test environment is broken, not the code under test."""


class WaitTimeout(AssertionError):
    """wait_for() ran out of time; an AssertionError so pytest reports it as a failure."""


def _run(
    args: Sequence[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; on failure raise with its stderr."""
    try:
        result = subprocess.run(
            list(args),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"timed out after {timeout:g} s: {' '.join(args)}") from exc
    if check and result.returncode != 0:
        raise NetnsError(
            f"command failed (exit {result.returncode}): {' '.join(args)}\n"
            f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
        )
    return result


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` in the test's own (root) namespace."""
    return _run(["ip", *args], check=check)


def ping_command(address: str, *, count: int = 1, wait: float = 2) -> list[str]:
    """A ping command line for *address* (IPv4 or IPv6), iputils if present, else busybox."""
    family = "-6" if ":" in address else "-4"
    base = ["ping"] if shutil.which("ping") else ["busybox", "ping"]
    return [*base, family, "-c", str(count), "-W", f"{wait:g}", address]


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    *,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll *predicate* until it returns something truthy, and return that.

    Raises WaitTimeout naming *what* if *timeout* seconds pass first. Tests
    wait on conditions through this, never on fixed sleeps: fast machines
    run fast and slow ones only fail after a generous deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Netns:
    """A uniquely named network namespace that is gone after ``with``.

    ``with Netns("host") as ns:`` creates ``ft-host-<random>``, brings lo up,
    turns off IPv6 DAD and opens ping sockets. Everything started through
    :meth:`popen` is reaped at exit, and every other process found in the
    namespace is killed before it is deleted.
    """

    def __init__(self, label: str = "") -> None:
        middle = f"{label}-" if label else ""
        self.name = f"{NETNS_PREFIX}{middle}{secrets.token_hex(4)}"
        self._popens: list[subprocess.Popen[Any]] = []
        self._created = False

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def path(self) -> str:
        """The bind mount that names the namespace (for ``ferryd --netns``, setns)."""
        return f"/run/netns/{self.name}"

    def __enter__(self) -> Netns:
        ip("netns", "add", self.name)
        self._created = True
        try:
            self.run(["ip", "link", "set", "lo", "up"])
            self.run(
                [
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv4.ping_group_range=0 2147483647",
                ]
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def exec_prefix(self) -> list[str]:
        """The argv prefix that runs a command inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    def run(
        self,
        args: Sequence[str],
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the namespace and wait for it, capturing text output.

        With *check* a non-zero exit raises NetnsError carrying its output.
        """
        return _run([*self.exec_prefix(), *args], check=check, timeout=timeout, input=input)

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command in the namespace; it is killed and reaped at exit if still running.

        ``ip netns exec`` execs the command, so the Popen's pid is the
        command's own (signals reach it directly).
        """
        proc: subprocess.Popen[Any] = subprocess.Popen([*self.exec_prefix(), *args], **kwargs)
        self._popens.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Processes currently in the namespace (zombies excluded)."""
        out = ip("netns", "pids", self.name, check=False).stdout
        return [int(word) for word in out.split()]

    # -- configuration helpers (thin wrappers over `ip`, for readable tests)

    def link_up(self, ifname: str) -> None:
        self.run(["ip", "link", "set", ifname, "up"])

    def add_addr(self, ifname: str, cidr: str) -> None:
        """Add an address (``10.0.0.1/24``, ``fd00::1/64``); IPv6 ones skip DAD."""
        extra = ["nodad"] if ":" in cidr else []
        self.run(["ip", "addr", "add", cidr, "dev", ifname, *extra])

    def add_route(self, dest: str, via: str, dev: str | None = None) -> None:
        """Add a route (*dest* may be ``default``); the family follows *via*."""
        family = "-6" if ":" in via else "-4"
        self.run(["ip", family, "route", "add", dest, "via", via, *(["dev", dev] if dev else [])])

    def links(self) -> list[str]:
        """Interface names in the namespace."""
        out = self.run(["ip", "-o", "link", "show"]).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    def ping(self, address: str, *, count: int = 1, wait: float = 2) -> bool:
        """Ping *address* from this namespace; True if it answered."""
        result = self.run(ping_command(address, count=count, wait=wait), check=False)
        return result.returncode == 0

    # -- cleanup

    def close(self) -> None:
        """Kill what runs in the namespace and delete it; safe to call twice.

        Errors here are collected and raised at the end, after every step
        has been attempted, so one failure does not leak the namespace.
        """
        if not self._created:
            return
        problems: list[str] = []
        for proc in self._popens:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                problems.append(f"pid {proc.pid} did not die after SIGKILL")
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._popens.clear()
        try:
            wait_for(self._kill_remaining, timeout=5, what=f"processes in {self.name} to die")
        except WaitTimeout as exc:
            problems.append(str(exc))
        result = ip("netns", "del", self.name, check=False)
        if result.returncode != 0 and os.path.exists(self.path):
            problems.append(f"ip netns del {self.name}: {result.stderr.strip()}")
        self._created = False
        if problems:
            raise NetnsError(f"cleanup of {self.name} incomplete: " + "; ".join(problems))

    def _kill_remaining(self) -> bool:
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids


def veth(ns_a: Netns, if_a: str, ns_b: Netns, if_b: str, mtu: int = 65520) -> None:
    """Join two namespaces with a veth pair and bring both ends up.

    Both ends are created directly inside their namespaces, so the names
    never pass through (and never clash in) the root namespace, where other
    test runs may use the same interface names.
    """
    ip(
        "link",
        "add",
        if_a,
        "netns",
        ns_a.name,
        "mtu",
        str(mtu),
        "type",
        "veth",
        "peer",
        "name",
        if_b,
        "netns",
        ns_b.name,
        "mtu",
        str(mtu),
    )
    ns_a.link_up(if_a)
    ns_b.link_up(if_b)


@dataclass(frozen=True)
class Topology:
    """The standard integration topology (see :func:`build_topology`).

    ::

        guest ns            host ns                          peer ns
        (tap0, made     ferryd --netns guest          up0 10.77.0.2/24 fd00:77::2/64
         by ferryd)     up0 10.77.0.1/24 fd00:77::1/64 ──  10.77.0.3/24 fd00:77::3/64
                        default via .2 / ::2
    """

    host: Netns
    peer: Netns
    guest: Netns
    uplink: str = "up0"
    host_v4: str = "10.77.0.1"
    host_v6: str = "fd00:77::1"
    prefix_v4: int = 24
    prefix_v6: int = 64
    gateway_v4: str = "10.77.0.2"
    gateway_v6: str = "fd00:77::2"
    #: The peer's addresses: two, so that tests have two distinct remote hosts.
    peers_v4: tuple[str, ...] = ("10.77.0.2", "10.77.0.3")
    peers_v6: tuple[str, ...] = ("fd00:77::2", "fd00:77::3")

    @property
    def namespaces(self) -> tuple[Netns, Netns, Netns]:
        return (self.host, self.peer, self.guest)


@contextlib.contextmanager
def build_topology() -> Iterator[Topology]:
    """Create host, peer and guest namespaces wired as in :class:`Topology`.

    The host is configured like a machine ferryd would run on: one uplink,
    an address per family, default routes to the gateway. The peer holds
    the gateway address and a second address, with default routes back to
    the host. The guest has only lo: ferryd creates its tap there. All three
    namespaces are removed on exit, also when setup fails halfway.
    """
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(Netns("host"))
        peer = stack.enter_context(Netns("peer"))
        guest = stack.enter_context(Netns("guest"))
        topo = Topology(host=host, peer=peer, guest=guest)
        veth(host, topo.uplink, peer, topo.uplink)
        host.add_addr(topo.uplink, f"{topo.host_v4}/{topo.prefix_v4}")
        host.add_addr(topo.uplink, f"{topo.host_v6}/{topo.prefix_v6}")
        host.add_route("default", topo.gateway_v4)
        host.add_route("default", topo.gateway_v6)
        for addr in topo.peers_v4:
            peer.add_addr(topo.uplink, f"{addr}/{topo.prefix_v4}")
        for addr in topo.peers_v6:
            peer.add_addr(topo.uplink, f"{addr}/{topo.prefix_v6}")
        peer.add_route("default", topo.host_v4)
        peer.add_route("default", topo.host_v6)
        yield topo


@dataclass
class TwoHostTopology:
    """Two hosts with the same addresses and MAC, and a peer the fabric moves between them.

    ::

        host_a ns                         peer ns
        up0 10.88.0.1/24 fd00:88::1/64 ── pa ─┐
            MAC 02:88:00:00:00:01             br0 10.88.0.2/24 fd00:88::2/64
        host_b ns                             │   (+ .3 / ::3)
        up0 (same addresses, same MAC) ─── pb ┘  pb: down, not in br0 until switch

    This is the real case of a migration: the target host carries the
    source's address and MAC, so the peer's neighbour cache stays valid and
    the peer never learns that anything moved. The peer's addresses live on
    a bridge, so that moving the link does not take them away. Before
    :meth:`switch_to_b` only host A is reachable (host B's up0 has no
    carrier: binding and connecting there works, nothing reaches the wire);
    after it only host B is: A's veth pair is deleted (so A's frozen
    sockets can never answer the peer, not even with an RST) and B's
    peer-side end joins the bridge.
    """

    host_a: Netns
    host_b: Netns
    peer: Netns
    uplink: str = "up0"
    bridge: str = "br0"
    port_a: str = "pa"
    port_b: str = "pb"
    host_mac: str = "02:88:00:00:00:01"
    host_v4: str = "10.88.0.1"
    host_v6: str = "fd00:88::1"
    prefix_v4: int = 24
    prefix_v6: int = 64
    peers_v4: tuple[str, ...] = ("10.88.0.2", "10.88.0.3")
    peers_v6: tuple[str, ...] = ("fd00:88::2", "fd00:88::3")
    switched: bool = False

    @property
    def namespaces(self) -> tuple[Netns, Netns, Netns]:
        return (self.host_a, self.host_b, self.peer)

    def switch_to_b(self) -> None:
        """Move the fabric from host A to host B (two ``ip`` commands; safe to call once)."""
        if self.switched:
            raise NetnsError("the fabric was already switched to host B")
        self.host_a.run(["ip", "link", "del", self.uplink])
        self.peer.run(["ip", "link", "set", self.port_b, "master", self.bridge, "up"])
        self.switched = True

    def standby_a(self) -> None:
        """After :meth:`switch_to_b`: give host A a new uplink, not yet on the fabric.

        The same picture as host B's at the start (same address and MAC, its
        peer-side end down and outside the bridge), so that a ferryd started
        in A can be the target of a migration back (A→B→A).
        """
        if not self.switched:
            raise NetnsError("host A is still on the fabric")
        self._add_uplink(self.host_a, self.port_a)

    def switch_to_a(self) -> None:
        """Move the fabric back from host B to host A (after :meth:`standby_a`)."""
        if not self.switched:
            raise NetnsError("the fabric is already on host A")
        self.host_b.run(["ip", "link", "del", self.uplink])
        self.peer.run(["ip", "link", "set", self.port_a, "master", self.bridge, "up"])
        self.switched = False

    def _add_uplink(self, host: Netns, port: str) -> None:
        ip(
            "link", "add", self.uplink, "netns", host.name, "address", self.host_mac,
            "mtu", "65520", "type", "veth",
            "peer", "name", port, "netns", self.peer.name, "mtu", "65520",
        )  # fmt: skip
        host.add_addr(self.uplink, f"{self.host_v4}/{self.prefix_v4}")
        host.add_addr(self.uplink, f"{self.host_v6}/{self.prefix_v6}")
        host.link_up(self.uplink)


@contextlib.contextmanager
def two_host_topology() -> Iterator[TwoHostTopology]:
    """Create host A, host B and a peer wired as in :class:`TwoHostTopology`.

    All three namespaces are removed on exit, also when setup fails halfway.
    The bridge runs no STP, so a new port forwards at once.
    """
    with contextlib.ExitStack() as stack:
        host_a = stack.enter_context(Netns("hosta"))
        host_b = stack.enter_context(Netns("hostb"))
        peer = stack.enter_context(Netns("peer"))
        topo = TwoHostTopology(host_a=host_a, host_b=host_b, peer=peer)
        peer.run(["ip", "link", "add", topo.bridge, "type", "bridge", "stp_state", "0"])
        peer.link_up(topo.bridge)
        for addr in topo.peers_v4:
            peer.add_addr(topo.bridge, f"{addr}/{topo.prefix_v4}")
        for addr in topo.peers_v6:
            peer.add_addr(topo.bridge, f"{addr}/{topo.prefix_v6}")
        for host, port in ((host_a, topo.port_a), (host_b, topo.port_b)):
            ip(
                "link", "add", topo.uplink, "netns", host.name, "address", topo.host_mac,
                "mtu", "65520", "type", "veth",
                "peer", "name", port, "netns", peer.name, "mtu", "65520",
            )  # fmt: skip
            host.add_addr(topo.uplink, f"{topo.host_v4}/{topo.prefix_v4}")
            host.add_addr(topo.uplink, f"{topo.host_v6}/{topo.prefix_v6}")
            host.link_up(topo.uplink)
        peer.run(["ip", "link", "set", topo.port_a, "master", topo.bridge, "up"])
        yield topo
