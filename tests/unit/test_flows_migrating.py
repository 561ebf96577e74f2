"""What the flows show a migration (ferryd.migration.host's narrow protocols), without root.

UdpFlows.entries is what a source streams for each UDP flow: an outbound
flow keeps its host port, an inbound one names the forwarding listener it
came in on, and each says how long it has been idle at ``now``.
TcpFlows.send_reset is the RST a restored handshake gets.
"""

from __future__ import annotations

import socket

import trio

from ferryd.flows.portspec import PortForward
from ferryd.flows.table import FlowKey
from ferryd.flows.tcp import TcpFlows
from ferryd.flows.tcp_conn import Endpoints
from ferryd.flows.udp import UdpEntry, UdpFlows
from ferryd.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from ferryd.wire.tcp import ACK, RST
from tests.unit.tcp_conn_support import RecordingGuest
from tests.unit.test_flows_helpers import (
    GUEST4,
    LINK,
    FakeGuest,
    destinations,
    gateway_of,
    loopback_of,
    udp_from_guest,
)


async def test_udp_entries_outbound_and_inbound() -> None:
    lo, gw = loopback_of(4), gateway_of(4)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        async with trio.open_nursery() as nursery:
            flows = UdpFlows(FakeGuest(), LINK, nursery, destinations=destinations())
            try:
                t0 = trio.current_time()
                flows.from_guest(*udp_from_guest(GUEST4, gw, 40001, port, b"hi"), t0)
                ((flow),) = list(flows.table)
                out = FlowKey(IPPROTO_UDP, GUEST4, 40001, gw, port)
                assert flows.entries(t0 + 2.5) == [UdpEntry(out, 2.5, None, flow.host_port)]
                assert flow.host_port != 0

                await flows.add_forward(PortForward(lo, 0, 5000))
                ((_fwd, _addr, listening),) = flows.listeners()
                inbound = FlowKey(IPPROTO_UDP, GUEST4, 5000, gw, port)
                flows.restore_inbound(inbound, listening, t0)
                entries = {e.key: e for e in flows.entries(t0 + 1.0)}
                assert entries[inbound] == UdpEntry(inbound, 1.0, listening, None)
                assert flows.count() == 2
                assert flows.entries(t0 - 1.0)[0].idle == 0.0  # never negative
            finally:
                await flows.aclose()
                nursery.cancel_scope.cancel()


def test_send_reset_tells_the_guest_exactly_that() -> None:
    guest = RecordingGuest()
    flows = TcpFlows(guest, LINK, None, destinations=destinations())
    ends = Endpoints(GUEST4, 40000, gateway_of(4), 80)
    flows.send_reset(ends, 1000, 5000)
    assert guest.routes == [(gateway_of(4), GUEST4, IPPROTO_TCP)]
    (rst,) = guest.segments
    assert (rst.seq, rst.ack, rst.flags, rst.payload) == (1000, 5000, RST | ACK, b"")
    assert flows.connections() == [] and flows.count() == 0
