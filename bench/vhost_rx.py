"""CPU per 64 KiB frame into a vhost-user receive ring: the virtqueue alone, no VM.

``python -m bench.vhost_rx [--layout frags|scattered] [--log]``. Guest RAM
is a memfd mapped as the daemon maps QEMU's (MmapMapper); its receive ring
has 256 one-descriptor chains of 4 KiB, as Linux's virtio-net posts them with
mergeable buffers for bulk traffic, laid out either as Linux carves them (8
in order out of each 32 KiB page, add_recvbuf_mergeable(): ``frags``) or each
on its own (``scattered``, the worst case). Each frame is what the TCP flow
sends a checksum-offloading frontend: a 54-byte head and 65,482 bytes of
payload with NEEDS_CSUM, 17 buffers. ``--log`` turns the dirty log on, as
during a migration. Prints microseconds of CPU (time.process_time) per frame
over ``--reps`` runs: min, median, max. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import time

from ferryd.frontends.vhost_user.memory import DirtyLog, GuestMemory, MmapMapper
from ferryd.frontends.vhost_user.messages import VHOST_VRING_F_LOG, MemoryRegion, VringAddress
from ferryd.frontends.vhost_user.virtqueue import (
    VIRTQ_DESC_F_WRITE,
    SplitVirtqueue,
    ring_sizes,
)

NUM = 256
BUFFER = 4096
RAM = 8 << 20
UVA = 0x7F00_0000_0000
DESC_GPA = 0x10000
HEAD, PAYLOAD = 54, 65482


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("frags", "scattered"), default="frags")
    parser.add_argument("--log", action="store_true", help="dirty log on (a migration)")
    parser.add_argument("--frames", type=int, default=1000, help="frames per run")
    parser.add_argument("--reps", type=int, default=25, help="runs")
    args = parser.parse_args()

    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    memory = GuestMemory.map_table_untrusted([MemoryRegion(0, RAM, UVA, 0)], [fd], MmapMapper())
    os.close(fd)
    desc_size, avail_size, _ = ring_sizes(NUM)
    avail = DESC_GPA + desc_size
    used = (avail + avail_size + 3) & ~3
    desc_view = memory.gpa_view(DESC_GPA, desc_size)
    avail_view = memory.gpa_view(avail, avail_size)
    for i in range(NUM):
        if args.layout == "frags":
            gpa = 0x100000 + (i // 8) * 0x10000 + (i % 8) * BUFFER
        else:
            gpa = 0x100000 + i * 2 * BUFFER
        struct.pack_into("<QIHH", desc_view, 16 * i, gpa, BUFFER, VIRTQ_DESC_F_WRITE, 0)
        struct.pack_into("<H", avail_view, 4 + 2 * i, i)  # slot i always offers head i
    flags = VHOST_VRING_F_LOG if args.log else 0
    address = VringAddress(0, flags, UVA + DESC_GPA, UVA + used, UVA + avail, used)
    vq = SplitVirtqueue(0)
    vq.set_num(NUM)
    vq.attach(memory, address, vq.views_for(memory, address))
    if args.log:
        vq.log = DirtyLog(memoryview(bytearray(RAM >> 15)))
    vq.start()
    vq.enabled = vq.mergeable = True

    parts: list[bytes | memoryview] = [bytes(HEAD), memoryview(bytearray(os.urandom(PAYLOAD)))]
    avail_idx = 0

    def run(frames: int) -> None:
        nonlocal avail_idx
        for _ in range(frames):
            avail_idx = (avail_idx + 17) & 0xFFFF  # the guest gives back what it read
            struct.pack_into("<H", avail_view, 2, avail_idx)
            if vq.push_frame_untrusted(parts, csum=(34, 16)) != 17:
                raise SystemExit("bench bug: the frame did not take 17 buffers")

    run(200)
    results = []
    for _ in range(args.reps):
        start = time.process_time()
        run(args.frames)
        results.append((time.process_time() - start) / args.frames * 1e6)
    print(
        f"{args.layout}{' log' if args.log else ''}: us of CPU per 64 KiB frame"
        f" min {min(results):.1f} median {statistics.median(results):.1f}"
        f" max {max(results):.1f} ({args.reps} x {args.frames} frames)"
    )


if __name__ == "__main__":
    main()
