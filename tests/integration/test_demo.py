"""The README's main command, ``make demo`` (scripts/demo), run as a newcomer runs it.

With fewer connections than the default (20, 2 of them busy) so that it
is quick; everything else is the demo as shipped. It must exit 0, show
every connection surviving byte-exact in its summary table and its final
line, and leave nothing behind: not the namespaces, processes and
directory it named in its progress lines, and not after Ctrl-C or a
failure either (a guest without its DHCP client: busybox off PATH).
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.integration.demo_run import assert_left_nothing, start, table_row

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_demo_migrates_every_connection_byte_exact_and_removes_everything() -> None:
    demo = start("-n", "20", "--busy", "2")
    output, _ = demo.communicate(timeout=300)
    assert demo.returncode == 0, output
    assert "demo finished: 20 connections survived the migration byte-exact." in output
    assert table_row(output, "survived byte-exact") == "20/20"
    assert table_row(output, "connections opened") == "20 (2 streaming both ways, 18 idle)"
    assert table_row(output, "ferryd A: TCP streamed out") == "20"
    assert table_row(output, "ferryd B: TCP restored") == "20"
    assert table_row(output, "forwarded port after").endswith(": ok")
    for direction in ("guest → peer", "peer → guest"):
        assert int(table_row(output, f"bytes, {direction}").replace(",", "")) > 2 << 20
    assert_left_nothing(output)


def test_ctrl_c_in_the_middle_removes_everything() -> None:
    demo = start("-n", "20", "--busy", "2")
    assert demo.stdout is not None
    lines: list[str] = []
    for line in demo.stdout:
        lines.append(line)
        if "connections open" in line:
            break
    else:
        pytest.fail("the demo ended before its connections were open:\n" + "".join(lines))
    demo.send_signal(signal.SIGINT)
    rest, _ = demo.communicate(timeout=120)
    output = "".join(lines) + rest
    assert demo.returncode == 130, output
    assert "demo interrupted" in output
    assert_left_nothing(output)


def test_a_failure_exits_1_with_the_reason_and_removes_everything() -> None:
    # ip and sysctl stay (/usr/sbin); busybox (/usr/bin), the guest's DHCP client, is gone.
    demo = start("-n", "4", "--busy", "1", env=dict(os.environ, PATH="/usr/sbin:/sbin"))
    output, _ = demo.communicate(timeout=300)
    assert demo.returncode == 1, output
    assert "demo failed: the guest's DHCP client (busybox udhcpc) got no lease: " in output
    assert "demo finished" not in output
    assert_left_nothing(output)
