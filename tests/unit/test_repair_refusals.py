"""carry_out_untrusted: the refusals made before any setsockopt(), without root.

These checks come first (repair.py, "Checks", step 1), so they refuse a
batch without touching a socket and need no privilege to test. The
descriptors stay open either way: the server hands them to the closer
thread (closer.py).
"""

from __future__ import annotations

import os
import socket

import pytest

from ferry_repair.armed import ArmedFilter, ArmedKeys
from ferry_repair.protocol import RepairCommand, Request, RequestRefused
from ferry_repair.repair import CallerRules, carry_out_untrusted


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_unbound_tcp_socket_refused_for_repair_on() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        request = Request(RepairCommand.ON, (sock.fileno(),))
        with pytest.raises(RequestRefused, match="descriptor 0 of the batch is not bound"):
            carry_out_untrusted(request, CallerRules(os.getuid()))
        assert is_open(sock.fileno())
        # Refused before anything was set: the forced-reuse guard never ran.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0


def test_pipe_refused() -> None:
    r, w = os.pipe()
    try:
        armed = ArmedFilter.load()
        for command in (c for c in RepairCommand if c.takes_descriptors):
            with pytest.raises(RequestRefused, match="descriptor 0 of the batch is not a socket"):
                carry_out_untrusted(
                    Request(command, (r, w)), CallerRules(os.getuid()), armed, ArmedKeys()
                )
            assert is_open(r) and is_open(w)
    finally:
        os.close(r)
        os.close(w)


def test_second_descriptor_a_pipe_refuses_the_whole_batch() -> None:
    r, w = os.pipe()
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            request = Request(RepairCommand.ON, (sock.fileno(), r))
            with pytest.raises(RequestRefused, match="descriptor 1 of the batch is not a socket"):
                carry_out_untrusted(request, CallerRules(os.getuid()))
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
    finally:
        os.close(r)
        os.close(w)


def test_unix_socket_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(RequestRefused, match="descriptor 0 of the batch is not a TCP socket"):
            carry_out_untrusted(Request(RepairCommand.OFF, (a.fileno(),)), CallerRules(os.getuid()))
        assert is_open(a.fileno())
