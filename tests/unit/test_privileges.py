"""--runas parsing: names, numbers and groups resolve as passt's option does.

Runs as whoever runs the tests; the root-only default (nobody) is checked
only when that is root.
"""

from __future__ import annotations

import grp
import os
import pwd

import pytest

from ferryd.privileges import Identity, PrivilegeError, resolve_runas
from ferryd.privileges import _lookup as lookup

NOBODY = pwd.getpwnam("nobody")


def test_user_by_name_and_number() -> None:
    expected = Identity(NOBODY.pw_uid, NOBODY.pw_gid, "nobody")
    assert lookup("nobody") == expected
    assert lookup(str(NOBODY.pw_uid)) == expected


def test_group_overrides_the_users() -> None:
    group = grp.getgrgid(0).gr_name
    assert lookup(f"nobody:{group}") == Identity(NOBODY.pw_uid, 0, "nobody")
    assert lookup("nobody:0") == Identity(NOBODY.pw_uid, 0, "nobody")


def test_uid_without_passwd_entry_needs_a_gid() -> None:
    unknown = 54321
    with pytest.raises(KeyError):
        pwd.getpwuid(unknown)
    with pytest.raises(PrivilegeError, match="give UID:GID"):
        lookup(str(unknown))
    assert lookup(f"{unknown}:{unknown}") == Identity(unknown, unknown, str(unknown))


@pytest.mark.parametrize("spec", ["no-such-user", "nobody:no-such-group"])
def test_unknown_names_are_the_operators_error(spec: str) -> None:
    with pytest.raises(PrivilegeError, match=r"no (user|group) named"):
        lookup(spec)


@pytest.mark.skipif(os.geteuid() != 0, reason="the default applies when started as root")
def test_root_defaults_to_nobody() -> None:
    assert resolve_runas(None) == Identity(NOBODY.pw_uid, NOBODY.pw_gid, "nobody")
