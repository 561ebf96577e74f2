"""The kernel's TCP repair and the repair helper, as the migration layer uses them.

Ports, so that a test without CAP_NET_ADMIN (no socket ever enters repair
mode then) drives the source and the restorer with doubles that record
what they were asked; production plugs in :data:`LINUX`
(ferryd.migration.sockstate) and :class:`~ferryd.migration.repair_source.RepairSource`
(whose clients are :class:`~ferryd.migration.repair_client.RepairClient`).

Why the kernel is split in two: a target only restores
(:class:`KernelRepair`); a source dumps (:class:`KernelDump`), and on one
host it also restores its own connections when it rolls back, so the
source's port is both.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from ferryd.migration import sockstate
from ferryd.migration.kernel_state import TcpKernelState
from ferryd.migration.repair_client import RepairMode

S = TypeVar("S", bound=socket.socket)


class KernelRepair(Protocol):
    """The kernel's side of restoring a TCP socket (REFERENCE.md gives the order)."""

    def new_socket_for(self, state: TcpKernelState, cls: type[S]) -> S: ...

    def restore_in_repair(self, sock: socket.socket, state: TcpKernelState) -> None: ...

    def finish_restore(self, sock: socket.socket, state: TcpKernelState) -> int: ...

    def close_silently(self, sock: socket.socket) -> None: ...

    def reuse_after_repair_off(self, socks: list[socket.socket]) -> None: ...


class KernelDump(KernelRepair, Protocol):
    """The kernel's side of a migration source: dumping, and restoring for a rollback."""

    def dump_tcp(self, sock: socket.socket) -> TcpKernelState: ...

    def reopen_send_window(self, sock: socket.socket, snd_wnd: int) -> None:
        """Undo the dump's held send window: the socket goes back into service."""
        ...

    def segment_counts(self, sock: socket.socket) -> tuple[int, int]:
        """Segments in and out so far: unchanged means a pre-copied dump still holds."""
        ...


class _Linux:
    """The kernel ports as Linux does them (ferryd.migration.sockstate)."""

    new_socket_for = staticmethod(sockstate.new_socket_for)
    restore_in_repair = staticmethod(sockstate.restore_in_repair)
    finish_restore = staticmethod(sockstate.finish_restore)
    close_silently = staticmethod(sockstate.close_silently)
    reuse_after_repair_off = staticmethod(sockstate.reuse_after_repair_off)
    dump_tcp = staticmethod(sockstate.dump_tcp)
    reopen_send_window = staticmethod(sockstate.reopen_send_window)
    segment_counts = staticmethod(sockstate.segment_counts)


LINUX: KernelDump = _Linux()


class RepairPort(Protocol):
    """A connection to the repair helper (ferry-repair): TCP_REPAIR on batches of sockets."""

    async def set_repair(
        self,
        socks: Sequence[socket.socket],
        mode: RepairMode,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """TCP_REPAIR to ``mode`` on ``socks``; ``progress(n)``: ``socks[:n]`` are done."""
        ...

    @property
    def reconnects(self) -> int:
        """Connections to the helper made after the first (shown by ``status``)."""
        ...

    can_arm: bool
    """Whether the helper takes ARM (set_repair), FREEZE_ARMED and DISARM
    (repair_helper/armed.py); set False once it refused one."""

    async def freeze_armed(self, count: int) -> None:
        """Stop the intake of the ``count`` sockets armed over this connection, at once."""
        ...

    async def disarm(self) -> None:
        """Let the sockets armed over this connection hear again."""
        ...


class RepairSupply(Protocol):
    """Where the repair helper comes from, and again after it went away."""

    async def get(self) -> RepairPort:
        """The helper's connection; raises RepairUnavailable if there is none to be had."""
        ...
