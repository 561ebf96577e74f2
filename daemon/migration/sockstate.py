"""The kernel half of TCP migration: freeze, dump and restore one TCP socket.

This module knows nothing of ferryd's flow table. It moves the state a Linux
TCP socket holds (sequence numbers, negotiated options, windows, timestamps
and both queues) out of a socket on the source host and into a new one on the
target, through the kernel's TCP_REPAIR interface (include/uapi/linux/tcp.h;
the option numbers and the order below are in REFERENCE.md, checked on this
kind of machine).

Theory of operation
===================

Source (per socket)::

    repair ON + freeze         RepairClient.set_repair (ferry-repair freezes
                               the socket's intake as it turns repair on)
    state = dump_tcp(sock)
    ... keep sock open until the outcome is known, then
    close_silently(sock)       (or, on rollback: reopen_send_window(sock,
                               state.snd_wnd), then repair OFF, which thaws it)

Why the freeze: a socket in repair mode still receives, queues and ACKs
whatever the peer sends (checked). Bytes that arrive after the dump would be
ACKed by the source and exist nowhere else, and the restored connection would
stall forever. A socket filter runs before TCP sees a segment
(tcp_v4_rcv/tcp_v6_rcv → tcp_filter → sk_filter_trim_cap), so with a filter
that returns 0 nothing is queued, nothing is ACKed, and the peer retransmits
to whichever host holds the connection next. ferry-repair attaches that
filter as it turns repair ON and detaches it at repair OFF
(repair_helper/repair.py, "Freezing intake"; passt-repair does not), so
ferryd holds no copy of the program. Tests and benchmarks that switch
repair mode themselves freeze with testbed/sockstate_tools.py.

Nothing new after the dump. The freeze stops what comes in, not what goes
out: a socket in repair mode still transmits unless its send queue is
selected (tcp_write_xmit() checks nothing else, tcp_write_wakeup() nothing
at all). With the peer's ACKs dropped, the tail loss probe
(tcp_send_loss_probe(), about two RTTs after the last send) sends the next
new segment when the window allows one (checked: one 1,448-byte segment
within 0.5 s, every time, 14 KB in flight and 64 KB unsent); the persist
timer sends what fits a small window. A byte sent after the dump reached
the peer, but the dump called it unsent: the restored socket's snd_nxt is
behind the peer's rcv_nxt, and every segment of the peer then carries an
ACK of unsent data, which tcp_ack() discards together with the segment
(RFC 9293 §3.10.7.4: such an ACK is dropped). Unless the restored socket
happens to send past that point the connection stalls both ways (seen: 1
or 2 of 100 busy connections moved between hosts, in FIN_WAIT1 with
~350 KB unacknowledged). So dump_tcp() holds the send window at what is in
flight (TCP_REPAIR_WINDOW, snd_wnd = snd_nxt − snd_una) before it reads
snd_nxt, whenever an unsent byte or FIN would fit in it: tcp_snd_wnd_test(),
the loss probe and tcp_write_wakeup() then send nothing beyond snd_nxt,
while everything in flight may still be retransmitted (a window of 0
instead would make the retransmit timer treat the peer as having shrunk
it, tcp_rtx_probe0_timed_out(), and give up after 240 s without an answer).
The dumped state keeps the window as it was; a socket put back into
service gets it back with reopen_send_window() before repair OFF.

dump_tcp() reads, with the socket in repair mode:

* TCP_INFO: ``tcpi_state`` (byte 0), ``tcpi_options`` (byte 5: TS 1, SACK 2,
  WSCALE 4), the window scales (byte 6: snd low nibble, rcv high nibble);
* TCP_MAXSEG (the MSS the kernel uses, restored as the clamp), TCP_TIMESTAMP
  (the socket's timestamp clock: restored so the peer's PAWS check keeps
  accepting our segments), TCP_REPAIR_WINDOW (snd_wl1, snd_wnd, max_window,
  rcv_wnd, rcv_wup);
* SIOCOUTQ (write_seq − snd_una: sent + unsent), SIOCOUTQNSD (write_seq −
  snd_nxt: unsent), SIOCINQ (rcv_nxt − copied_seq, minus a received FIN);
* per queue, selected with TCP_REPAIR_QUEUE: TCP_QUEUE_SEQ (write_seq resp.
  rcv_nxt, i.e. the END of the queue) and the bytes, with recv(MSG_PEEK)
  (tcp_peek_sndq() walks the retransmit and write queues; the receive queue
  is peeked from copied_seq, so a SO_PEEK_OFF set by ferryd is reset to 0
  for the dump and put back afterwards).

What a dump yields is a :class:`~ferryd.migration.kernel_state.TcpKernelState`,
the type the migration stream carries too; how it counts the FINs is in
kernel_state.py ("FIN bookkeeping").

Target, in the phases that batching the helper needs::

    socks = [new_socket_for(s) for s in states]        # SO_REUSEADDR, bound, unconnected
    repair ON for all socks                             # one batched helper call
    for sock, s in ...: restore_in_repair(sock, s)
    repair OFF for all socks                            # one batched helper call
    for sock, s in ...: finish_restore(sock, s)         # may need calling again

restore_in_repair() does, in this order (each step's reason is the kernel's):

1. while unconnected (bound, by new_socket_for; TCP_QUEUE_SEQ is refused
   with EPERM in any state but TCP_CLOSE): the START of each queue,
   write_seq − len(send queue), less one for our FIN (queued again by
   shutdown()), and rcv_nxt − len(recv queue), the peer's FIN included
   (see "The peer's FIN" below). Setting the END values would make the
   socket acknowledge bytes the peer never sent;
2. TCP_TIMESTAMP (sets tsoffset), TCP_MAXSEG, connect(): in repair
   mode tcp_connect() calls tcp_finish_connect() at once, no SYN,
   ESTABLISHED. tcp_init_buffer_space() sizes the initial send buffer there
   from the MSS of the moment (tcp_sndbuf_expand(): about 2 x 10 segments),
   which without a hint is the 536-byte default: ~69 KB (checked). So
   TCP_MAXSEG = min(mss, 32767) first (~2 MB, checked), cleared to 0 again
   after step 3;
3. TCP_REPAIR_OPTIONS: MSS, WINDOW (snd | rcv << 16), SACK_PERM, TIMESTAMP,
   as tcpi_options says. The kernel takes them only in ESTABLISHED before any
   byte went on the wire (``!tp->bytes_sent``, since Linux 6.1);
4. the receive queue (tcp_send_rcvq(): appended, rcv_nxt advanced) and the
   sent-but-unacked part of the send queue (tcp_write_xmit() in repair mode
   with the send queue selected marks it as sent without transmitting; the
   retransmit timer and the window probe at repair OFF bring it to the peer).
   Written in chunks, halving a chunk on ENOMEM. The unsent tail is NOT
   written in repair mode (a blocking send of it there never returns).
   The sent part must go in whole: snd_nxt has to reach the source's, or the
   peer's ACKs (up to the source's snd_nxt) are "ACKs of unsent data" that
   tcp_ack() discards with their segment, and nothing would ever free the
   send buffer. If the send buffer is full before it is all in (EAGAIN; no
   ACK can free space in repair mode) it is raised once with SO_SNDBUF,
   which also ends send-buffer autotuning for that socket (SOCK_SNDBUF_LOCK)
   and is capped by net.core.wmem_max; beyond that the restore fails;
5. FIN_WAIT2 (our FIN sent and acked): shutdown(SHUT_WR) with the send queue
   selected queues the FIN and marks it sent, without transmitting;
6. TCP_REPAIR_WINDOW last (tcp_repair_set_window() refuses rcv_wup after
   rcv_nxt with EINVAL, so only once the receive queue is in), as dumped.

finish_restore() runs after repair OFF: it sends the unsent tail normally
(without blocking; call again with ``sent=`` while it returns less than
``state.unsent``), then, if our FIN had not been acked (FIN_WAIT1, CLOSING,
LAST_ACK), shutdown(SHUT_WR) queues it after the data again.

The peer's FIN. Repair mode cannot queue a received FIN (tcp_send_rcvq()
makes plain data segments), so the restored socket is ESTABLISHED (or
FIN_WAIT* once we shut down) from the kernel's point of view and never
reports end-of-file; the caller knows from ``state.fin_received`` that the
peer has closed (ferryd already passed the FIN to the guest). Its rcv_nxt
must still count the FIN, i.e. be the source's exactly: every segment the
restored socket sends carries rcv_nxt as its ACK, and one short of the FIN
is below the peer's snd_una. The peer takes each such segment as an old
ACK (tcp_ack(): ``before(ack, prior_snd_una)`` → old_ack), which returns
before rcv_tstamp and ts_recent are updated (tcp_replace_ts_recent()), so
its TSecr stays at the source's last tsval: every RTT the restored socket
then takes from an ACK of retransmitted data (tcp_ack_update_rtt() →
tcp_rtt_tsopt_us()) is the time since the freeze, its RTO grows to
seconds and a loss stalls the upload (checked: 1.5 MB stuck, RTO 8 s).
Hence the receive queue starts at rcv_nxt − len(recv queue): the FIN's
sequence number sits before the unread bytes, which the restored socket
numbers one higher than the wire did. Nothing can tell: the peer sends
nothing after its FIN, and a retransmission of anything before it ends at
or before rcv_nxt, a duplicate that tcp_data_queue() drops either way.
After our own FIN is acknowledged such a socket waits in FIN_WAIT2 for a
FIN that will not come: close it (the kernel then reaps it after
tcp_fin_timeout).

Not carried: the out-of-order queue (never acknowledged cumulatively, so the
peer resends it; SACKed parts after a delay, when it detects the reneging),
urgent data, congestion state (the restored socket starts with an initial
window and RTO), link-local IPv6 scope ids.

close_silently(): in repair mode close() calls tcp_disconnect(), which sends
neither FIN nor RST (it only sets ECONNABORTED on the socket).

On one host (same namespace) the target's connect() of a 4-tuple fails
with EADDRNOTAVAIL while the source socket exists, and a peer segment
arriving between the source's close and the target's restore is answered
with an RST (checked: a peer reading during the restore lost connections).
So nothing here is used there: the socket itself is handed over
(ferryd.migration.handover). Between two hosts there is no gap: the source
keeps its frozen sockets until the fabric moved.

Errors: everything raises :class:`SocketStateError`, whose message names the
socket's 4-tuple and the failing step. A state to restore is valid by
construction (TcpKernelState checks itself), so the restore steps check
nothing again.

API (every socket is a stdlib ``socket.socket``, as ferryd's are)::

    dump_tcp(sock) -> TcpKernelState                    # frozen, repair ON
    reopen_send_window(sock, state.snd_wnd)             # rollback: before repair OFF
    segment_counts(sock) -> (out, in)                   # any time
    close_silently(sock)                                # repair ON, else refused
    new_socket_for(state) -> socket.socket              # bound; then repair ON
    restore_in_repair(sock, state)                      # then repair OFF
    reuse_after_repair_off(socks)                       # at every repair OFF
    finish_restore(sock, state, *, sent=0) -> int       # bytes of the tail sent
"""

