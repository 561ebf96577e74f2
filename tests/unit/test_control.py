"""Tests of the control socket (ferryd.control) and ferryctl (ferryd.ctl).

A real ControlServer runs in the test's nursery on a socket in a short
temporary directory (sun_path is limited to 108 bytes, pytest's tmp_path can
be longer). Clients are the real ones: the blocking helper in a worker
thread, the trio helper, raw sockets for malformed frames, and ferryctl's
main() both in a thread and as the installed console script.

Descriptor leaks are checked through pipes: a pipe's read end sees EOF only
once every copy of its write end is closed, so sending the write end with a
request and then closing ours proves whether the server kept a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from ferryd import ctl
from ferryd.control import (
    MAX_REQUEST,
    ControlAddressInUse,
    ControlClientError,
    ControlError,
    ControlProtocolError,
    ControlRequestFailed,
    ControlServer,
    DaemonNotRunning,
    encode_frame,
    parse_length_untrusted,
    parse_request_untrusted,
    parse_response_untrusted,
    request,
    request_async,
)

FLOWS = [
    {
        "proto": "tcp",
        "guest_addr": "10.77.0.1",
        "guest_port": 40000,
        "remote_addr": "192.0.2.7",
        "remote_port": 443,
        "host_addr": "10.77.0.2",
        "host_port": 80,
        "state": "ESTABLISHED",
        "bytes_to_guest": 123456,
        "bytes_from_guest": 78,
    },
    {
        "proto": "udp",
        "guest_addr": "fd00:77::1",
        "guest_port": 5353,
        "remote_addr": "2001:db8::53",
        "remote_port": 53,
        "host_addr": "fd00:77::3",
        "host_port": 53,
        "state": "ACTIVE",
        "bytes_to_guest": 0,
        "bytes_from_guest": 9,
    },
]


@dataclass
class Daemon:
    """A ControlServer with test handlers, and what they observed."""

    path: str
    server: ControlServer
    ready_after: int = 0  # status answers "ready": false this many times
    status_calls: int = 0
    release: trio.Event = field(default_factory=trio.Event)


@pytest.fixture
def sock_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="fc-")
    try:
        yield os.path.join(directory, "ctl.sock")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def make_server(path: str) -> Daemon:
    server = ControlServer(path)
    daemon = Daemon(path, server)

    async def status(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        daemon.status_calls += 1
        return {"ready": daemon.status_calls > daemon.ready_after, "version": "test"}

    async def flows(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"flows": FLOWS}

    async def echo(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"request": req, "nfds": len(fds)}

    async def refuse(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        raise ControlError("refused: the guest has no such flow")

    async def crash(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        raise RuntimeError("handler bug")

    async def unencodable(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"value": object()}

    async def write_to_fd(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        # Takes ownership of the one descriptor, as a migrate handler will.
        if len(fds) != 1:
            raise ControlError(f"expected one descriptor, got {len(fds)}")
        fd = fds.pop()
        try:
            os.write(fd, req["data"].encode())
        finally:
            os.close(fd)
        return {}

    async def block(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        await daemon.release.wait()
        return {"released": True}

    async def release(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        daemon.release.set()
        return {}

    async def hang(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    for name, handler in [
        ("status", status),
        ("flows", flows),
        ("echo", echo),
        ("refuse", refuse),
        ("crash", crash),
        ("unencodable", unencodable),
        ("write-to-fd", write_to_fd),
        ("block", block),
        ("release", release),
        ("hang", hang),
    ]:
        server.register(name, handler)
    return daemon


@pytest.fixture
async def daemon(sock_path: str, nursery: trio.Nursery) -> AsyncIterator[Daemon]:
    d = make_server(sock_path)
    await nursery.start(d.server.serve)
    yield d


def raw_exchange(path: str, frames: list[bytes], fds: list[int] | None = None) -> list[Any]:
    """Send raw bytes (first chunk with fds), read responses until the server closes
    or stops answering; return the decoded responses."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        responses: list[Any] = []
        for i, data in enumerate(frames):
            try:
                if i == 0 and fds:
                    socket.send_fds(sock, [data], fds)
                else:
                    sock.sendall(data)
                header = _recv_exact(sock, 4)
            except (BrokenPipeError, ConnectionResetError):
                header = None  # closed by the server, with our bytes unread
            if header is None:
                responses.append(None)
                break
            (length,) = struct.unpack(">I", header)
            payload = _recv_exact(sock, length)
            assert payload is not None
            responses.append(json.loads(payload))
        return responses


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        data = sock.recv(size - len(buf))
        if not data:
            return None
        buf += data
    return buf


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def is_closed_everywhere(read_fd: int) -> bool:
    """True if no copy of the pipe's write end remains open (EOF), False if one does."""
    os.set_blocking(read_fd, False)
    try:
        while os.read(read_fd, 4096):
            pass
    except BlockingIOError:
        return False
    return True


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


# ---------------------------------------------------------------------------
# codec


