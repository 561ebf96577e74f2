"""``make demo VM=1`` (scripts/demo/vm.py), with 10 connections (2 busy) so that it is quick.

The VM demo as shipped otherwise: a QEMU VM on ``ferryd --vhost-user``
takes its lease by DHCP, its connections survive QEMU's live migration
byte-exact, a forwarded port reaches it through host B; the demo exits 0
and leaves no namespace, process or directory behind.
"""

from __future__ import annotations

import pytest

from tests.integration.demo_run import assert_left_nothing, start, table_row

pytestmark = [pytest.mark.slow]


def test_the_vm_demo_migrates_every_connection_byte_exact_and_removes_everything() -> None:
    demo = start("--vm", "-n", "10", "--busy", "2")
    output, _ = demo.communicate(timeout=600)
    assert demo.returncode == 0, output
    assert "demo finished: 10 connections survived the migration byte-exact." in output
    assert table_row(output, "survived byte-exact") == "10/10"
    assert table_row(output, "ferryd A: TCP streamed out") == "10"
    assert table_row(output, "ferryd B: TCP restored") == "10"
    assert table_row(output, "forwarded port after").endswith(": ok")
    assert table_row(output, "downtime").endswith("(QEMU: the guest paused)")
    sent = int(table_row(output, "bytes, guest → peer").replace(",", ""))
    assert sent == int(table_row(output, "bytes, peer → guest").replace(",", "")) > 0
    assert_left_nothing(output)
