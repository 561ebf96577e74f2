"""Network namespaces: create, run in, and always clean up.

Tests, benchmarks and the demo need real Linux TCP stacks on both sides of
ferryd: a "guest" namespace (ferryd puts its tap there), a "host" namespace
(where ferryd and its host sockets live) and "peer" namespaces standing for
the rest of the network (testbed/topology.py wires them). This module makes
one namespace with the ``ip`` command (iproute2) rather than netlink
libraries: every step is a command line a developer can paste into a shell
to reproduce a failure.

Cleanup is the point of the design. Engineers and CI run integration tests
concurrently on the same machine, so:

* every namespace gets a unique name, ``ft-<label>-<random>``, and tests
  only ever touch names they created;
* :class:`Netns` is a context manager whose exit kills every process still
  in the namespace (found with ``ip netns pids``, so also grandchildren the
  test never knew about) and deletes it, whether the test passed, failed or
  was interrupted;
* nothing waits a fixed time: cleanup polls with testbed/wait.py's
  :func:`wait_for`.

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
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from testbed.wait import WaitTimeout, wait_for

__all__ = [
    "DEFAULT_TIMEOUT",
    "NETNS_PREFIX",
    "Netns",
    "NetnsError",
    "ip",
    "ping_command",
]

#: Every namespace made here starts with this, so leaks are easy to spot.
NETNS_PREFIX = "ft-"
#: Default limit for one command run in a namespace.
DEFAULT_TIMEOUT = 30.0


class NetnsError(Exception):
    """A namespace command failed: the test environment is broken, not the code under test."""


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
