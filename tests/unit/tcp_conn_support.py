"""A guest link that records, decoded, every TCP segment ferryd sends the guest."""

from __future__ import annotations

from dataclasses import dataclass

from ferryd.wire.ip import IPPROTO_TCP, IpAddress, IpPacket
from ferryd.wire.tcp import TcpOptions, parse_tcp_untrusted
from tests.unit.test_flows_helpers import guest_of


@dataclass(frozen=True)
class Sent:
    """One segment ferryd sent the guest, as the guest reads it."""

    seq: int
    ack: int
    flags: int
    options: TcpOptions
    payload: bytes


class RecordingGuest:
    """A GuestPort that records every TCP segment sent to the guest, as the guest
    reads it: decoded by ferryd's own parser (its checksum may be partial)."""

    def __init__(self) -> None:
        self.segments: list[Sent] = []
        self.routes: list[tuple[IpAddress, IpAddress, int]] = []
        """Source, destination and protocol of each segment, in the same order."""

    def send_ip(
        self,
        src: IpAddress,
        dst: IpAddress,
        proto: int,
        l4: bytes,
        payload: bytes | memoryview = b"",
        csum_offset: int | None = None,
    ) -> bool:
        assert proto == IPPROTO_TCP
        packet = IpPacket(src.version, src, dst, proto, 64, memoryview(bytes(l4) + payload))
        seg = parse_tcp_untrusted(packet, verify_checksum=False)
        self.routes.append((src, dst, proto))
        self.segments.append(Sent(seg.seq, seg.ack, seg.flags, seg.options, bytes(seg.payload)))
        return True

    def guest_address(self, version: int) -> IpAddress | None:
        return guest_of(version)
