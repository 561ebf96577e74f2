"""The migration layer's errors: each says what went wrong and whose fault it is.

Whoever drives a migration translates them (ferryd.migration_control turns
them into the control socket's ControlError; a QEMU frontend will turn them
into a failed device-state transfer). Nothing here knows of either. A
request that does not fit the role raises the subclass
ferryd.migration.roles.IllegalTransition, defined next to the table; the
repair helper's failures are the subclass
ferryd.migration.repair_client.RepairError (RepairUnavailable: no helper).
"""

from __future__ import annotations


class MigrationError(Exception):
    """A migration request could not be carried out; the message says why."""


class NoMigration(MigrationError):
    """A request about the migration in progress, and there is none of that side."""


class StreamRejected(MigrationError):
    """The stream from the source says something this ferryd refuses (the source's fault)."""


class MigrationAborted(MigrationError):
    """migrate-abort stopped a pre-copy, a freeze or a restore in progress."""


class MigrationFailed(MigrationError):
    """The migration failed; the message says what was undone (rolled back or not)."""
