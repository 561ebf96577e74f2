"""The Internet checksum (RFC 1071) and the TCP/UDP/ICMPv6 pseudo-headers.

Theory: the one's-complement sum of 16-bit big-endian words equals the value
of the whole byte string read as one big-endian integer, taken modulo 0xFFFF,
because 0x10000 ≡ 1 (mod 0xFFFF). ``int.from_bytes`` and a single modulo run
in C, so a 64 KiB segment is summed in microseconds with no Python loop.
The one ambiguity of that shortcut is the sum 0xFFFF ("negative zero"), which
the modulo maps to 0; it only arises for non-zero input, so it is told apart
by testing the input for zero.

Sums of separate parts can be added before folding as long as every part but
the last has an even length (RFC 1071 §2(B), associativity): the pseudo-header
is 12 (IPv4) or 40 (IPv6) bytes, so it is summed apart from the segment.
"""

from ipaddress import IPv4Address, IPv6Address


def raw_sum(data: bytes | bytearray | memoryview) -> int:
    """Unfolded sum of ``data`` as 16-bit words (odd length: zero-padded)."""
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    return value


def fold(total: int) -> int:
    """Fold a raw sum into the 16-bit one's-complement sum (0..0xFFFF)."""
    if total == 0:
        return 0
    folded = total % 0xFFFF
    return folded if folded else 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum field value: the complement of the folded sum."""
    return ~fold(initial + raw_sum(data)) & 0xFFFF


def pseudo_header_sum(
    src: IPv4Address | IPv6Address, dst: IPv4Address | IPv6Address, proto: int, length: int
) -> int:
    """Raw sum of the IPv4 (RFC 793 §3.1) or IPv6 (RFC 8200 §8.1) pseudo-header.

    Each address read as one integer is congruent (mod 0xFFFF) to the sum of
    its 16-bit words, and the protocol and length are whole words (IPv6's
    32-bit length reduces the same way), so no bytes need to be built.
    """
    return int(src) + int(dst) + proto + length


def verify(data: bytes | bytearray | memoryview, initial: int = 0) -> bool:
    """True if ``data`` (checksum field included) sums to 0xFFFF."""
    return fold(initial + raw_sum(data)) == 0xFFFF


def complete_partial(
    head: bytes, csum_offset: int, payload: bytes | bytearray | memoryview = b""
) -> bytes:
    """Finish a CHECKSUM_PARTIAL header: its field at ``csum_offset`` holds the
    folded pseudo-header sum, so the sum of the header as it is plus the
    payload is the full sum (the header has an even length, RFC 1071 §2(B))."""
    out = bytearray(head)
    csum = ~fold(raw_sum(head) + raw_sum(payload)) & 0xFFFF
    out[csum_offset : csum_offset + 2] = csum.to_bytes(2, "big")
    return bytes(out)
