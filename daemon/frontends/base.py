"""What ferryd needs of a frontend: the guest's Ethernet frames in and out.

A frontend is the guest's side of the link: a tap device in a network
namespace (ferryd.frontends.tap), QEMU's stream netdev on a Unix socket
(ferryd.frontends.stream), QEMU's vhost-user device
(ferryd.frontends.vhost_user). Each one is an
adapter (STYLE.md, "One adapter per transport"): the stack
(ferryd.stack) only sends frames through a :class:`FrameSink`, and the
data path (ferryd.datapath) only runs, drains and hands over a
:class:`Frontend`. Nothing above the data path knows which
frontend it runs on; migration (ferryd.migration) does not even see it.

A new frontend implements :class:`Frontend` and is handed to
:class:`ferryd.datapath.DataPath` by ferryd.main; nothing else changes.

The handover pair is what a live migration needs of the link: the guest's
frames must never be lost while it moves from one ferryd to the other. The
target :meth:`~Frontend.take_over` the guest before the source's freeze
(frames then queue there, unread, until the target's data path starts), and
the source :meth:`~Frontend.hand_over` at its freeze, right after a
:meth:`~Frontend.drain` of what it had queued already. A tap does both with
its multi-queue device (one queue per ferryd). A stream frontend has
nothing to move: each ferryd listens on its own socket for its own QEMU,
and hand_over only stops reading and sending (ferryd.frontends.stream); a
vhost-user frontend leaves it to QEMU, which stops the device's rings on
the source and starts them on the target.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

#: ``on_frame(frame, trusted)``: one frame from the guest, a view valid only
#: for the call (ferryd keeps no payload); ``trusted``: its L4 checksum is not
#: to be verified (the guest's kernel left it to the device or vouched for it).
OnFrame = Callable[[memoryview, bool], None]
#: Called after each burst of frames (work deferred per frame is done there once).
OnBurstEnd = Callable[[], None]


class FrameSink(Protocol):
    """Frames out, to the guest: what the stack needs of a frontend."""

    csum_offload: bool
    """True if frames may leave the L4 checksum to the guest's kernel."""

    def send(self, frame: bytes) -> bool:
        """Deliver one complete frame; drop it (and count it) if the guest cannot take it now.

        True if it went out. False tells the sender the guest has no room now
        (a full receive ring or socket) or no link: a TCP push stops there and
        goes on when the guest has taken frames (flows/tcp_conn.py,
        ``TcpConn.push``) instead of sending into a queue that drops.
        """
        ...

    def send_partial(
        self, parts: list[bytes | memoryview], csum_start: int, csum_offset: int
    ) -> bool:
        """Deliver a frame whose L4 checksum the guest's kernel may leave unsummed (as send)."""
        ...


@dataclass
class FrontendCounters:
    """What crossed the frontend, and what it could not take (counted, never logged per frame)."""

    frames_in: int = 0
    frames_out: int = 0
    dropped_out: int = 0
    """Frames for the guest not taken: its queue was full, or the frontend is down (a
    TCP push stops at one and sends its bytes again later: FrameSink.send)."""


class Frontend(FrameSink, Protocol):
    """Frames in and out, and the handover of the guest: what the data path needs."""

    @property
    def counters(self) -> FrontendCounters:
        """What crossed it (a frontend may count more, in a subclass)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What ``ferryctl status`` shows of it: its ``kind`` ("tap", "stream") and where it is."""
        ...

    async def run(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        """Deliver every frame the guest sends, until cancelled."""
        ...

    def drain(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        """Deliver, without waiting, what the guest queued already (bounded in time)."""
        ...

    def hand_over(self) -> None:
        """Stop taking the guest's frames: from now on the other ferryd's frontend gets them."""
        ...

    def take_over(self) -> None:
        """Take the guest's frames from now on; they wait, unread, until :meth:`run`."""
        ...

    def close(self) -> None: ...
