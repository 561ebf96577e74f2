"""ferry-tap-setup: root's half of ferryd-netns@.service, run as ``ExecStartPre=+``.

ferryd-netns@.service starts ferryd with no capability at all, so everything that
needs one happens here, as root, before it starts:

1. in the guest's namespace, create the persistent multi-queue tap if it is
   missing (TUNSETIFF, TUNSETGROUP, TUNSETPERSIST: ``ip tuntap add ... mode
   tap multi_queue vnet_hdr group G`` does the same) and set its MTU and
   bring it up. The group lets ferryd (gid G, no CAP_NET_ADMIN) attach to it
   later (drivers/net/tun.c, tun_not_capable()). An existing tap is left as
   it is: it may be carrying the guest's traffic to another ferryd (a
   migration target attaches a queue to the same tap);
2. open /dev/net/tun *inside* the guest's namespace (the file binds to its
   opener's namespace, tun_chr_open(); TUNSETIFF then finds the tap there
   even when called from the host's namespace) and hand it to systemd's
   file descriptor store: ``FDSTORE=1``, ``FDNAME=tap``, ``FDPOLL=0``
   (sd_notify(3)) with the descriptor attached, then ``BARRIER=1`` so that
   systemd has taken it before this process exits. systemd passes stored
   descriptors to the next ExecStart= like socket-activated ones
   (LISTEN_FDS; ferryd.frontends.tap_fd reads them).

Why not a socket unit with ``ListenSpecial=/dev/net/tun`` and
``NetworkNamespacePath=``: systemd opens special files in PID 1 itself
(src/core/socket.c, socket_open_fds(): special_address_create(), no helper
process and no setns), so the file would belong to the host's namespace; and
a listening socket unit polls its descriptors, which for an unattached tun
file is EPOLLERR at once (tun_chr_poll()), failing the unit
(socket_dispatch_io()). FDPOLL=0 keeps the store from polling it for the
same reason (systemd drops a stored descriptor that reports EPOLLERR).

The store holds one descriptor (FileDescriptorStoreMax=1): when ferryd
restarts, systemd still holds the one ferryd attached before, passes it
again (ferryd.frontends.tap: an attached descriptor is accepted as it is),
and refuses the fresh one sent here.
"""

from __future__ import annotations

import argparse
import array
import fcntl
import grp
import os
import select
import socket
import struct
import sys

from pyroute2.netlink.exceptions import NetlinkError

from ferryd.frontends.tap import TAP_FLAGS, TUNSETIFF
from ferryd.netns import run_in_netns
from ferryd.sd_notify import notify_address

TUNSETPERSIST = 0x400454CB
TUNSETGROUP = 0x400454CE
IFF_TUN_EXCL = 0x8000  # include/uapi/linux/if_tun.h
BARRIER_TIMEOUT = 5.0


class SetupError(Exception):
    """The tap cannot be prepared as asked (operator's configuration)."""


def ensure_tap(name: str, gid: int, mtu: int) -> None:
    """The persistent tap ``name`` exists in this thread's namespace; if we make it, up at ``mtu``.

    An existing tap is left as it is (the module docstring says why).
    IFF_TUN_EXCL makes the creation fail (EBUSY) if a tap of that name
    appeared since the lookup, so root never adopts, regroups or persists a
    device someone else made in the guest's namespace (tun_set_iff()).
    """
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=name):
            return
        fd = open_tun()
        try:
            flags = TAP_FLAGS | IFF_TUN_EXCL
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
            fcntl.ioctl(fd, TUNSETGROUP, gid)
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
        finally:
            os.close(fd)
        (index,) = ipr.link_lookup(ifname=name)
        ipr.link("set", index=index, mtu=mtu, state="up")


def open_tun() -> int:
    """/dev/net/tun, opened in this thread's namespace (and bound to it)."""
    return os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)


def store_fd(notify_socket: str, fd: int, name: str) -> None:
    """Give ``fd`` to systemd's descriptor store and wait until it has it (sd_notify(3))."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(notify_address(notify_socket))
        message = f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0\n".encode()
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        sock.sendmsg([message], rights)
        # sd_notify_barrier(): systemd closes its copy of the pipe's write end
        # once it has processed every message sent before this one.
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            ends = array.array("i", [write_end]).tobytes()
            barrier = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, ends)]
            sock.sendmsg([b"BARRIER=1\n"], barrier)
            os.close(write_end)
            write_end = -1
            poller = select.poll()
            poller.register(read_end, select.POLLHUP)
            if not poller.poll(BARRIER_TIMEOUT * 1000):
                raise SetupError("systemd did not acknowledge the stored tap descriptor")
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="ferry-tap-setup",
        description="As root, before ferryd-netns@.service's ferryd: create the guest's persistent "
        "tap and store a /dev/net/tun descriptor opened in its namespace with systemd "
        "(NotifyAccess=exec, FileDescriptorStoreMax=1).",
    )
    p.add_argument("--netns", required=True, metavar="PATH", help="/run/netns/NAME")
    p.add_argument("--tap", default="tap0", metavar="NAME")
    p.add_argument("--group", default="ferry", help="ferryd's group, which may attach")
    p.add_argument("--mtu", type=int, default=65520)
    opts = p.parse_args(argv)
    try:
        try:
            gid = int(opts.group) if opts.group.isdigit() else grp.getgrnam(opts.group).gr_gid
        except KeyError:
            raise SetupError(f"no group named {opts.group!r} (groupadd --system ferry)") from None
        notify = os.environ.get("NOTIFY_SOCKET")
        if not notify:
            raise SetupError(
                "NOTIFY_SOCKET is not set: run from ferryd-netns@.service (NotifyAccess=exec)"
            )

        def in_guest() -> int:
            ensure_tap(opts.tap, gid, opts.mtu)
            return open_tun()

        fd = run_in_netns(opts.netns, in_guest)
        try:
            store_fd(notify, fd, "tap")
        finally:
            os.close(fd)
    except (OSError, SetupError, NetlinkError) as exc:
        print(f"ferry-tap-setup: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
