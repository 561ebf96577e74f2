"""``ferryd --vhost-user``, driven as QEMU and a guest's driver would, without a VM.

testbed/vhost_user_driver.py plays QEMU (the control messages with a real
memfd as the guest's RAM and real eventfds, over ferryd's real socket) and
the guest's virtio driver (the split rings in that memfd). ferryd runs as
it always does (its own process, privileges dropped, seccomp). The frames
are ferryd's own answers: ARP for the gateway, and an ICMP echo to the
peer that goes out through a host socket, large enough that its reply
spans several receive buffers (mergeable buffers).

Then QEMU misbehaves: each hostile message ends its connection with a
line in ferryd's log, ferryd's mapping of the guest's RAM is gone, and a
new connection is served from scratch. A guest driver that breaks its
transmit ring costs that ring (counted), not the connection.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from ferryd.frontends.vhost_user.messages import (
    Request,
    VringAddress,
    build_request,
    pack_memory_table,
    pack_u64,
    pack_vring_address,
    pack_vring_file,
)
from ferryd.wire.arp import ARP_REPLY, ARP_REQUEST, ArpPacket, build_arp, parse_arp_untrusted
from ferryd.wire.ethernet import build_ethernet, parse_ethernet_untrusted
from ferryd.wire.icmp import build_icmp, echo_rest, parse_icmp_untrusted
from ferryd.wire.ip import IPPROTO_ICMP, build_ip, parse_ipv4_untrusted
from ferryd.wire.tcp import SYN, parse_tcp_untrusted
from testbed.ferryd_process import FerrydProcess, describe_status, launch
from testbed.paths import FERRYD
from testbed.topology import Topology
from testbed.vhost_user_driver import (
    ACKED_FEATURES,
    RAM_SIZE,
    RX_BUFFER_SIZE,
    RX_BUFFERS,
    UVA_BASE,
    VhostUserQemu,
)
from testbed.wait import wait_for

GUEST_MAC = bytes.fromhex("525400123456")
FERRY_MAC = bytes.fromhex("9a559a559a55")
ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806


@pytest.fixture
def vhost_ferryd(topology: Topology, short_tmp: Path) -> Iterator[tuple[FerrydProcess, Path]]:
    socket_path, control = short_tmp / "ferryd.sock", str(short_tmp / "ferryd.ctl")
    argv = [str(FERRYD), "--vhost-user", "--socket", str(socket_path), "--control", control]
    started: list[FerrydProcess] = []
    try:
        yield launch(topology.host, argv, control, short_tmp / "ferryd.log", started), socket_path
    finally:
        for ferryd in started:
            status = ferryd.stop()
            print(f"--- ferryd log (exit {describe_status(status)}) ---\n{ferryd.log()}")
            assert status in ferryd.ok_exit, f"ferryd ended with {describe_status(status)}"


def _arp_for_gateway(qemu: VhostUserQemu, topology: Topology) -> ArpPacket:
    request = ArpPacket(
        ARP_REQUEST,
        GUEST_MAC,
        IPv4Address(topology.host_v4),
        bytes(6),
        IPv4Address(topology.gateway_v4),
    )
    qemu.transmit(build_ethernet(b"\xff" * 6, GUEST_MAC, ETH_P_ARP, build_arp(request)))
    (frame,) = qemu.receive(1)
    eth = parse_ethernet_untrusted(frame)
    assert (eth.dst, eth.src, eth.ethertype) == (GUEST_MAC, FERRY_MAC, ETH_P_ARP)
    return parse_arp_untrusted(eth.payload)


def _served(qemu: VhostUserQemu, topology: Topology) -> None:
    """A fresh connection works: started, buffers posted, ARP answered."""
    qemu.start()
    qemu.post_rx()
    reply = _arp_for_gateway(qemu, topology)
    assert (reply.op, reply.sha, reply.spa) == (
        ARP_REPLY,
        FERRY_MAC,
        IPv4Address(topology.gateway_v4),
    )


def _guest_ram_mapped(ferryd: FerrydProcess) -> bool:
    maps = Path(f"/proc/{ferryd.proc.pid}/maps").read_text()
    return "memfd:vhost-test-ram" in maps


def _eventfds(ferryd: FerrydProcess) -> int:
    count = 0
    for fd in Path(f"/proc/{ferryd.pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            count += os.readlink(fd) == "anon_inode:[eventfd]"
    return count


def test_arp_and_a_large_echo_through_the_rings(
    topology: Topology, vhost_ferryd: tuple[FerrydProcess, Path]
) -> None:
    ferryd, path = vhost_ferryd
    eventfds = _eventfds(ferryd)
    with VhostUserQemu(path) as qemu:
        _served(qemu, topology)
        assert _guest_ram_mapped(ferryd)
        assert _eventfds(ferryd) == eventfds + 4  # a kick and a call per ring
        # 20000 bytes of echo: the reply (20042 bytes with its headers) spans
        # several 4 KiB receive buffers; the request is one 20 KiB transmit chain.
        body = bytes(range(256)) * 78 + b"end!"
        guest, peer = IPv4Address(topology.host_v4), IPv4Address(topology.peers_v4[1])
        icmp = build_icmp(guest, peer, 8, 0, echo_rest(0x4242, 1), body)
        qemu.transmit(build_ethernet(FERRY_MAC, GUEST_MAC, ETH_P_IP,
                                     build_ip(guest, peer, IPPROTO_ICMP, icmp)))  # fmt: skip
        (frame,) = qemu.receive(1)
        ip = parse_ipv4_untrusted(parse_ethernet_untrusted(frame).payload)
        assert (ip.src, ip.dst) == (peer, guest)
        echo = parse_icmp_untrusted(ip)
        assert (echo.type, bytes(echo.body)) == (0, body)
        status = ferryd.request("status")
        assert status["frontend"]["kind"] == "vhost-user"
        assert status["frontend"]["connected"] is True
        counters = status["counters"]["frontend"]
        assert counters["frames_in"] == 2 and counters["frames_out"] == 2
        assert counters["kicks"] == 2  # one per transmit (the stand-in always kicks)
        assert qemu.transmitted() == 2  # both transmit chains given back
    wait_for(lambda: not _guest_ram_mapped(ferryd), timeout=5, what="ferryd to unmap the RAM")
    assert ferryd.request("status")["frontend"]["connected"] is False
    # Every eventfd QEMU gave closed (the session's end closes them as it goes).
    wait_for(lambda: _eventfds(ferryd) == eventfds, timeout=5, what="the eventfds closed")


def _memory_table_outside(qemu: VhostUserQemu) -> None:
    qemu.negotiate()
    qemu.send(Request.SET_FEATURES, pack_u64(0x1_0000_0000))
    qemu.send(
        Request.SET_MEM_TABLE, pack_memory_table([qemu.memory_region()]), (qemu.ram_fd,), ack=True
    )
    qemu.send(Request.SET_VRING_NUM, struct.pack("=II", 1, 256))
    # the used ring 4 bytes past the end of the guest's RAM
    beyond = VringAddress(1, 0, UVA_BASE, UVA_BASE + RAM_SIZE + 4, UVA_BASE + 0x1000, 0)
    qemu.send(Request.SET_VRING_ADDR, pack_vring_address(beyond))


def _call_is_a_pipe(qemu: VhostUserQemu) -> None:
    qemu.negotiate()
    r, w = os.pipe()  # blocking: a full one would block whoever writes it
    try:
        qemu.send(Request.SET_VRING_CALL, pack_vring_file(0, True), (w,))
    finally:
        os.close(r)
        os.close(w)


def _kick_is_a_file(qemu: VhostUserQemu) -> None:
    qemu.negotiate()
    qemu.send(Request.SET_FEATURES, pack_u64(0x1_0000_0000))
    qemu.send(
        Request.SET_MEM_TABLE, pack_memory_table([qemu.memory_region()]), (qemu.ram_fd,), ack=True
    )
    qemu.send(Request.SET_VRING_NUM, struct.pack("=II", 1, 256))
    qemu.send(Request.SET_VRING_ADDR, pack_vring_address(qemu.tx.address()))
    # the guest's RAM (a memfd) as the kick: epoll cannot wait on a regular file
    qemu.send(Request.SET_VRING_KICK, pack_vring_file(1, True), (qemu.ram_fd,))


HOSTILE = {
    "garbage header": lambda q: q.raw(b"\xde\xad\xbe\xef" * 3),
    "oversized payload": lambda q: q.raw(struct.pack("=III", Request.SET_MEM_TABLE, 1, 1 << 20)),
    "out of order": lambda q: q.raw(
        build_request(Request.SET_VRING_KICK, pack_vring_file(1, True)), (q.tx.kick,)
    ),
    "ring outside memory": _memory_table_outside,
    "call not an eventfd": _call_is_a_pipe,
    "kick not an eventfd": _kick_is_a_file,
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_qemu_loses_its_connection_and_the_next_one_is_served(
    topology: Topology, vhost_ferryd: tuple[FerrydProcess, Path], case: str
) -> None:
    ferryd, path = vhost_ferryd
    with VhostUserQemu(path) as qemu:
        HOSTILE[case](qemu)
        assert qemu.wait_closed(), "ferryd kept the connection"
    assert not _guest_ram_mapped(ferryd)
    with VhostUserQemu(path) as qemu:
        _served(qemu, topology)
        counters = ferryd.request("status")["counters"]["frontend"]
        assert (counters["connections"], counters["protocol_errors"]) == (2, 1)
    assert "QEMU sent an invalid message" in ferryd.log()


def test_a_broken_transmit_ring_stops_until_qemu_restarts_it(
    topology: Topology, vhost_ferryd: tuple[FerrydProcess, Path]
) -> None:
    ferryd, path = vhost_ferryd
    with VhostUserQemu(path) as qemu:
        _served(qemu, topology)
        qemu.transmit(b"x" * 60, addr=RAM_SIZE + 0x1000)  # a buffer outside guest memory
        wait_for(
            lambda: ferryd.request("status")["counters"]["frontend"]["ring_errors"] == 1,
            timeout=5,
            what="the broken ring to be counted",
        )
        assert ferryd.request("status")["frontend"]["rings"] == {"rx": True, "tx": False}
        # QEMU stops the ring, the guest's driver (reset) fixes its descriptor, QEMU
        # starts the ring again from where it stopped: the chain is taken this time.
        base = qemu.stop_ring(qemu.tx)
        assert base == qemu.sent - 1  # the broken chain was not taken
        qemu.tx.avail_idx = base
        qemu.sent -= 1
        qemu.start_ring(qemu.tx, base)
        reply = _arp_for_gateway(qemu, topology)
        assert reply.op == ARP_REPLY
        assert ferryd.request("status")["frontend"]["connected"] is True
    assert "broke ring 1" in ferryd.log()


def test_one_qemu_at_a_time(topology: Topology, vhost_ferryd: tuple[FerrydProcess, Path]) -> None:
    ferryd, path = vhost_ferryd
    with VhostUserQemu(path) as qemu:
        _served(qemu, topology)
        with VhostUserQemu(path) as second:
            assert second.wait_closed(), "a second QEMU was served"
        assert _arp_for_gateway(qemu, topology).op == ARP_REPLY  # the first one still is
        counters = ferryd.request("status")["counters"]["frontend"]
        assert (counters["connections"], counters["refused"]) == (1, 1)


def test_every_page_ferryd_writes_is_marked_in_qemus_dirty_log(
    topology: Topology, vhost_ferryd: tuple[FerrydProcess, Path]
) -> None:
    _, path = vhost_ferryd
    with VhostUserQemu(path) as qemu:
        _served(qemu, topology)  # the first receive buffer (head 0) holds that ARP reply
        log = qemu.start_dirty_log()
        assert not any(bytes(log))
        assert _arp_for_gateway(qemu, topology).op == ARP_REPLY
        # The reply is published while the request's chain is still ferryd's: it is
        # given back (and its used ring logged) at the end of the burst.
        wait_for(
            lambda: struct.unpack_from("<H", qemu.ram, qemu.tx.used + 2)[0] == qemu.sent,
            timeout=5,
            what="the request's transmit chain given back",
        )
        marked = {page for page in range(len(log) * 8) if log[page // 8] & 1 << page % 8}
        # the reply's buffer (head 1), and the used ring of each ring (nothing else:
        # ferryd only reads the transmit buffers)
        assert marked == {
            (RX_BUFFERS + RX_BUFFER_SIZE) >> 12,
            qemu.rx.used >> 12,
            qemu.tx.used >> 12,
        }


FORWARD_PORT = 2222


def _failed_load(qemu: VhostUserQemu) -> None:
    """A target QEMU's LOAD of a stream that is not one; its CHECK fails."""
    qemu.negotiate()
    qemu.send(Request.SET_FEATURES, pack_u64(ACKED_FEATURES), ack=True)
    reader, writer = os.pipe()
    try:
        qemu.send(Request.SET_DEVICE_STATE_FD, struct.pack("=II", 1, 0), (reader,))
    finally:
        os.close(reader)
    assert qemu.reply()[0] == Request.SET_DEVICE_STATE_FD
    with contextlib.suppress(BrokenPipeError):  # ferryd may stop reading at once
        os.write(writer, b"\xff" * 4096)
    os.close(writer)
    assert qemu.u64(Request.CHECK_DEVICE_STATE) != 0


