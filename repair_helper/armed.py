"""The armed filter: a socket's intake frozen by one map update instead of one setsockopt.

A migration's freeze must stop every TCP socket's intake before it checks
or dumps it (repair.py, "Freezing intake"). Socket by socket through the
helper that costs ~5 µs each (descriptors passed, checked, filter attached,
TCP_REPAIR set: ``bench.repair``), 5 ms of a 1,000-connection freeze, in the
guest's downtime. But most of those sockets were pre-copied minutes or
seconds before, and ferryd only needs to confirm that they did not move.

So a pre-copied socket is *armed* instead of released bare: it leaves repair
mode carrying a filter that looks its own socket cookie up in one hash map
(key: the cookie, u64; value: u32, 0 pass, 1 drop). Arming costs what the
release cost, outside the downtime. At the freeze one
``bpf(BPF_MAP_UPDATE_BATCH)`` sets every armed socket of the caller to 1:
their intake stops at once, whatever their number, and ferryd confirms
each by its segment counts without putting it in repair mode. Only the
connections that moved since are put in repair mode and dumped. Deleting a
socket's key lets everything in again (a missing key passes).

Kernel behaviour relied on:

* a socket filter runs in sk_filter_trim_cap() with ``skb->sk`` set to the
  receiving socket for the program's run (net/core/filter.c), so
  bpf_get_socket_cookie(skb) is that socket's cookie, the same value as
  getsockopt(SO_COOKIE) (sock_gen_cookie), with or without early demux
  (checked here on IPv4 and IPv6, tcp_early_demux off);
* a socket filter's return value is the number of bytes to keep: 0 drops
  the packet before TCP sees it (tcp_filter), 0xffffffff keeps it whole;
* socket cookies are never reused while the system runs (a 64-bit counter),
  so a key left behind never matches another socket;
* the program holds a reference to the map and each socket one to the
  program: a socket armed by a helper that exits stays as armed (frozen if
  it was), and only detaching its filter (repair OFF, repair.py) or closing
  it ends that. Frozen is the safe way to fail.

Both are created once at start-up, while the helper may still hold CAP_BPF
(kernel.unprivileged_bpf_disabled forbids it otherwise, as for dropall.py);
afterwards map updates need only the map's descriptor, which never leaves
the helper. Without the privilege there is no armed filter, and the helper
refuses the commands that need it (the client falls back to repair mode).

The map is shared by every caller; the server (server.py) keeps which keys
each connection armed and acts on those only, so one caller can neither
freeze nor release another's sockets. Its size bounds what callers can
leave in it: a key is removed when its caller releases its sockets, or
closes its connection with them unfrozen. A frozen key stays (its socket
may still need to hear nothing), so a caller that freezes and hangs up over
and over can fill the map; arming is then refused and migrations fall back
to repair mode, slower but correct.
"""

from __future__ import annotations

import _socket
import ctypes
import errno
import os
import platform
import socket
import struct
from collections.abc import Iterator

from ferry_repair.dropall import SYS_BPF, bpf_at_start

_BPF_MAP_CREATE = 0
_BPF_MAP_UPDATE_ELEM = 2
_BPF_MAP_DELETE_ELEM = 3
_BPF_PROG_LOAD = 5
_BPF_MAP_UPDATE_BATCH = 26
_BPF_MAP_DELETE_BATCH = 27
#: bpf() commands made after start-up: the sandbox allows these only (sandbox.py).
RUNTIME_COMMANDS = (
    _BPF_MAP_UPDATE_ELEM,
    _BPF_MAP_DELETE_ELEM,
    _BPF_MAP_UPDATE_BATCH,
    _BPF_MAP_DELETE_BATCH,
)
_BPF_MAP_TYPE_HASH = 1
_BPF_F_NO_PREALLOC = 1
_BPF_PROG_TYPE_SOCKET_FILTER = 1
_BPF_ANY = 0

#: Keys the map holds at most: 16 ferryds each migrating 16,384 connections
#: (ferryd's default --max-flows). ~80 bytes of kernel memory a key, taken as used.
MAX_KEYS = 16 * 16_384
#: Keys one connection may arm (one ferryd's connections, plus some churn).
MAX_KEYS_PER_CONNECTION = 4 * 16_384

PASS = 0
DROP = 1

_COOKIE = struct.Struct("<Q")
#: include/uapi/asm-generic/socket.h
SO_COOKIE = 57


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _program(map_fd: int) -> bytes:
    """The filter (linux/bpf.h encodings): drop if map[cookie] is non-zero."""
    return b"".join(
        (
            _insn(0x85, imm=46),  # call bpf_get_socket_cookie(r1 = skb)
            _insn(0x7B, dst=10, src=0, off=-8),  # *(u64 *)(r10 - 8) = r0
            _insn(0xBF, dst=2, src=10),  # r2 = r10
            _insn(0x07, dst=2, imm=-8),  # r2 += -8: the key
            _insn(0x18, dst=1, src=1, imm=map_fd),  # r1 = the map (BPF_PSEUDO_MAP_FD) ...
            _insn(0),  # ... its upper half
            _insn(0x85, imm=1),  # call bpf_map_lookup_elem
            _insn(0x15, dst=0, off=3),  # if r0 == NULL goto pass
            _insn(0x61, dst=1, src=0),  # r1 = *(u32 *)r0
            _insn(0x15, dst=1, off=1),  # if r1 == 0 goto pass
            _insn(0x05, off=2),  # goto drop
            _insn(0xB4, dst=0, imm=-1),  # pass: w0 = 0xffffffff (keep it all)
            _insn(0x95),  # exit
            _insn(0xB4, dst=0, imm=0),  # drop: w0 = 0
            _insn(0x95),  # exit
        )
    )


