"""The drop-all socket filter that freezes a socket's intake, loaded once as eBPF.

ferry-repair attaches a filter that drops every segment to each socket it
turns repair ON for (repair.py says why). A classic BPF program
(SO_ATTACH_FILTER) is converted and compiled for every socket it is
attached to: ~10 µs a socket here, five times TCP_REPAIR itself, and the
largest part of a migration's freeze at a thousand connections. An eBPF
socket filter is loaded once (bpf(BPF_PROG_LOAD), at start-up, while the
helper may still hold CAP_BPF or CAP_SYS_ADMIN: kernel.unprivileged_bpf_
disabled forbids it to others) and then only referenced by each socket
(SO_ATTACH_BPF with the program's fd, sk_attach_bpf: ~1.4 µs). Both are
removed by SO_DETACH_FILTER (SO_DETACH_BPF is the same option). Without
the privilege to load it, the helper falls back to the classic program.

The program is two instructions, ``r0 = 0; exit``: a socket filter's
return value is how many bytes of the packet to keep, and 0 drops it
(sk_filter_trim_cap) before TCP sees it (tcp_v4_rcv / tcp_v6_rcv:
tcp_filter).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import struct

log = logging.getLogger("ferry-repair")

SO_ATTACH_BPF = 50
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SOCKET_FILTER = 1
#: bpf(2)'s syscall number (asm/unistd_64.h, include/uapi/asm-generic/unistd.h).
SYS_BPF = {"x86_64": 321, "aarch64": 280}
#: Tries at a bpf() call at start-up that failed with EAGAIN: the verifier
#: gives up on a program when a signal is pending (kernel/bpf/verifier.c,
#: do_check), a stop included; libbpf tries five times as well.
BPF_ATTEMPTS = 5
# BPF_ALU64 | BPF_MOV | BPF_K to r0, imm 0; then BPF_JMP | BPF_EXIT (linux/bpf.h).
_PROGRAM = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)


def load_drop_all() -> int | None:
    """Load the program; its fd, or None if this kernel or our privileges refuse it."""
    number = SYS_BPF.get(platform.machine())
    if number is None:
        return None
    insns = ctypes.create_string_buffer(_PROGRAM, len(_PROGRAM))
    license_ = ctypes.create_string_buffer(b"GPL")
    # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level,
    # log_size, log_buf, kern_version (the kernel zero-extends a shorter attr).
    attr = struct.pack(
        "<IIQQIIQI",
        _BPF_PROG_TYPE_SOCKET_FILTER,
        len(_PROGRAM) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        0,
        0,
        0,
        0,
    )
    fd = bpf_at_start(number, _BPF_PROG_LOAD, attr, "the drop-all program")
    if fd < 0:
        return None
    os.set_inheritable(fd, False)
    return fd


def bpf_at_start(number: int, command: int, attr: bytes, what: str) -> int:
    """bpf(2) ``command`` with ``attr``: a descriptor, or -1 (logged unless EPERM).

    EPERM is the expected refusal (no CAP_BPF), which the serving line
    reports; any other is logged here with its errno, so that the helper
    does not blame a missing capability for, say, a memory limit.
    """
    buf = ctypes.create_string_buffer(attr, len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    for _ in range(BPF_ATTEMPTS):
        fd = int(libc.syscall(number, command, buf, len(attr)))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code != errno.EAGAIN:
            break
    if code != errno.EPERM:
        log.warning(
            "cannot create %s: bpf(): %s %s",
            what,
            errno.errorcode.get(code, code),
            os.strerror(code),
        )
    return -1
