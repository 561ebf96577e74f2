"""The descriptor budget: how many flows ferryd can hold sockets for, shared by all protocols.

Theory of operation
-------------------
Every TCP connection, outbound UDP flow and ICMP echo flow holds one socket,
and the process may hold at most RLIMIT_NOFILE descriptors (ferryd raises
its soft limit to the hard one at start). Issue 9: with the default
``--max-flows`` (16,384 per protocol) never checked against that limit, a
guest that opened ~19k UDP flows and then TCP connections made ``socket()``
fail with EMFILE outside any handler and ferryd died; under a low limit
``accept()`` on the control socket did the same.

So at start ferryd works out a budget, ``RLIMIT_NOFILE - RESERVE -
listeners``, that every protocol's flow table draws from
(:class:`~ferryd.flows.table.FlowTable` asks :meth:`DescriptorBudget.check`
before it adds a flow holding a socket). What is kept back:

=====================================  =====
what                                   fds
=====================================  =====
stdin, stdout, stderr                  3
the tap (and a target's second queue)  2
trio's epoll, wakeup pair, signal fd   4
the TCP reactor's epoll                1
the control socket and its clients     1 + :data:`MAX_CONTROL_CONNECTIONS`
 (each may pass a descriptor or two)   + 16
a migration: its pipe, the helper      4
 connection, a socket being set up
--metrics: its listener and clients    1 + :data:`MAX_METRICS_CONNECTIONS`
--pcap: the capture file               1
slack (logging, /proc reads, netlink)  11
=====================================  =====

That is :data:`RESERVE` (64). Forwarding listeners are counted from the
options (two per port without a bind address, one per family). A
migration's restored flows are flows like any other: they draw on the
budget (a target short of descriptors fails the restore and the source
rolls back). Descriptors passed to ferry-repair are the flows' own sockets:
a batch of 253 costs ferryd nothing extra (the helper's copies are its own).

When the budget is spent a new flow is refused as a router would refuse it
(TCP RST, ICMP administratively prohibited for UDP and ICMP echo), counted
in ``refused``, and logged rate-limited. Should the kernel still run out
(EMFILE or ENFILE from ``socket()`` or ``accept()``: another process, a
limit lowered behind ferryd's back, the reserve exceeded), the same refusal
happens and ``exhausted`` is counted; nothing in ferryd lets that error
escape (the accept loops back off for :data:`ACCEPT_BACKOFF`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio

from ferryd.logthrottle import LogThrottle

__all__ = [
    "ACCEPT_BACKOFF",
    "MAX_CONTROL_CONNECTIONS",
    "MAX_METRICS_CONNECTIONS",
    "RESERVE",
    "DescriptorBudget",
    "DescriptorsSpent",
    "FlowLimitReached",
    "is_exhaustion",
    "open_flow_socket",
    "presize_fd_table",
    "serve_accepted",
]

log = logging.getLogger("ferryd.descriptors")

#: Control connections served at once; more wait in the listen backlog.
MAX_CONTROL_CONNECTIONS = 16
#: --metrics HTTP connections served at once (ferryd.http_metrics).
MAX_METRICS_CONNECTIONS = 4
#: Descriptors kept back from flows (see the table in the module docstring).
RESERVE = 64
#: How long an accept loop waits after EMFILE/ENFILE before trying again
#: (the listener stays readable: retrying at once would spin).
ACCEPT_BACKOFF = 0.1

#: Errors that mean "no descriptor (or kernel memory) for a new socket".
_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class FlowLimitReached(Exception):
    """The table is full: a new flow was refused (resource limit, not a bug)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"flow table is full ({limit} flows)")
        self.limit = limit


class DescriptorsSpent(FlowLimitReached):
    """No descriptor is left for a new flow (the budget is spent, or the kernel said EMFILE)."""

    def __init__(self, limit: int, why: str = "") -> None:
        Exception.__init__(
            self, why or f"descriptor budget spent ({limit} descriptors for flows in use)"
        )
        self.limit = limit


def is_exhaustion(exc: OSError) -> bool:
    """Whether ``exc`` says the process or the system ran out of descriptors."""
    return exc.errno in _EXHAUSTION


#: The class of socket open_flow_socket() makes (TCP's own, for its connections).
S = TypeVar("S", bound=socket.socket)


