"""The control socket's server and client (ferryd.control.server, .client) over a real socket.

A real ControlServer runs in the test's nursery (control_support.py);
clients are the real blocking one in a worker thread, and raw sockets for
malformed frames and descriptors.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from typing import Any

import pytest
import trio
import trio.testing

from ferryd.control import (
    ControlAddressInUse,
    ControlClientError,
    ControlRequestFailed,
    ControlServer,
    DaemonNotRunning,
    request,
)
from ferryd.control.protocol import MAX_REQUEST, encode_frame
from ferryd.descriptors import MAX_CONTROL_CONNECTIONS
from tests.unit.control_support import (
    Daemon,
    ask,
    frame,
    in_thread,
    is_closed_everywhere,
    make_server,
    raw_exchange,
    recv_exact,
)

# ---------------------------------------------------------------------------
# requests and answers


async def test_status(daemon: Daemon) -> None:
    response = await in_thread(lambda: request(daemon.path, "status"))
    assert response == {"ok": True, "ready": True, "version": "test"}


async def test_socket_mode_and_removal(sock_path: str) -> None:
    d = make_server(sock_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.server.serve)
        st = os.lstat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        nursery.cancel_scope.cancel()
    assert not await trio.Path(sock_path).exists(), "socket left behind after serve() ended"


async def test_request_arguments_reach_handler(daemon: Daemon) -> None:
    response = await ask(daemon.path, "echo", n=1, names=["a", "b"])
    assert response["request"] == {"cmd": "echo", "n": 1, "names": ["a", "b"]}
    assert response["nfds"] == 0


async def test_handler_error_is_reported(daemon: Daemon) -> None:
    with pytest.raises(ControlRequestFailed, match="no such flow") as info:
        await ask(daemon.path, "refuse")
    assert info.value.error == "refused: the guest has no such flow"


@pytest.mark.parametrize("cmd", ["crash", "unencodable"])
async def test_handler_bug_is_reported_and_server_survives(
    daemon: Daemon, cmd: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ControlRequestFailed, match="internal error in ferryd"):
        await ask(daemon.path, cmd)
    assert any(r.levelname == "ERROR" for r in caplog.records), "handler bug was not logged"
    assert (await ask(daemon.path, "status"))["ok"]


async def test_unknown_command_lists_known(daemon: Daemon) -> None:
    with pytest.raises(ControlRequestFailed, match=r"unknown command 'nope' \(known: block,"):
        await ask(daemon.path, "nope")


async def test_daemon_not_running(sock_path: str) -> None:
    with pytest.raises(DaemonNotRunning, match="not running"):
        await ask(sock_path, "status")
    with pytest.raises(DaemonNotRunning):
        request(sock_path, "status")
    # A socket file with nobody listening: connection refused, same answer.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(sock_path)
        with pytest.raises(DaemonNotRunning):
            request(sock_path, "status")


async def test_sync_request_timeout(daemon: Daemon) -> None:
    with pytest.raises(ControlClientError, match="no answer from ferryd"):
        await in_thread(lambda: request(daemon.path, "hang", timeout=0.2))


async def test_many_clients_at_once(daemon: Daemon) -> None:
    """A blocked handler does not stop others; 50 clients are served together."""
    results: list[dict[str, Any]] = []

    async def call(cmd: str) -> None:
        results.append(await ask(daemon.path, cmd))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "block")
            for _ in range(50):
                nursery.start_soon(call, "status")
            # An idle client holding half a header must not block anyone.
            idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.connect(daemon.path)
            idle.send(b"\x00\x00")
            nursery.start_soon(call, "release")
    idle.close()
    assert len(results) == 52
    assert {"ok": True, "released": True} in results


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1, 2]", b'{"x": 1}', b"\xc3\x28", b"[" * 60000, b'{"cmd": "nope"}'],
)
async def test_malformed_request_answered_and_connection_survives(
    daemon: Daemon, payload: bytes
) -> None:
    good = encode_frame({"cmd": "status"})
    responses = await in_thread(lambda: raw_exchange(daemon.path, [frame(payload), good]))
    assert responses[0]["ok"] is False
    assert responses[0]["error"]
    assert responses[1]["ok"] is True


@pytest.mark.parametrize(
    "header", [b"\x00\x00\x00\x00", struct.pack(">I", MAX_REQUEST + 1), b"\xff\xff\xff\xff"]
)
async def test_bad_length_answered_then_closed(daemon: Daemon, header: bytes) -> None:
    responses = await in_thread(
        lambda: raw_exchange(daemon.path, [header, encode_frame({"cmd": "status"})])
    )
    assert responses[0]["ok"] is False
    assert "bad request" in responses[0]["error"]
    assert responses[1:] == [None]  # closed: the frame boundary was lost
    assert (await ask(daemon.path, "status"))["ok"]


async def test_truncated_frame_then_eof(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(daemon.path)
        sock.sendall(struct.pack(">I", 100) + b'{"cmd"')
        sock.shutdown(socket.SHUT_WR)
        header = await in_thread(lambda: recv_exact(sock, 4))
        assert header is not None
        payload = await in_thread(lambda: recv_exact(sock, struct.unpack(">I", header)[0]))
        assert payload is not None
        assert json.loads(payload) == {
            "ok": False,
            "error": "connection closed in the middle of a request frame",
        }
        assert await in_thread(lambda: sock.recv(10)) == b""
    assert (await ask(daemon.path, "status"))["ok"]


async def test_client_gone_before_answer(daemon: Daemon) -> None:
    """A client that vanishes mid-frame (so the error answer hits a broken pipe)."""
    for _ in range(20):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.path)
        sock.send(b"\x00\x00")
        sock.close()
    assert (await ask(daemon.path, "status"))["ok"]


async def test_clients_beyond_the_limit_wait_for_a_slot(daemon: Daemon) -> None:
    """At most MAX_CONTROL_CONNECTIONS are served at once; the next waits in the backlog."""
    clients = []
    try:
        for _ in range(MAX_CONTROL_CONNECTIONS):
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(sock)
            await sock.connect(daemon.path)
            await sock.send(encode_frame({"cmd": "block"}))
        await trio.testing.wait_all_tasks_blocked()
        assert daemon.blocked == MAX_CONTROL_CONNECTIONS
        late = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        clients.append(late)
        await late.connect(daemon.path)
        await late.send(encode_frame({"cmd": "status"}))
        await trio.testing.wait_all_tasks_blocked()
        assert daemon.status_calls == 0, "a client beyond the limit was served"
        daemon.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert daemon.status_calls == 0, "idle connections hold their slots"
        clients.pop(0).close()  # one slot is free again
        with trio.fail_after(5):
            header = await late.recv(4)
            payload = await late.recv(struct.unpack(">I", header)[0])
        assert json.loads(payload)["ok"] is True
        assert daemon.status_calls == 1
    finally:
        for sock in clients:
            sock.close()


# ---------------------------------------------------------------------------
# descriptors


async def test_fd_passing(daemon: Daemon) -> None:
    r, w = os.pipe()
    try:
        await ask(daemon.path, "write-to-fd", fds=[w], data="hello")
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"hello"
        assert is_closed_everywhere(r), "handler's copy of the write end is still open"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@pytest.mark.parametrize(
    ("cmd", "n", "refusal"),
    [
        ("flows", 1, "bad request: 'flows' takes no file descriptors, not 1"),
        ("write-to-fd", 2, "bad request: 'write-to-fd' takes at most 1 file descriptor, not 2"),
    ],
)
async def test_more_descriptors_than_a_command_takes_are_refused_and_closed(
    daemon: Daemon, cmd: str, n: int, refusal: str
) -> None:
    # The server's per-command rule (register(..., max_fds=)): refused before
    # the handler runs (write-to-fd's own check would word it otherwise).
    pipes = [os.pipe() for _ in range(n)]
    try:
        with pytest.raises(ControlRequestFailed) as info:
            await ask(daemon.path, cmd, fds=[w for _, w in pipes], data="x")
        assert info.value.error == refusal
        for r, w in pipes:
            os.close(w)
            assert is_closed_everywhere(r), "the refused request's descriptor leaked"
    finally:
        for r, _ in pipes:
            os.close(r)
    assert "flows" in await ask(daemon.path, "flows")  # without one it is served


def test_a_rule_beyond_what_a_frame_carries_is_a_bug() -> None:
    async def h(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {}

    with pytest.raises(ValueError, match="max_fds must be 0 to 253"):
        ControlServer("/nonexistent").register("a", h, max_fds=254)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",  # rejected by the parser
        b'{"cmd": "nope"}',  # unknown command
        b'{"cmd": "echo"}',  # handler ignores descriptors
        b'{"cmd": "refuse"}',  # handler raises ControlError
        b'{"cmd": "crash"}',  # handler has a bug
    ],
)
async def test_fds_of_rejected_or_ignored_request_are_closed(
    daemon: Daemon, payload: bytes
) -> None:
    r, w = os.pipe()
    r2, w2 = os.pipe()
    try:
        await in_thread(lambda: raw_exchange(daemon.path, [frame(payload)], fds=[w, w2]))
        os.close(w)
        os.close(w2)
        assert is_closed_everywhere(r), "server leaked the first descriptor"
        assert is_closed_everywhere(r2), "server leaked the second descriptor"
    finally:
        os.close(r)
        os.close(r2)


async def test_fds_with_bad_length_are_closed(daemon: Daemon) -> None:
    r, w = os.pipe()
    try:
        await in_thread(lambda: raw_exchange(daemon.path, [b"\xff\xff\xff\xff"], fds=[w]))
        os.close(w)
        assert is_closed_everywhere(r)
    finally:
        os.close(r)


# ---------------------------------------------------------------------------
# start-up


async def test_stale_socket_is_replaced(sock_path: str, nursery: trio.Nursery) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)  # bound, never listening: what a crashed daemon leaves
    stale.close()
    d = make_server(sock_path)
    await nursery.start(d.server.serve)
    assert (await ask(sock_path, "status"))["ok"]


async def test_refuses_to_start_over_live_daemon(daemon: Daemon) -> None:
    second = ControlServer(daemon.path)
    with pytest.raises(ControlAddressInUse, match="already listening"):
        await second.serve()
    assert (await ask(daemon.path, "status"))["ok"], "first daemon was disturbed"


async def test_refuses_to_replace_a_regular_file(sock_path: str) -> None:
    await trio.Path(sock_path).write_text("precious")
    with pytest.raises(ControlAddressInUse, match="not a socket"):
        await ControlServer(sock_path).serve()
    assert await trio.Path(sock_path).read_text() == "precious"


def test_register_twice_is_a_bug() -> None:
    server = ControlServer("/nonexistent")

    async def h(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {}

    server.register("a", h)
    with pytest.raises(ValueError, match="already registered"):
        server.register("a", h)