def test_a_new_qemu_after_a_failed_load_gets_the_ferryd_as_started(
    topology: Topology, short_tmp: Path
) -> None:
    """The target QEMU died after a LOAD that failed: the next QEMU boots its guest here.

    ferryd was made a target by the LOAD (its data path stopped, its
    forward closed by the rebuild); the new QEMU's ring start, with no
    LOAD, puts it back to running as it started: ARP answered, and a
    connection to its forwarded port reaches the guest as a SYN.
    """
    socket_path, control = short_tmp / "ferryd.sock", str(short_tmp / "ferryd.ctl")
    argv = [
        str(FERRYD), "--vhost-user", "--socket", str(socket_path), "--control", control,
        "-t", f"{FORWARD_PORT}:22",
    ]  # fmt: skip
    started: list[FerrydProcess] = []
    try:
        ferryd = launch(topology.host, argv, control, short_tmp / "ferryd.log", started)
        with VhostUserQemu(socket_path) as qemu:
            _failed_load(qemu)
        assert ferryd.request("status")["role"] == "incoming"
        with VhostUserQemu(socket_path) as qemu:
            _served(qemu, topology)
            assert ferryd.request("status")["role"] == "running"
            hello = (
                "import socket;"
                f"socket.create_connection(({topology.host_v4!r}, {FORWARD_PORT}), timeout=30)"
            )
            client = topology.peer.popen([sys.executable, "-c", hello])
            try:
                (frame,) = qemu.receive(1)
                ip = parse_ipv4_untrusted(parse_ethernet_untrusted(frame).payload)
                syn = parse_tcp_untrusted(ip, verify_checksum=False)  # offloaded: partial
                assert (ip.dst, syn.dport, syn.flags & SYN) == (
                    IPv4Address(topology.host_v4),
                    22,
                    SYN,
                )
            finally:
                client.kill()
                client.wait()
        assert "QEMU started a new guest here" in ferryd.log()
    finally:
        for process in started:
            status = process.stop()
            print(f"--- ferryd log (exit {describe_status(status)}) ---\n{process.log()}")
            assert status in process.ok_exit, f"ferryd ended with {describe_status(status)}"
