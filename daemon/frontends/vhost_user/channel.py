"""The vhost-user socket: whole messages and their descriptors in, replies out (trio).

The thin I/O layer under :class:`~.session.VhostUserSession`. QEMU writes
each message with one sendmsg(2), its descriptors in an SCM_RIGHTS control
message on the header's first byte (hw/virtio/vhost-user.c,
vhost_user_write() through qemu_chr_fe_set_msgfds()); a stream socket may
still hand the bytes over in pieces. :func:`receive_message` reads the
12-byte header with room for :data:`MAX_FDS` descriptors, asks
:func:`~.messages.payload_size_untrusted` how much follows (refused before
reading it if too much), and reads exactly that. Every descriptor that
arrived is either returned or closed, whatever happens.

:func:`serve_connection` runs one session over one connection: each message
to the session, each action done or handed on, until QEMU closes the
connection or sends something the session refuses (then the connection
ends: QEMU reconnects and gets a fresh session). It says why the
connection ended (:class:`Ended`) and leaves the logging to its caller,
which throttles it: QEMU can end connections as fast as it likes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ferryd.control.protocol import fds_from_ancdata
from ferryd.frontends.vhost_user.actions import (
    Action,
    CheckDeviceState,
    CloseFds,
    SendReply,
    SetCall,
    SetKick,
    TransferDeviceState,
)
from ferryd.frontends.vhost_user.errors import VhostUserProtocolError
from ferryd.frontends.vhost_user.messages import (
    HEADER_SIZE,
    MAX_REGIONS,
    TransferDirection,
    payload_size_untrusted,
)
from ferryd.frontends.vhost_user.session import VhostUserSession

#: A message read without waiting does not yield to trio's scheduler; after
#: this many in a row the channel yields once anyway (a QEMU that writes
#: messages faster than they are handled must not stall the data path).
FAIRNESS = 32

MAX_FDS = MAX_REGIONS
"""The most descriptors one message carries (SET_MEM_TABLE's eight regions)."""
_ANC_BUFSIZE = socket.CMSG_SPACE(MAX_FDS * 4)


def close_fds(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)


async def receive_message(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One whole message and its descriptors, or None if QEMU closed the connection.

    Raises :class:`VhostUserProtocolError` (having closed every descriptor
    received) for a header the session would refuse anyway, more descriptors
    than a message can carry, or a connection closed mid-message.

    ``sock`` is non-blocking; it is read at once and waited for only when
    empty. (A trio socket yields to the scheduler after every call that
    succeeds: three turns of every busy flow task per message, which QEMU,
    blocked on each reply with its guest stopped, counted as downtime.)
    """
    fds: list[int] = []
    try:
        buffer = bytearray()
        truncated = False
        while len(buffer) < HEADER_SIZE:
            try:
                data, ancdata, flags, _ = sock.recvmsg(
                    HEADER_SIZE - len(buffer), _ANC_BUFSIZE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            fds_from_ancdata(ancdata, fds)
            truncated |= bool(flags & socket.MSG_CTRUNC)
            if not data:
                if not buffer and not fds:
                    return None
                raise VhostUserProtocolError("connection closed in the middle of a message")
            buffer += data
        if truncated or len(fds) > MAX_FDS:
            raise VhostUserProtocolError(f"more than {MAX_FDS} file descriptors in a message")
        size = payload_size_untrusted(buffer)
        while len(buffer) < HEADER_SIZE + size:
            try:
                data = sock.recv(HEADER_SIZE + size - len(buffer))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not data:
                raise VhostUserProtocolError("connection closed in the middle of a message")
            buffer += data
        return bytes(buffer), fds
    except BaseException:
        close_fds(fds)
        raise


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write a whole reply to the non-blocking ``sock``, waiting only while it is full."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


@dataclass(frozen=True, slots=True)
class Ended:
    """Why a connection ended: ``fault`` if QEMU sent something the session refused."""

    reason: str
    fault: bool = False


async def serve_connection(
    sock: socket.socket,
    session: VhostUserSession,
    apply: Callable[[Action], Awaitable[None]],
    check_device_state: Callable[[TransferDirection], Awaitable[bool]],
) -> Ended:
    """Run ``session`` over ``sock`` until QEMU disconnects or misbehaves; why it ended.

    Replies are sent and spare descriptors closed here; every other action
    goes to ``apply`` (the adapter: eventfds, rings, the device state's
    descriptor), in order, each awaited before the next message is read
    (a ring's start waits for the migration's rollback or resume); an
    ``apply`` that finds QEMU at fault (a descriptor of the wrong kind)
    closes that action's descriptor and raises VhostUserProtocolError,
    which ends the connection as a refused message does.
    CHECK_DEVICE_STATE waits for ``check_device_state`` (the migration
    controller's verdict), as QEMU does. A refused message ends the
    connection; the session is closed in every case.
    """
    sock.setblocking(False)
    handled = 0
    try:
        while True:
            handled += 1
            if handled % FAIRNESS == 0:
                # Messages read without waiting never yield: let the data path run.
                await trio.lowlevel.checkpoint()
            try:
                received = await receive_message(sock)
                if received is None:
                    return Ended("QEMU closed the connection")
                data, fds = received
                try:
                    actions = session.receive_untrusted(data, fds)
                except VhostUserProtocolError:
                    close_fds(fds)
                    raise
            except VhostUserProtocolError as exc:
                return Ended(f"QEMU sent an invalid message: {exc}", fault=True)
            except OSError as exc:
                # ECONNRESET: QEMU died with our reply unread (unix_release_sock).
                return Ended(f"QEMU's connection failed: {exc.strerror or exc}")
            while actions:
                action, *actions = actions
                if isinstance(action, SendReply):
                    try:
                        await send_all(sock, action.data)
                    except OSError as exc:  # EPIPE: QEMU went away before its reply
                        close_fds([fd for a in actions for fd in _descriptors(a)])
                        return Ended(f"QEMU's connection failed: {exc.strerror or exc}")
                elif isinstance(action, CloseFds):
                    close_fds(action.fds)
                elif isinstance(action, CheckDeviceState):
                    ok = await check_device_state(action.direction)
                    actions = session.device_state_checked(ok) + actions
                else:
                    try:
                        await apply(action)
                    except VhostUserProtocolError as exc:  # e.g. a kick that is no eventfd
                        close_fds([fd for a in actions for fd in _descriptors(a)])
                        return Ended(f"QEMU sent an invalid message: {exc}", fault=True)
                    except BaseException:
                        close_fds([fd for a in actions for fd in _descriptors(a)])
                        raise
    finally:
        session.close()


def _descriptors(action: Action) -> tuple[int, ...]:
    """The descriptors an action not yet carried out owns (closed if it never will be)."""
    if isinstance(action, CloseFds):
        return action.fds
    if isinstance(action, (SetKick, SetCall)):
        return () if action.fd is None else (action.fd,)
    if isinstance(action, TransferDeviceState):
        return (action.fd,)
    return ()
