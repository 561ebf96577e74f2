"""The role of a ferryd in a migration, and the only ways it may change.

A ferryd starts ``running`` (or ``incoming``, waiting for a migration's
stream); each migration request or outcome is an :class:`Event`, and
:data:`TRANSITIONS` lists every (role, event) pair that is allowed and the
role it leads to (h2's ``_transitions`` table, STYLE.md). Anything else
raises :class:`IllegalTransition` (defined below, next to the table): a
request that does not fit the role is refused before anything is touched.

Source: running → [precopying → precopied →] migrating-out → frozen →
migrated → (linger, exit); a failure or an abort rolls back to running, or
to rollback-pending while the repair helper cannot be reached.
Target: incoming → migrating-in → restored → running; a failure or an abort
discards what was restored and goes back to incoming. QEMU's device-state
LOAD also starts from running (a ferryd whose guest never ran), and a
ferryd so made a target goes back to running when, its LOAD given up, a
new QEMU boots a guest on it. A target
that resumed is running, and may be a source next.

``str(role)`` (:attr:`Role.status`) is what ``ferryctl status`` shows as
``role``, and what ferryd.coordinator, the tests and the README read: both
sides' migrating roles show as ``migrating``, yet they are two roles, so
the table cannot confuse a source's with a target's. (Two members of a
StrEnum with one value would be aliases, one role: hence the pairs.)
"""

from __future__ import annotations

import enum

from ferryd.migration.errors import MigrationError


class Role(enum.Enum):
    """A role; its value is (status, side), the side telling apart equal statuses."""

    status: str
    """What ``ferryctl status`` shows as ``role``."""

    def __init__(self, status: str, _side: str) -> None:
        self.status = status

    def __str__(self) -> str:
        return self.status

    def __format__(self, spec: str) -> str:
        return format(self.status, spec)

    RUNNING = "running", ""
    """Serving the guest (a source-to-be, or a target that resumed)."""
    INCOMING = "incoming", "target"
    """Waiting for a migration's stream (started with --incoming)."""
    PRECOPYING = "precopying", "source"
    PRECOPIED = "precopied", "source"
    """The quiet connections went ahead; the guest still runs here."""
    MIGRATING_OUT = "migrating", "source"
    """Freezing and streaming."""
    FROZEN = "frozen", "source"
    """Streamed, waiting for commit or abort."""
    MIGRATED = "migrated", "source"
    """Committed; lingers, then exits."""
    ROLLBACK_PENDING = "rollback-pending", "source"
    """A rollback could not be completed yet (the helper is unreachable)."""
    MIGRATING_IN = "migrating", "target"
    """Reading the stream and restoring."""
    RESTORED = "restored", "target"
    """Everything restored, waiting for resume."""


class Event(enum.Enum):
    """A migration request or outcome: what may change the role."""

    PRECOPY = "pre-copy"
    PRECOPIED = "pre-copy done"
    PRECOPY_DROPPED = "pre-copy dropped"
    FREEZE = "freeze"
    FREEZE_PRECOPIED = "freeze after a pre-copy"
    STREAMED = "streamed"
    COMMIT = "commit"
    ROLLED_BACK = "rolled back"
    ROLLBACK_FAILED = "rollback failed"
    MIGRATE_IN = "migrate in"
    LOAD = "QEMU's device-state load"
    RESTORED = "restored"
    RESTORE_FAILED = "restore failed"
    DISCARD = "discard"
    RESUME = "resume"
    REOPEN = "a new guest without a load"


#: Roles in which a source's rollback has something to undo.
_ROLLING_BACK = (Role.MIGRATING_OUT, Role.FROZEN, Role.MIGRATED, Role.ROLLBACK_PENDING)

TRANSITIONS: dict[tuple[Role, Event], Role] = {
    # source
    (Role.RUNNING, Event.PRECOPY): Role.PRECOPYING,
    (Role.PRECOPYING, Event.PRECOPIED): Role.PRECOPIED,
    (Role.PRECOPYING, Event.PRECOPY_DROPPED): Role.RUNNING,
    (Role.PRECOPIED, Event.PRECOPY_DROPPED): Role.RUNNING,
    (Role.RUNNING, Event.FREEZE): Role.MIGRATING_OUT,
    (Role.PRECOPIED, Event.FREEZE_PRECOPIED): Role.MIGRATING_OUT,
    (Role.MIGRATING_OUT, Event.STREAMED): Role.FROZEN,
    (Role.FROZEN, Event.COMMIT): Role.MIGRATED,
    **{(role, Event.ROLLED_BACK): Role.RUNNING for role in _ROLLING_BACK},
    **{(role, Event.ROLLBACK_FAILED): Role.ROLLBACK_PENDING for role in _ROLLING_BACK},
    # target
    (Role.INCOMING, Event.MIGRATE_IN): Role.MIGRATING_IN,
    # QEMU's LOAD (vhost-user SET_DEVICE_STATE_FD) makes a target of a ferryd
    # started like any other: QEMU sends it only to an incoming VM whose guest
    # never ran, so a running ferryd has nothing of it to lose (the target
    # refuses one that serves flows, ferryd.migration.target). ferryctl's
    # migrate-in still needs --incoming: its ferryd may serve a guest.
    (Role.RUNNING, Event.LOAD): Role.MIGRATING_IN,
    (Role.INCOMING, Event.LOAD): Role.MIGRATING_IN,
    (Role.MIGRATING_IN, Event.RESTORED): Role.RESTORED,
    (Role.MIGRATING_IN, Event.RESTORE_FAILED): Role.INCOMING,
    (Role.RESTORED, Event.DISCARD): Role.INCOMING,
    (Role.RESTORED, Event.RESUME): Role.RUNNING,
    # A target whose LOAD was given up (the target QEMU died: its restore
    # failed or was discarded) is incoming, its data path stopped and its
    # start-time forwards closed by the rebuild; a new QEMU that boots its
    # guest here (a ring start, no LOAD) gets the ferryd as it started:
    # running, its forwards bound again. Only for a ferryd started running
    # (MigrationController.reopen): one started --incoming waits for a stream.
    (Role.INCOMING, Event.REOPEN): Role.RUNNING,
}


class IllegalTransition(MigrationError):
    """The request does not fit this ferryd's role (the caller's mistake; nothing changed)."""

    def __init__(self, role: Role, event: Event, message: str) -> None:
        super().__init__(message)
        self.role = role
        self.event = event


#: Roles a rollback can start from (derived from the table).
ROLLBACK_ROLES = frozenset(role for role, event in TRANSITIONS if event is Event.ROLLED_BACK)


class RoleMachine:
    """The current role; changed only through :data:`TRANSITIONS`."""

    def __init__(self, role: Role) -> None:
        self.role = role

    def allows(self, event: Event) -> bool:
        """Whether the table has ``event`` from the current role (nothing changes)."""
        return (self.role, event) in TRANSITIONS

    def check(self, event: Event, refusal: str | None = None) -> None:
        """Raise IllegalTransition unless ``event`` is allowed now (nothing changes)."""
        if not self.allows(event):
            text = refusal or "{event} is not possible: this ferryd is {role}"
            raise IllegalTransition(
                self.role, event, text.format(role=self.role, event=event.value)
            )

    def step(self, event: Event, refusal: str | None = None) -> Role:
        """Apply ``event``; raise IllegalTransition (role unchanged) if the table has no such pair.

        ``refusal`` is the error's message, with ``{role}`` for the current role.
        """
        self.check(event, refusal)
        self.role = TRANSITIONS[self.role, event]
        return self.role

    def __str__(self) -> str:
        return str(self.role)
