"""The vhost-user back-end's control plane: QEMU's messages in, actions out (sans-IO).

Theory of operation
-------------------

One :class:`VhostUserSession` per connection from QEMU; a reconnecting QEMU
gets a fresh one (the old one's :meth:`~VhostUserSession.close` unmaps its
memory). The adapter hands it each message with the descriptors that came
with it (:meth:`~VhostUserSession.receive_untrusted`) and does what the
returned actions (:mod:`.actions`) say, in order. A message that is
malformed, oversized, not negotiated or out of order raises
:class:`VhostUserProtocolError` and changes nothing: the adapter closes the
message's descriptors and the connection.

The order QEMU follows (hw/virtio/vhost.c and vhost-user.c, QEMU 10)::

    vhost_user_backend_init   GET_FEATURES, GET_PROTOCOL_FEATURES,
                              SET_PROTOCOL_FEATURES (GET_QUEUE_NUM only with MQ)
    vhost_dev_init            SET_OWNER, GET_FEATURES, per ring SET_VRING_CALL
                              (and SET_VRING_ERR)
    vhost_dev_start           SET_FEATURES, SET_MEM_TABLE, per ring SET_VRING_NUM,
                              SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK,
                              SET_VRING_CALL; SET_LOG_BASE if migrating;
                              SET_VRING_ENABLE 1 per ring
    migration starts          SET_LOG_BASE, SET_FEATURES + LOG_ALL, per ring
                              SET_VRING_ADDR + VHOST_VRING_F_LOG (rings running)
    vhost_dev_stop            GET_VRING_BASE per ring (stops it), SET_VRING_ENABLE 0
    virtio reset              RESET_DEVICE (negotiated), then vhost_dev_start again
    device state (source)     SET_DEVICE_STATE_FD SAVE, CHECK_DEVICE_STATE
    device state (target)     SET_DEVICE_STATE_FD LOAD, CHECK_DEVICE_STATE

The session's phase is an explicit table (:data:`ALLOWED`): before
SET_OWNER only the negotiation; after it everything else; while QEMU waits
for CHECK_DEVICE_STATE's answer, nothing. Within a phase each request
checks what it needs: a ring index below :data:`NUM_QUEUES`, a negotiated
protocol feature (LOG_SHMFD, RESET_DEVICE, DEVICE_STATE), a memory table
before ring addresses, a size and addresses before a kick, a stopped ring
for SET_VRING_NUM / BASE, a suspended device (every ring stopped) for
SET_DEVICE_STATE_FD. SET_FEATURES may come again while rings run, but only
to turn LOG_ALL on or off (QEMU's vhost_dev_set_log); any other change
then is refused, as is a feature ferryd did not offer or the lack of
VIRTIO_F_VERSION_1.

Replies: GET_* answer with their value; SET_LOG_BASE (LOG_SHMFD) and
SET_DEVICE_STATE_FD answer with a u64 0 (the latter with bit 8: ferryd
uses QEMU's pipe, not one of its own). With need_reply (REPLY_ACK) any
other request gets a u64 0 once done; a failure is a disconnect, not a
non-zero ack. CHECK_DEVICE_STATE's answer waits for the migration
controller (:meth:`~VhostUserSession.device_state_checked`).

Early freeze: the device suspended (its last ring stopped) while LOG_ALL
is on means QEMU stopped the VM to end its migration; SAVE follows once
RAM's last pass is sent. :class:`~.actions.DeviceSuspended` tells the
adapter then, so that it may freeze before SAVE comes.

Rollback: after a SAVE that CHECK_DEVICE_STATE confirmed, QEMU either
quits (the target took over) or starts the rings again because the
migration failed after ferryd's part (the target died after the device
state was sent, a cancel); after a suspension while migrating with no
SAVE yet, it starts them again if its migration failed or was cancelled
before the SAVE. Either way the first SET_VRING_KICK then comes with
:class:`~.actions.DeviceResumed`, ahead of the ring's own actions, so the
controller thaws its sockets before the guest's frames flow.

Rings: started by SET_VRING_KICK (ferryd needs the eventfd; a "no fd"
kick, i.e. polling, is refused), stopped by GET_VRING_BASE, which answers
with the next available index to process; enabled by SET_VRING_ENABLE, or
all at once by a SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES
(vhost-user.rst, "Ring states"). The data path uses the
:class:`~.virtqueue.SplitVirtqueue` objects in :attr:`VhostUserSession.queues`
directly; the session configures them and keeps their dirty log in step
with LOG_ALL and SET_LOG_BASE.

No clock: vhost-user has no timeouts (QEMU blocks on each reply), so
nothing here depends on time.

No buffer is ever in flight between two messages: a transmit chain goes
back to the guest as soon as it is copied, a receive chain as soon as it is
written, so GET_VRING_BASE's index is the whole state of a ring and
inflight tracking (INFLIGHT_SHMFD) has nothing to add. Not done here:
multiple queue pairs, the packed ring, postcopy, IOMMU.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

from ferryd.frontends.vhost_user.actions import (
    Action,
    CheckDeviceState,
    CloseFds,
    DeviceResumed,
    DeviceSuspended,
    DirtyLogging,
    RingChanged,
    SendReply,
    SetCall,
    SetKick,
    TransferDeviceState,
)
from ferryd.frontends.vhost_user.errors import VhostUserProtocolError
from ferryd.frontends.vhost_user.features import (
    NUM_QUEUES,
    OFFERED_FEATURES,
    OFFERED_PROTOCOL_FEATURES,
    REQUIRED_FEATURES,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_PROTOCOL_F_DEVICE_STATE,
    VHOST_USER_PROTOCOL_F_LOG_SHMFD,
    VHOST_USER_PROTOCOL_F_RESET_DEVICE,
    VIRTIO_NET_F_MRG_RXBUF,
    bit,
)
from ferryd.frontends.vhost_user.memory import DirtyLog, GuestMemory, MemoryMapper
from ferryd.frontends.vhost_user.messages import (
    VHOST_VRING_F_LOG,
    VRING_NOFD,
    DeviceStateFd,
    LogArea,
    MemoryTable,
    Message,
    Request,
    TransferDirection,
    VringAddress,
    VringFile,
    VringState,
    parse_message_untrusted,
    reply_u64,
    reply_vring_state,
)
from ferryd.frontends.vhost_user.virtqueue import MAX_QUEUE_SIZE, SplitVirtqueue

MAX_LOG_SIZE = 1 << 40
"""A dirty log bigger than this (a guest of 32 PiB) is refused rather than mapped."""


class Phase(enum.Enum):
    NEGOTIATING = enum.auto()
    """Before SET_OWNER: features and protocol features only."""
    OWNED = enum.auto()
    """SET_OWNER received: the device is QEMU's to configure."""
    CHECKING = enum.auto()
    """CHECK_DEVICE_STATE received; QEMU waits for the migration controller's answer."""


