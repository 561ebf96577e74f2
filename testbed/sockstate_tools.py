"""What ferry-repair does to a socket, done directly: for tests and benchmarks as root.

ferryd never freezes a socket or sets TCP_REPAIR itself: it asks
ferry-repair, which attaches the drop-all filter as it turns repair ON and
detaches it at repair OFF (repair_helper/repair.py, "Freezing intake"). Tests
and benchmarks of the kernel half (ferryd.migration.sockstate) run as root
and do the same here, without a helper in between, so that what they
measure or check is the kernel's part alone. The filter program is
ferry-repair's own classic one (``DROP_ALL_FPROG``), not a copy.

Failures raise :class:`~ferryd.migration.sockstate.SocketStateError`, as
the functions of sockstate do.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

from ferry_repair.protocol import TCP_REPAIR
from ferry_repair.repair import DROP_ALL_FPROG, SO_ATTACH_FILTER, SO_DETACH_FILTER
from ferryd.migration.kernel_state import four_tuple
from ferryd.migration.repair_client import RepairMode
from ferryd.migration.sockstate import SocketStateError

__all__ = ["freeze_intake", "set_repair_direct", "thaw_intake"]


def _where(sock: socket.socket) -> str:
    try:
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError:
        return f"TCP socket fd {sock.fileno()}"
    return four_tuple(local[0], local[1], remote[0], remote[1])


def freeze_intake(sock: socket.socket) -> None:
    """Attach the drop-all socket filter: from now on every incoming segment is dropped unseen."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, DROP_ALL_FPROG)
    except OSError as exc:
        raise SocketStateError(
            _where(sock), "freeze intake (SO_ATTACH_FILTER)", exc.strerror or str(exc)
        ) from exc


def thaw_intake(sock: socket.socket) -> None:
    """Detach the socket filter again; a socket without one is left alone."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise SocketStateError(
            _where(sock), "thaw intake (SO_DETACH_FILTER)", exc.strerror or str(exc)
        ) from exc


def set_repair_direct(socks: Sequence[socket.socket], mode: RepairMode) -> None:
    """Set TCP_REPAIR to ``mode`` on each socket ourselves (needs CAP_NET_ADMIN).

    The same contract as RepairClient.set_repair, without the freeze: on
    failure the sockets before the failing one are switched, the rest are not.
    """
    value = int(RepairMode(mode))
    for index, sock in enumerate(socks):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, value)
        except OSError as exc:
            raise SocketStateError(
                _where(sock),
                f"TCP_REPAIR={value} (socket {index} of {len(socks)})",
                exc.strerror or str(exc),
            ) from exc
