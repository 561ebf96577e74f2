"""What the kernel holds for one TCP connection: the one type that dumps, streams and restores.

:class:`TcpKernelState` is what ``sockstate.dump_tcp`` reads out of a socket
in repair mode, what a ``TcpFlowRecord`` carries in the migration stream
(records.py maps it to and from protobuf) and what
``sockstate.restore_in_repair`` writes into a new socket. It is defined once,
here, with no I/O, so that the stream codec does not depend on socket code
and the socket code does not depend on protobuf.

Invariant: a state is restorable once it exists. ``__post_init__`` checks
every field and raises :class:`KernelStateError` (a :class:`ValueError`)
listing what is wrong; nothing downstream checks again. Values from the
migration stream come through ``records.kernel_state_from_proto_untrusted``,
which turns that error (and every other one) into ``StreamError``; a dump
that yields an invalid state (the kernel said something we do not expect)
is turned into ``SocketStateError`` by sockstate.

FIN bookkeeping. A FIN occupies one sequence number. Once we queued our FIN
(FIN_WAIT1, FIN_WAIT2, CLOSING, LAST_ACK) write_seq counts it, and while it
is unacknowledged SIOCOUTQ counts it too (SIOCOUTQNSD as well while it is
unsent); the peeked bytes never contain it. Once the peer's FIN arrived
(CLOSE_WAIT, LAST_ACK, CLOSING) rcv_nxt counts it. The state keeps the
kernel's raw ``send_seq``/``recv_seq`` (FIN included) and the queues as
data only (``unsent`` is the data length of the unsent tail); the FIN flags
follow from ``tcp_state`` (properties ``fin_sent``, ``fin_acked``,
``fin_received``), so no extra field is needed.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import Final

from ferryd.migration.value import value_class
from ferryd.wire.ip import IpAddress
from ferryd.wire.tcp import MAX_WSCALE

__all__ = [
    "SUPPORTED_STATES",
    "KernelStateError",
    "TcpKernelState",
    "TcpState",
    "four_tuple",
]

_U32: Final = 1 << 32


class TcpState:
    """Linux TCP state numbers (include/net/tcp_states.h), as in tcpi_state."""

    ESTABLISHED: Final = 1
    SYN_SENT: Final = 2
    SYN_RECV: Final = 3
    FIN_WAIT1: Final = 4
    FIN_WAIT2: Final = 5
    TIME_WAIT: Final = 6
    CLOSE: Final = 7
    CLOSE_WAIT: Final = 8
    LAST_ACK: Final = 9
    LISTEN: Final = 10
    CLOSING: Final = 11

    NAMES: Final = {
        1: "ESTABLISHED",
        2: "SYN_SENT",
        3: "SYN_RECV",
        4: "FIN_WAIT1",
        5: "FIN_WAIT2",
        6: "TIME_WAIT",
        7: "CLOSE",
        8: "CLOSE_WAIT",
        9: "LAST_ACK",
        10: "LISTEN",
        11: "CLOSING",
    }


#: States a connection can be dumped and restored in.
SUPPORTED_STATES: Final = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.FIN_WAIT1,
        TcpState.FIN_WAIT2,
        TcpState.CLOSE_WAIT,
        TcpState.LAST_ACK,
        TcpState.CLOSING,
    }
)
_FIN_SENT: Final = frozenset(
    {TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.LAST_ACK, TcpState.CLOSING}
)
_FIN_RECEIVED: Final = frozenset({TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING})


class KernelStateError(ValueError):
    """A TCP kernel state that no restorable socket can have; the message lists every problem.

    Whose fault depends on where the values came from: the migration
    stream's writer (records turns this into StreamError) or, from a dump,
    a kernel that answered what this code does not expect.
    """


def four_tuple(local_addr: object, local_port: int, remote_addr: object, remote_port: int) -> str:
    """A connection as error messages name it: ``TCP a:p -> b:q``, IPv6 addresses bracketed."""
    if ":" in str(local_addr):
        return f"TCP [{local_addr}]:{local_port} -> [{remote_addr}]:{remote_port}"
    return f"TCP {local_addr}:{local_port} -> {remote_addr}:{remote_port}"


@value_class  # (frozen to mypy; a plain dataclass at run time, 3 µs less a value: value.py)
class TcpKernelState:
    """Everything the kernel holds for one TCP connection (REFERENCE.md, "Dump, per socket").

    ``send_seq`` and ``recv_seq`` are the kernel's write_seq and rcv_nxt: the
    END of each queue, a FIN included once queued (ours) or received (the
    peer's). ``send_queue`` and ``recv_queue`` are data only; ``unsent`` is
    the length of the tail of ``send_queue`` not yet sent (FIN excluded).
    The field names are those of the protobuf message ``TcpSocket``.
    """

    local_addr: IpAddress
    """Both addresses are of one family, the socket's (a v4-mapped IPv6 socket's are IPv6)."""
    local_port: int
    remote_addr: IpAddress
    remote_port: int
    tcp_state: int
    """TcpState.*, tcpi_state: one of :data:`SUPPORTED_STATES`."""
    mss: int
    """TCP_MAXSEG."""
    snd_wscale: int
    rcv_wscale: int
    options: int
    """tcpi_options bits: OPT_TIMESTAMPS 1, OPT_SACK 2, OPT_WSCALE 4, ..."""
    timestamp: int
    """TCP_TIMESTAMP, u32: the socket's timestamp clock."""
    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int
    send_seq: int
    """write_seq, u32: the end of the send queue."""
    recv_seq: int
    """rcv_nxt, u32: the end of the receive queue."""
    send_queue: bytes = b""
    unsent: int = 0
    """How many bytes at the end of send_queue were never sent."""
    recv_queue: bytes = b""

    def __post_init__(self) -> None:
        if _plainly_valid(self):
            return
        problems = _problems(self)
        if problems:
            raise KernelStateError(f"{self.describe()}: {'; '.join(problems)}")

    @property
    def family(self) -> int:
        """4 or 6: the socket's address family, that of its addresses."""
        return self.local_addr.version

    @property
    def fin_sent(self) -> bool:
        """We queued our FIN (shutdown(SHUT_WR) or close); ``send_seq`` counts it."""
        return self.tcp_state in _FIN_SENT

    @property
    def fin_acked(self) -> bool:
        """The peer acknowledged our FIN (FIN_WAIT2)."""
        return self.tcp_state == TcpState.FIN_WAIT2

    @property
    def fin_received(self) -> bool:
        """The peer's FIN arrived; ``recv_seq`` counts it; the restored socket will not say EOF."""
        return self.tcp_state in _FIN_RECEIVED

    @property
    def send_start(self) -> int:
        """Sequence number of the first byte of ``send_queue`` (snd_una)."""
        return (self.send_seq - len(self.send_queue) - int(self.fin_sent)) % _U32

    @property
    def restored_recv_start(self) -> int:
        """Where the restored receive queue starts: after a received FIN (sockstate's docstring).

        The dumped queue itself starts one earlier when a FIN was received
        (copied_seq; recv_seq counts the FIN): the restored socket's rcv_nxt
        must include the FIN, or the peer would see old ACKs.
        """
        return (self.recv_seq - len(self.recv_queue)) % _U32

    def describe(self) -> str:
        """The 4-tuple, as error messages name it."""
        return four_tuple(self.local_addr, self.local_port, self.remote_addr, self.remote_port)


