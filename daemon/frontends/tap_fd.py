"""A /dev/net/tun descriptor opened by someone else, in the guest's namespace.

Why: the kernel binds a /dev/net/tun file to the network namespace of the
process that *opened* it (drivers/net/tun.c, tun_chr_open() keeps
``current->nsproxy->net_ns`` in ``tfile->net``), and TUNSETIFF looks the
device up by name in that namespace, wherever the caller runs then. So a
root launcher can open the file inside the guest's namespace and hand the
descriptor to a ferryd that stays in the host's namespace with no
capability at all: no setns() (CAP_SYS_ADMIN), no device creation
(CAP_NET_ADMIN). TUNSETIFF onto an existing persistent tap needs no
capability either when the tap's owner or group is ours (tun_not_capable():
``euid == owner`` or ``in_egroup_p(group)``, effective or supplementary
gid), and TUNSETOFFLOAD and TUNSETQUEUE check none. The tap itself (its
MTU, link state, the guest's addresses) is root's business beforehand
(``ip tuntap add ... multi_queue vnet_hdr group G``), which is why
``--config-net`` is refused in this mode.

Two ways to receive it: ``--tap-fd N`` (an inherited descriptor), or the
sd_listen_fds(3) protocol (LISTEN_PID/LISTEN_FDS, descriptor 3), parsed by
ferry_repair.activation.listen_fds, which the helper uses for its own
listener: ferryd already imports repair_helper at run time (the repair
client and sockstate use ferry_repair.protocol); the helper never imports
daemon.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import MutableMapping

from ferry_repair.activation import SD_LISTEN_FDS_START, ActivationError, listen_fds

#: /dev/net/tun is the misc device 10:200 (Documentation/admin-guide/devices.txt).
TUN_DEVICE = os.makedev(10, 200)


class TapFdError(Exception):
    """The descriptor handed to ferryd is not a usable /dev/net/tun (bad config)."""


def inherited_tap_fd(environ: MutableMapping[str, str], explicit: int | None) -> int | None:
    """The /dev/net/tun descriptor we were given, or None to open one ourselves.

    ``explicit`` is ``--tap-fd``. Otherwise LISTEN_FDS=1 with LISTEN_PID
    naming us means descriptor 3; the variables are removed once read (as
    sd_listen_fds() does) so that nothing ferryd might start inherits them.
    """
    try:
        count = listen_fds(environ)  # read (and removed) even with --tap-fd
    except ActivationError as exc:
        if explicit is None:
            raise TapFdError(str(exc)) from None
        count = None
    if explicit is not None:
        fd = explicit
    elif count is None:
        return None  # not activated, or the variables were meant for another process
    elif count != 1:
        raise TapFdError(f"LISTEN_FDS={count}: expected exactly one /dev/net/tun descriptor")
    else:
        fd = SD_LISTEN_FDS_START
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise TapFdError(f"descriptor {fd} is not open: {exc.strerror}") from None
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != TUN_DEVICE:
        raise TapFdError(f"descriptor {fd} is not /dev/net/tun (character device 10:200)")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise TapFdError(f"descriptor {fd} is not open for reading and writing (O_RDWR)")
    os.set_inheritable(fd, False)
    os.set_blocking(fd, False)
    return fd
