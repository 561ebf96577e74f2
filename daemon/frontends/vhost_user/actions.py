"""What the vhost-user session asks its adapter to do (small frozen dataclasses).

:class:`~ferryd.frontends.vhost_user.session.VhostUserSession` owns no socket
and no descriptor it does not hand on: every descriptor of a message it
accepted appears in exactly one action below, and the adapter does the
I/O, in the order the actions come.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferryd.frontends.vhost_user.messages import TransferDirection


@dataclass(frozen=True, slots=True)
class SendReply:
    """Write these bytes (one whole reply message) to QEMU."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CloseFds:
    """Descriptors the session is done with (mapped memory stays mapped after close)."""

    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SetKick:
    """Ring ``index``'s kick eventfd is now ``fd``; close the previous one. None: no kick fd
    (the ring stopped): stop watching."""

    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class SetCall:
    """Ring ``index``'s call eventfd (signalled after used buffers) is now ``fd``; close the
    previous one. None: do not signal."""

    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class RingChanged:
    """Ring ``index`` was started or stopped, enabled or disabled (frames flow when both)."""

    index: int
    started: bool
    enabled: bool


@dataclass(frozen=True, slots=True)
class DirtyLogging:
    """QEMU turned VHOST_F_LOG_ALL on (``on``: a migration of this VM started, its RAM
    pre-copy) or off again (cancelled, or over); said once per change."""

    on: bool


@dataclass(frozen=True, slots=True)
class TransferDeviceState:
    """SET_DEVICE_STATE_FD: write (SAVE) or read (LOAD) ferry's migration stream on ``fd``,
    then close it; the migration controller's job. The device is suspended (every ring
    stopped) while it runs."""

    direction: TransferDirection
    fd: int


@dataclass(frozen=True, slots=True)
class CheckDeviceState:
    """CHECK_DEVICE_STATE: QEMU waits until ferryd knows whether the transfer succeeded;
    answer with :meth:`VhostUserSession.device_state_checked`."""

    direction: TransferDirection


@dataclass(frozen=True, slots=True)
class DeviceSuspended:
    """The last running ring stopped while LOG_ALL is on: QEMU stopped the VM to end its
    migration, and its SAVE follows once RAM's last pass is sent (a few milliseconds
    in which ferryd may freeze already)."""


@dataclass(frozen=True, slots=True)
class DeviceResumed:
    """A ring starts again after the device was suspended during a migration (after a
    successful SAVE, or before any): QEMU resumed this (source) VM, so its migration
    failed or was cancelled, and ferryd rolls back whatever it froze, thawing its
    sockets, before the guest's frames flow again."""


Action = (
    SendReply
    | CloseFds
    | SetKick
    | SetCall
    | RingChanged
    | TransferDeviceState
    | CheckDeviceState
    | DeviceSuspended
    | DeviceResumed
    | DirtyLogging
)