from __future__ import annotations

import errno
import fcntl
import functools
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Final, TypeVar

from ferry_repair.protocol import TCP_REPAIR
from ferryd.flows.tcp_seq import seq_add, seq_diff
from ferryd.linux import (
    OPT_SACK,
    OPT_TIMESTAMPS,
    OPT_WSCALE,
    SIOCINQ,
    SIOCOUTQ,
    SIOCOUTQNSD,
    SO_PEEK_OFF,
    TCP_NO_QUEUE,
    TCP_QUEUE_SEQ,
    TCP_RECV_QUEUE,
    TCP_REPAIR_OPTIONS,
    TCP_REPAIR_QUEUE,
    TCP_REPAIR_WINDOW,
    TCP_SEND_QUEUE,
    TCP_TIMESTAMP,
)
from ferryd.migration.kernel_state import (
    SUPPORTED_STATES,
    TcpKernelState,
    TcpState,
    four_tuple,
)
from ferryd.wire.ip import IpAddress
from ferryd.wire.tcp import TCPOPT_MSS, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP, TCPOPT_WINDOW

#: The class of socket new_socket_for() makes (the data path's, TcpFlows.adopt).
S = TypeVar("S", bound=socket.socket)

__all__ = [
    "PortInUse",
    "SocketStateError",
    "close_silently",
    "dump_tcp",
    "finish_restore",
    "may_hold_window",
    "new_socket_for",
    "parse_tcp_info",
    "queues_empty",
    "reopen_send_window",
    "restore_in_repair",
    "reuse_after_repair_off",
    "segment_counts",
]

