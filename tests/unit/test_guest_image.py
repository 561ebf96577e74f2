"""The guest builder's own parts: its cpio archive as another cpio reads it, module names.

The whole guest is booted by tests/integration/vm; these pin the pieces a
boot failure would hide behind a silent kernel: every entry of the
initramfs (files, directories, the console's device node) read back by
busybox's cpio, and the module names as modules.builtin and modinfo spell them.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from testbed.guest_image import _cpio, _Entry, _module_name


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox (bootstrap installs it)")
def test_the_archive_reads_back_entry_by_entry() -> None:
    entries = [
        _Entry.directory("etc"),
        _Entry.file("etc/odd", b"x" * 5, 0o644),  # a length that needs padding
        _Entry.file("init", b"#!/bin/sh\n", 0o755),
        _Entry.char_device("dev/console", 5, 1),
    ]
    listing = subprocess.run(
        ["busybox", "cpio", "-t", "-v"], input=_cpio(entries), capture_output=True, check=True
    ).stdout.decode()
    rows = [line.split() for line in listing.splitlines()]
    assert [row[-1] for row in rows] == ["etc", "etc/odd", "init", "dev/console"]
    assert [row[0] for row in rows] == ["drwxr-xr-x", "-rw-r--r--", "-rwxr-xr-x", "crw-------"]
    assert rows[1][2] == "5" and rows[2][2] == "10"  # sizes: nothing lost to padding


def test_module_names_are_canonical() -> None:
    assert _module_name("kernel/drivers/net/virtio_net.ko") == "virtio_net"
    assert _module_name("kernel/drivers/virtio/virtio-pci.ko.xz") == "virtio_pci"
    assert _module_name("net_failover") == "net_failover"
