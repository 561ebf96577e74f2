"""ferryd as a vhost-user-net back-end: QEMU's guest talks to ferryd through shared memory.

With ``-netdev vhost-user`` QEMU hands the virtio-net device's queues to
another process (QEMU's docs/interop/vhost-user.rst): a unix socket carries
control messages and file descriptors (the guest's RAM, eventfds), and the
frames themselves move through split virtqueues in the guest's memory,
which ferryd maps. Sans-IO pieces, one job each, and the socket under them:

- :mod:`.messages`: the wire format, parsed (``*_untrusted``) and built.
- :mod:`.session`: the control plane's state machine (features, owner,
  memory table, rings, dirty log, device state), emitting :mod:`.actions`.
- :mod:`.memory`: the mapped regions, address translation, the dirty log.
- :mod:`.virtqueue`: split rings and the virtio-net header: frames out of
  the transmit ring, into the receive ring (mergeable buffers).
- :mod:`.device`: the queue pair as frames, what a Frontend calls.
- :mod:`.channel`: the one piece of I/O so far, the socket under the
  session (trio): messages with their descriptors in, replies out.
- :mod:`.features`: the feature bits offered; :mod:`.errors`: whose fault.

Still to come: the rest of the trio adapter (the listening socket and
reconnects, the kick and call eventfds, the
:class:`~ferryd.frontends.base.Frontend` over :class:`~.device.NetDevice`,
the device state and the rollback signal handed to the migration
controller) and ``ferryd --vhost-user --socket PATH``.
"""