#: Largest value TCP_MAXSEG accepts (MAX_TCP_WINDOW).
MAX_USER_MSS: Final = 32767

#: Largest chunk written to a queue in repair mode in one call; halved on ENOMEM.
MAX_CHUNK: Final = 1 << 20

_INT = struct.Struct("=i")
_REPAIR_WINDOW = struct.Struct("=5I")
_REPAIR_OPT = struct.Struct("=II")

#: The head of struct tcp_info (include/uapi/linux/tcp.h) up to tcpi_total_retrans:
#: 8 bytes (state, ca_state, retransmits, probes, backoff, options, wscales,
#: app_limited/fastopen bits), then 24 u32 (rto ... total_retrans). The kernel
#: copies min(optlen, sizeof) bytes, so asking for this head is enough.
TCP_INFO_HEAD = struct.Struct("=8B24I")
#: struct tcp_info's tcpi_segs_out and tcpi_segs_in (u32 at offset 136, after
#: total_retrans, pacing_rate, max_pacing_rate, bytes_acked, bytes_received).
_TCP_INFO_SEGS = struct.Struct("=136x2I")


class SocketStateError(Exception):
    """Dumping, restoring or closing a TCP socket failed; the message says which and where."""

    def __init__(self, where: str, step: str, reason: str) -> None:
        super().__init__(f"{where}: {step}: {reason}")
        self.where = where
        self.step = step
        self.reason = reason