def open_flow_socket(
    cls: type[S], budget: DescriptorBudget | None, family: int, kind: int, proto: int = 0
) -> S:
    """A non-blocking, close-on-exec socket of class ``cls`` for a new flow.

    Out of descriptors (EMFILE, ENFILE...) raises :class:`DescriptorsSpent`,
    counted in ``budget.counters.exhausted``, so the caller refuses the flow as when
    the budget is spent; any other error is raised as it is.
    """
    try:
        return cls(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
    except OSError as exc:
        if not is_exhaustion(exc):
            raise
        if budget is None:
            raise DescriptorsSpent(0, f"no descriptor for a new socket: {exc}") from exc
        raise budget.exhausted_by(exc) from exc


class _Table(Protocol):
    @property
    def descriptors(self) -> int: ...


@dataclass
class DescriptorCounters:
    """New flows refused for want of a descriptor (for the counters registry)."""

    refused: int = 0
    """Because the budget was spent."""
    exhausted: int = 0
    """Because the kernel had no descriptor left (EMFILE...)."""


class DescriptorBudget:
    """Descriptors the flow tables may hold between them, and what was refused
    (``counters``, registered as the ``descriptors`` group)."""

    def __init__(self, capacity: int, *, limit: int = 0, reserved: int = 0) -> None:
        self.capacity = max(0, capacity)
        self.limit = limit
        """RLIMIT_NOFILE the capacity was worked out from (0: not from a limit)."""
        self.reserved = reserved
        self.counters = DescriptorCounters()
        self._tables: list[_Table] = []

    @classmethod
    def from_rlimit(cls, listeners: int) -> DescriptorBudget:
        """The budget the current (already raised) RLIMIT_NOFILE allows."""
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        reserved = RESERVE + listeners
        return cls(soft - reserved, limit=soft, reserved=reserved)

    def track(self, tables: Iterable[_Table]) -> None:
        """Count the descriptors of these tables from now on (the daemon's current ones)."""
        self._tables = list(tables)

    @property
    def in_use(self) -> int:
        return sum(t.descriptors for t in self._tables)

    def check(self) -> None:
        if self.in_use >= self.capacity:
            self.counters.refused += 1
            raise DescriptorsSpent(self.capacity)

    def exhausted_by(self, exc: OSError) -> DescriptorsSpent:
        """Count an EMFILE-like failure; the exception to refuse the flow with."""
        self.counters.exhausted += 1
        return DescriptorsSpent(self.capacity, f"no descriptor for a new socket: {exc}")

    def warn_if_short(self, max_flows: int) -> None:
        """Say so at start if even one protocol could not reach ``--max-flows``.

        The protocols share the budget, so their limits may add up to more
        than it holds (the default 3 x 16384 does under a 20,000 limit): that
        is by design and not worth a line at every start. A limit that one
        protocol alone cannot reach is a configuration to look at.
        """
        if max_flows > self.capacity:
            log.warning(
                "--max-flows %d cannot be reached: RLIMIT_NOFILE %d leaves %d descriptors"
                " (%d kept back) for the flows of every protocol together; flows beyond"
                " that are refused",
                max_flows,
                self.limit,
                self.capacity,
                self.reserved,
            )

    def snapshot(self) -> dict[str, int]:
        """The budget as it stands (``ferryctl status``'s ``descriptors``).

        Not what it refused: those are counters, shown once, with the others
        (``counters.descriptors``: the data path registers ``counters``).
        """
        return {
            "limit": self.limit,
            "reserved": self.reserved,
            "for_flows": self.capacity,
            "in_use": self.in_use,
        }


Conn = TypeVar("Conn")


async def serve_accepted(
    accept: Callable[[], Awaitable[Conn]],
    serve: Callable[[Conn, trio.Semaphore], Awaitable[None]],
    limit: int,
    what: str,
    throttle: LogThrottle,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept until cancelled, at most *limit* connections served at once.

    Each connection is served in its own task with the semaphore, which
    *serve* releases when done; more clients wait in the backlog (their
    descriptors are in ferryd's reserve). EMFILE and the like, or a client
    that aborted (ECONNABORTED, accept(2)), back off for ACCEPT_BACKOFF: the
    listener stays readable, so retrying at once would spin. Any other
    error ends the loop.
    """
    slots = trio.Semaphore(limit)
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()
            try:
                conn = await accept()
            except OSError as exc:
                slots.release()
                if not is_exhaustion(exc) and exc.errno != errno.ECONNABORTED:
                    raise
                throttle.warning("accept", trio.current_time(), "%s: cannot accept: %s", what, exc)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            nursery.start_soon(serve, conn, slots)


def presize_fd_table(descriptors: int) -> int:
    """Grow this process's descriptor table now to hold ``descriptors``; the size asked.

    The kernel grows a process's descriptor table by doubling it
    (fs/file.c, expand_fdtable), and when the table is shared, as it is by
    every thread of a process, it first waits for an RCU grace period
    (synchronize_rcu()) so that no thread still reads the old one. On these
    machines that wait was 8-16 ms per doubling (measured: a dup2() to
    descriptor 300 with a second thread alive took 10.9 ms, 3 µs without).
    A migration target creates its sockets in the downtime: 1,000 of them
    went through four doublings, ~40 ms of the restore. Grown here, before
    any thread starts, the table costs nothing later; it never shrinks (8
    bytes of kernel memory per slot: 128 KiB for the default 16,384 flows).
    Capped by RLIMIT_NOFILE. F_DUPFD, not dup2(): it takes the lowest free
    number from there on, so a descriptor ferryd was handed at that number
    (``--tap-fd``, socket activation) stays open; the table is as large anyway.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    size = min(descriptors, soft)
    spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if spare < size - 1:
            os.close(fcntl.fcntl(spare, fcntl.F_DUPFD_CLOEXEC, size - 1))
    except OSError:
        pass  # EMFILE: every number from there on is taken, so the table is that large
    finally:
        os.close(spare)
    return size
