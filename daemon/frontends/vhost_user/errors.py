"""The two errors of the vhost-user back-end, one per party that can be at fault.

vhost-user has two untrusted peers. QEMU (the front-end) sends the control
messages on the unix socket; the guest's driver writes the virtqueues in
shared memory. Each gets its own error (STYLE.md rule 6) so the adapter
knows what to do: a :class:`VhostUserProtocolError` ends the connection
(QEMU reconnects and gets a fresh session), a :class:`GuestDriverError`
costs one frame or one ring, never the daemon.
"""


class VhostUserProtocolError(ValueError):
    """QEMU sent a malformed, oversized, unsupported or out-of-order message: its fault.

    The session is left as it was before the message; the adapter closes the
    message's file descriptors and the connection.
    """


class GuestDriverError(ValueError):
    """The guest's driver put something invalid in a virtqueue: its fault.

    A descriptor outside guest memory, a loop in a chain, an available index
    running ahead of the queue size. The ring's indices and the guest's memory
    are left as they were.
    """


class GuestMemoryError(GuestDriverError):
    """An address and length that no single region of guest memory holds."""
