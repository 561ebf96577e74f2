"""Typed face of pyseccomp (ctypes bindings to libseccomp, which ships no type hints).

libseccomp (Debian's libseccomp2, already on every systemd machine) turns
syscall names into the right numbers for the architecture and builds the
BPF program, with the architecture check. pyseccomp only wraps its C API
with ctypes; Debian's python3-seccomp is the same API but lives outside the
virtualenv.
"""

from __future__ import annotations

from typing import Protocol, cast

import pyseccomp  # type: ignore[import-untyped]

ALLOW: int = pyseccomp.ALLOW
EQ: int = pyseccomp.EQ
MASKED_EQ: int = pyseccomp.MASKED_EQ
CTL_LOG: int = pyseccomp.Attr.CTL_LOG
"""Filter attribute: SECCOMP_FILTER_FLAG_LOG, the kernel logs every action but ALLOW."""
CTL_TSYNC: int = pyseccomp.Attr.CTL_TSYNC
"""Filter attribute: SECCOMP_FILTER_FLAG_TSYNC, the filter applies to every thread."""


class _Arg(Protocol):
    pass


class _SyscallFilter(Protocol):
    def add_rule(self, action: int, syscall: str, *args: _Arg) -> None: ...

    def set_attr(self, attr: int, value: int) -> None: ...

    def load(self) -> None: ...


def errno_action(code: int) -> int:
    """The action that makes a denied syscall fail with ``code``."""
    return cast(int, pyseccomp.ERRNO(code))


def syscall_arg(index: int, op: int, value: int, value_b: int = 0) -> _Arg:
    """A comparison on syscall argument ``index`` (MASKED_EQ: ``arg & value == value_b``)."""
    return cast(_Arg, pyseccomp.Arg(index, op, value, value_b))


def new_filter(default_action: int) -> _SyscallFilter:
    """A new filter whose unmatched syscalls get ``default_action``."""
    return cast(_SyscallFilter, pyseccomp.SyscallFilter(default_action))
