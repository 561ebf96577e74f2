"""Who may connect to ferryd's sockets: the umask widens only QEMU's vhost-user socket.

ferryd@.service runs ferryd with UMask=0007 so that QEMU (libvirt's user,
a member of ferryd's group) reaches the vhost-user socket; the control
socket must stay its owner's alone whatever the umask.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferryd.frontends.vhost_user.frontend import VhostUserFrontend
from ferryd.unix_listener import group_mode, listen_at, unlink_if_ours


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize(("mask", "mode"), [(0o007, 0o660), (0o022, 0o640), (0o077, 0o600)])
def test_vhost_user_socket_is_0660_less_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    os.umask(mask)
    assert group_mode() == mode
    path = tmp_path / "vhost-user.sock"
    frontend = VhostUserFrontend.listen(str(path))
    try:
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
    finally:
        frontend.close()


@pytest.mark.usefixtures("umask")
def test_other_sockets_stay_0600_whatever_the_umask(tmp_path: Path) -> None:
    os.umask(0)
    path = tmp_path / "control.sock"
    raw, bound = listen_at(str(path), 1)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        raw.close()
        unlink_if_ours(str(path), bound)
