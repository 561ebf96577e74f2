"""A small reference TCP endpoint standing for the guest's kernel, for the in-memory tests.

Enough of RFC 9293 to move a byte stream both ways through ferryd's core
over a lossy link, and nothing clever: it keeps no out-of-order data (a
segment that is not next is dropped and answered with a duplicate ACK),
retransmits go-back-N from SND.UNA on its timer or on three duplicate ACKs
(RFC 5681 §3.2), probes a zero window, ACKs every segment at once, and
closes with a FIN once its application has nothing more to send.
"""

from __future__ import annotations

import enum

from ferryd.flows.tcp_seq import seq_add, seq_diff
from ferryd.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions, TcpSegment
from tests.unit.tcp_memory import GUEST_PORT, REMOTE_PORT

GUEST_WSCALE = 7
GUEST_WINDOW = 0xFFFF  # << GUEST_WSCALE: 8 MiB, more than any test moves at once
RTO = 0.2
_EMPTY = memoryview(b"")


class GState(enum.Enum):
    CLOSED = 0
    SYN_SENT = 1
    SYN_RECEIVED = 2
    ESTABLISHED = 3
    RESET = 4


class RefGuest:
    """The guest's TCP: ``data`` is what its application sends, then (``close``) a FIN."""

    def __init__(
        self,
        isn: int,
        data: bytes,
        *,
        mss: int = 1460,
        timestamps: bool = False,
        close: bool = True,
        ports: tuple[int, int] = (GUEST_PORT, REMOTE_PORT),
    ) -> None:
        self.sport, self.dport = ports
        self.isn = isn
        self.data = data
        self.mss = mss
        self.timestamps = timestamps
        self.close_when_done = close
        self.state = GState.CLOSED
        self.snd_una = self.snd_nxt = isn
        self.snd_wnd = 0
        self.peer_ws = 0
        self.rcv_nxt = 0
        self.irs = 0
        self.received = bytearray()
        self.fin_received = False
        self.fin_sent = False
        self.fin_acked = False
        self.dupacks = 0
        self.timer = float("inf")
        self.ts_recent = 0
        self.out: list[TcpSegment] = []

    # --- helpers -------------------------------------------------------------

    def _opts(self, now: float, syn: bool) -> TcpOptions:
        ts = (int(now * 1000) & 0xFFFFFFFF, self.ts_recent) if self.timestamps else None
        if syn:
            return TcpOptions(mss=self.mss, wscale=GUEST_WSCALE, timestamp=ts)
        return TcpOptions(timestamp=ts)

    def _seg(
        self, seq: int, flags: int, now: float, payload: bytes = b"", syn: bool = False
    ) -> None:
        ack = self.rcv_nxt if flags & ACK else 0
        window = GUEST_WINDOW if not syn else 0xFFFF
        self.out.append(
            TcpSegment(
                self.sport,
                self.dport,
                seq,
                ack,
                flags,
                window,
                self._opts(now, syn),
                memoryview(payload),
            )
        )

    def _data_end(self) -> int:
        """Sequence number after the last byte (FIN excluded)."""
        return seq_add(self.isn, 1 + len(self.data))

    @property
    def done_sending(self) -> bool:
        return self.fin_acked or (not self.close_when_done and self.snd_una == self._data_end())

    # --- opening ---------------------------------------------------------

    def connect(self, now: float) -> TcpSegment:
        """The guest's SYN (an outbound connection)."""
        self.state = GState.SYN_SENT
        self.snd_nxt = seq_add(self.isn, 1)
        self._seg(self.isn, SYN, now, syn=True)
        self.timer = now + RTO
        return self.out.pop()

    # --- input -----------------------------------------------------------

    def receive(self, seg: TcpSegment, now: float) -> None:
        if self.state in (GState.RESET, GState.CLOSED) and not seg.flags & SYN:
            return
        ts = seg.options.timestamp
        if ts is not None and self.timestamps:
            self.ts_recent = ts[0]
        if seg.flags & RST:
            self.state = GState.RESET
            self.timer = float("inf")
            return
        if seg.flags & SYN:
            self._syn(seg, now)
            return
        if self.state is GState.SYN_RECEIVED and seg.flags & ACK and seg.ack == self.snd_nxt:
            self.state = GState.ESTABLISHED
            self.snd_una = seg.ack
            self.snd_wnd = seg.window << self.peer_ws
            self.timer = float("inf")
        if self.state is not GState.ESTABLISHED:
            return
        if seg.flags & ACK:
            self._ack(seg, now)
        length = len(seg.payload)
        if length or seg.flags & FIN:
            if seg.seq == self.rcv_nxt and not self.fin_received:
                self.received += seg.payload
                self.rcv_nxt = seq_add(self.rcv_nxt, length)
                if seg.flags & FIN:
                    self.fin_received = True
                    self.rcv_nxt = seq_add(self.rcv_nxt, 1)
            self._seg(self.snd_nxt, ACK, now)  # every segment, in order or not, is ACKed
        elif seq_diff(seg.seq, self.rcv_nxt) < 0:
            self._seg(self.snd_nxt, ACK, now)  # a window probe: answer it

    def _syn(self, seg: TcpSegment, now: float) -> None:
        opts = seg.options
        self.peer_ws = opts.wscale if opts.wscale is not None else 0
        self.timestamps = self.timestamps and opts.timestamp is not None
        if self.state is GState.SYN_SENT and seg.flags & ACK and seg.ack == self.snd_nxt:
            self.irs = seg.seq
            self.rcv_nxt = seq_add(seg.seq, 1)
            self.snd_una = seg.ack
            self.snd_wnd = seg.window  # never scaled in a SYN
            self.state = GState.ESTABLISHED
            self.timer = float("inf")
            self._seg(self.snd_nxt, ACK, now)
        elif self.state in (GState.CLOSED, GState.SYN_RECEIVED) and not seg.flags & ACK:
            # ferryd opens an inbound connection: answer its SYN (again).
            self.irs = seg.seq
            self.rcv_nxt = seq_add(seg.seq, 1)
            self.state = GState.SYN_RECEIVED
            self.snd_nxt = seq_add(self.isn, 1)
            self._seg(self.isn, SYN | ACK, now, syn=True)
            self.timer = now + RTO
        elif self.state is GState.ESTABLISHED:
            self._seg(self.snd_nxt, ACK, now)  # a retransmitted SYN-ACK: our ACK was lost

    def _ack(self, seg: TcpSegment, now: float) -> None:
        acked = seq_diff(seg.ack, self.snd_una)
        wnd = seg.window << self.peer_ws
        if 0 < acked <= seq_diff(self.snd_nxt, self.snd_una):
            self.snd_una = seg.ack
            if self.fin_sent and seg.ack == seq_add(self._data_end(), 1):
                self.fin_acked = True
            self.dupacks = 0
            self.timer = now + RTO if self.snd_una != self.snd_nxt else float("inf")
        elif (
            acked == 0
            and self.snd_una != self.snd_nxt
            and not seg.payload
            and not seg.flags & FIN
            and wnd == self.snd_wnd
        ):
            self.dupacks += 1
            if self.dupacks == 3:
                self._go_back()
        self.snd_wnd = wnd

    def _go_back(self) -> None:
        self.snd_nxt = self.snd_una
        self.dupacks = 0
        if self.fin_sent and not self.fin_acked:
            self.fin_sent = False

    # --- output ----------------------------------------------------------

    def send(self, now: float) -> None:
        """What the window lets go: data, then the FIN."""
        if self.state is not GState.ESTABLISHED:
            return
        end = self._data_end()
        while True:
            in_flight = seq_diff(self.snd_nxt, self.snd_una)
            room = self.snd_wnd - in_flight
            left = seq_diff(end, self.snd_nxt)
            if left <= 0 or room <= 0:
                break
            n = min(self.mss, left, room)
            off = seq_diff(self.snd_nxt, seq_add(self.isn, 1))
            self._seg(self.snd_nxt, ACK | PSH, now, self.data[off : off + n])
            self.snd_nxt = seq_add(self.snd_nxt, n)
        if (
            self.close_when_done
            and not self.fin_sent
            and self.snd_nxt == end
            and seq_diff(self.snd_nxt, self.snd_una) < self.snd_wnd + 1
        ):
            self._seg(self.snd_nxt, FIN | ACK, now)
            self.snd_nxt = seq_add(self.snd_nxt, 1)
            self.fin_sent = True
        if self.snd_nxt != self.snd_una and self.timer == float("inf"):
            self.timer = now + RTO
        if self.snd_wnd == 0 and seq_diff(end, self.snd_nxt) > 0 and self.timer == float("inf"):
            self.timer = now + RTO  # probe the zero window

    def on_timer(self, now: float) -> None:
        if now < self.timer:
            return
        self.timer = float("inf")
        if self.state is GState.SYN_SENT:
            self._seg(self.isn, SYN, now, syn=True)
            self.timer = now + RTO
        elif self.state is GState.SYN_RECEIVED:
            self._seg(self.isn, SYN | ACK, now, syn=True)
            self.timer = now + RTO
        elif self.state is GState.ESTABLISHED:
            if self.snd_nxt != self.snd_una:
                self._go_back()
            elif self.snd_wnd == 0 and seq_diff(self._data_end(), self.snd_nxt) > 0:
                self._seg(seq_add(self.snd_una, -1), ACK, now)  # zero-window probe
                self.timer = now + RTO

    def take(self) -> list[TcpSegment]:
        out, self.out = self.out, []
        return out
