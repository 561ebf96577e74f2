"""The frames' face of the two rings: what a Frontend needs, without any I/O.

:class:`NetDevice` turns the session's receive and transmit rings into the
calls the data path makes on a frontend (ferryd.frontends.base): ``send`` /
``send_partial`` put a frame in the guest's receive ring, :meth:`NetDevice.
receive_burst` hands the frames of the transmit ring to ``on_frame``. It
owns no descriptor: whether the guest wants an interrupt is returned
(by each send, and by the burst), and the trio adapter writes the call
eventfd: for each frame to the guest that wants one, once per burst of
its frames.

Transmit frames are copied (see :mod:`.virtqueue`) into one preallocated
buffer and handed on as a view valid for the call, the tap frontend's
contract. ``trusted`` is the header's NEEDS_CSUM or DATA_VALID, as for the
tap: the guest's own kernel left the checksum to the device or vouched for
it. A TCP segment larger than the MTU (HOST_TSO4/6: gso_type TCPV4/6) is
handed on whole, as the tap does; nothing segments it.

A guest's broken ring raises :class:`GuestDriverError` out of here; the
adapter stops using that ring until QEMU starts it again (a ring QEMU
restarts gets its base and indexes afresh).
"""

from __future__ import annotations

from dataclasses import dataclass

from ferryd.frontends.base import FrontendCounters, OnFrame
from ferryd.frontends.vhost_user.features import (
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_GUEST_CSUM,
    bit,
)
from ferryd.frontends.vhost_user.session import VhostUserSession
from ferryd.frontends.vhost_user.virtqueue import (
    NET_HDR_SIZE,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
)

MAX_TX_FRAME = NET_HDR_SIZE + 14 + 4 + 65535
"""Header, Ethernet with one VLAN tag, the largest IP packet: a 64 KiB TSO segment fits."""
_TRUST = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID


@dataclass
class VhostUserCounters(FrontendCounters):
    """The frames (FrontendCounters), and what the rings and QEMU's connections did besides."""

    discarded_in: int = 0
    """Guest frames not handed on: too long, shorter than a header, or a disabled ring."""
    notifications: int = 0
    """Interrupts asked for (call eventfd writes the adapter makes)."""
    kicks: int = 0
    """The guest's notifications on the transmit ring ("frames posted"), each an exit."""
    connections: int = 0
    """QEMU's connections served (its first, and every reconnect)."""
    refused: int = 0
    """Connections closed at once: another QEMU was being served."""
    protocol_errors: int = 0
    """Connections ended because QEMU sent a message the session refused."""
    ring_errors: int = 0
    """Rings stopped because the guest's driver broke them (until QEMU restarts them)."""


#: What :meth:`NetDevice.send` says of a frame: it went in; and the guest wants to hear of it.
TAKEN = 1
NOTIFY = 2


class NetDevice:
    """Frames in and out of one vhost-user session's queue pair (no I/O)."""

    def __init__(self, session: VhostUserSession, counters: VhostUserCounters) -> None:
        self.session = session
        self.counters = counters
        """Shared by every session of one frontend (a reconnect does not reset them)."""
        self._rx = session.queues[RX_QUEUE]
        self._tx = session.queues[TX_QUEUE]
        self._buffer = memoryview(bytearray(MAX_TX_FRAME))

    @property
    def csum_offload(self) -> bool:
        """Frames may leave the L4 checksum to the guest (VIRTIO_NET_F_GUEST_CSUM acked)."""
        features = self.session.features
        return features is not None and bool(features & bit(VIRTIO_NET_F_GUEST_CSUM))

    def send(self, frame: bytes | memoryview) -> int:
        """One frame to the guest, or dropped and counted if it has no buffer for it now.

        0 if dropped; else :data:`TAKEN`, with :data:`NOTIFY` if the guest
        wants an interrupt for it (counted).
        """
        return self._deliver(self._rx.push_frame_untrusted((frame,)))

    def send_partial(
        self, parts: list[bytes | memoryview], csum_start: int, csum_offset: int
    ) -> int:
        """A frame whose L4 checksum the guest may leave unsummed (csum_offload only)."""
        return self._deliver(self._rx.push_frame_untrusted(parts, csum=(csum_start, csum_offset)))

    def _deliver(self, buffers: int) -> int:
        counters = self.counters
        if not buffers:
            counters.dropped_out += 1
            return 0
        counters.frames_out += 1
        if self._rx.should_notify():
            counters.notifications += 1
            return TAKEN | NOTIFY
        return TAKEN

    def receive_burst(self, on_frame: OnFrame, limit: int) -> tuple[bool, bool]:
        """Hand up to ``limit`` of the guest's frames to ``on_frame``.

        Returns ``(more, notify)``: the ring may hold more (the burst was
        full), and the guest wants an interrupt for the buffers given back.
        A started but disabled ring is emptied without handing anything on
        (vhost-user.rst, "Ring states").
        """
        tx, buffer, counters = self._tx, self._buffer, self.counters
        capacity = len(buffer)
        used: list[tuple[int, int]] = []
        try:
            while len(used) < limit:
                got = tx.pop_readable_untrusted(buffer)
                if got is None:
                    break
                head, length = got
                used.append((head, 0))  # the bytes are copied: the buffer goes back
                if length > capacity or length <= NET_HDR_SIZE or not tx.enabled:
                    counters.discarded_in += 1
                    continue
                counters.frames_in += 1
                on_frame(buffer[NET_HDR_SIZE:length], bool(buffer[0] & _TRUST))
        finally:
            # Once per burst (one used.idx store), and even when a later chain was broken.
            if used and tx.started:
                tx.push_used_batch(used)
        taken = len(used)
        notify = taken > 0 and tx.should_notify()
        if notify:
            counters.notifications += 1
        return taken == limit, notify
