"""Who is on the other end of a connection, and whether we serve them.

The kernel records the credentials of a Unix socket's peer when the
connection is made (or, for the connecting side, when the peer called
listen()), and SO_PEERCRED returns them: they cannot be forged by the peer
and do not change afterwards (net/unix/af_unix.c, copy_peercred). So one
check per connection decides whom the helper serves: a caller whose uid or
gid is allowed gets its batches carried out, within the rules repair.py
enforces on each socket (its own sockets only, unless it is root; repair ON
only for bound ones; never the kernel's forced address reuse); any other
caller is refused before a byte is read.

By default the helper serves root and its own uid: an unprivileged ferryd
needs an explicit ``--allow-uid`` or ``--allow-gid`` (bad config, not a bug,
if that is missing).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


@dataclass(frozen=True)
class PeerCredentials:
    """SO_PEERCRED of a connection."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The kernel's record of who the peer of ``sock`` is."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return PeerCredentials(pid, uid, gid)


@dataclass(frozen=True)
class CallerPolicy:
    """Which uids and gids the helper serves."""

    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def build(cls, extra_uids: Iterable[int] = (), gids: Iterable[int] = ()) -> CallerPolicy:
        """Root, our own uid, plus what the administrator allowed."""
        return cls(frozenset({0, os.getuid(), *extra_uids}), frozenset(gids))

    def allows(self, peer: PeerCredentials) -> bool:
        """Whether ``peer`` may have batches carried out."""
        return peer.uid in self.uids or peer.gid in self.gids

    def __str__(self) -> str:
        gids = ",".join(map(str, sorted(self.gids))) or "none"
        return f"uids {','.join(map(str, sorted(self.uids)))}, gids {gids}"
