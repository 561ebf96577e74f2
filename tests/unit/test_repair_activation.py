"""ferry_repair.activation: the sd_listen_fds(3) variables, shared by the helper and ferryd."""

from __future__ import annotations

import os

import pytest

from ferry_repair.activation import ActivationError, activation_listener, listen_fds


def ours(count: str) -> dict[str, str]:
    return {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count, "LISTEN_FDNAMES": "x"}


def test_not_activated() -> None:
    env = {"PATH": "/bin"}
    assert listen_fds(env) is None
    assert env == {"PATH": "/bin"}


@pytest.mark.parametrize("missing", ["LISTEN_PID", "LISTEN_FDS"])
def test_half_set_is_not_activated(missing: str) -> None:
    env = ours("1")
    del env[missing]
    assert listen_fds(env) is None
    assert env == {}


@pytest.mark.parametrize("count", ["1", "abc", "0"])
def test_variables_of_another_process_are_ignored_and_removed(count: str) -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": count, "LISTEN_FDNAMES": "x"}
    assert listen_fds(env) is None
    assert env == {}


@pytest.mark.parametrize(("count", "expected"), [("1", 1), ("0", 0), ("2", 2)])
def test_count_for_us(count: str, expected: int) -> None:
    env = ours(count)
    assert listen_fds(env) == expected
    assert env == {}


@pytest.mark.parametrize("count", ["abc", "", "-1", "1.0", " 1", "١"])
def test_malformed_count_for_us(count: str) -> None:
    env = ours(count)
    with pytest.raises(ActivationError, match="not a number"):
        listen_fds(env)
    assert env == {}


@pytest.mark.parametrize("count", ["0", "2"])
def test_helper_wants_exactly_one_socket(count: str) -> None:
    with pytest.raises(ActivationError, match=f"LISTEN_FDS={count} sockets, expected 1"):
        activation_listener(ours(count))


def test_helper_not_activated() -> None:
    assert activation_listener({"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}) is None