class PortInUse(SocketStateError):
    """bind() of a restored socket found its port held by a socket that does not
    share it (EADDRINUSE): maybe for a moment only (see restore.BIND_PATIENCE)."""


# -- encodings and helpers


@dataclass(frozen=True, slots=True)
class TcpInfoHead:
    """The fields of struct tcp_info that a dump uses."""

    state: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    snd_mss: int
    rcv_mss: int


def parse_tcp_info(data: bytes) -> TcpInfoHead:
    """Decode the head of struct tcp_info (at least TCP_INFO_HEAD.size bytes)."""
    fields = TCP_INFO_HEAD.unpack_from(data)
    wscales = fields[6]
    return TcpInfoHead(
        state=fields[0],
        options=fields[5],
        snd_wscale=wscales & 0x0F,
        rcv_wscale=wscales >> 4,
        snd_mss=fields[8 + 2],
        rcv_mss=fields[8 + 3],
    )


def queues_empty(sock: socket.socket) -> bool:
    """An established socket with nothing in either queue (TCP_INFO's state, SIOCINQ,
    SIOCOUTQ), read without repair mode; False for one that cannot be read.

    For a socket handed over alive (ferryd.migration.handover): what is true
    now may change the next moment (a peer's segment), which is harmless for
    the one use, flowstate.at_rest's: a connection armed without a resync
    still wakes for what arrives after.
    """
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        fd = sock.fileno()
        return (
            state == TcpState.ESTABLISHED
            and not _ioctl_int(fd, SIOCINQ)
            and not _ioctl_int(fd, SIOCOUTQ)
        )
    except OSError:
        return False


def repair_options(state: TcpKernelState) -> bytes:
    """The TCP_REPAIR_OPTIONS argument: struct tcp_repair_opt pairs in the checked order."""
    return _repair_options(state.mss, state.options, state.snd_wscale, state.rcv_wscale)


@functools.lru_cache(maxsize=256)
def _repair_options(mss: int, options: int, snd_wscale: int, rcv_wscale: int) -> bytes:
    """Cached: the connections of one migration share a few MSS and option sets."""
    pairs = [(TCPOPT_MSS, mss)]
    if options & OPT_WSCALE:
        pairs.append((TCPOPT_WINDOW, snd_wscale | rcv_wscale << 16))
    if options & OPT_SACK:
        pairs.append((TCPOPT_SACK_PERM, 0))
    if options & OPT_TIMESTAMPS:
        pairs.append((TCPOPT_TIMESTAMP, 0))
    return b"".join(_REPAIR_OPT.pack(code, value) for code, value in pairs)


def repair_window(state: TcpKernelState) -> bytes:
    """The TCP_REPAIR_WINDOW argument: the dumped values, snd_wl1 held inside the receive window.

    rcv_nxt is restored exactly (state.recv_seq). tcp_repair_set_window()
    refuses with EINVAL an snd_wl1 after rcv_nxt + rcv_wnd, yet a live
    socket reaches that state: when a segment cannot be queued for lack of
    receive memory (ferryd shrinks a busy socket's SO_RCVBUF before a
    migration, flows/tcp_host.bound_queues), tcp_data_queue() drops it
    after tcp_ack() has already taken its sequence number as snd_wl1
    (tcp_ack_update_window()), and sets ICSK_ACK_NOMEM, which makes
    tcp_select_window() advertise a zero window with rcv_wup = rcv_nxt.
    Seen: snd_wl1 1,571,504 bytes past rcv_nxt, rcv_wnd 129,024. snd_wl1
    only guards the send window against reordered old segments
    (tcp_may_update_window(), RFC 9293 §3.10.7.4 SND.WL1); the peer
    retransmits the dropped bytes, and the highest value the kernel takes
    keeps that guard as close as it can be. The other two checks
    (max_window >= snd_wnd, rcv_wup not after rcv_nxt) hold for any dump.
    """
    return _window_arg(
        state.recv_seq, state.snd_wl1, state.snd_wnd, state.max_window, state.rcv_wnd, state.rcv_wup
    )


