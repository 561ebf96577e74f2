"""A UDP echo server and a checking client, run inside test namespaces.

``server ADDR PORT`` answers every datagram with the datagram itself, a
``|`` and the source address it came from, so a client can check both the
payload (byte for byte) and the address the server saw (inbound forwarding
must preserve the peer's address).

``client ADDR PORT COUNT`` sends COUNT distinct datagrams (index + random
bytes), one at a time, resending a datagram up to 5 times if its echo does
not come back within a second (UDP may drop; a lost *answer* is not a
failure of the test's subject unless it keeps happening). It prints one JSON
line with what it saw and exits 1 if any payload went missing or came back
different.
"""

import json
import os
import socket
import sys


def server(addr: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    print("listening", flush=True)
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data + b"|" + peer[0].encode(), peer)


def client(addr: str, port: int, count: int, size: int) -> int:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    sock.connect((addr, port))
    seen: set[str] = set()
    resent = 0
    for i in range(count):
        payload = f"{i}:".encode() + os.urandom(size)
        for _attempt in range(5):
            sock.send(payload)
            try:
                while True:
                    reply = sock.recv(65535)
                    body, _, source = reply.rpartition(b"|")
                    if body == payload:
                        seen.add(source.decode())
                        break
                    # A late echo of an earlier resent datagram: skip it.
                    if not body.split(b":", 1)[0].isdigit() or int(body.split(b":", 1)[0]) >= i:
                        print(json.dumps({"error": f"datagram {i} came back altered"}))
                        return 1
                break
            except TimeoutError:
                resent += 1
        else:
            print(json.dumps({"error": f"datagram {i} lost 5 times", "received": i}))
            return 1
    print(json.dumps({"received": count, "resent": resent, "seen": sorted(seen)}))
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "server":
        server(sys.argv[2], int(sys.argv[3]))
    elif cmd == "client":
        size = int(sys.argv[5]) if len(sys.argv) > 5 else 64
        sys.exit(client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), size))
    else:
        sys.exit(f"unknown command {cmd!r}")
