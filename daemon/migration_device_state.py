"""QEMU's device-state transfer (vhost-user) handed to the migration controller.

Placeholder: the vhost-user frontend works, but the transfer of ferry's
migration stream through QEMU is not wired to the controller yet. Every
SET_DEVICE_STATE_FD is refused (the descriptor closed at once, so QEMU sees
EOF) and CHECK_DEVICE_STATE answers "failed": QEMU then fails the
migration and the source VM runs on, its connections untouched (nothing
was frozen). The real adapter replaces this module with the same class.
"""

from __future__ import annotations

import logging
import os

from ferryd.frontends.vhost_user.messages import TransferDirection
from ferryd.migration.controller import MigrationController

log = logging.getLogger("ferryd.migration")


class DeviceStateMigration:
    """A :class:`~ferryd.frontends.vhost_user.device_state.DeviceStateHandler` refusing all."""

    def __init__(self, controller: MigrationController) -> None:
        self.controller = controller

    def save(self, fd: int) -> None:
        self._refuse(fd, TransferDirection.SAVE)

    def load(self, fd: int) -> None:
        self._refuse(fd, TransferDirection.LOAD)

    def _refuse(self, fd: int, direction: TransferDirection) -> None:
        os.close(fd)
        log.warning(
            "QEMU asked for a device state %s: migration through QEMU is not wired yet",
            direction.name,
        )

    async def check(self, direction: TransferDirection) -> bool:
        return False

    async def resumed(self) -> None:
        return None

    async def started(self) -> None:
        return None

    def disconnected(self) -> None:
        return None
