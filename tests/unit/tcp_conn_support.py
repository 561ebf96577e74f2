"""A guest link that records, decoded, every TCP segment ferryd sends the guest."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from ferryd.wire.ip import IPPROTO_TCP, IpAddress
from ferryd.wire.tcp import TcpOptions, _parse_options_untrusted

GUEST = IPv4Address("10.0.2.15")


@dataclass(frozen=True)
class Sent:
    """One segment ferryd sent the guest, as the guest would read its header."""

    seq: int
    flags: int
    options: TcpOptions
    length: int
    """Payload bytes."""


class RecordingGuest:
    """A GuestPort that decodes the TCP header of every segment sent to the guest."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def send_ip(
        self,
        src: IpAddress,
        dst: IpAddress,
        proto: int,
        l4: bytes,
        payload: bytes | memoryview = b"",
        csum_offset: int | None = None,
    ) -> None:
        assert proto == IPPROTO_TCP
        offset = (l4[12] >> 4) * 4
        options = _parse_options_untrusted(memoryview(l4)[20:offset])
        seq = struct.unpack_from("!I", l4, 4)[0]
        self.sent.append(Sent(seq, l4[13], options, len(payload)))

    def guest_address(self, version: int) -> IpAddress | None:
        return GUEST

    def data_at(self, seq: int) -> int:
        """How many times a data segment starting at ``seq`` was sent."""
        return sum(1 for s in self.sent if s.seq == seq and s.length)
