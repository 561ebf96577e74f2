"""What the vhost-user frontend asks of whoever migrates ferryd (QEMU drives the migration).

With vhost-user, QEMU carries ferry's migration stream inside its own
(vhost-user.rst, "Migrating back-end state"): SET_DEVICE_STATE_FD hands
ferryd a pipe end to write (SAVE, on the source) or to read (LOAD, on the
target) while every ring is stopped, and CHECK_DEVICE_STATE waits for the
outcome. What happens next tells the source how the migration ended: QEMU
restarting a ring after a good SAVE means it failed after ferryd's part
(the source VM runs again: roll back), QEMU closing the connection means
the target took over. On a target, the first ring QEMU starts after a good
LOAD means the VM runs there: resume.

The frontend knows none of the migration's machinery: ferryd.main hands it
an object with these methods (ferryd.migration_device_state's adapter over
the migration controller), as ferryd.migration_control does for ferryctl.
"""

from __future__ import annotations

from typing import Protocol

from ferryd.frontends.vhost_user.messages import TransferDirection


class DeviceStateHandler(Protocol):
    def save(self, fd: int) -> None:
        """SET_DEVICE_STATE_FD SAVE: freeze and write the stream on ``fd`` (owned from here on,
        closed when done, so that QEMU sees EOF), in the background; returns at once."""
        ...

    def load(self, fd: int) -> None:
        """SET_DEVICE_STATE_FD LOAD: read the stream from ``fd`` (owned from here on) and
        restore it, in the background; returns at once."""
        ...

    async def check(self, direction: TransferDirection) -> bool:
        """CHECK_DEVICE_STATE: wait for the transfer QEMU asks about; True if it succeeded."""
        ...

    def suspended(self) -> None:
        """QEMU stopped the VM while migrating it (the session's DeviceSuspended): its SAVE
        follows; freeze already, in the background, if that helps; returns at once."""
        ...

    async def resumed(self) -> None:
        """QEMU restarts a ring after a good SAVE, or after a suspension while migrating
        (the session's DeviceResumed): roll back whatever was frozen (thaw every socket,
        restart the data path) before any frame flows."""
        ...

    async def started(self) -> None:
        """A ring starts (every start, the adapter does not filter): after a checked LOAD,
        resume the restored flows before any frame flows; otherwise nothing."""
        ...

    def dirty_logging(self, on: bool) -> None:
        """QEMU turned LOG_ALL on (a migration of the VM started: its RAM pre-copy) or off
        (it ended or was cancelled): cap the flows' kernel queues meanwhile, so that what
        crosses in the stopped phase is bounded (ferryd.migration.source.QUEUE_BOUND)."""
        ...

    def disconnected(self) -> None:
        """QEMU's connection ended: after a checked SAVE the target took over (commit); after
        a LOAD not yet resumed the VM will not run here (discard); otherwise nothing."""
        ...
