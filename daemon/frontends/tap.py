"""Tap frontend: the guest is a network namespace with a tap device.

Setup (privileged, before ferryd drops its capabilities): in the guest's
namespace (ferryd.netns), open /dev/net/tun and attach to the tap device with
TUNSETIFF, which creates it if it does not exist (a persistent tap of that
name is attached to instead); set its MTU and bring it up through rtnetlink
(pyroute2); with ``--config-net`` also assign the guest's addresses and
default routes, as ``pasta --config-net`` does. The returned file descriptor
keeps working after the thread that opened it is gone and after capabilities
are dropped: the kernel checks permissions at TUNSETIFF time only.
:meth:`TapFrontend.adopt` is the unprivileged variant: a descriptor opened
in the guest's namespace by someone else (ferryd.frontends.tap_fd), a tap
already made and configured by root; only TUNSETIFF and TUNSETOFFLOAD here.

Data path: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR gives one Ethernet frame per
read and per write, each behind a 10-byte ``struct virtio_net_hdr``
(include/uapi/linux/virtio_net.h). That header is what makes checksum
offload possible both ways (TUNSETOFFLOAD with TUN_F_CSUM):

- guest → ferryd: a frame flagged VIRTIO_NET_HDR_F_NEEDS_CSUM carries a TCP
  or UDP checksum the guest's kernel never computed (it trusts its device to
  do it). Such frames come from the guest's own stack, so ferryd does not
  verify them; every other frame is verified as usual.
- ferryd → guest: TCP segments are written with NEEDS_CSUM and csum_start /
  csum_offset, the checksum field holding only the pseudo-header sum: the
  guest's kernel accepts them as CHECKSUM_PARTIAL (locally delivered, never
  summed; completed only if the guest forwards them). Summing 64 KiB of
  payload per segment in Python was the largest cost of the data path.

With TUN_F_TSO4/TSO6 the guest may also hand over one TCP segment larger
than the MTU (gso_type TCPV4/TCPV6); ferryd writes it to the host socket
like any other segment, so no segmentation happens anywhere.

The fd is non-blocking; the reader waits for readability once and
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
import time
from collections.abc import Callable
from typing import Any

import trio

from ferryd.frontends.base import FrontendCounters, OnBurstEnd, OnFrame
from ferryd.link import LinkConfig
from ferryd.netns import run_in_netns

log = logging.getLogger("ferryd.tap")

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETQUEUE = 0x400454D9
TUNGETIFF = 0x800454D2
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
_VNET_PLAIN = bytes(VNET_HDR_LEN)
_VNET_CSUM = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum start/offset
# A TSO frame from the guest: up to a 64 KiB IP packet, plus the headers.
_MAX_FRAME = VNET_HDR_LEN + 14 + 65535 + 64
_BURST = 64


class TapSetupError(Exception):
    """The tap device could not be set up (bad namespace, name or permission)."""


class TapGone(Exception):
    """The tap device went away under us (deleted in the guest's namespace).

    Not a bug and not a frame ferryd could drop: there is no guest left to
    serve, so ferryd ends with one line (ferryd.exits) and its unit's restart
    policy decides what comes next.
    """


def _set_queue(fd: int, flag: int) -> None:
    fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH", b"", flag))


#: What ferryd asks of the tap; a persistent tap must have been made with
#: the same (``ip tuntap add ... mode tap multi_queue vnet_hdr``): TUNSETIFF
#: refuses a multi-queue mismatch with EINVAL (tun_set_iff()).
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE


def _attach_given(fd: int, name: str, incoming: bool) -> None:
    """Attach the descriptor someone else opened (ferryd.frontends.tap_fd) to tap ``name``.

    It may already be attached: a descriptor kept across ferryd's restarts
    by whoever passed it stays attached to its queue (TUNSETIFF then fails
    with EEXIST), so TUNGETIFF is asked first; EBADFD means not attached
    (__tun_chr_ioctl). No capability is needed for any of this on a
    persistent tap of our user or group (tun_not_capable()).
    """
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(18))
    except OSError as exc:
        if exc.errno != errno.EBADFD:
            raise
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), TAP_FLAGS))
        except OSError as setiff:
            # EINVAL for a queue detached earlier (tun_set_iff(): tfile->detached),
            # e.g. by a ferryd that was a migration's source or target, kept
            # by systemd's descriptor store across a restart: attach it back.
            if setiff.errno != errno.EINVAL:
                raise
            try:
                _set_queue(fd, IFF_ATTACH_QUEUE)
            except OSError:
                raise setiff from None
    else:
        current = ifr[:16].rstrip(b"\0").decode(errors="replace")
        (flags,) = struct.unpack("H", ifr[16:18])
        if current != name or flags & TAP_FLAGS != TAP_FLAGS:
            raise TapSetupError(
                f"the tap descriptor is already attached to {current!r} (flags {flags:#x}),"
                f" not to a multi-queue vnet_hdr tap {name!r}"
            )
    _attached(fd, incoming)


def _device_gone(fd: int) -> bool:
    """Whether the device behind our attached queue was deleted (TUNGETIFF:
    EBADFD once tun_detach_all() cleared the queue's device, __tun_chr_ioctl)."""
    try:
        fcntl.ioctl(fd, TUNGETIFF, bytes(18))
    except OSError as exc:
        return exc.errno == errno.EBADFD
    return False


def _attached(fd: int, incoming: bool) -> None:
    """The queue is ours: a migration target's waits detached (it takes over at
    resume); offloads on (see the module docstring)."""
    if incoming:
        _set_queue(fd, IFF_DETACH_QUEUE)
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)


def _open_and_configure(name: str, link: LinkConfig, config_net: bool, incoming: bool) -> int:
    from pyroute2 import IPRoute

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # IFF_MULTI_QUEUE: a migration target attaches a second queue to the
        # same device (disabled until it takes over), so the guest's link
        # never goes away while it moves from one ferryd to the other.
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), TAP_FLAGS))
        _attached(fd, incoming)
        if incoming:
            return fd
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
    """A tap device's fd, with a draining reader and a non-blocking writer.

    Implements :class:`ferryd.frontends.base.Frontend`; the handover is the
    tap's multi-queue: each ferryd holds one queue of the same device.
    """

    def __init__(
        self, fd: int, *, attached: bool = True, name: str = "", netns: str | None = None
    ) -> None:
        self.fd = fd
        self.name = name
        self.netns = netns
        """The guest's namespace as named at start (None: the descriptor's opener knows)."""
        self.attached = attached
        """Whether this queue receives the guest's frames (not so for --incoming)."""
        self._buf = bytearray(_MAX_FRAME)
        self._view = memoryview(self._buf)
        self.counters = FrontendCounters()

    def describe(self) -> dict[str, Any]:
        return {"kind": "tap", "name": self.name, "netns": self.netns}

    def hand_over(self) -> None:
        """Stop receiving the guest's frames (a migration's source, at its freeze).

        Detaching our queue makes tun steer every flow to the queue that
        remains (the target's): nothing the guest sends meanwhile is lost.
        """
        if self.attached:
            try:
                _set_queue(self.fd, IFF_DETACH_QUEUE)
            except OSError:
                # EINVAL when the device was deleted: tun_detach_all() left our
                # queue with no device (tun_set_queue). Nothing to give up then;
                # the next run() reports the gone tap.
                if not _device_gone(self.fd):
                    raise
            self.attached = False

    def take_over(self) -> None:
        """Start receiving the guest's frames (a migration's target, before the freeze)."""
        if not self.attached:
            _set_queue(self.fd, IFF_ATTACH_QUEUE)
            self.attached = True

    @classmethod
    def open(
        cls, netns: str, name: str, link: LinkConfig, config_net: bool, incoming: bool = False
    ) -> "TapFrontend":
        if not name or len(name.encode()) > 15:
            raise TapSetupError(f"tap name {name!r} must be 1 to 15 bytes (IFNAMSIZ)")
        if not os.path.exists(netns):
            raise TapSetupError(f"network namespace {netns} does not exist")
        try:
            fd = run_in_netns(netns, lambda: _open_and_configure(name, link, config_net, incoming))
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EINVAL:
                hint = " (an existing device without multi-queue support?)"
            raise TapSetupError(f"cannot set up tap {name!r} in {netns}: {exc}{hint}") from exc
        except Exception as exc:  # pyroute2's NetlinkError and friends
            raise TapSetupError(f"cannot configure tap {name!r} in {netns}: {exc}") from exc
        return cls(fd, attached=not incoming, name=name, netns=netns)

    @classmethod
    def adopt(
        cls, fd: int, name: str, incoming: bool = False, netns: str | None = None
    ) -> "TapFrontend":
        """A frontend on a /dev/net/tun descriptor opened in the guest's namespace by another.

        No setns and no netlink: the tap exists already, with its MTU and
        link state set by whoever created it (see ferryd.frontends.tap_fd).
        """
        if not name or len(name.encode()) > 15:
            raise TapSetupError(f"tap name {name!r} must be 1 to 15 bytes (IFNAMSIZ)")
        try:
            _attach_given(fd, name, incoming)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EPERM:
                # tun_not_capable(), or a missing device: creating one needs
                # CAP_NET_ADMIN (tun_set_iff()).
                hint = (
                    " (does a persistent tap of that name exist in the namespace the"
                    " descriptor was opened in, owned by ferryd's user or group?)"
                )
            elif exc.errno == errno.EINVAL:
                hint = " (a tap made without multi_queue or vnet_hdr?)"
            raise TapSetupError(f"cannot attach to tap {name!r}: {exc.strerror}{hint}") from exc
        return cls(fd, attached=not incoming, name=name, netns=netns)

    #: Frames may be sent with a partial L4 checksum (see the module doc).
    csum_offload = True

    def send(self, frame: bytes) -> bool:
        """Write one complete frame; if the tap's queue is full, drop it."""
        return self._write([_VNET_PLAIN, frame])

    def send_partial(
        self, parts: list[bytes | memoryview], csum_start: int, csum_offset: int
    ) -> bool:
        """Write a frame whose L4 checksum the guest's kernel may leave unsummed."""
        hdr = _VNET_CSUM.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, csum_start, csum_offset)
        return self._write([hdr, *parts])

    def _write(self, parts: list[bytes | memoryview]) -> bool:
        try:
            os.writev(self.fd, parts)
        except BlockingIOError:
            self.counters.dropped_out += 1  # a full NIC queue: see daemon/guest.py
            return False
        except OSError as exc:
            # EIO: the tap is down (guest side closed it); nothing to deliver to.
            self.counters.dropped_out += 1
            if exc.errno != errno.EIO:
                log.warning("tap write failed: %s", exc)
            return False
        self.counters.frames_out += 1
        return True

    async def run(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        """Deliver every frame the guest sends, until cancelled.

        ``on_frame(frame, trusted)``: ``trusted`` means the guest's kernel
        left the checksum to the device (NEEDS_CSUM) or vouched for it
        (DATA_VALID), so it is not to be verified. After a burst of
        :data:`_BURST` frames the loop yields once, so a guest that never
        lets the queue run dry cannot starve the socket readers.
        ``on_burst_end()`` follows every burst (work deferred per frame, such
        as ACKs, is done there once).
        """
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            while self._burst(on_frame):  # a full burst: more may be queued
                on_burst_end()
                await trio.lowlevel.checkpoint()
            on_burst_end()

    def _burst(self, on_frame: OnFrame, limit: int = _BURST) -> bool:
        """Deliver up to ``limit`` queued frames; True unless the queue ran dry."""
        readv, fd, buf, view, counters = os.readv, self.fd, [self._buf], self._view, self.counters
        trust = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID
        for _ in range(limit):
            try:
                n = readv(fd, buf)
            except BlockingIOError:
                return False
            except OSError as exc:
                # EBADFD: the device was deleted and our queue detached from
                # it (drivers/net/tun.c, tun_get() finds no device).
                raise TapGone(f"the guest's tap device is gone: {exc.strerror}") from exc
            if n <= VNET_HDR_LEN:
                continue
            counters.frames_in += 1
            on_frame(view[VNET_HDR_LEN:n], bool(view[0] & trust))
        return True

    def drain(self, on_frame: OnFrame, on_burst_end: OnBurstEnd, budget: float = 0.002) -> None:
        """Deliver, without waiting, the frames queued now, for about ``budget`` seconds.

        A migration's source calls it right before detaching its queue: the
        kernel drops whatever a queue still holds when it is detached
        (__tun_detach: tun_queue_purge), and for the guest that is data
        already sent, recovered only by its retransmission timer. The budget
        keeps this out of the downtime's way: a guest sending at full speed
        keeps a thousand 64 KiB frames queued, half a second of work; what
        is left then is dropped, and resent by the guest (~200 ms, its RTO).

        The freeze goes on if the device is gone (the stream frontend's
        drain contains its failures too): there is nothing left to deliver,
        and the next :meth:`run` reads the same EBADFD and reports it.
        """
        deadline = time.monotonic() + budget
        try:
            while self._burst(on_frame, 4) and time.monotonic() < deadline:
                pass
        except TapGone as exc:
            log.warning("%s; nothing to drain", exc)
        on_burst_end()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
