"""The wire protocol ferry-repair shares with passt-repair, and its parser.

A client (ferryd, or passt) hands sockets to the helper over a Unix stream
socket, one *batch* per message: exactly one data byte, the command, read as
a signed 8-bit integer (1: repair on, 0: repair off, -1: repair off without
the kernel's window probe), carried together with 1..253 file descriptors in
one SCM_RIGHTS control message (ferry-repair's own commands, RepairCommand,
differ). The helper sets TCP_REPAIR to the command on
every descriptor, closes its copies, and echoes the command byte. On any
error it sends nothing more and closes the connection, so a client that
pipelines batches learns which one failed by counting the replies it got
before end-of-file. 253 is the kernel's SCM_MAX_FD (include/net/scm.h, not
exported in a UAPI header): a single sendmsg() cannot carry more.

Everything in a message is chosen by the client, which may be hostile or
buggy, so :func:`parse_request_untrusted` treats it as untrusted input. It
raises exactly one exception, :class:`RequestRefused`, whose message says
what the *client* did wrong. It closes nothing, even on refusal: every
descriptor the kernel installed in our table for a message (:func:`fds_in`,
whatever shape the control data had) goes to the closer thread
(closer.py), because close() of a caller's descriptor may block for as
long as the caller likes (a lingering TCP socket, a Unix socket with such
sockets queued on it, a file on the caller's FUSE mount), and the serving
loop must never wait.

Kernel behaviour relied on (net/unix/af_unix.c, net/core/scm.c):

* On a stream socket, a receive never returns data from two messages that
  both carry descriptors: reading stops after the first one whose
  descriptors were passed up. So one recvmsg() with a buffer larger than one
  byte returns one client message, and a longer message shows up as such.
* If the control buffer is too small, or our descriptor table is full
  (EMFILE), the kernel installs what it can, drops the rest and sets
  MSG_CTRUNC. Such a batch cannot be carried out faithfully: it is refused.
"""

from __future__ import annotations

import _socket
import array
import contextlib
import enum
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Most descriptors one SCM_RIGHTS message can carry (kernel's SCM_MAX_FD).
SCM_MAX_FD = 253

#: TCP_REPAIR's option number at level IPPROTO_TCP (include/uapi/linux/tcp.h).
TCP_REPAIR = 19

#: Control buffer that fits a full batch. A larger batch cannot be sent (the
#: sending kernel refuses it with EINVAL), so anything bigger is refused anyway.
ANCILLARY_BUFFER_SIZE = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)

#: Data buffer for one receive: larger than a valid message, so that a message
#: of the wrong length is seen as one instead of being read a byte at a time.
DATA_BUFFER_SIZE = 64

_ControlMessage = tuple[int, int, bytes]


class RepairCommand(enum.IntEnum):
    """The command byte: passt-repair's three are the TCP_REPAIR value the helper sets.

    ferry-repair adds three (armed.py), which passt-repair does not know:
    ferryd sends them only to a helper it connected to (``--repair``), never
    to one that connected to it (``--repair-listen``, maybe passt-repair).
    """

    ON = 1
    OFF = 0
    OFF_NO_WINDOW_PROBE = -1
    ARM = 2
    """As OFF_NO_WINDOW_PROBE, but each socket keeps the armed filter (armed.py)."""
    FREEZE_ARMED = 3
    """No descriptors: every socket this connection armed stops its intake. The
    command byte is followed by how many sockets the caller armed (u32, little
    endian), which must be how many the helper holds for it."""
    DISARM = 4
    """No descriptors: every socket this connection armed lets everything in again."""

    @property
    def takes_descriptors(self) -> bool:
        return self not in (RepairCommand.FREEZE_ARMED, RepairCommand.DISARM)

    @property
    def repair_value(self) -> int:
        """The TCP_REPAIR value set on each descriptor."""
        return -1 if self is RepairCommand.ARM else int(self)

    def to_byte(self) -> bytes:
        """The command as the one signed byte on the wire."""
        return int(self).to_bytes(1, "little", signed=True)