def _window_arg(
    rcv_nxt: int, snd_wl1: int, snd_wnd: int, max_window: int, rcv_wnd: int, rcv_wup: int
) -> bytes:
    """TCP_REPAIR_WINDOW's argument, snd_wl1 held inside the receive window (repair_window)."""
    right_edge = seq_add(rcv_nxt, rcv_wnd)
    if seq_diff(snd_wl1, right_edge) > 0:
        snd_wl1 = right_edge
    return _REPAIR_WINDOW.pack(snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup)


def _where(sock: socket.socket) -> str:
    """Name a socket by its 4-tuple, as far as the kernel still knows it."""
    try:
        local = sock.getsockname()
        try:
            remote = sock.getpeername()
        except OSError:
            return f"TCP socket fd {sock.fileno()} bound to {local[0]}:{local[1]} (unconnected)"
        return four_tuple(local[0], local[1], remote[0], remote[1])
    except OSError:
        return f"TCP socket fd {sock.fileno()}"


@functools.lru_cache(maxsize=1024)
def _text(addr: IpAddress) -> str:
    """An address as bind()/connect() take it, written once: a restore names the same
    few (the host's, the peers') a thousand times, and str() of an IPv6 one costs ~3 µs."""
    return str(addr)


@functools.lru_cache(maxsize=1024)
def _address(text: str) -> IpAddress:
    """An address getsockname()/getpeername() gave, parsed once: a dump names the same
    few (the host's, the peers') a thousand times, and parsing one costs ~6 µs."""
    return ip_address(text)


def _ioctl_int(fd: int, request: int) -> int:
    value: int = _INT.unpack(fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]
    return value


# -- repair OFF, close


def reuse_after_repair_off(socks: Iterable[socket.socket]) -> None:
    """Give sockets just taken out of repair mode their SO_REUSEADDR back.

    Repair OFF, with or without the window probe, leaves the address reuse
    off whatever it was before: net/ipv4/tcp.c, do_tcp_setsockopt(),
    TCP_REPAIR_OFF / TCP_REPAIR_OFF_NO_WP: ``sk->sk_reuse = SK_NO_REUSE``
    (TCP_REPAIR_ON had set SK_FORCE_REUSE). A socket bound next to one of
    these on the same port (a forwarding listener, a restored connection's
    twin) then fails with EADDRINUSE: inet_bind_conflict() lets two sockets
    share a port only if both reuse it. Every ferry socket that shares a
    port had it (accepted from a listener with SO_REUSEADDR, or made by
    :func:`new_socket_for`): call this at each repair OFF.
    """
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def close_silently(sock: socket.socket) -> None:
    """Close a socket in repair mode: tcp_disconnect() sends neither FIN nor RST.

    Raises SocketStateError, leaving the socket open, if it is not in repair
    mode (closing it would then send a FIN, or an RST if data is unread).
    """
    try:
        repair = sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR)
    except OSError as exc:
        raise SocketStateError(
            _where(sock), "close silently (TCP_REPAIR?)", exc.strerror or str(exc)
        ) from exc
    if repair != 1:
        raise SocketStateError(
            _where(sock), "close silently", "not in repair mode: close() would reach the peer"
        )
    sock.close()


# -- dump