class ArmedFilterError(Exception):
    """The kernel refused a map update (full map, out of memory, a key not there)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


class ArmedFilter:
    """The map and the program that reads it; :meth:`load` makes both."""

    def __init__(self, map_fd: int, program_fd: int) -> None:
        self.map_fd = map_fd
        self.program_fd = program_fd
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._number = SYS_BPF[platform.machine()]

    @classmethod
    def load(cls) -> ArmedFilter | None:
        """Create the map and load the program; None if this kernel or our privileges refuse."""
        number = SYS_BPF.get(platform.machine())
        if number is None:
            return None
        # union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size,
        # max_entries, map_flags.
        map_fd = bpf_at_start(
            number,
            _BPF_MAP_CREATE,
            struct.pack("<IIIII", _BPF_MAP_TYPE_HASH, 8, 4, MAX_KEYS, _BPF_F_NO_PREALLOC),
            "the armed filter's map",
        )
        if map_fd < 0:
            return None
        code = _program(map_fd)
        insns = ctypes.create_string_buffer(code, len(code))
        license_ = ctypes.create_string_buffer(b"GPL")
        program_fd = bpf_at_start(
            number,
            _BPF_PROG_LOAD,
            struct.pack(
                "<IIQQIIQI",
                _BPF_PROG_TYPE_SOCKET_FILTER,
                len(code) // 8,
                ctypes.addressof(insns),
                ctypes.addressof(license_),
                0,
                0,
                0,
                0,
            ),
            "the armed filter's program",
        )
        if program_fd < 0:
            os.close(map_fd)
            return None
        os.set_inheritable(map_fd, False)
        os.set_inheritable(program_fd, False)
        return cls(map_fd, program_fd)

    def _bpf(self, command: int, attr: bytes) -> None:
        buf = ctypes.create_string_buffer(attr, len(attr))
        if int(self._libc.syscall(self._number, command, buf, len(attr))) < 0:
            code = ctypes.get_errno()
            raise ArmedFilterError(
                f"bpf() map update: {errno.errorcode.get(code, code)} {os.strerror(code)}",
                code,
            )

    def add(self, cookie: int) -> None:
        """Arm one socket, passing (a new key; an existing one is set to pass)."""
        key = ctypes.create_string_buffer(_COOKIE.pack(cookie), 8)
        value = ctypes.create_string_buffer(struct.pack("<I", PASS), 4)
        # BPF_MAP_UPDATE_ELEM: map_fd, (pad), key, value, flags.
        self._bpf(
            _BPF_MAP_UPDATE_ELEM,
            struct.pack(
                "<IIQQQ", self.map_fd, 0, ctypes.addressof(key), ctypes.addressof(value), _BPF_ANY
            ),
        )

    def set_all(self, keys: ArmedKeys, value: int) -> None:
        """Set every key of ``keys`` to ``value`` (PASS or DROP), in one call."""
        self._batch(_BPF_MAP_UPDATE_BATCH, keys, value)

    def remove_all(self, keys: ArmedKeys) -> None:
        """Delete every key of ``keys`` (their sockets then pass everything)."""
        self._batch(_BPF_MAP_DELETE_BATCH, keys, None)

    def remove_each(self, keys: ArmedKeys) -> None:
        """Delete the keys one by one, those already gone passed over."""
        key = ctypes.create_string_buffer(8)
        for packed in keys.each():
            key.raw = packed
            # BPF_MAP_DELETE_ELEM: map_fd, (pad), key.
            attr = struct.pack("<IIQ", self.map_fd, 0, ctypes.addressof(key))
            try:
                self._bpf(_BPF_MAP_DELETE_ELEM, attr)
            except ArmedFilterError as exc:
                if exc.errno != errno.ENOENT:
                    raise

    def _batch(self, command: int, armed: ArmedKeys, value: int | None) -> None:
        count = len(armed)
        if not count:
            return
        keys = ctypes.create_string_buffer(bytes(armed.packed), 8 * count)
        values = (
            ctypes.create_string_buffer(struct.pack("<I", value) * count, 4 * count)
            if value is not None
            else None
        )
        # union bpf_attr, batch: in_batch, out_batch, keys, values, count,
        # map_fd, elem_flags, flags. A delete of a missing key fails (ENOENT)
        # and stops there: keys are removed only once (server.py).
        self._bpf(
            command,
            struct.pack(
                "<QQQQIIQQ",
                0,
                0,
                ctypes.addressof(keys),
                0 if values is None else ctypes.addressof(values),
                count,
                self.map_fd,
                0,
                0,
            ),
        )


class ArmedKeys:
    """The keys one connection armed, each once, kept packed for the map's batch calls
    (a FREEZE_ARMED of 16,384 keys then packs nothing)."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self.packed = bytearray()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, cookie: int) -> None:
        """Keep ``cookie``'s key, once however often it is armed."""
        if cookie not in self._seen:
            self._seen.add(cookie)
            self.packed += _COOKIE.pack(cookie)

    def each(self) -> Iterator[bytes]:
        """Each key, packed as the map takes it."""
        view = memoryview(self.packed)
        for start in range(0, len(view), 8):
            yield bytes(view[start : start + 8])

    def clear(self) -> None:
        self._seen.clear()
        self.packed.clear()


def socket_cookie(handle: _socket.socket) -> int:
    """getsockopt(SO_COOKIE): the socket's cookie, as the program sees it."""
    return int(_COOKIE.unpack(handle.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])
