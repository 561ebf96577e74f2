"""A real ControlServer with test handlers, and raw-socket helpers, for the control tests.

The server runs in the test's nursery on a socket in a short temporary
directory (sun_path is limited to 108 bytes, pytest's tmp_path can be
longer). Descriptor leaks are checked through pipes: a pipe's read end sees
EOF only once every copy of its write end is closed, so sending the write
end with a request and then closing ours proves whether the server kept a
copy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio

from ferryd.control import ControlError, ControlServer, request

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

COUNTERS = {
    "stack": {"frames_in": 1234567, "frames_out": 12, "malformed": 0},
    "refusals": {"tcp": 3, "unanswered": 0},
}


@dataclass
class Daemon:
    """A ControlServer with test handlers, and what they observed."""

    path: str
    server: ControlServer
    ready_after: int = 0  # status answers "ready": false this many times
    status_calls: int = 0
    blocked: int = 0  # "block" requests waiting for "release"
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

    async def counters(req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"counters": COUNTERS}

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
        daemon.blocked += 1
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
        ("counters", counters),
        ("echo", echo),
        ("refuse", refuse),
        ("crash", crash),
        ("unencodable", unencodable),
        ("block", block),
        ("release", release),
        ("hang", hang),
    ]:
        server.register(name, handler)
    server.register("flows", flows, max_fds=0)  # as ferryd registers it
    server.register("write-to-fd", write_to_fd, max_fds=1)
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
                header = recv_exact(sock, 4)
            except (BrokenPipeError, ConnectionResetError):
                header = None  # closed by the server, with our bytes unread
            if header is None:
                responses.append(None)
                break
            (length,) = struct.unpack(">I", header)
            payload = recv_exact(sock, length)
            assert payload is not None
            responses.append(json.loads(payload))
        return responses


def recv_exact(sock: socket.socket, size: int) -> bytes | None:
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


async def ask(path: str, cmd: str, **kwargs: Any) -> dict[str, Any]:
    """The blocking client, from trio code (as trio code calls it)."""
    return await trio.to_thread.run_sync(partial(request, path, cmd, **kwargs))