class RequestRefused(Exception):
    """The client sent something the helper will not act on (client's fault)."""


@dataclass(frozen=True)
class Request:
    """A well-formed batch: the command and the descriptors the kernel gave us.

    The descriptors are ours (copies installed in the helper's table); the
    server hands them to the closer thread (closer.py) once the batch is done.
    """

    command: RepairCommand
    fds: tuple[int, ...]
    count: int = 0
    """FREEZE_ARMED: how many sockets the caller armed."""


#: struct linger {l_onoff = 0, l_linger = 0}: close() never waits for unsent data.
LINGER_OFF = struct.pack("=ii", 0, 0)


def close_fds(fds: Iterable[int]) -> None:
    """Close descriptors we own, ignoring ones that are already gone."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def linger_off_all(fds: Iterable[int]) -> None:
    """Switch SO_LINGER off on each descriptor that is a socket, before we close it.

    Our close() may drop the last reference to a client's socket, and a TCP
    socket with SO_LINGER on and unsent data then blocks close() for up to
    the linger time (tcp_close → sk_stream_wait_close). Only the closer
    thread calls this, right before it closes (closer.py): a shortcut for the
    common case, not a guarantee (the caller may switch it on again, or the
    socket may be queued inside another). Not a socket: left alone.
    """
    for fd in fds:
        try:
            handle = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
        except (OSError, ValueError):  # not a socket, or not a descriptor at all
            continue
        try:
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_OFF)
        except OSError:
            pass  # not a socket that lingers (AF_UNIX takes it too; others may not)
        finally:
            handle.detach()


def fds_in(ancdata: Sequence[_ControlMessage]) -> list[int]:
    """Every descriptor passed in SCM_RIGHTS control messages, whatever else is wrong."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            # A truncated control message may end inside an int: only whole
            # ints are descriptors the kernel installed.
            ints.frombytes(data[: len(data) - len(data) % ints.itemsize])
            fds.extend(ints)
    return fds


def parse_request_untrusted(
    data: bytes, ancdata: Sequence[_ControlMessage], msg_flags: int
) -> Request:
    """Check one received message (recvmsg's first three results) and return its request.

    Raises :class:`RequestRefused` if the message is not exactly one known
    command byte with 1..253 descriptors and nothing else (for FREEZE_ARMED,
    the byte and its count with no descriptor; for DISARM, the byte alone). Either way the
    descriptors the message carried (:func:`fds_in`) stay open: the caller
    closes them, off the serving thread (module docstring).
    """
    fds = fds_in(ancdata)
    command = _command_untrusted(data, ancdata, msg_flags, len(fds))
    count = int.from_bytes(data[1:], "little") if command is RepairCommand.FREEZE_ARMED else 0
    return Request(command, tuple(fds), count)


def _command_untrusted(
    data: bytes, ancdata: Sequence[_ControlMessage], msg_flags: int, nfds: int
) -> RepairCommand:
    if msg_flags & socket.MSG_CTRUNC:
        raise RequestRefused(
            "control data truncated (MSG_CTRUNC): more descriptors than the helper could take"
        )
    if not data:
        raise RequestRefused("message of 0 bytes, expected a command byte")
    for level, kind, _ in ancdata:
        if (level, kind) != (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            raise RequestRefused(f"unexpected control message (level {level}, type {kind})")
    value = int.from_bytes(data[:1], "little", signed=True)
    try:
        command = RepairCommand(value)
    except ValueError:
        raise RequestRefused(f"unknown command {value}") from None
    expected = 5 if command is RepairCommand.FREEZE_ARMED else 1
    if len(data) != expected:
        raise RequestRefused(
            f"message of {len(data)} bytes, expected {expected} for command {command.name}"
        )
    if not command.takes_descriptors:
        if nfds:
            raise RequestRefused(
                f"{nfds} descriptors with command {command.name}, which takes none"
            )
        return command
    if nfds == 0:
        raise RequestRefused("no descriptors with the command")
    if nfds > SCM_MAX_FD:
        raise RequestRefused(f"{nfds} descriptors in one message, at most {SCM_MAX_FD} allowed")
    return command