def test_encode_frame_roundtrip() -> None:
    data = encode_frame({"cmd": "status", "x": "é"})
    length = parse_length_untrusted(data[:4], MAX_REQUEST)
    assert length == len(data) - 4
    assert parse_request_untrusted(data[4:]) == {"cmd": "status", "x": "é"}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"\x00\x00\x00\x00", "empty frame"),
        (struct.pack(">I", MAX_REQUEST + 1), "exceeds the limit"),
        (b"\x00\x01", "expected 4"),
    ],
)
def test_parse_length_untrusted_rejects(header: bytes, message: str) -> None:
    with pytest.raises(ControlProtocolError, match=message):
        parse_length_untrusted(header, MAX_REQUEST)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe", "not valid UTF-8"),
        (b"{", "not valid JSON"),
        (b'{"cmd": NaN}', "not valid JSON"),
        (b"1" * 5000, "not valid JSON"),  # beyond int's max string digits
        (b"[" * 60000, "nested too deeply"),
        (b"[]", "JSON list, expected an object"),
        (b"{}", 'no "cmd"'),
        (b'{"cmd": 3}', 'no "cmd"'),
        (b'{"cmd": ""}', 'no "cmd"'),
    ],
)
def test_parse_request_untrusted_rejects(payload: bytes, message: str) -> None:
    with pytest.raises(ControlProtocolError, match=message):
        parse_request_untrusted(payload)


@pytest.mark.parametrize(
    "payload", [b'{"ok": 1}', b'{"ok": false}', b'{"ok": false, "error": 3}', b'"ok"']
)
def test_parse_response_untrusted_rejects(payload: bytes) -> None:
    with pytest.raises(ControlProtocolError):
        parse_response_untrusted(payload)


# ---------------------------------------------------------------------------
# server behaviour


async def test_status_sync_and_async(daemon: Daemon) -> None:
    response = await in_thread(lambda: request(daemon.path, "status"))
    assert response == {"ok": True, "ready": True, "version": "test"}
    assert await request_async(daemon.path, "status") == response


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
    response = await request_async(daemon.path, "echo", n=1, names=["a", "b"])
    assert response["request"] == {"cmd": "echo", "n": 1, "names": ["a", "b"]}
    assert response["nfds"] == 0


async def test_handler_error_is_reported(daemon: Daemon) -> None:
    with pytest.raises(ControlRequestFailed, match="no such flow") as info:
        await request_async(daemon.path, "refuse")
    assert info.value.error == "refused: the guest has no such flow"


@pytest.mark.parametrize("cmd", ["crash", "unencodable"])
async def test_handler_bug_is_reported_and_server_survives(
    daemon: Daemon, cmd: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ControlRequestFailed, match="internal error in ferryd"):
        await request_async(daemon.path, cmd)
    assert any(r.levelname == "ERROR" for r in caplog.records), "handler bug was not logged"
    assert (await request_async(daemon.path, "status"))["ok"]


async def test_unknown_command_lists_known(daemon: Daemon) -> None:
    with pytest.raises(ControlRequestFailed, match=r"unknown command 'nope' \(known: block,"):
        await request_async(daemon.path, "nope")


async def test_daemon_not_running(sock_path: str) -> None:
    with pytest.raises(DaemonNotRunning, match="not running"):
        await request_async(sock_path, "status")
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
        results.append(await request_async(daemon.path, cmd))

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
    assert (await request_async(daemon.path, "status"))["ok"]


async def test_truncated_frame_then_eof(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(daemon.path)
        sock.sendall(struct.pack(">I", 100) + b'{"cmd"')
        sock.shutdown(socket.SHUT_WR)
        header = await in_thread(lambda: _recv_exact(sock, 4))
        assert header is not None
        payload = await in_thread(lambda: _recv_exact(sock, struct.unpack(">I", header)[0]))
        assert payload is not None
        assert json.loads(payload) == {
            "ok": False,
            "error": "connection closed in the middle of a request frame",
        }
        assert await in_thread(lambda: sock.recv(10)) == b""
    assert (await request_async(daemon.path, "status"))["ok"]


async def test_client_gone_before_answer(daemon: Daemon) -> None:
    """A client that vanishes mid-frame (so the error answer hits a broken pipe)."""
    for _ in range(20):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.path)
        sock.send(b"\x00\x00")
        sock.close()
    assert (await request_async(daemon.path, "status"))["ok"]


# ---------------------------------------------------------------------------
# descriptors


@pytest.mark.parametrize("use_async", [False, True])
async def test_fd_passing(daemon: Daemon, use_async: bool) -> None:
    r, w = os.pipe()
    try:
        if use_async:
            await request_async(daemon.path, "write-to-fd", fds=[w], data="hello")
        else:
            await in_thread(lambda: request(daemon.path, "write-to-fd", fds=[w], data="hello"))
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"hello"
        assert is_closed_everywhere(r), "handler's copy of the write end is still open"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


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
    assert (await request_async(sock_path, "status"))["ok"]


async def test_refuses_to_start_over_live_daemon(daemon: Daemon) -> None:
    second = ControlServer(daemon.path)
    with pytest.raises(ControlAddressInUse, match="already listening"):
        await second.serve()
    assert (await request_async(daemon.path, "status"))["ok"], "first daemon was disturbed"


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


