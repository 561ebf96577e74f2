"""ferry-repair's bpf() calls at start-up (dropall.bpf_at_start): what a refusal logs.

The serving line says "no CAP_BPF" when a program is missing; that is right
for EPERM only, so any other errno must be logged with its name first.
"""

from __future__ import annotations

import logging
import platform

import pytest

from ferry_repair.dropall import SYS_BPF, bpf_at_start

#: Not a bpf() command (linux/bpf.h ends far below): the kernel says EINVAL.
NO_SUCH_COMMAND = 9999


@pytest.mark.skipif(platform.machine() not in SYS_BPF, reason="bpf() number unknown here")
def test_a_refusal_other_than_eperm_is_logged_with_its_errno(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="ferry-repair"):
        fd = bpf_at_start(SYS_BPF[platform.machine()], NO_SUCH_COMMAND, bytes(16), "a test map")
    assert fd == -1
    assert [r.getMessage() for r in caplog.records] == [
        "cannot create a test map: bpf(): EINVAL Invalid argument"
    ]
