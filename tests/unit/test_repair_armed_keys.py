"""ferry-repair's ArmedKeys (repair_helper/armed.py): each key once, packed as the map takes it."""

from __future__ import annotations

import struct

from ferry_repair.armed import ArmedKeys


def test_each_cookie_is_kept_once_in_arming_order_packed_little_endian() -> None:
    keys = ArmedKeys()
    for cookie in (5, 1 << 40, 5, 7, 1 << 40):
        keys.add(cookie)
    assert len(keys) == 3
    assert bytes(keys.packed) == struct.pack("<3Q", 5, 1 << 40, 7)
    assert list(keys.each()) == [struct.pack("<Q", k) for k in (5, 1 << 40, 7)]
    keys.clear()
    assert len(keys) == 0 and not keys.packed and not keys
