"""``ferryd --metrics``'s HTTP responder (ferryd.http_metrics) on real sockets.

The request comes from anyone who reaches the address: a good scrape gets
the text, anything else a status and the connection closed, and a client
that sends too much or too slowly is cut off without holding the server.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from ferryd import http_metrics
from ferryd.descriptors import MAX_METRICS_CONNECTIONS
from ferryd.exits import StartupError
from ferryd.http_metrics import (
    HttpRequestError,
    MetricsAddress,
    MetricsServer,
    parse_address,
    parse_request_untrusted,
)

BODY = b"# TYPE ferry_ready gauge\nferry_ready 1.0\n"


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9650", MetricsAddress(host="127.0.0.1", port=9650)),
        ("[::1]:9650", MetricsAddress(host="::1", port=9650)),
        ("localhost:80", MetricsAddress(host="localhost", port=80)),
        ("/run/ferry/m.sock", MetricsAddress(path="/run/ferry/m.sock")),
    ],
)
def test_addresses(text: str, address: MetricsAddress) -> None:
    assert parse_address(text) == address
    assert str(address) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("9650", "expected HOST:PORT"),
        (":9650", "expected HOST:PORT"),
        ("::1:9650", "goes in brackets"),
        ("[127.0.0.1]:9650", "only an IPv6"),
        ("127.0.0.1:0", "from 1 to 65535"),
        ("127.0.0.1:65536", "from 1 to 65535"),
        ("127.0.0.1:http", "from 1 to 65535"),
        ("relative/path", "expected HOST:PORT"),
    ],
)
def test_bad_addresses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_address(text)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x", None),
        (b"HEAD /metrics?x=1 HTTP/1.0", None),
        (b"POST /metrics HTTP/1.1", 405),
        (b"GET / HTTP/1.1", 404),
        (b"GET /metrics HTTP/2.0", 505),
        (b"GET /metrics", 400),
        (b"GET  /metrics HTTP/1.1", 400),
        (b"GET /m\xe9trics HTTP/1.1", 400),
        (b"", 400),
    ],
)
def test_request_lines(head: bytes, status: int | None) -> None:
    if status is None:
        assert parse_request_untrusted(head)[1] == "/metrics"
    else:
        with pytest.raises(HttpRequestError) as info:
            parse_request_untrusted(head)
        assert info.value.status == status


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int]]:
    srv = MetricsServer(MetricsAddress(host="127.0.0.1", port=0), lambda: BODY)
    srv.bind()
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        yield srv.sockname  # type: ignore[misc]
        nursery.cancel_scope.cancel()


async def _exchange(address: tuple[str, int], request: bytes, *, hang_up: bool = False) -> bytes:
    client = trio.socket.socket()
    with client:
        await client.connect(address)
        if request:
            await client.send(request)
        if hang_up:
            client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := await client.recv(65536):
            answer += chunk
        return answer


async def test_scrape(server: tuple[str, int]) -> None:
    answer = await _exchange(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert "Content-Type: text/plain; version=0.0.4; charset=utf-8" in lines
    assert f"Content-Length: {len(BODY)}" in lines and "Connection: close" in lines
    assert body == BODY
    head_only = await _exchange(server, b"HEAD /metrics HTTP/1.0\n\n")
    assert head_only.startswith(b"HTTP/1.1 200 OK\r\n") and head_only.endswith(b"\r\n\r\n")


async def test_refusals(server: tuple[str, int]) -> None:
    answer = await _exchange(server, b"DELETE /metrics HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"Allow: GET, HEAD\r\n" in answer
    answer = await _exchange(server, b"GET /secret HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")
    # A head that never ends within MAX_HEAD: 431, and the rest is never read.
    answer = await _exchange(server, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
    assert answer.startswith(b"HTTP/1.1 431 ")
    # A client that hangs up before finishing: nothing, and the server goes on.
    assert await _exchange(server, b"GET /met", hang_up=True) == b""
    assert (await _exchange(server, b"GET /metrics HTTP/1.1\r\n\r\n")).endswith(BODY)


async def test_a_silent_client_is_cut_off(
    server: tuple[str, int], autojump_clock: trio.testing.MockClock
) -> None:
    """Silent clients, more than the server serves at once: each is closed after TIMEOUT,
    and a scrape still gets through."""
    silent = [trio.socket.socket() for _ in range(MAX_METRICS_CONNECTIONS + 2)]
    try:
        for sock in silent:
            await sock.connect(server)
        start = trio.current_time()
        for sock in silent:
            assert await sock.recv(100) == b""  # closed by the server
        assert trio.current_time() - start >= http_metrics.TIMEOUT
        assert (await _exchange(server, b"GET /metrics HTTP/1.1\r\n\r\n")).endswith(BODY)
    finally:
        for sock in silent:
            sock.close()


async def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "metrics.sock")
    srv = MetricsServer(MetricsAddress(path=path), lambda: BODY)
    srv.bind()
    assert (os.stat(path).st_mode & 0o777) == 0o600
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        client = trio.socket.socket(socket.AF_UNIX)
        with client:
            await client.connect(path)
            await client.send(b"GET /metrics HTTP/1.1\r\n\r\n")
            answer = b""
            while chunk := await client.recv(65536):
                answer += chunk
        assert answer.endswith(BODY)
        nursery.cancel_scope.cancel()
    with pytest.raises(FileNotFoundError):  # the socket file goes with the server
        os.stat(path)


def test_address_in_use_is_a_startup_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        srv = MetricsServer(MetricsAddress(host="127.0.0.1", port=port), lambda: BODY)
        with pytest.raises(StartupError, match=rf"--metrics 127.0.0.1:{port}: cannot listen"):
            srv.bind()


async def test_a_render_that_raises_is_a_500_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def render() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return BODY

    srv = MetricsServer(MetricsAddress(host="127.0.0.1", port=0), render)
    srv.bind()
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        address = srv.sockname
        assert isinstance(address, tuple)
        first = await _exchange(address, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 500 ")
        assert (await _exchange(address, b"GET /metrics HTTP/1.1\r\n\r\n")).endswith(BODY)
        nursery.cancel_scope.cancel()
    assert "metrics: rendering failed" in caplog.text
