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

``tftp ADDR PORT`` is a TFTP server (RFC 1350) for the one client a VM
test has: a guest with busybox only, whose ``tftp`` client is its one tool
that holds a UDP socket and reads answers on it. The file it serves is
endless: block after block, each sent once the last was acknowledged (a
lock-step UDP exchange between one guest socket and this one, both ways,
going on across a migration), until a line ``finish`` on stdin; then the
next block is the last (short), and once acknowledged the server prints
one JSON line with the blocks, bytes and SHA-256 of what it sent. A block
not acknowledged within a second is sent again (the guest may be paused).
"""

import hashlib
import json
import os
import select
import socket
import struct
import sys
import threading
import time


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


TFTP_RRQ, TFTP_DATA, TFTP_ACK = 1, 3, 4
TFTP_BLOCK = 512
#: Between an acknowledgement and the next block (the exchange need not be fast).
TFTP_PACE = 0.05
#: How long a block may go unacknowledged before the transfer is given up.
TFTP_GIVE_UP = 180.0


def tftp(addr: str, port: int) -> int:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((addr, port))
    finishing = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "finish":
                finishing.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    print("listening", flush=True)
    while True:
        request, client = sock.recvfrom(65535)
        if struct.unpack_from("!H", request)[0] == TFTP_RRQ:
            break
    # Options (RFC 2347: busybox asks for tsize) are ignored: DATA 1 answers.
    sock.connect(client)
    digest, sent, block = hashlib.sha256(), 0, 0
    while True:
        block += 1
        last = finishing.is_set()
        payload = (b"%08d" % block) * (8 if last else TFTP_BLOCK // 8)
        packet = struct.pack("!HH", TFTP_DATA, block & 0xFFFF) + payload
        deadline = time.monotonic() + TFTP_GIVE_UP
        acked = False
        while not acked:
            if time.monotonic() > deadline:
                print(json.dumps({"error": f"block {block} never acknowledged"}), flush=True)
                return 1
            sock.send(packet)
            ends = time.monotonic() + 1.0
            while (left := ends - time.monotonic()) > 0 and not acked:
                if not select.select([sock], [], [], left)[0]:
                    break
                try:
                    answer = sock.recv(65535)
                except ConnectionRefusedError:
                    continue  # ICMP unreachable while the guest's host moves: send again
                if answer[:4] == struct.pack("!HH", TFTP_ACK, block & 0xFFFF):
                    acked = True
        digest.update(payload)
        sent += len(payload)
        if last:
            result = {"blocks": block, "bytes": sent, "sha256": digest.hexdigest()}
            print(json.dumps(result), flush=True)
            return 0
        time.sleep(TFTP_PACE)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "server":
        server(sys.argv[2], int(sys.argv[3]))
    elif cmd == "client":
        size = int(sys.argv[5]) if len(sys.argv) > 5 else 64
        sys.exit(client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), size))
    elif cmd == "tftp":
        sys.exit(tftp(sys.argv[2], int(sys.argv[3])))
    else:
        sys.exit(f"unknown command {cmd!r}")
