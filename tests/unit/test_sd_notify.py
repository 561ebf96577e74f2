"""ferryd.sd_notify against a real datagram socket, which is what systemd listens on."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferryd.sd_notify import Notifier


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    with _receiver(str(tmp_path / "notify")) as sock:
        yield str(tmp_path / "notify"), sock


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[str, socket.socket]]:
    name = f"ferry-test-notify-{os.getpid()}"
    with _receiver("\0" + name) as sock:
        yield "@" + name, sock


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_and_stopping_reach_the_socket(kind: str, request: pytest.FixtureRequest) -> None:
    value, sock = request.getfixturevalue(f"{kind}_receiver")
    environ = {"NOTIFY_SOCKET": value, "OTHER": "kept"}
    notifier = Notifier.from_environ(environ)
    # Taken out: a child of ferryd must not pose as the unit's main process.
    assert environ == {"OTHER": "kept"}
    notifier.ready("serving the guest (running)")
    notifier.stopping("shutting down")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving the guest (running)\n"
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=shutting down\n"


def test_outside_systemd_nothing_is_sent() -> None:
    environ: dict[str, str] = {}
    notifier = Notifier.from_environ(environ)
    assert notifier.address is None
    notifier.ready("serving")  # no socket, no error


def test_unsupported_address_is_refused_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    environ = {"NOTIFY_SOCKET": "vsock:2:1234"}
    assert Notifier.from_environ(environ).address is None
    assert environ == {}
    assert "not a Unix socket path" in caplog.text


def test_nobody_listening_is_a_warning_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    notifier.ready("serving")
    assert "cannot tell systemd 'READY=1" in caplog.text