def dump_tcp(sock: socket.socket) -> TcpKernelState:
    """Read a frozen socket in repair mode; see the module docstring.

    The socket is left as it was but for its send window, held at what is
    in flight when an unsent byte would fit in it, so that nothing the dump
    calls unsent ever leaves (module docstring, "Nothing new after the
    dump"); :func:`reopen_send_window` gives the window back.
    """
    step = "start"
    try:
        step = "getsockname/getpeername"
        local = sock.getsockname()
        remote = sock.getpeername()
        step = "TCP_INFO"
        info = parse_tcp_info(
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_HEAD.size)
        )
        if info.state not in SUPPORTED_STATES:
            raise SocketStateError(
                four_tuple(local[0], local[1], remote[0], remote[1]),
                "dump",
                f"cannot migrate a connection in state {TcpState.NAMES.get(info.state, '?')}",
            )
        step = "TCP_MAXSEG"
        mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        step = "TCP_TIMESTAMP"
        timestamp = sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF
        step = "TCP_REPAIR_WINDOW"
        window = _REPAIR_WINDOW.unpack(
            sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _REPAIR_WINDOW.size)
        )
        fd = sock.fileno()
        step = "SIOCOUTQ/SIOCINQ"
        # (SIOCOUTQ, write_seq - snd_una, cannot change while the intake is
        # frozen: only an ACK moves snd_una. snd_nxt can: read last, below.)
        outq = _ioctl_int(fd, SIOCOUTQ)
        inq = _ioctl_int(fd, SIOCINQ)
        # Our FIN queued and not yet acknowledged (FIN_WAIT2: acknowledged).
        fin_pending = info.state in (TcpState.FIN_WAIT1, TcpState.CLOSING, TcpState.LAST_ACK)
        # An unacked FIN is the last "byte" of SIOCOUTQ, and of SIOCOUTQNSD while unsent.
        data_len = outq - int(fin_pending)

        step = "select send queue"
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        step = "TCP_QUEUE_SEQ (send queue)"
        send_seq = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
        step = "peek send queue"
        send_queue = sock.recv(data_len, socket.MSG_PEEK | socket.MSG_DONTWAIT) if data_len else b""
        step = "select receive queue"
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        step = "TCP_QUEUE_SEQ (receive queue)"
        recv_seq = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
        step = "peek receive queue"
        recv_queue = _peek_recv_queue(sock, inq) if inq else b""
        step = "deselect queue"
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        step = "SIOCOUTQNSD"
        outq_unsent = _ioctl_int(fd, SIOCOUTQNSD)
        if outq_unsent and window[1] > outq - outq_unsent:
            step = "hold the send window (TCP_REPAIR_WINDOW)"
            held = _window_arg(recv_seq, window[0], outq - outq_unsent, *window[2:])
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, held)
            step = "SIOCOUTQNSD (window held)"
            outq_unsent = _ioctl_int(fd, SIOCOUTQNSD)
        unsent = outq_unsent - int(fin_pending and outq_unsent > 0)
    except OSError as exc:
        raise SocketStateError(_where(sock), f"dump: {step}", exc.strerror or str(exc)) from exc
    where = four_tuple(local[0], local[1], remote[0], remote[1])
    if len(send_queue) != data_len:
        raise SocketStateError(
            where, "dump: peek send queue", f"got {len(send_queue)} bytes, SIOCOUTQ says {data_len}"
        )
    if not 0 <= unsent <= data_len:
        raise SocketStateError(where, "dump", f"SIOCOUTQNSD {outq_unsent} > SIOCOUTQ {outq}")
    try:
        return TcpKernelState(
            local_addr=_address(local[0]),
            local_port=local[1],
            remote_addr=_address(remote[0]),
            remote_port=remote[1],
            tcp_state=info.state,
            mss=mss,
            snd_wscale=info.snd_wscale,
            rcv_wscale=info.rcv_wscale,
            options=info.options,
            timestamp=timestamp,
            snd_wl1=window[0],
            snd_wnd=window[1],
            max_window=window[2],
            rcv_wnd=window[3],
            rcv_wup=window[4],
            send_seq=send_seq,
            recv_seq=recv_seq,
            send_queue=send_queue,
            unsent=unsent,
            recv_queue=recv_queue,
        )
    except ValueError as exc:  # KernelStateError: a kernel answer we do not expect
        raise SocketStateError(where, "dump", str(exc)) from exc


def may_hold_window(state: TcpKernelState) -> bool:
    """Whether dump_tcp() may have held the send window of the socket it read ``state`` from.

    It did if an unsent byte or our FIN fitted the window; from the state
    alone an unacknowledged FIN may be sent or not, so this errs towards yes.
    """
    return state.unsent > 0 or (state.fin_sent and not state.fin_acked)


