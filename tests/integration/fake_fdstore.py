"""The part of systemd that ferryd-netns@.service's ExecStartPre= talks to: the notify socket.

A datagram socket that takes sd_notify(3) messages as PID 1 does for a unit
with NotifyAccess=exec and FileDescriptorStoreMax=1: ``FDSTORE=1`` keeps
the attached descriptor (one at most; a later one is closed, as systemd
refuses descriptors beyond the maximum), ``BARRIER=1`` is acknowledged by
closing the pipe end it carries. What systemd then does with the store,
passing it as descriptor 3 with LISTEN_FDS, is the test's launcher's job.
"""

from __future__ import annotations

import array
import os
import socket
import threading
from pathlib import Path


class FakeFdStore:
    def __init__(self, path: Path, max_fds: int = 1) -> None:
        self.path = str(path)
        self.max_fds = max_fds
        self.stored: list[tuple[str, int]] = []
        """(FDNAME, descriptor) in arrival order."""
        self.messages: list[dict[str, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.path)
        self._sock.settimeout(0.1)
        self._closing = threading.Event()
        os.chmod(self.path, 0o666)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        size = array.array("i").itemsize
        while not self._closing.is_set():
            try:
                data, ancillary, _flags, _addr = self._sock.recvmsg(
                    4096, socket.CMSG_SPACE(16 * size)
                )
            except TimeoutError:
                continue
            fds = array.array("i")
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds.frombytes(payload[: len(payload) - len(payload) % size])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    if len(self.stored) < self.max_fds:
                        self.stored.append((fields.get("FDNAME", "stored"), fd))
                    else:
                        os.close(fd)
            else:
                for fd in fds:  # BARRIER=1: closing the write end is the answer
                    os.close(fd)

    def close(self) -> None:
        self._closing.set()
        self._thread.join()
        self._sock.close()
        for _name, fd in self.stored:
            os.close(fd)
        self.stored.clear()
