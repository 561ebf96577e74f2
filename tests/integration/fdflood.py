"""Descriptor floods for tests/integration/test_guest_descriptors.py, one JSON line each.

``udp ADDR PORT COUNT``   (in the guest) open COUNT connected UDP sockets,
    send one datagram on each, print ``sent``, wait for a stdin line, then
    print how many sockets hold an error (ICMP unreachable) and which.
``tcp ADDR PORT COUNT``   (in the guest) try COUNT connect()s one after
    the other; print how many connected, were refused, or timed out.
``control PATH COUNT``    (on the host) open up to COUNT connections to a
    control socket without sending anything, print ``open N``, wait for a
    stdin line, close them all.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections import Counter


def udp(addr: str, port: int, count: int) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    socks = []
    for _ in range(count):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.connect((addr, port))
        s.send(b"x")
        socks.append(s)
    print("sent", flush=True)
    sys.stdin.readline()
    errors = Counter(
        errno.errorcode.get(e, str(e))
        for s in socks
        if (e := s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    )
    print(json.dumps({"errors": sum(errors.values()), "kinds": dict(errors)}), flush=True)


def tcp(addr: str, port: int, count: int) -> None:
    outcome: Counter[str] = Counter()
    held = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        s.settimeout(15)
        try:
            s.connect((addr, port))
            outcome["connected"] += 1
            held.append(s)
        except ConnectionRefusedError:
            outcome["refused"] += 1
            s.close()
        except TimeoutError:
            outcome["timeout"] += 1
            s.close()
    print(json.dumps(dict(outcome)), flush=True)


def control(path: str, count: int, seconds: float = 3.0) -> None:
    socks: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    while len(socks) < count and time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:  # the backlog is full: try again while ferryd accepts
            s.close()
            time.sleep(0.01)
            continue
        except OSError:  # refused: nobody listens any more
            s.close()
            break
        socks.append(s)
    print(f"open {len(socks)}", flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()
    os._exit(0)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "udp":
        udp(args[0], int(args[1]), int(args[2]))
    elif cmd == "tcp":
        tcp(args[0], int(args[1]), int(args[2]))
    elif cmd == "control":
        control(args[0], int(args[1]))
    else:
        sys.exit(f"unknown command {cmd!r}")
