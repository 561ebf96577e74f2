"""systemd socket activation: take the listening socket systemd passed us.

The protocol (sd_listen_fds(3)): systemd starts the service with the
listening sockets as descriptors 3, 4, ... and sets LISTEN_FDS to their
count and LISTEN_PID to the service's pid, so that a process that merely
inherited the environment does not mistake unrelated descriptors for them.
The variables are removed once read, as sd_listen_fds() does, so they do not
leak further. ferry-repair.socket passes exactly one Unix stream socket;
anything else is a configuration error and is reported as such.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

SD_LISTEN_FDS_START = 3


class ActivationError(Exception):
    """The sockets systemd passed are not what ferry-repair.socket declares (bad config)."""


def listen_fds(environ: MutableMapping[str, str]) -> int | None:
    """How many descriptors, from :data:`SD_LISTEN_FDS_START` on, were passed to us.

    None if we were not socket-activated: LISTEN_PID or LISTEN_FDS missing,
    or LISTEN_PID naming another process (we merely inherited the variables:
    not ours to touch). Otherwise LISTEN_FDS as a number, which may be 0 or
    more than the caller expects: the caller says what it wanted. LISTEN_PID,
    LISTEN_FDS and LISTEN_FDNAMES are removed in every case, as
    sd_listen_fds() does. Raises :class:`ActivationError` if LISTEN_FDS meant
    for us is not a decimal number.

    Shared with ferryd (daemon/frontends/tap_fd.py, which receives a
    /dev/net/tun descriptor the same way); this package never imports daemon.
    """
    pid = environ.pop("LISTEN_PID", None)
    count = environ.pop("LISTEN_FDS", None)
    environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None or pid != str(os.getpid()):
        return None
    if not (count.isascii() and count.isdigit()):
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number of descriptors")
    return int(count)


def activation_listener(environ: MutableMapping[str, str]) -> socket.socket | None:
    """The socket-activated listener, or None if we were not socket-activated."""
    count = listen_fds(environ)
    if count is None:
        return None
    if count != 1:
        raise ActivationError(f"systemd passed LISTEN_FDS={count} sockets, expected 1")
    try:
        listener = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        raise ActivationError(f"descriptor 3 from systemd is not a socket: {exc}") from None
    listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM or not listening:
        listener.detach()
        raise ActivationError(
            "descriptor 3 from systemd is not a listening Unix stream socket"
            " (ferry-repair.socket needs ListenStream=PATH and Accept=no)"
        )
    listener.set_inheritable(False)
    return listener
