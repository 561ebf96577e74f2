"""A TcpConn on a real host socket with no adapter around it, for the state-machine tests."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address

from daemon.flows.table import Flow, FlowKey
from daemon.flows.tcp_conn import Endpoints, State, TcpConn
from daemon.guest import GuestPort
from daemon.wire.ip import IPPROTO_TCP

GUEST = IPv4Address("10.0.2.15")
REMOTE = IPv4Address("192.0.2.1")
GUEST_PORT = 40000
REMOTE_PORT = 80


def bare_conn(sock: socket.socket, guest: GuestPort, state: State, link_mss: int) -> TcpConn:
    """GUEST:40000 -> REMOTE:80 on ``sock``, in ``state``; every adapter callback a no-op."""
    conn = TcpConn(
        Endpoints(GUEST, GUEST_PORT, REMOTE, REMOTE_PORT),
        sock,
        guest,
        state,
        link_mss,
        memoryview(bytearray(1 << 20)),
        on_closed=lambda c: None,
        on_ack_due=lambda c: None,
        on_changed=lambda c: None,
        rcvlowat_cap=1 << 20,
    )
    key = FlowKey(IPPROTO_TCP, GUEST, GUEST_PORT, REMOTE, REMOTE_PORT)
    conn.flow = Flow(key, conn, state.value, 0.0, 0.0)
    return conn
