"""TCP traffic with end-to-end checks, run inside test namespaces.

The data is a deterministic pseudo-random stream (``random.Random(seed)``,
1 MiB at a time), so both ends can check every byte by SHA-256 without
storing it, and an offset error of any size changes the hash.

Servers (each connection served in its own thread):
  ``sink ADDR PORT``      read to EOF, answer "<count> <sha256>" and close.
  ``source ADDR PORT``    read a line "<bytes> <seed>", send that stream, close.
  ``echo ADDR PORT``      send back everything received, close on EOF.
Clients (print one JSON line, exit 1 on any mismatch):
  ``send ADDR PORT BYTES SEED``   stream to a sink, half-close, check the answer.
  ``fetch ADDR PORT BYTES SEED``  ask a source for a stream and check it.
  ``rr ADDR PORT COUNT``          COUNT one-byte round trips through an echo server.
"""

import hashlib
import json
import random
import socket
import sys
import threading
import time

CHUNK = 1 << 20


def stream(nbytes: int, seed: int):  # type: ignore[no-untyped-def]
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


def _serve(addr: str, port: int, handler) -> None:  # type: ignore[no-untyped-def]
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


def send(addr: str, port: int, nbytes: int, seed: int) -> int:
    sock = socket.create_connection((addr, port))
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


def main(argv: list[str]) -> int:
    cmd, addr, port = argv[0], argv[1], int(argv[2])
    servers = {"sink": _sink, "source": _source, "echo": _echo}
    if cmd in servers:
        _serve(addr, port, servers[cmd])
        return 0
    if cmd == "send":
        return send(addr, port, int(argv[3]), int(argv[4]))
    if cmd == "fetch":
        return fetch(addr, port, int(argv[3]), int(argv[4]))
    if cmd == "rr":
        return rr(addr, port, int(argv[3]))
    print(f"unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
