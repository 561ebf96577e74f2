"""TCP traffic with end-to-end checks, run inside test namespaces.

The data is a deterministic pseudo-random stream (``random.Random(seed)``,
1 MiB at a time), so both ends can check every byte by SHA-256 without
storing it, and an offset error of any size changes the hash.

Servers (each connection served in its own thread):
  ``sink ADDR PORT``      read to EOF, answer "<count> <sha256>" and close.
  ``source ADDR PORT``    read a line "<bytes> <seed>", send that stream, close.
  ``echo ADDR PORT``      send back everything received, close on EOF.
Clients (print one JSON line, exit 1 on any mismatch):
  ``send ADDR PORT BYTES SEED [SNDBUF]``  stream to a sink, half-close, check the answer.
  ``fetch ADDR PORT BYTES SEED``  ask a source for a stream and check it.
  ``rr ADDR PORT COUNT``          COUNT one-byte round trips through an echo server.

Scenario commands for tests/integration/test_tcp.py (results as JSON lines
on stdout; servers print one line per connection):
  ``hold ADDR PORT``        a sink for one connection at a time that reads
                            nothing until a line arrives on its stdin (a
                            stalled application: its receive window closes).
  ``holdfetch ADDR PORT BYTES SEED``  fetch, but read nothing until a line
                            arrives on stdin (the guest application stalls).
  ``many ADDR PORT COUNT BYTES``  open COUNT connections to a sink, print
                            "connected", wait for a stdin line, then send
                            connection i the stream of seed i, half-close all
                            and check every answer.
  ``echoconns ADDR PORT COUNT``  open COUNT connections to an echo server,
                            print "connected", then obey stdin lines:
                            ``poke I J`` (connections I..J-1 each send 100
                            checked bytes and read the echo), ``close I J``,
                            ``check`` (every open connection echoes 1,000
                            checked bytes; prints ok and exits).
  ``peer ADDR PORT``        scenario server: the client's first line names
                            what to do (see ``_peer``).
  ``halfclose ADDR PORT MODE UP UPSEED DOWN DOWNSEED``  MODE ``guest-first``:
                            send UP bytes, shut down writing, then receive
                            DOWN bytes to EOF; ``peer-first``: receive DOWN
                            bytes to EOF, then send UP bytes and shut down.
  ``rstrecv ADDR PORT``     ask the peer to reset; expect ECONNRESET.
  ``rstsend ADDR PORT``     wait until the peer is ready, then reset.
  ``connect ADDR PORT TIMEOUT``  one connect(); print the error and the time.
  ``http ADDR PORT DIR``    HTTP/1.1: GET serves files from DIR, PUT answers
                            "<count> <sha256>" of the body.
"""

import errno
import hashlib
import http.server
import json
import os
import random
import resource
import socket
import sys
import threading
import time
from collections.abc import Iterator

CHUNK = 1 << 20
#: Linux socket options (not in the socket module): set buffers past net.core.*mem_max.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33