def reopen_send_window(sock: socket.socket, snd_wnd: int) -> None:
    """Give a dumped socket its send window back (``snd_wnd``, the dump's), in repair mode.

    For a socket that goes back into service after :func:`dump_tcp` (a
    rollback, a pre-copy dump not kept), before repair goes OFF: with the
    window held the socket would send nothing new until the peer's next
    window update, and a peer that waits for our data sends none. (Repair
    OFF's window probe would bring one, but tcp_send_window_probe() sends
    it in ESTABLISHED only, and a source thaws without it.) Nothing is
    written if the window is already ``snd_wnd``. The other values are the
    socket's own; intake is frozen, so nothing moved them since the dump.
    """
    step = "TCP_REPAIR_WINDOW"
    try:
        window = _REPAIR_WINDOW.unpack(
            sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _REPAIR_WINDOW.size)
        )
        if window[1] == snd_wnd:
            return
        step = "reopen the send window (TCP_REPAIR_WINDOW)"
        sock.setsockopt(
            socket.IPPROTO_TCP,
            TCP_REPAIR_WINDOW,
            _REPAIR_WINDOW.pack(window[0], snd_wnd, max(window[2], snd_wnd), *window[3:]),
        )
    except OSError as exc:
        raise SocketStateError(_where(sock), step, exc.strerror or str(exc)) from exc


def segment_counts(sock: socket.socket) -> tuple[int, int]:
    """(segments sent, segments received) by the socket so far: tcpi_segs_out / tcpi_segs_in.

    The kernel counts every segment it transmits (__tcp_transmit_skb:
    data, ACKs, probes, retransmissions) and every segment it takes in
    for the socket once the socket filter let it pass (tcp_v4_rcv /
    tcp_v6_rcv: tcp_filter, then tcp_segs_in). While neither count moves
    and the owner neither writes nor reads, nothing a dump reads can change
    (sequence numbers, windows, queues, state), which is how a pre-copied
    dump is confirmed after the freeze without dumping again. Works
    without repair mode.
    """
    data = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SEGS.size)
    out, in_ = _TCP_INFO_SEGS.unpack(data)
    return out, in_


def _peek_recv_queue(sock: socket.socket, length: int) -> bytes:
    """All ``length`` bytes of the receive queue, from copied_seq, whatever SO_PEEK_OFF was."""
    peek_off = sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
    if peek_off < 0:
        data = sock.recv(length, flags)
        if len(data) == length:
            return data
    # Peek from the start, resuming where each peek ended; put the offset back.
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        parts: list[bytes] = []
        got = 0
        while got < length:
            part = sock.recv(length - got, flags)
            if not part:
                raise OSError(errno.EIO, f"receive queue ended after {got} of {length} bytes")
            parts.append(part)
            got += len(part)
        return b"".join(parts)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, peek_off)


# -- restore


