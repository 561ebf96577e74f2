"""Fixtures shared by the unit tests."""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator

import pytest

from ferryd import collector
from ferryd.flows.tcp_conn import TcpConn
from ferryd.flows.tcp_host import SocketHost
from ferryd.linux import SO_PEEK_OFF
from tests.unit.control_support import (  # noqa: F401 (fixtures: a served ControlServer)
    daemon,
    sock_path,
)
from tests.unit.migration_fakes import (  # noqa: F401 (fixtures: a fake source and target)
    fake_paths,
    fakes,
)


@pytest.fixture(autouse=True)
def collector_running() -> Iterator[None]:
    """Each test starts with Python's collector running and no pause on.

    A test that leaves a migration target restored and not resumed leaves
    the collector paused (ferryd.collector), as a daemon would until its
    resume or discard; the tests after it must not inherit that.
    """
    yield
    collector._depth = 0
    gc.enable()


@pytest.fixture
def host_pair() -> Iterator[tuple[SocketHost[TcpConn], socket.socket]]:
    """(ferryd's host socket, the peer's socket) over loopback, set up as TcpFlows does."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        ours: SocketHost[TcpConn] = SocketHost.taking(server.accept()[0])
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()
