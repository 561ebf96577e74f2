"""The migration role table: every (role, event) pair is either listed or refused."""

from __future__ import annotations

import itertools

import pytest

from ferryd.migration.errors import MigrationError
from ferryd.migration.roles import (
    ROLLBACK_ROLES,
    TRANSITIONS,
    Event,
    IllegalTransition,
    Role,
    RoleMachine,
)


@pytest.mark.parametrize(("role", "event"), list(itertools.product(Role, Event)))
def test_every_pair_follows_the_table(role: Role, event: Event) -> None:
    machine = RoleMachine(role)
    if (role, event) in TRANSITIONS:
        assert machine.step(event) is TRANSITIONS[role, event]
        assert machine.role is TRANSITIONS[role, event]
    else:
        with pytest.raises(IllegalTransition) as info:
            machine.step(event)
        assert machine.role is role  # refused: nothing changed
        assert isinstance(info.value, MigrationError)
        assert (info.value.role, info.value.event) == (role, event)
        assert f"this ferryd is {role}" in str(info.value)


def test_refusal_names_the_role() -> None:
    machine = RoleMachine(Role.INCOMING)
    with pytest.raises(IllegalTransition, match=r"^cannot pre-copy: this ferryd is incoming$"):
        machine.step(Event.PRECOPY, "cannot pre-copy: this ferryd is {role}")
    with pytest.raises(IllegalTransition):
        machine.check(Event.COMMIT)
    assert machine.role is Role.INCOMING


def test_source_and_target_paths() -> None:
    source = RoleMachine(Role.RUNNING)
    for event, role in [
        (Event.PRECOPY, Role.PRECOPYING),
        (Event.PRECOPIED, Role.PRECOPIED),
        (Event.FREEZE_PRECOPIED, Role.MIGRATING_OUT),
        (Event.STREAMED, Role.FROZEN),
        (Event.COMMIT, Role.MIGRATED),
        (Event.ROLLBACK_FAILED, Role.ROLLBACK_PENDING),
        (Event.ROLLBACK_FAILED, Role.ROLLBACK_PENDING),
        (Event.ROLLED_BACK, Role.RUNNING),
    ]:
        assert source.step(event) is role
    target = RoleMachine(Role.INCOMING)
    for event, role in [
        (Event.MIGRATE_IN, Role.MIGRATING_IN),
        (Event.RESTORED, Role.RESTORED),
        (Event.RESUME, Role.RUNNING),
        (Event.FREEZE, Role.MIGRATING_OUT),  # a resumed target may migrate on
    ]:
        assert target.step(event) is role


def test_rollback_roles() -> None:
    assert {
        Role.MIGRATING_OUT,
        Role.FROZEN,
        Role.MIGRATED,
        Role.ROLLBACK_PENDING,
    } == ROLLBACK_ROLES


def test_roles_read_as_status_shows_them() -> None:
    assert str(Role.ROLLBACK_PENDING) == "rollback-pending"
    assert f"{Role.PRECOPIED}" == "precopied"
    assert str(Role.MIGRATING_OUT) == str(Role.MIGRATING_IN) == "migrating"
    # What ferryctl status, the coordinator, the tests and the README read.
    assert {str(role) for role in Role} == {
        "running",
        "incoming",
        "precopying",
        "precopied",
        "migrating",
        "frozen",
        "migrated",
        "rollback-pending",
        "restored",
    }


def test_a_source_and_a_target_migrating_are_two_roles() -> None:
    """Both show as "migrating", yet the table tells them apart."""
    assert len({Role.MIGRATING_OUT, Role.MIGRATING_IN}) == 2  # not aliases
    assert (Role.MIGRATING_OUT, Event.RESTORED) not in TRANSITIONS
    assert (Role.MIGRATING_IN, Event.STREAMED) not in TRANSITIONS
    assert (Role.MIGRATING_IN, Event.ROLLED_BACK) not in TRANSITIONS
    assert Role.MIGRATING_IN not in ROLLBACK_ROLES


def test_allows_reads_the_table() -> None:
    machine = RoleMachine(Role.PRECOPIED)
    assert machine.allows(Event.FREEZE_PRECOPIED)
    assert not machine.allows(Event.FREEZE)
    assert machine.role is Role.PRECOPIED