def wscale_problem(name: str, scale: int) -> str | None:
    """Why ``scale`` (named ``name``) is no window scale, or None (RFC 7323 §2.3)."""
    if 0 <= scale <= MAX_WSCALE:
        return None
    return f"{name} {scale} is not a window scale (0-{MAX_WSCALE})"


def _plainly_valid(s: TcpKernelState) -> bool:
    """True if :func:`_problems` would find nothing, in one expression (the usual case).

    A migration builds one state per connection, on both sides, in its
    downtime: listing nothing in a dozen steps costs more than the check.
    False says only "look closer": :func:`_problems` decides.
    """
    kind = type(s.local_addr)
    return (
        (kind is IPv4Address or kind is IPv6Address)
        and type(s.remote_addr) is kind
        and 0 < s.local_port <= 0xFFFF
        and 0 < s.remote_port <= 0xFFFF
        and s.tcp_state in SUPPORTED_STATES
        and 0 <= s.mss <= 0xFFFF
        and 0 <= s.snd_wscale <= MAX_WSCALE
        and 0 <= s.rcv_wscale <= MAX_WSCALE
        and 0 <= s.options <= 0xFF
        and 0 <= s.timestamp < _U32
        and 0 <= s.snd_wl1 < _U32
        and 0 <= s.snd_wnd < _U32
        and 0 <= s.max_window < _U32
        and 0 <= s.rcv_wnd < _U32
        and 0 <= s.rcv_wup < _U32
        and 0 <= s.send_seq < _U32
        and 0 <= s.recv_seq < _U32
        and 0 <= s.unsent <= len(s.send_queue)
        and not (s.tcp_state == TcpState.FIN_WAIT2 and s.send_queue)
    )


def _problems(s: TcpKernelState) -> list[str]:
    """Everything that keeps ``s`` from being a restorable socket's state."""
    problems: list[str] = []
    addrs = (s.local_addr, s.remote_addr)
    if not all(isinstance(a, IPv4Address | IPv6Address) for a in addrs):
        problems.append(f"addresses {s.local_addr!r}, {s.remote_addr!r} are not IP addresses")
    elif s.local_addr.version != s.remote_addr.version:
        problems.append(f"IPv{s.local_addr.version} and IPv{s.remote_addr.version} addresses mixed")
    for name, port in (("local port", s.local_port), ("remote port", s.remote_port)):
        if not 0 < port <= 0xFFFF:
            problems.append(f"{name} {port} is not a port (1-65535)")
    if s.tcp_state not in SUPPORTED_STATES:
        name = TcpState.NAMES.get(s.tcp_state, str(s.tcp_state))
        problems.append(f"cannot restore a connection in TCP state {name}")
    if not 0 <= s.mss <= 0xFFFF:
        problems.append(f"MSS {s.mss} is not in 0-65535")
    for name, scale in (("snd_wscale", s.snd_wscale), ("rcv_wscale", s.rcv_wscale)):
        if (problem := wscale_problem(name, scale)) is not None:
            problems.append(problem)
    if not 0 <= s.options <= 0xFF:
        problems.append(f"TCP options bits {s.options} do not fit tcp_info's byte")
    for name, value in (
        ("timestamp", s.timestamp),
        ("snd_wl1", s.snd_wl1),
        ("snd_wnd", s.snd_wnd),
        ("max_window", s.max_window),
        ("rcv_wnd", s.rcv_wnd),
        ("rcv_wup", s.rcv_wup),
        ("send_seq", s.send_seq),
        ("recv_seq", s.recv_seq),
    ):
        if not 0 <= value < _U32:
            problems.append(f"{name} {value} is not a 32-bit unsigned value")
    if not 0 <= s.unsent <= len(s.send_queue):
        problems.append(f"{s.unsent} unsent bytes in a send queue of {len(s.send_queue)}")
    if s.tcp_state == TcpState.FIN_WAIT2 and s.send_queue:
        # Our FIN was acknowledged, so was every byte before it.
        problems.append("FIN_WAIT2 with data in the send queue")
    return problems
