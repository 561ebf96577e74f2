"""ferryd as a vhost-user-net back-end: QEMU's guest talks to ferryd through shared memory.

With ``-netdev vhost-user`` QEMU hands the virtio-net device's queues to
another process (QEMU's docs/interop/vhost-user.rst): a unix socket carries
control messages and file descriptors (the guest's RAM, eventfds), and the
frames themselves move through split virtqueues in the guest's memory,
which ferryd maps. Sans-IO pieces, one job each, then the trio adapter:

- :mod:`.messages`: the wire format, parsed (``*_untrusted``) and built.
- :mod:`.session`: the control plane's state machine (features, owner,
  memory table, rings, dirty log, device state), emitting :mod:`.actions`.
- :mod:`.memory`: the mapped regions, address translation, the dirty log.
- :mod:`.virtqueue`: split rings and the virtio-net header: frames out of
  the transmit ring, into the receive ring (mergeable buffers).
- :mod:`.device`: the queue pair as frames, what a Frontend calls.
- :mod:`.channel`: the socket under the session (trio): messages with
  their descriptors in, replies out.
- :mod:`.frontend`: :class:`~.frontend.VhostUserFrontend`, the
  :class:`~ferryd.frontends.base.Frontend` over :class:`~.device.NetDevice`
  (``ferryd --vhost-user --socket PATH``): the listening socket and
  reconnects, the kick and call eventfds, and the control connection that
  lives as long as the daemon.
- :mod:`.device_state`: what the frontend asks of the migration (the
  device state QEMU transfers, the rollback and resume signals), given by
  ferryd.main (ferryd.migration_device_state).
- :mod:`.features`: the feature bits offered; :mod:`.errors`: whose fault.
"""
