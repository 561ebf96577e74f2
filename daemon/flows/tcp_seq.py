"""TCP sequence-number arithmetic (RFC 9293 §3.4): modulo 2**32 comparisons.

Sequence numbers wrap, so "a before b" means the signed 32-bit distance
from b to a is negative. Every comparison of sequence or acknowledgement
numbers in ferry goes through these helpers.
"""

MASK = 0xFFFFFFFF


def seq_add(a: int, n: int) -> int:
    return (a + n) & MASK


def seq_diff(a: int, b: int) -> int:
    """``a - b`` as a signed distance in [-2**31, 2**31)."""
    d = (a - b) & MASK
    return d - (1 << 32) if d & 0x80000000 else d
