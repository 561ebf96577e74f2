"""Ethernet II framing (IEEE 802.3, DIX header: destination, source, type).

ferryd sees frames without FCS (tap devices, QEMU's stream socket and
vhost-user all strip it). 802.1Q-tagged and 802.3 length-field frames are
reported with their raw type so the stack can drop them: a guest on ferry's
point-to-point link has no reason to send either.
"""

import struct
from dataclasses import dataclass

from ferryd.wire.errors import MalformedPacket

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6

_HDR = struct.Struct("!6s6sH")


# Not frozen: built for every frame, and a frozen dataclass's __init__ sets
# each field through object.__setattr__ in Python (three times slower).
# Nothing assigns to a parsed frame; eq=False keeps hashing by identity.
@dataclass(slots=True, eq=False)
class EthernetFrame:
    dst: bytes
    src: bytes
    ethertype: int
    payload: memoryview


def parse_ethernet_untrusted(frame: bytes | bytearray | memoryview) -> EthernetFrame:
    """Split a frame into its header fields and payload (no copy)."""
    if len(frame) < ETH_HLEN:
        raise MalformedPacket(f"Ethernet frame of {len(frame)} bytes is shorter than a header")
    dst, src, ethertype = _HDR.unpack_from(frame)
    return EthernetFrame(dst, src, ethertype, memoryview(frame)[ETH_HLEN:])


def ethernet_header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return _HDR.pack(dst, src, ethertype)


def build_ethernet(
    dst: bytes, src: bytes, ethertype: int, payload: bytes | bytearray | memoryview
) -> bytes:
    return _HDR.pack(dst, src, ethertype) + payload


def is_multicast(mac: bytes) -> bool:
    """Group bit (IEEE 802 I/G): broadcast and multicast destinations."""
    return bool(mac[0] & 1)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """Parse ``aa:bb:cc:dd:ee:ff`` (configuration input, so ValueError)."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)
