"""The stack's side of the guest link, as seen by flows.

Flows (UDP, ICMP and TCP) never build Ethernet headers or know which
frontend carries the frames: they hand an upper-layer message and its
addresses to a :class:`GuestPort`, which adds the IP and Ethernet headers and
queues the frame to the frontend. Sending never blocks: the guest link is a
datagram link, and a frame the frontend cannot take at once is dropped and
counted, exactly as a full NIC queue would (UDP and ICMP tolerate it; TCP
retransmits).
"""

from typing import Protocol

from ferryd.wire.ip import IpAddress


class GuestPort(Protocol):
    def send_ip(
        self,
        src: IpAddress,
        dst: IpAddress,
        proto: int,
        l4: bytes,
        payload: bytes | memoryview = b"",
        csum_offset: int | None = None,
    ) -> bool:
        """Send ``l4`` followed by ``payload`` to the guest; False if it could not take it.

        Without ``csum_offset`` the message is complete and checksummed. With
        it, the 16-bit field at that offset of ``l4`` holds only the
        pseudo-header sum and is completed by the frontend or the guest's
        kernel (checksum offload, see frontends/tap.py). ``payload`` is
        written from where it is, without being copied into ``l4``.
        """
        ...

    def guest_address(self, version: int) -> IpAddress | None:
        """The guest's address of that IP version (4 or 6), if known.

        Inbound flows send to it. It is the configured address until the
        guest is seen using another one (SLAAC), then the last one seen.
        """
        ...
