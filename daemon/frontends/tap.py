"""Tap frontend: the guest is a network namespace with a tap device.

Setup (privileged, before ferryd drops its capabilities): in the guest's
namespace (daemon.netns), open /dev/net/tun and attach to the tap device with
TUNSETIFF, which creates it if it does not exist (a persistent tap of that
name is attached to instead); set its MTU and bring it up through rtnetlink
(pyroute2); with ``--config-net`` also assign the guest's addresses and
default routes, as ``pasta --config-net`` does. The returned file descriptor
keeps working after the thread that opened it is gone and after capabilities
are dropped: the kernel checks permissions at TUNSETIFF time only.

Data path: IFF_TAP | IFF_NO_PI gives one bare Ethernet frame per read and
per write. The fd is non-blocking; the reader waits for readability once and
then drains the queue with ``readv`` into one preallocated buffer until
EAGAIN (REFERENCE.md: each trio await costs ~9 µs, so awaiting per frame
would halve throughput). A frame handed to the stack is a view of that
buffer, valid only until the stack returns: ferryd keeps no payload.
"""

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Callable

import trio

from daemon.link import LinkConfig
from daemon.netns import run_in_netns

log = logging.getLogger("ferryd.tap")

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
_MAX_FRAME = 65536 + 14 + 4  # MTU 65520 + Ethernet header, with room to spare
_BURST = 64


class TapSetupError(Exception):
    """The tap device could not be set up (bad namespace, name or permission)."""


def _open_and_configure(name: str, link: LinkConfig, config_net: bool) -> int:
    from pyroute2 import IPRoute

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=index, mtu=link.mtu, state="up")
            if config_net:
                _config_net(ipr, index, link)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _config_net(ipr: object, index: int, link: LinkConfig) -> None:
    """Addresses and default routes for the guest, idempotent across restarts."""
    from pyroute2.netlink.exceptions import NetlinkError

    def tolerate_exists(fn: Callable[[], object]) -> None:
        try:
            fn()
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    if link.ipv4 is not None:
        v4 = link.ipv4
        tolerate_exists(
            lambda: ipr.addr(  # type: ignore[attr-defined]
                "add", index=index, address=str(v4.address), prefixlen=v4.prefixlen
            )
        )
        tolerate_exists(
            lambda: ipr.route(  # type: ignore[attr-defined]
                "add", dst="0.0.0.0/0", gateway=str(v4.gateway), oif=index
            )
        )
    if link.ipv6 is not None:
        v6 = link.ipv6
        # IFA_F_NODAD (0x02): ferryd never claims the guest's address, so
        # duplicate address detection could only delay the guest.
        tolerate_exists(
            lambda: ipr.addr(  # type: ignore[attr-defined]
                "add",
                index=index,
                address=str(v6.address),
                prefixlen=v6.prefixlen,
                family=10,
                flags=0x02,
            )
        )
        tolerate_exists(
            lambda: ipr.route(  # type: ignore[attr-defined]
                "add", dst="::/0", gateway=str(v6.gateway), oif=index, family=10
            )
        )


class TapFrontend:
    """A tap device's fd, with a draining reader and a non-blocking writer."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray(_MAX_FRAME)
        self._view = memoryview(self._buf)
        self.frames_in = 0
        self.frames_out = 0
        self.dropped_out = 0

    @classmethod
    def open(cls, netns: str, name: str, link: LinkConfig, config_net: bool) -> "TapFrontend":
        if not name or len(name.encode()) > 15:
            raise TapSetupError(f"tap name {name!r} must be 1 to 15 bytes (IFNAMSIZ)")
        if not os.path.exists(netns):
            raise TapSetupError(f"network namespace {netns} does not exist")
        try:
            fd = run_in_netns(netns, lambda: _open_and_configure(name, link, config_net))
        except OSError as exc:
            raise TapSetupError(f"cannot set up tap {name!r} in {netns}: {exc}") from exc
        except Exception as exc:  # pyroute2's NetlinkError and friends
            raise TapSetupError(f"cannot configure tap {name!r} in {netns}: {exc}") from exc
        return cls(fd)

    def send(self, frame: bytes) -> None:
        """Write one frame; if the tap's queue is full, drop it (see guest.py)."""
        try:
            os.write(self.fd, frame)
            self.frames_out += 1
        except BlockingIOError:
            self.dropped_out += 1
        except OSError as exc:
            # EIO: the tap is down (guest side closed it); nothing to deliver to.
            self.dropped_out += 1
            if exc.errno != errno.EIO:
                log.warning("tap write failed: %s", exc)

    async def run(self, on_frame: Callable[[memoryview], None]) -> None:
        """Deliver every frame the guest sends, until cancelled.

        After a burst of :data:`_BURST` frames the loop yields once, so a guest
        that never lets the queue run dry cannot starve the socket readers.
        """
        readv, fd, buf, view = os.readv, self.fd, [self._buf], self._view
        while True:
            await trio.lowlevel.wait_readable(fd)
            drained = False
            while not drained:
                for _ in range(_BURST):
                    try:
                        n = readv(fd, buf)
                    except BlockingIOError:
                        drained = True
                        break
                    self.frames_in += 1
                    on_frame(view[:n])
                else:
                    await trio.lowlevel.checkpoint()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