# ---------------------------------------------------------------------------
# ferryctl


async def run_ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await trio.to_thread.run_sync(partial(ctl.main, list(argv)))
    out, err = capsys.readouterr()
    return rc, out, err


async def test_ctl_status(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run_ctl(capsys, "--control", daemon.path, "status")
    assert (rc, err) == (0, "")
    assert json.loads(out) == {"ok": True, "ready": True, "version": "test"}
    assert out.startswith("{\n  "), "status JSON should be pretty-printed"


async def test_ctl_status_not_running(sock_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run_ctl(capsys, "--control", sock_path, "status")
    assert rc == 1
    assert out == ""
    assert err == f"ferryctl: ferryd is not running (no one listens on {sock_path})\n"


async def test_ctl_status_wait_until_ready(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.ready_after = 3
    rc, out, _ = await run_ctl(capsys, "--control", daemon.path, "status", "--wait", "10")
    assert rc == 0
    assert json.loads(out)["ready"] is True
    assert daemon.status_calls == 4


async def test_ctl_status_wait_for_socket(
    sock_path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ferryctl started before the daemon: it retries until the daemon is up."""
    refused = threading.Event()

    def counting_request(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return request(*args, **kwargs)
        except DaemonNotRunning:
            refused.set()
            raise

    monkeypatch.setattr(ctl, "request", counting_request)
    d = make_server(sock_path)
    async with trio.open_nursery() as nursery:
        ctl_done = trio.Event()
        result: list[tuple[int, str, str]] = []

        async def ctl_task() -> None:
            result.append(await run_ctl(capsys, "--control", sock_path, "status", "--wait", "10"))
            ctl_done.set()

        nursery.start_soon(ctl_task)
        # Start the server only once ferryctl has been refused at least once.
        assert await trio.to_thread.run_sync(refused.wait, 5), "ferryctl never tried"
        await nursery.start(d.server.serve)
        with trio.fail_after(10):
            await ctl_done.wait()
        nursery.cancel_scope.cancel()
    assert result[0][0] == 0, result
    assert json.loads(result[0][1])["ready"] is True


async def test_ctl_status_wait_times_out(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.ready_after = 10**9
    rc, out, err = await run_ctl(capsys, "--control", daemon.path, "status", "--wait", "0.3")
    assert rc == 1
    assert out == ""
    assert "not ready after 0.3 s (daemon answered but is not ready)" in err


async def test_ctl_flows_table(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run_ctl(capsys, "--control", daemon.path, "flows")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == [
        "PROTO",
        "GUEST",
        "REMOTE",
        "HOST",
        "STATE",
        "TO_GUEST",
        "FROM_GUEST",
    ]
    assert lines[1].split() == [
        "tcp",
        "10.77.0.1:40000",
        "192.0.2.7:443",
        "10.77.0.2:80",
        "ESTABLISHED",
        "123456",
        "78",
    ]
    assert lines[2].split()[1:4] == ["[fd00:77::1]:5353", "[2001:db8::53]:53", "[fd00:77::3]:53"]
    # Aligned: every column starts at the same offset on every line.
    for column in ("GUEST", "REMOTE", "HOST", "STATE"):
        start = lines[0].index(column)
        assert all(line[start - 2 : start] == "  " for line in lines)
    # Byte counts are right-aligned on the header's right edge.
    assert len({len(line) for line in lines}) == 1


async def test_ctl_flows_json(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = await run_ctl(capsys, "--control", daemon.path, "flows", "--json")
    assert rc == 0
    assert json.loads(out) == FLOWS


async def test_ctl_error_response(sock_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    server = ControlServer(sock_path)

    async def status(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        raise ControlError("shutting down")

    server.register("status", status)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        rc, out, err = await run_ctl(capsys, "--control", sock_path, "status", "--wait", "5")
        assert (rc, out) == (1, "")
        assert err == "ferryctl: status: shutting down\n"
        rc, _, err = await run_ctl(capsys, "--control", sock_path, "flows")
        assert rc == 1
        assert "unknown command 'flows'" in err
        nursery.cancel_scope.cancel()


async def test_ctl_console_script(daemon: Daemon) -> None:
    """The installed entry point works (runs in a real subprocess)."""
    script = Path(sys.executable).parent / "ferryctl"
    if not script.exists():
        pytest.skip(f"ferryctl console script not installed next to {sys.executable}")
    result = await trio.run_process(
        [str(script), "--control", daemon.path, "status", "--wait", "5"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ready"] is True


def test_ctl_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ctl.main(["status"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        ctl.main(["--control", "/x", "status", "--wait", "-1"])
    assert "zero or more seconds" in capsys.readouterr().err


def test_format_flow_table_tolerates_missing_fields() -> None:
    text = ctl.format_flow_table([{"proto": "icmp", "guest_addr": "10.0.0.1"}])
    assert text.splitlines()[1].split() == ["icmp", "10.0.0.1", "?", "?", "?", "?", "?"]
