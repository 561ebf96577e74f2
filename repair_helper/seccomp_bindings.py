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


class _Arg(Protocol):
    pass


class _SyscallFilter(Protocol):
    def add_rule(self, action: int, syscall: str, *args: _Arg) -> None: ...

    def load(self) -> None: ...


def errno_action(code: int) -> int:
    """The action that makes a denied syscall fail with ``code``."""
    return cast(int, pyseccomp.ERRNO(code))


def syscall_arg(index: int, op: int, value: int) -> _Arg:
    """A comparison on syscall argument ``index``."""
    return cast(_Arg, pyseccomp.Arg(index, op, value))


def new_filter(default_action: int) -> _SyscallFilter:
    """A new filter whose unmatched syscalls get ``default_action``."""
    return cast(_SyscallFilter, pyseccomp.SyscallFilter(default_action))
