"""QEMU's stream netdev played by a relay: a guest namespace's tap to ferryd's socket.

``ferryd --socket PATH`` serves a QEMU; the tests need a real Linux TCP
stack as the guest without booting one, so this relay stands in for QEMU:
it makes a tap in the namespace it runs in (the guest's stack sits behind
it, configured by DHCP like a VM's) and carries every frame between that
tap and ferryd's socket the way QEMU's ``-netdev stream`` does, each behind
its 4-byte big-endian length. Like QEMU it never blocks on ferryd: while
ferryd's side of the socket is full it stops reading the tap (whose queue
then drops, as a virtio queue would stall), and a frame is written whole or
its rest is finished before the next. Like QEMU with ``reconnect-ms`` it
connects again when ferryd closes the connection.

Run with ferryd's venv Python inside the guest namespace, as root::

    python stream_relay.py --socket PATH [--tap tap0] [--mtu 65520]

Commands on stdin, one a line; each is answered with one JSON line on
stdout once done (events are JSON lines too):

  ``status``        ``{"status": {...}}``: connected, path, counts.
  ``switch PATH``   hang up and serve PATH from now on (a migration's
                    switch to the target's ferryd); ``{"switched": PATH}``.
  ``reconnect``     hang up and connect again (QEMU restarted).
  ``hostile N``     write a length of N (and 64 bytes) after the frames
                    already queued: ``{"hostile": N}``.

Events: ``{"ready": ...}`` once the tap is up; ``{"connected": PATH}``;
``{"disconnected": REASON}`` when ferryd hangs up.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from typing import Any

from ferryd.frontends.stream_framing import MAX_FRAME, FrameReader, StreamFramingError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
#: How often a relay that is not connected tries again (QEMU's reconnect-ms).
RECONNECT = 0.05
#: Bytes queued for ferryd before the tap is left alone (QEMU's queue, roughly).
QUEUE = 256 << 10


def emit(**line: Any) -> None:
    print(json.dumps(line), flush=True)


def open_tap(name: str, mtu: int) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    subprocess.run(["ip", "link", "set", "dev", name, "mtu", str(mtu), "up"], check=True)
    return fd


class Relay:
    def __init__(self, tap: int, path: str) -> None:
        self.tap = tap
        self.path = path
        self.sock: socket.socket | None = None
        self.reader = FrameReader(MAX_FRAME)
        self.pending = b""
        """Bytes for ferryd not written yet: the rest of a frame, or queued whole ones."""
        self.next_try = 0.0
        self.counts = {"connections": 0, "to_ferryd": 0, "from_ferryd": 0, "dropped": 0}

    # --- the connection -------------------------------------------------------

    def connect(self) -> None:
        if self.sock is not None or time.monotonic() < self.next_try:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError:  # not there yet, nobody listening, or its backlog full
            sock.close()
            self.next_try = time.monotonic() + RECONNECT
            return
        self.sock = sock
        self.reader.reset()
        self.pending = b""
        self.counts["connections"] += 1
        emit(connected=self.path)

    def hang_up(self, reason: str | None) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.pending = b""  # QEMU starts a new connection at a frame boundary
        if reason is not None:
            emit(disconnected=reason)
            self.next_try = time.monotonic() + RECONNECT

    # --- frames ----------------------------------------------------------------

    def from_tap(self) -> None:
        """The guest's frames, onto the stream (or dropped: nobody connected)."""
        while len(self.pending) < QUEUE:
            try:
                frame = os.read(self.tap, MAX_FRAME + 64)
            except BlockingIOError:
                break
            if self.sock is None:
                self.counts["dropped"] += 1
                continue
            self.pending += struct.pack(">I", len(frame)) + frame
            self.counts["to_ferryd"] += 1
        self.flush()

    def flush(self) -> None:
        if self.sock is None or not self.pending:
            return
        try:
            sent = self.sock.send(self.pending, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return
        except OSError as exc:
            self.hang_up(f"write failed: {exc.strerror}")
            return
        self.pending = self.pending[sent:]

    def from_ferryd(self) -> None:
        for _ in range(16):
            if self.sock is None:
                return
            try:
                n = self.sock.recv_into(self.reader.space())
            except BlockingIOError:
                return
            except OSError as exc:
                self.hang_up(f"read failed: {exc.strerror}")
                return
            if n == 0:
                self.hang_up("ferryd closed the connection")
                return
            try:
                frames = self.reader.received_untrusted(n)
            except StreamFramingError as exc:
                self.hang_up(f"ferryd broke the framing: {exc}")
                return
            for frame in frames:
                try:
                    os.write(self.tap, frame)
                    self.counts["from_ferryd"] += 1
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EIO):
                        raise
                    self.counts["dropped"] += 1

    # --- commands ---------------------------------------------------------------

    def command(self, line: str) -> None:
        words = line.split()
        if not words:
            return
        if words[0] == "status":
            emit(status={"connected": self.sock is not None, "path": self.path, **self.counts})
        elif words[0] == "switch":
            self.hang_up(None)
            self.path, self.next_try = words[1], 0.0
            self.connect()
            emit(switched=self.path)
        elif words[0] == "reconnect":
            self.hang_up(None)
            self.next_try = 0.0
            self.connect()
            emit(reconnected=self.path)
        elif words[0] == "hostile":
            self.pending += struct.pack(">I", int(words[1])) + bytes(64)
            self.flush()
            emit(hostile=int(words[1]))
        else:
            emit(error=f"unknown command {words[0]!r}")

    def run(self) -> None:
        """Relay until stdin closes."""
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        lines = b""
        while True:
            self.connect()
            poller = select.poll()
            poller.register(stdin, select.POLLIN)
            # A full queue for ferryd holds the next frames back in the tap's.
            if len(self.pending) < QUEUE:
                poller.register(self.tap, select.POLLIN)
            if self.sock is not None:
                poller.register(self.sock, select.POLLIN | (select.POLLOUT if self.pending else 0))
            timeout = None if self.sock is not None else RECONNECT * 1000
            for fd, events in poller.poll(timeout):
                if fd == stdin:
                    data = os.read(stdin, 4096)
                    if not data:
                        return
                    lines += data
                    while b"\n" in lines:
                        line, lines = lines.split(b"\n", 1)
                        self.command(line.decode())
                elif fd == self.tap:
                    self.from_tap()
                elif self.sock is not None and fd == self.sock.fileno():
                    if events & select.POLLOUT:
                        self.flush()
                    if self.sock is not None and events & (select.POLLIN | select.POLLHUP):
                        self.from_ferryd()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, metavar="PATH")
    parser.add_argument("--tap", default="tap0")
    parser.add_argument("--mtu", type=int, default=65520)
    opts = parser.parse_args()
    relay = Relay(open_tap(opts.tap, opts.mtu), opts.socket)
    relay.connect()
    emit(ready=opts.tap, connected=relay.sock is not None)
    relay.run()


if __name__ == "__main__":
    main()
