"""daemon.frontends.tap_fd: which descriptor ferryd was given, checked before it is used."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from daemon.frontends.tap_fd import TapFdError, inherited_tap_fd


@pytest.fixture
def pipe() -> Iterator[int]:
    r, w = os.pipe()
    yield r
    os.close(r)
    os.close(w)


def test_not_activated() -> None:
    assert inherited_tap_fd({}, None) is None


def test_variables_for_another_process_are_ignored_and_removed() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "tap"}
    assert inherited_tap_fd(env, None) is None
    assert env == {}


def test_more_than_one_descriptor_is_a_configuration_error() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
    with pytest.raises(TapFdError, match="LISTEN_FDS=2"):
        inherited_tap_fd(env, None)


def test_a_descriptor_that_is_not_tun_is_refused(pipe: int) -> None:
    with pytest.raises(TapFdError, match="not /dev/net/tun"):
        inherited_tap_fd({}, pipe)


def test_a_closed_descriptor_is_refused() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(TapFdError, match="not open"):
        inherited_tap_fd({}, r)