_NEGOTIATION = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
    }
)
ALLOWED: dict[Phase, frozenset[Request]] = {
    Phase.NEGOTIATING: _NEGOTIATION | {Request.SET_OWNER},
    Phase.OWNED: frozenset(Request) - {Request.SET_OWNER},
    Phase.CHECKING: frozenset(),
}
"""Which requests each phase accepts; anything else is out of order."""

_OWN_REPLY = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.SET_LOG_BASE,
        Request.SET_DEVICE_STATE_FD,
        Request.CHECK_DEVICE_STATE,
    }
)
"""Requests answered with a payload of their own: need_reply adds no ack to them."""


class VhostUserSession:
    """One connection's worth of vhost-user state; see the module docstring."""

    def __init__(
        self,
        mapper: MemoryMapper,
        *,
        features: int = OFFERED_FEATURES,
        protocol_features: int = OFFERED_PROTOCOL_FEATURES,
    ) -> None:
        self._mapper = mapper
        self.offered_features = features
        self.offered_protocol_features = protocol_features
        self.phase = Phase.NEGOTIATING
        self.features: int | None = None
        """What SET_FEATURES acked, None before it."""
        self.protocol_features = 0
        self.memory: GuestMemory | None = None
        self.log: DirtyLog | None = None
        self._log_view: memoryview | None = None
        self._transfer: TransferDirection | None = None
        self._saved = False
        """A SAVE succeeded and no ring has started since (see DeviceResumed)."""
        self._stopped_migrating = False
        """The device was suspended with LOG_ALL on and no ring has started since."""
        self.queues = tuple(SplitVirtqueue(i) for i in range(NUM_QUEUES))
        self._handlers: dict[Request, Callable[[Message], list[Action]]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.RESET_DEVICE: self._reset_device,
            Request.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            Request.CHECK_DEVICE_STATE: self._check_device_state,
        }

    # -- entry points -----------------------------------------------------------

    def receive_untrusted(self, data: bytes | memoryview, fds: Sequence[int]) -> list[Action]:
        """One whole message (header and payload) and its descriptors.

        On success every descriptor is in exactly one returned action; on
        :class:`VhostUserProtocolError` none was taken and nothing changed.
        """
        return self.handle_untrusted(parse_message_untrusted(data, fds))

    def handle_untrusted(self, message: Message) -> list[Action]:
        request = message.request
        if request not in ALLOWED[self.phase]:
            raise VhostUserProtocolError(
                f"{request.name} is out of order ({self.phase.name.lower()})"
            )
        actions = self._handlers[request](message)
        if message.need_reply and request not in _OWN_REPLY:
            actions.append(SendReply(reply_u64(request, 0)))
        return actions

    def device_state_checked(self, ok: bool) -> list[Action]:
        """The migration controller's verdict on the transfer QEMU asked about."""
        if self.phase is not Phase.CHECKING:
            raise RuntimeError("no CHECK_DEVICE_STATE is waiting for an answer")
        self.phase = Phase.OWNED
        self._saved = ok and self._transfer is TransferDirection.SAVE
        self._transfer = None
        return [SendReply(reply_u64(Request.CHECK_DEVICE_STATE, 0 if ok else 1))]

    def close(self) -> None:
        """Unmap what this session mapped (the connection is gone)."""
        for vq in self.queues:
            vq.reset()
        self._drop_memory()
        self._drop_log()

    @property
    def suspended(self) -> bool:
        """Every ring stopped: ferryd must not touch guest memory (vhost-user.rst)."""
        return not any(vq.started for vq in self.queues)

    # -- helpers ----------------------------------------------------------------

    def _queue(self, name: str, index: int) -> SplitVirtqueue:
        if index >= NUM_QUEUES:
            raise VhostUserProtocolError(
                f"{name}: ring {index}, ferryd has {NUM_QUEUES} (one queue pair)"
            )
        return self.queues[index]

    def _need_protocol(self, name: str, feature: int) -> None:
        if not self.protocol_features & bit(feature):
            raise VhostUserProtocolError(f"{name} without its protocol feature (bit {feature})")

    def _drop_memory(self) -> None:
        if self.memory is not None:
            self.memory.unmap(self._mapper)
            self.memory = None

    def _drop_log(self) -> None:
        self.log = None
        if self._log_view is not None:
            self._mapper.unmap(self._log_view)
            self._log_view = None
        self._apply_log()

    @property
    def _logging(self) -> bool:
        """LOG_ALL is on: QEMU is migrating the VM."""
        return self.features is not None and bool(self.features & bit(VHOST_F_LOG_ALL))

    def _apply_log(self) -> None:
        logging = self._logging
        for vq in self.queues:
            vq.log = self.log if logging else None

    @staticmethod
    def _ring_changed(vq: SplitVirtqueue) -> RingChanged:
        return RingChanged(vq.index, vq.started, vq.enabled)

    # -- negotiation ------------------------------------------------------------

    def _get_features(self, message: Message) -> list[Action]:
        return [SendReply(reply_u64(Request.GET_FEATURES, self.offered_features))]

    def _set_features(self, message: Message) -> list[Action]:
        value = message.payload
        assert isinstance(value, int)
        if value & ~self.offered_features:
            raise VhostUserProtocolError(
                f"SET_FEATURES {value:#x}: bits {value & ~self.offered_features:#x} not offered"
            )
        if value & REQUIRED_FEATURES != REQUIRED_FEATURES:
            raise VhostUserProtocolError(
                f"SET_FEATURES {value:#x} without VIRTIO_F_VERSION_1 (legacy virtio)"
            )
        if not self.suspended and self.features is not None:
            changed = (value ^ self.features) & ~bit(VHOST_F_LOG_ALL)
            if changed:
                raise VhostUserProtocolError(
                    f"SET_FEATURES changes {changed:#x} while rings run (only LOG_ALL may)"
                )
        was_logging = self.features is not None and bool(self.features & bit(VHOST_F_LOG_ALL))
        self.features = value
        for vq in self.queues:
            vq.mergeable = bool(value & bit(VIRTIO_NET_F_MRG_RXBUF))
        self._apply_log()
        actions: list[Action] = []
        logging = bool(value & bit(VHOST_F_LOG_ALL))
        if logging != was_logging:
            # QEMU's first sign of a migration (vhost_dev_log_start, as its
            # RAM pre-copy begins): ferryd caps its queues meanwhile.
            actions.append(DirtyLogging(logging))
        if not value & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            for vq in self.queues:  # vhost-user.rst, "Ring states"
                if not vq.enabled:
                    vq.enabled = True
                    actions.append(self._ring_changed(vq))
        return actions

    def _get_protocol_features(self, message: Message) -> list[Action]:
        return [SendReply(reply_u64(Request.GET_PROTOCOL_FEATURES, self.offered_protocol_features))]

    def _set_protocol_features(self, message: Message) -> list[Action]:
        value = message.payload
        assert isinstance(value, int)
        if value & ~self.offered_protocol_features:
            raise VhostUserProtocolError(
                f"SET_PROTOCOL_FEATURES {value:#x}: bits"
                f" {value & ~self.offered_protocol_features:#x} not offered"
            )
        if not self.suspended:
            raise VhostUserProtocolError("SET_PROTOCOL_FEATURES while rings run")
        self.protocol_features = value
        return []

    def _get_queue_num(self, message: Message) -> list[Action]:
        return [SendReply(reply_u64(Request.GET_QUEUE_NUM, NUM_QUEUES // 2))]

    def _set_owner(self, message: Message) -> list[Action]:
        self.phase = Phase.OWNED
        return []

    def _stop_all(self, *, forget: bool) -> list[Action]:
        actions: list[Action] = []
        for vq in self.queues:
            was_started, was_enabled = vq.started, vq.enabled
            if forget:
                vq.reset()
            else:
                vq.started = vq.enabled = False
            if was_started:
                actions.append(SetKick(vq.index, None))
            if was_started or was_enabled:
                actions.append(self._ring_changed(vq))
        return actions

    def _reset_owner(self, message: Message) -> list[Action]:
        # Deprecated; vhost-user.rst recommends ignoring it or disabling every ring.
        return self._stop_all(forget=False)

    def _reset_device(self, message: Message) -> list[Action]:
        """Every ring back to unconfigured, the acked features forgotten.

        QEMU sends it on every virtio reset (virtio_reset() calls
        vhost_reset_device()), the guest's driver probing included, and starts
        the device again with SET_FEATURES, SET_MEM_TABLE and each ring's
        messages. The call eventfds, the memory table and the log are kept:
        QEMU does not always send them again (a call fd comes with the guest's
        interrupt vectors), and keeping them costs nothing.
        """
        self._need_protocol("RESET_DEVICE", VHOST_USER_PROTOCOL_F_RESET_DEVICE)
        actions = self._stop_all(forget=True)
        self.features = None
        self._transfer = None
        self._apply_log()
        return actions

    # -- memory and log ---------------------------------------------------------

    def _set_mem_table(self, message: Message) -> list[Action]:
        table = message.payload
        assert isinstance(table, MemoryTable)
        memory = GuestMemory.map_table_untrusted(table.regions, table.fds, self._mapper)
        try:
            remapped = [
                (vq, vq.address, vq.views_for(memory, vq.address))
                for vq in self.queues
                if vq.address is not None
            ]
        except VhostUserProtocolError:
            memory.unmap(self._mapper)
            raise
        for vq, address, views in remapped:
            vq.attach(memory, address, views)
        self._drop_memory()
        self.memory = memory
        return [CloseFds(table.fds)]

    def _set_log_base(self, message: Message) -> list[Action]:
        area = message.payload
        assert isinstance(area, LogArea)
        self._need_protocol("SET_LOG_BASE", VHOST_USER_PROTOCOL_F_LOG_SHMFD)
        if not 0 < area.size <= MAX_LOG_SIZE:
            raise VhostUserProtocolError(f"SET_LOG_BASE: a log of {area.size} bytes")
        try:
            view = self._mapper.map(area.fd, area.offset, area.size)
        except (OSError, ValueError, OverflowError) as exc:
            raise VhostUserProtocolError(f"SET_LOG_BASE: cannot map the log: {exc}") from None
        self._drop_log()
        self._log_view = view
        self.log = DirtyLog(view, self._mapper.address(view))
        self._apply_log()
        return [CloseFds((area.fd,)), SendReply(reply_u64(Request.SET_LOG_BASE, 0))]

    def _set_log_fd(self, message: Message) -> list[Action]:
        # An eventfd to tell QEMU the log changed; QEMU reads the log on its own
        # schedule (vhost_log_sync), so ferryd never signals it.
        return [CloseFds(message.fds)]

    # -- rings ------------------------------------------------------------------

    def _set_vring_num(self, message: Message) -> list[Action]:
        state = message.payload
        assert isinstance(state, VringState)
        vq = self._queue("SET_VRING_NUM", state.index)
        num = state.num
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise VhostUserProtocolError(
                f"SET_VRING_NUM: ring {state.index} of {num}, not a power of two up to"
                f" {MAX_QUEUE_SIZE}"
            )
        if vq.started:
            raise VhostUserProtocolError(f"SET_VRING_NUM: ring {state.index} is running")
        vq.set_num(num)
        return []

    def _set_vring_base(self, message: Message) -> list[Action]:
        state = message.payload
        assert isinstance(state, VringState)
        vq = self._queue("SET_VRING_BASE", state.index)
        if state.num > 0xFFFF:
            raise VhostUserProtocolError(
                f"SET_VRING_BASE: ring {state.index} base {state.num:#x} has reserved bits"
            )
        if vq.started:
            raise VhostUserProtocolError(f"SET_VRING_BASE: ring {state.index} is running")
        vq.last_avail = state.num
        return []

    def _set_vring_addr(self, message: Message) -> list[Action]:
        address = message.payload
        assert isinstance(address, VringAddress)
        vq = self._queue("SET_VRING_ADDR", address.index)
        if address.flags & ~VHOST_VRING_F_LOG:
            raise VhostUserProtocolError(
                f"SET_VRING_ADDR: ring {address.index} flags {address.flags:#x} unknown"
            )
        if self.memory is None:
            raise VhostUserProtocolError(
                f"SET_VRING_ADDR: ring {address.index} before SET_MEM_TABLE"
            )
        views = vq.views_for(self.memory, address)
        vq.attach(self.memory, address, views)
        return []

    def _get_vring_base(self, message: Message) -> list[Action]:
        state = message.payload
        assert isinstance(state, VringState)
        vq = self._queue("GET_VRING_BASE", state.index)
        if state.num:
            raise VhostUserProtocolError(
                f"GET_VRING_BASE: ring {state.index} with reserved num {state.num}"
            )
        # The reply first: QEMU's VM is stopped and waits for it (this is its
        # downtime), and the ring is stopped by now (``started`` is what the
        # data path checks before touching it), so what the adapter does to
        # follow (its kick closed, the migration told) can run while QEMU
        # goes on to the next ring.
        actions: list[Action] = [
            SendReply(reply_vring_state(Request.GET_VRING_BASE, vq.index, vq.last_avail))
        ]
        if vq.started:
            vq.started = False
            actions += [SetKick(vq.index, None), self._ring_changed(vq)]
            if self.suspended and self._logging:
                # vm_stop → vhost_dev_stop while migrating: QEMU ends its
                # migration, and SAVE comes after RAM's last pass.
                self._stopped_migrating = True
                actions.append(DeviceSuspended())
        return actions

    def _vring_file(self, message: Message) -> tuple[SplitVirtqueue, int | None]:
        file = message.payload
        assert isinstance(file, VringFile)
        return self._queue(message.request.name, file.index), file.fd

    def _set_vring_kick(self, message: Message) -> list[Action]:
        vq, fd = self._vring_file(message)
        if fd is None:
            raise VhostUserProtocolError(
                f"SET_VRING_KICK: ring {vq.index} without an eventfd (polling is not supported)"
            )
        if not vq.attached:
            raise VhostUserProtocolError(
                f"SET_VRING_KICK: ring {vq.index} before its size and addresses"
            )
        vq.start()
        actions: list[Action] = []
        if self._saved or self._stopped_migrating:
            # QEMU resumed the source VM: roll back before frames flow.
            self._saved = self._stopped_migrating = False
            actions.append(DeviceResumed())
        return [*actions, SetKick(vq.index, fd), self._ring_changed(vq)]

    def _set_vring_call(self, message: Message) -> list[Action]:
        vq, fd = self._vring_file(message)
        return [SetCall(vq.index, fd)]

    def _set_vring_err(self, message: Message) -> list[Action]:
        self._vring_file(message)  # ferryd reports no ring error through it
        return [CloseFds(message.fds)]

    def _set_vring_enable(self, message: Message) -> list[Action]:
        state = message.payload
        assert isinstance(state, VringState)
        vq = self._queue("SET_VRING_ENABLE", state.index)
        if state.num > 1:
            raise VhostUserProtocolError(
                f"SET_VRING_ENABLE: ring {state.index} with {state.num} (0 or 1)"
            )
        if vq.enabled == bool(state.num):
            return []
        vq.enabled = bool(state.num)
        return [self._ring_changed(vq)]

    # -- device state (migration) ---------------------------------------------

    def _set_device_state_fd(self, message: Message) -> list[Action]:
        params = message.payload
        assert isinstance(params, DeviceStateFd)
        self._need_protocol("SET_DEVICE_STATE_FD", VHOST_USER_PROTOCOL_F_DEVICE_STATE)
        if not self.suspended:
            raise VhostUserProtocolError(
                "SET_DEVICE_STATE_FD while rings run (the device must be suspended)"
            )
        # A transfer QEMU gave up on (no CHECK_DEVICE_STATE) is superseded: the
        # controller drops it when it gets the new one.
        self._transfer = params.direction
        self._saved = False
        # The reply first, as for GET_VRING_BASE: QEMU waits for it with the VM
        # stopped, and handing the descriptor over starts work, not waits for it.
        return [
            SendReply(reply_u64(Request.SET_DEVICE_STATE_FD, VRING_NOFD)),
            TransferDeviceState(params.direction, params.fd),
        ]

    def _check_device_state(self, message: Message) -> list[Action]:
        self._need_protocol("CHECK_DEVICE_STATE", VHOST_USER_PROTOCOL_F_DEVICE_STATE)
        if self._transfer is None:
            raise VhostUserProtocolError("CHECK_DEVICE_STATE without SET_DEVICE_STATE_FD")
        self.phase = Phase.CHECKING
        return [CheckDeviceState(self._transfer)]
