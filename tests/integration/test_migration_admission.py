"""A migration target holds a stream to its own destination rules (issue 9, item 10).

The stream is the source's word. Here it is forged on its way (a proxy
between the source's migrate-out and the target's migrate-in decodes it
and re-encodes it, valid to the last checksum) to restore what a guest
may not have on the target: a TCP connection to the target host's
127.0.0.1:6379 (where a host-local service listens), a UDP flow to
::ffff:127.0.0.1, a forwarding listener on an address the target host does
not own. A real target ferryd must refuse the stream with an error naming
the record, keep nothing of it (its flow tables stay empty, its role goes
back to ``incoming``), and the source must roll back with every connection
still flowing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

import pytest

from ferryd.migration.records import (
    FlowRecord,
    ListenerRecord,
    StreamHeader,
    TcpFlowRecord,
    UdpFlowRecord,
)
from ferryd.migration.stream import (
    FlowReceived,
    HeaderReceived,
    StreamDecoder,
    StreamEncoder,
)
from testbed.migrationbed import MigrationBed
from testbed.streams import Streams
from testbed.wait import wait_for
from tests.integration.test_migration import _migrate_through, _source_survives

LOOPBACK4 = IPv4Address("127.0.0.1")


Change = Callable[[StreamHeader, list[FlowRecord]], list[FlowRecord]]


def _forged(change: Change) -> Callable[[bytes], bytes]:
    """A mangle for _migrate_through: the stream re-encoded with ``change`` applied to its flows."""

    def mangle(stream: bytes) -> bytes:
        decoder = StreamDecoder()
        events = decoder.feed_untrusted(stream)
        decoder.eof()
        headers = [e.header for e in events if isinstance(e, HeaderReceived)]
        flows = [e.flow for e in events if isinstance(e, FlowReceived)]
        assert len(headers) == 1
        enc = StreamEncoder()
        out = enc.header(headers[0])
        for rec in change(headers[0], flows):
            out += enc.flow(rec)
        return out + enc.trailer()

    return mangle


def _tcp_to_local_service(header: StreamHeader, flows: list[FlowRecord]) -> list[FlowRecord]:
    """The first IPv4 connection's remote, as the guest sees it and on the socket, becomes
    127.0.0.1:6379."""
    out = list(flows)
    for i, rec in enumerate(out):
        if (
            isinstance(rec, TcpFlowRecord)
            and rec.kernel is not None
            and rec.remote_addr.version == 4
        ):
            kernel = replace(rec.kernel, remote_addr=LOOPBACK4, remote_port=6379)
            out[i] = replace(rec, remote_addr=LOOPBACK4, remote_port=6379, kernel=kernel)
            return out
    raise AssertionError("no IPv4 TCP flow in the stream")


def _udp_to_mapped_loopback(header: StreamHeader, flows: list[FlowRecord]) -> list[FlowRecord]:
    assert header.ipv6 is not None
    forged = UdpFlowRecord(header.ipv6.address, 5353, IPv6Address("::ffff:127.0.0.1"), 53, 0.0)
    return [*flows, forged]


def _listener_on_foreign_address(header: StreamHeader, flows: list[FlowRecord]) -> list[FlowRecord]:
    return [ListenerRecord(6, IPv4Address("203.0.113.9"), 6380, 22), *flows]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_tcp_to_local_service, "TCP flow to 127.0.0.1:6379"),
        (_udp_to_mapped_loopback, "UDP flow to [::ffff:127.0.0.1]:53"),
        (_listener_on_foreign_address, "listener on 203.0.113.9:6380"),
    ],
    ids=["tcp-127.0.0.1:6379", "udp-::ffff:127.0.0.1", "listener-foreign-address"],
)
def test_target_refuses_a_stream_its_rules_refuse(
    two_hosts: MigrationBed,
    change: Change,
    expected: str,
) -> None:
    bed = two_hosts
    source = bed.start_source()
    target = bed.start_target()
    streams = Streams(bed.peer, bed.guest, "::", bed.peer_v4, 9700, "busy:2", "idle:20")
    try:
        streams.wait_flowing("busy", 4 << 20)
        error = _migrate_through(source, target, _forged(change))
        print("target refused:", error)
        assert expected in error
        assert "migration refused" in error
        _source_survives(source, target, streams)
        wait_for(
            lambda: target.request("status")["role"] == "incoming",
            timeout=10,
            what="the target to reset to incoming",
        )
        assert target.request("status")["flows"] == {"tcp": 0, "udp": 0, "icmp": 0}
        assert target.request("flows")["flows"] == []
    finally:
        streams.close()
