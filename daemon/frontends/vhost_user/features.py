"""Feature bits: virtio-net's, the virtio ring's, and vhost-user's own.

Numbers from the virtio 1.x specification (5.1.3 "Feature bits", 6
"Reserved Feature Bits") and QEMU's docs/interop/vhost-user.rst ("Protocol
features"). One place for them: the session negotiates with these, the
virtqueue code reads the negotiated set.
"""

# virtio-net device features (virtio 1.x, 5.1.3)
VIRTIO_NET_F_CSUM = 0
"""The device (ferryd) accepts frames whose L4 checksum the guest left partial."""
VIRTIO_NET_F_GUEST_CSUM = 1
"""The guest accepts frames with a partial L4 checksum (ferryd's send_partial)."""
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_HOST_TSO4 = 11
"""The guest may send TCP/IPv4 segments larger than the MTU (needs CSUM)."""
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_MRG_RXBUF = 15
"""A received frame may span several guest buffers (num_buffers in the header)."""
VIRTIO_NET_F_MQ = 22

# vhost and ring features
VHOST_F_LOG_ALL = 26
"""The back-end marks every guest page it writes in the dirty log (migration)."""
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
"""vhost-user's own bit: GET/SET_PROTOCOL_FEATURES exist; rings start disabled."""
VIRTIO_F_VERSION_1 = 32
"""Virtio 1.x: little-endian rings, a 12-byte net header with num_buffers."""
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34

# vhost-user protocol features
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1
VHOST_USER_PROTOCOL_F_RARP = 2
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_BACKEND_REQ = 5
VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13
VHOST_USER_PROTOCOL_F_DEVICE_STATE = 19


def bit(n: int) -> int:
    return 1 << n


OFFERED_FEATURES = (
    bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VHOST_USER_F_PROTOCOL_FEATURES)
    | bit(VHOST_F_LOG_ALL)
)
"""What ferryd offers QEMU (GET_FEATURES).

Not offered, on purpose: GUEST_TSO4/6 (the stack never builds a segment
larger than the MTU; with MTU 65520 a 64 KiB segment reaches the guest as
one frame across mergeable buffers), EVENT_IDX (notifications are
suppressed only by the ring's flags; an implementation cut a Linux guest's
transmit kicks from 1 to 0.15 per frame but no throughput or CPU change
showed under TCG, and one bench run in nine lost the guest's transmit
ring: not offered until that is understood; the lost ring was probably
the used-index store fixed since, see virtqueue.py, which happened without
EVENT_IDX too; its avail_event would need the same one-store write),
INDIRECT_DESC (refused in a chain),
MQ (one queue pair), RING_PACKED and ACCESS_PLATFORM (split rings in
QEMU's address space only).
"""

OFFERED_PROTOCOL_FEATURES = (
    bit(VHOST_USER_PROTOCOL_F_REPLY_ACK)
    | bit(VHOST_USER_PROTOCOL_F_LOG_SHMFD)
    | bit(VHOST_USER_PROTOCOL_F_RESET_DEVICE)
    | bit(VHOST_USER_PROTOCOL_F_DEVICE_STATE)
)
"""What ferryd offers QEMU (GET_PROTOCOL_FEATURES).

LOG_SHMFD is what lets QEMU migrate at all (without it QEMU installs a
migration blocker); DEVICE_STATE carries ferry's migration stream; REPLY_ACK
lets QEMU wait for the messages that must be done before it goes on
(SET_MEM_TABLE, LOG_ALL on SET_FEATURES, SET_VRING_ENABLE). Not offered: MQ
(QEMU then assumes one queue pair and never asks GET_QUEUE_NUM),
CONFIGURE_MEM_SLOTS (so at most 8 regions, in SET_MEM_TABLE only), RARP (the
guest's own announcement is enough; QEMU skips SEND_RARP), BACKEND_REQ,
INFLIGHT_SHMFD (no inflight tracking: see the package docstring).
"""

REQUIRED_FEATURES = bit(VIRTIO_F_VERSION_1)
"""Refused without: legacy (pre-1.0) rings and headers are not supported."""

NUM_QUEUES = 2
"""One queue pair: ring 0 is receiveq1 (to the guest), ring 1 is transmitq1."""
RX_QUEUE = 0
TX_QUEUE = 1
