"""ferryd.frontends.tap_fd: which descriptor ferryd was given, checked before it is used."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ferryd.frontends.tap_fd import TapFdError, inherited_tap_fd


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


@pytest.mark.parametrize(("count", "message"), [("0", "LISTEN_FDS=0"), ("abc", "not a number")])
def test_malformed_count_is_a_configuration_error(count: str, message: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count}
    with pytest.raises(TapFdError, match=message):
        inherited_tap_fd(env, None)
    assert env == {}


def test_malformed_variables_do_not_matter_with_tap_fd(pipe: int) -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "abc"}
    with pytest.raises(TapFdError, match="not /dev/net/tun"):  # checked: --tap-fd's descriptor
        inherited_tap_fd(env, pipe)
    assert env == {}


@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun here")
def test_tun_opened_read_only_is_refused() -> None:
    fd = os.open("/dev/net/tun", os.O_RDONLY)
    try:
        with pytest.raises(TapFdError, match="O_RDWR"):
            inherited_tap_fd({}, fd)
    finally:
        os.close(fd)


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