def new_socket_for(state: TcpKernelState, cls: type[S]) -> S:
    """A socket (of class ``cls``: the data path's own) of the right family with
    SO_REUSEADDR, bound to the local address; next: repair ON.

    Bound here, out of repair mode, under the usual rules: ferry-repair turns
    repair ON only for a bound socket (it would otherwise let a caller bind
    over other users' ports, repair_helper/repair.py). With SO_REUSEADDR the
    bind succeeds next to sockets that are merely bound or connected on the
    port and also reuse it, but not next to a listener: the forwarding
    listeners of the stream are created after the connections (restore.py).
    """
    family = socket.AF_INET6 if state.family == 6 else socket.AF_INET
    try:
        # Non-blocking from the start, as ferryd's data path wants it: in
        # repair mode connect() completes at once (tcp_connect() calls
        # tcp_finish_connect()), so it never says EINPROGRESS, and every
        # send here passes MSG_DONTWAIT anyway.
        sock = cls(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as exc:
        raise SocketStateError(state.describe(), "socket()", exc.strerror or str(exc)) from exc
    step = "SO_REUSEADDR"
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        step = "bind"
        sock.bind((_text(state.local_addr), state.local_port))
    except OSError as exc:
        sock.close()
        error = PortInUse if exc.errno == errno.EADDRINUSE else SocketStateError
        raise error(state.describe(), step, exc.strerror or str(exc)) from exc
    return sock


def restore_in_repair(sock: socket.socket, state: TcpKernelState) -> None:
    """Restore ``state`` into ``sock`` (from new_socket_for, now in repair mode).

    See the module docstring for the order and why. Next: repair OFF, then
    :func:`finish_restore`.
    """
    tcp = socket.IPPROTO_TCP
    step = "start"
    try:
        # The receive queue's first, so that the send queue stays selected
        # for what follows: one setsockopt less when the receive queue is empty.
        step = "receive queue sequence (TCP_QUEUE_SEQ)"
        sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        sock.setsockopt(tcp, TCP_QUEUE_SEQ, _signed(state.restored_recv_start))
        step = "send queue sequence (TCP_QUEUE_SEQ)"
        sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        sock.setsockopt(tcp, TCP_QUEUE_SEQ, _signed(state.send_start))
        step = "TCP_TIMESTAMP"
        sock.setsockopt(tcp, TCP_TIMESTAMP, _signed(state.timestamp))
        step = "TCP_MAXSEG (for the initial send buffer)"
        sock.setsockopt(tcp, socket.TCP_MAXSEG, min(state.mss, MAX_USER_MSS))
        step = "connect"
        sock.connect((_text(state.remote_addr), state.remote_port))
        step = "TCP_REPAIR_OPTIONS"
        sock.setsockopt(tcp, TCP_REPAIR_OPTIONS, repair_options(state))
        step = "TCP_MAXSEG (clear)"
        sock.setsockopt(tcp, socket.TCP_MAXSEG, 0)
        if state.recv_queue:
            step = "receive queue contents"
            sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            _write_queue(sock, memoryview(state.recv_queue))
            sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        sent = len(state.send_queue) - state.unsent
        step = "send queue contents"
        if sent:
            _write_queue(sock, memoryview(state.send_queue)[:sent], grow_sndbuf=True)
        if state.fin_acked:
            step = "FIN (shutdown in repair mode)"
            sock.shutdown(socket.SHUT_WR)
        step = "TCP_REPAIR_WINDOW"
        sock.setsockopt(tcp, TCP_REPAIR_WINDOW, repair_window(state))
    except OSError as exc:
        detail = exc.strerror or str(exc)
        if step == "TCP_REPAIR_WINDOW" and exc.errno == errno.EINVAL:
            detail += f" ({_window_values(sock, state)})"
        raise SocketStateError(state.describe(), f"restore: {step}", detail) from exc


def _window_values(sock: socket.socket, state: TcpKernelState) -> str:
    """What tcp_repair_set_window() compared, for an EINVAL: the dumped window and rcv_nxt."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        rcv_nxt = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    except OSError:
        rcv_nxt = -1
    return (
        f"snd_wl1 {state.snd_wl1} snd_wnd {state.snd_wnd} max_window {state.max_window}"
        f" rcv_wnd {state.rcv_wnd} rcv_wup {state.rcv_wup} dumped recv_seq {state.recv_seq}"
        f" restored rcv_nxt {rcv_nxt} recv queue {len(state.recv_queue)}"
    )


def _write_queue(sock: socket.socket, data: memoryview, *, grow_sndbuf: bool = False) -> None:
    """Write ``data`` into the selected queue, in chunks; halve a chunk on ENOMEM.

    With ``grow_sndbuf`` (the sent part of the send queue), a full send
    buffer is made larger once with SO_SNDBUF (see the module docstring);
    if that is still not enough, OSError(ENOBUFS).
    """
    chunk = MAX_CHUNK
    flags = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
    grown = False
    while data:
        try:
            n = sock.send(data[:chunk], flags)
        except BlockingIOError:
            if not grow_sndbuf or grown:
                raise OSError(
                    errno.ENOBUFS,
                    f"{len(data)} bytes do not fit the send buffer"
                    f" ({sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)} bytes;"
                    " net.core.wmem_max limits it)",
                ) from None
            # SO_SNDBUF doubles the value it is given (socket(7)); ask for room for
            # all that is left, plus as much again for the kernel's overhead.
            current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, current + 2 * len(data))
            grown = True
            continue
        except OSError as exc:
            if exc.errno == errno.ENOMEM and chunk > 1:
                chunk //= 2
                continue
            raise
        data = data[n:]


def finish_restore(sock: socket.socket, state: TcpKernelState, *, sent: int = 0) -> int:
    """After repair OFF: send the unsent tail, then our FIN if it had not been acknowledged.

    Sends without blocking and returns how much of the unsent tail
    (``state.unsent`` bytes) has now gone in total. When that is less than
    ``state.unsent`` the socket's send buffer is full: call again with
    ``sent=`` the returned value once it is writable. The FIN (FIN_WAIT1,
    CLOSING, LAST_ACK) is queued right after the last byte.
    """
    tail = memoryview(state.send_queue)[len(state.send_queue) - state.unsent :]
    try:
        while sent < len(tail):
            try:
                sent += sock.send(tail[sent:], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return sent
        if state.fin_sent and not state.fin_acked:
            sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        raise SocketStateError(
            state.describe(), "finish restore", exc.strerror or str(exc)
        ) from exc
    return sent


def _signed(value: int) -> int:
    """A u32 as the C int that setsockopt(int) passes on unchanged."""
    return value - (1 << 32) if value >= 1 << 31 else value
