"""systemd's readiness protocol (sd_notify(3)), for ``Type=notify`` units.

A unit with ``Type=notify`` counts as started only when its main process
says ``READY=1``; units ordered after it (and ``systemctl start``, hence
libvirt's hook) wait for that. systemd passes the address of its notify
socket in ``$NOTIFY_SOCKET``: a path, or an abstract name written with a
leading ``@`` (the kernel's leading NUL byte, unix(7)). A message is one
datagram of ``KEY=VALUE`` lines; no answer comes back.

ferryd says ``READY=1`` (with a ``STATUS=`` line for ``systemctl status``)
once its guest socket and control socket listen and it serves, and
``STOPPING=1`` when it begins to shut down. :meth:`Notifier.from_environ`
takes the variable out of the environment, as sd_notify's
``unset_environment`` does, so that nothing ferryd might start believes it
is systemd's main process. Outside systemd (no variable) every call does
nothing. A message that cannot be sent is logged, never fatal: ferryd's
guest does not depend on systemd hearing it (systemd then fails the start
after ``TimeoutStartSec=``, which is the visible outcome).

No libsystemd: the protocol is one sendto(). The socket is made per
message, as libsystemd does; socket(AF_UNIX) and sendto() stay in ferryd's
seccomp allow-list and the unit's RestrictAddressFamilies=.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

__all__ = ["Notifier", "notify_address"]

log = logging.getLogger("ferryd.sd_notify")

ENV = "NOTIFY_SOCKET"


def notify_address(value: str) -> str:
    """``$NOTIFY_SOCKET`` as an AF_UNIX address: ``@name`` is the abstract ``\\0name``."""
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    """Where to send this process's notifications, or nowhere (not under systemd)."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        """Take ``$NOTIFY_SOCKET`` (removed from ``environ``); only paths and ``@`` names.

        systemd also accepts ``vsock:`` addresses (for a VM's own systemd);
        a ferryd under a host's systemd never gets one, so it is refused
        with a warning rather than half supported.
        """
        value = environ.pop(ENV, "")
        if not value:
            return cls(None)
        if not value.startswith(("/", "@")):
            log.warning("$%s=%s: not a Unix socket path; systemd will not hear us", ENV, value)
            return cls(None)
        return cls(notify_address(value))

    def send(self, **fields: str) -> None:
        """One datagram, ``KEY=VALUE`` per line (``ready="1"`` -> ``READY=1``)."""
        if self.address is None:
            return
        message = "".join(f"{key.upper()}={value}\n" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            log.warning("cannot tell systemd %r: %s", message.strip(), exc)

    def ready(self, status: str) -> None:
        self.send(ready="1", status=status)

    def stopping(self, status: str) -> None:
        self.send(stopping="1", status=status)