def stream(nbytes: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    left = nbytes
    while left > 0:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def expected(nbytes: int, seed: int) -> str:
    h = hashlib.sha256()
    for chunk in stream(nbytes, seed):
        h.update(chunk)
    return h.hexdigest()


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _raise_fd_limit() -> None:
    """Many connections need more than the usual soft limit of 1024 descriptors."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve(addr: str, port: int, handler) -> None:  # type: ignore[no-untyped-def]
    _raise_fd_limit()
    srv = socket.socket(_family(addr), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1024)
    print("listening", flush=True)
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=handler, args=(conn, peer), daemon=True).start()


def _sink(conn: socket.socket, peer: tuple[str, int]) -> None:
    h = hashlib.sha256()
    n = 0
    while data := conn.recv(CHUNK):
        h.update(data)
        n += len(data)
    conn.sendall(f"{n} {h.hexdigest()} {peer[0]}".encode())
    conn.close()


def _source(conn: socket.socket, peer: tuple[str, int]) -> None:
    line = b""
    while not line.endswith(b"\n"):
        data = conn.recv(100)
        if not data:
            conn.close()
            return
        line += data
    nbytes, seed = (int(x) for x in line.split())
    for chunk in stream(nbytes, seed):
        conn.sendall(chunk)
    conn.close()


def _echo(conn: socket.socket, peer: tuple[str, int]) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(CHUNK):
        conn.sendall(data)
    conn.close()


def _read_all(sock: socket.socket) -> bytes:
    parts = []
    while data := sock.recv(CHUNK):
        parts.append(data)
    return b"".join(parts)


def send(addr: str, port: int, nbytes: int, seed: int, sndbuf: int = 0) -> int:
    sock = socket.socket(_family(addr), socket.SOCK_STREAM)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
    sock.connect((addr, port))
    start = time.monotonic()
    for chunk in stream(nbytes, seed):
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    answer = _read_all(sock).decode().split()
    took = time.monotonic() - start
    ok = answer[:2] == [str(nbytes), expected(nbytes, seed)]
    print(
        json.dumps(
            {
                "ok": ok,
                "bytes": nbytes,
                "answer": answer,
                "seconds": took,
                "peer_saw": answer[2] if len(answer) > 2 else None,
            }
        )
    )
    return 0 if ok else 1


def fetch(addr: str, port: int, nbytes: int, seed: int) -> int:
    sock = socket.create_connection((addr, port))
    start = time.monotonic()
    sock.sendall(f"{nbytes} {seed}\n".encode())
    h = hashlib.sha256()
    n = 0
    while data := sock.recv(CHUNK):
        h.update(data)
        n += len(data)
    took = time.monotonic() - start
    ok = n == nbytes and h.hexdigest() == expected(nbytes, seed)
    print(json.dumps({"ok": ok, "bytes": n, "seconds": took}))
    return 0 if ok else 1


def rr(addr: str, port: int, count: int) -> int:
    sock = socket.create_connection((addr, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for i in range(count):
        b = bytes([i & 0xFF])
        t = time.perf_counter()
        sock.sendall(b)
        if sock.recv(1) != b:
            print(json.dumps({"ok": False, "at": i}))
            return 1
        times.append(time.perf_counter() - t)
    times.sort()
    print(
        json.dumps(
            {
                "ok": True,
                "mean_us": sum(times) / count * 1e6,
                "p99_us": times[int(count * 0.99)] * 1e6,
            }
        )
    )
    return 0


def _json(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _recv_check(sock: socket.socket, nbytes: int, seed: int) -> dict[str, object]:
    """Read to EOF; say whether exactly the stream (nbytes, seed) came."""
    h = hashlib.sha256()
    n = 0
    while data := sock.recv(CHUNK):
        h.update(data)
        n += len(data)
    return {"bytes": n, "ok": n == nbytes and h.hexdigest() == expected(nbytes, seed)}


def _listen(addr: str, port: int, rcvbuf: int = 0) -> socket.socket:
    _raise_fd_limit()
    srv = socket.socket(_family(addr), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf:
        # Accepted sockets inherit it; FORCE passes net.core.rmem_max (root).
        srv.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    srv.bind((addr, port))
    srv.listen(1024)
    print("listening", flush=True)
    return srv


def hold(addr: str, port: int, rcvbuf: int) -> None:
    srv = _listen(addr, port, rcvbuf)
    while True:
        conn, peer = srv.accept()
        _json(accepted=peer[0])
        sys.stdin.readline()
        _sink(conn, peer)
        _json(done=peer[0])


def holdfetch(addr: str, port: int, nbytes: int, seed: int, rcvbuf: int) -> int:
    sock = socket.socket(_family(addr), socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    sock.connect((addr, port))
    sock.sendall(f"{nbytes} {seed}\n".encode())
    _json(requested=nbytes)
    sys.stdin.readline()
    result = _recv_check(sock, nbytes, seed)
    _json(**result)
    return 0 if result["ok"] else 1


def many(addr: str, port: int, count: int, nbytes: int) -> int:
    _raise_fd_limit()
    socks = [socket.create_connection((addr, port), timeout=30) for _ in range(count)]
    _json(connected=len(socks))
    sys.stdin.readline()
    for seed, sock in enumerate(socks):
        for chunk in stream(nbytes, seed):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
    bad = []
    peers = set()
    for seed, sock in enumerate(socks):
        answer = _read_all(sock).decode().split()
        sock.close()
        if answer[:2] != [str(nbytes), expected(nbytes, seed)]:
            bad.append(seed)
        peers.update(answer[2:3])
    _json(ok=not bad, bad=bad[:20], count=count, peers=sorted(peers))
    return 0 if not bad else 1


def _echo_round(sock: socket.socket, index: int, size: int, round_: int) -> bool:
    data = hashlib.sha256(f"{index}/{round_}".encode()).digest() * (size // 32 + 1)
    data = data[:size]
    sock.sendall(data)
    got = b""
    while len(got) < size:
        part = sock.recv(size - len(got))
        if not part:
            return False
        got += part
    return got == data


def echoconns(addr: str, port: int, count: int) -> int:
    _raise_fd_limit()
    socks: dict[int, socket.socket] = {
        i: socket.create_connection((addr, port), timeout=30) for i in range(count)
    }
    _json(connected=len(socks))
    rounds = 0
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        rounds += 1
        if words[0] == "poke":
            bad = [
                i
                for i in range(int(words[1]), int(words[2]))
                if not _echo_round(socks[i], i, 100, rounds)
            ]
            _json(poked=int(words[2]) - int(words[1]), bad=bad)
        elif words[0] == "close":
            for i in range(int(words[1]), int(words[2])):
                socks.pop(i).close()
            _json(closed=int(words[2]) - int(words[1]))
        elif words[0] == "check":
            bad = [i for i, sock in socks.items() if not _echo_round(sock, i, 1000, rounds)]
            _json(ok=not bad, checked=len(socks), bad=bad[:20])
            return 0 if not bad else 1
    return 1


def _peer(conn: socket.socket, peer: tuple[str, int]) -> None:
    """One scenario per connection, named by the client's first line."""
    line = b""
    while not line.endswith(b"\n"):
        data = conn.recv(1)
        if not data:
            _json(scenario=None, error="EOF before the scenario line")
            conn.close()
            return
        line += data
    name, *args = line.decode().split()
    result: dict[str, object] = {"scenario": name}
    try:
        if name == "guest-first":
            # The client half-closes after UP bytes; we see EOF, then send DOWN.
            up, up_seed, down, down_seed = (int(a) for a in args)
            result["up"] = _recv_check(conn, up, up_seed)
            for chunk in stream(down, down_seed):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
            result["eof_after_close"] = conn.recv(1) == b""
        elif name == "peer-first":
            # We send DOWN and half-close; the client keeps sending UP after its EOF.
            up, up_seed, down, down_seed = (int(a) for a in args)
            for chunk in stream(down, down_seed):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
            result["up"] = _recv_check(conn, up, up_seed)
        elif name == "reset-me":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        elif name == "expect-reset":
            conn.sendall(b"ready\n")
            try:
                result["read"] = len(conn.recv(100))
                result["reset"] = False
            except ConnectionResetError:
                result["reset"] = True
        else:
            result["error"] = "unknown scenario"
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    conn.close()
    _json(**result)


def halfclose(
    addr: str, port: int, mode: str, up: int, up_seed: int, down: int, down_seed: int
) -> int:
    sock = socket.create_connection((addr, port), timeout=60)
    sock.sendall(f"{mode} {up} {up_seed} {down} {down_seed}\n".encode())
    if mode == "guest-first":
        for chunk in stream(up, up_seed):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        down_result = _recv_check(sock, down, down_seed)
    else:
        down_result = _recv_check(sock, down, down_seed)
        for chunk in stream(up, up_seed):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        # The peer closes once it has seen our EOF: a clean EOF, not a reset.
        down_result["eof_after_close"] = sock.recv(1) == b""
    sock.close()
    _json(down=down_result)
    return 0 if down_result["ok"] else 1


def rstrecv(addr: str, port: int) -> int:
    sock = socket.create_connection((addr, port), timeout=30)
    sock.sendall(b"reset-me\n")
    try:
        data = sock.recv(100)
    except ConnectionResetError:
        _json(reset=True)
        return 0
    _json(reset=False, read=len(data))
    return 1


def rstsend(addr: str, port: int) -> int:
    sock = socket.create_connection((addr, port), timeout=30)
    sock.sendall(b"expect-reset\n")
    ready = sock.recv(100)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    sock.close()
    _json(ready=ready.decode())
    return 0 if ready == b"ready\n" else 1


def connect(addr: str, port: int, timeout: float) -> int:
    sock = socket.socket(_family(addr), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    start = time.monotonic()
    error = None
    try:
        sock.connect((addr, port))
    except TimeoutError:
        error = "timeout"
    except OSError as exc:
        error = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    _json(error=error, seconds=time.monotonic() - start)
    sock.close()
    return 0


class _HttpHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:
        left = int(self.headers["Content-Length"])
        h = hashlib.sha256()
        n = 0
        while left > 0:
            data = self.rfile.read(min(CHUNK, left))
            if not data:
                break
            h.update(data)
            n += len(data)
            left -= len(data)
        body = f"{n} {h.hexdigest()} {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _DualStackServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


def http_serve(addr: str, port: int, directory: str) -> None:
    os.chdir(directory)
    server_class = _DualStackServer if ":" in addr else http.server.ThreadingHTTPServer
    server = server_class((addr, port), _HttpHandler)
    print("listening", flush=True)
    server.serve_forever()


def main(argv: list[str]) -> int:
    cmd, addr, port = argv[0], argv[1], int(argv[2])
    servers = {"sink": _sink, "source": _source, "echo": _echo, "peer": _peer}
    if cmd in servers:
        _serve(addr, port, servers[cmd])
        return 0
    if cmd == "send":
        return send(addr, port, int(argv[3]), int(argv[4]), *(int(a) for a in argv[5:6]))
    if cmd == "fetch":
        return fetch(addr, port, int(argv[3]), int(argv[4]))
    if cmd == "rr":
        return rr(addr, port, int(argv[3]))
    if cmd == "hold":
        hold(addr, port, int(argv[3]) if len(argv) > 3 else 0)
        return 0
    if cmd == "holdfetch":
        return holdfetch(addr, port, int(argv[3]), int(argv[4]), int(argv[5]))
    if cmd == "many":
        return many(addr, port, int(argv[3]), int(argv[4]))
    if cmd == "echoconns":
        return echoconns(addr, port, int(argv[3]))
    if cmd == "halfclose":
        mode, *sizes = argv[3:8]
        up, up_seed, down, down_seed = (int(a) for a in sizes)
        return halfclose(addr, port, mode, up, up_seed, down, down_seed)
    if cmd == "rstrecv":
        return rstrecv(addr, port)
    if cmd == "rstsend":
        return rstsend(addr, port)
    if cmd == "connect":
        return connect(addr, port, float(argv[3]))
    if cmd == "http":
        http_serve(addr, port, argv[3])
        return 0
    print(f"unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
