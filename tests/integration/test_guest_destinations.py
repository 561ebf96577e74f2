"""The guest cannot reach the host itself (issue 9, item 1), attacked from the guest.

A service listens in ferryd's host namespace on every address, TCP and UDP,
both families (like a redis or a DNS cache a host keeps for its own users).
Frames written on the guest's tap (testbed/rawframes.py: a guest kernel would keep
these destinations to itself) try to reach it at 127.0.0.1, ::1,
::ffff:127.0.0.1, the unspecified addresses, the host's own uplink
addresses (which the guest also has, passt's way) and another address of
the host. Each must be answered as a router's filter would (a RST for a
SYN, ICMP administratively prohibited for a datagram or an echo request),
counted in ``ferryctl status``, and the service must see nothing: after
the probes a connection made on the host itself is the first thing it
reports. With ``--map-gw`` the gateway address reaches it, the one
documented way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from testbed.ferryd_process import FerrydProcess
from testbed.netns import Netns
from testbed.paths import RAWFRAMES
from testbed.tcptool_process import Lines
from testbed.topology import Topology
from testbed.wait import wait_for
from tests.integration.conftest import StartFerryd

PY = sys.executable
PORT = 6379
HOST_OTHER_V4 = "192.0.2.10"
HOST_OTHER_V6 = "2001:db8:ff::10"

#: A host-local service on every address: reports each TCP connection and datagram.
SERVICE = """
import socket, select, sys
port = int(sys.argv[1])
tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("::", port)); tcp.listen(64)
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
udp.bind(("::", port))
print("listening", flush=True)
while True:
    for s in select.select([tcp, udp], [], [])[0]:
        if s is tcp:
            conn, peer = tcp.accept()
            data = conn.recv(100)
            print("tcp", peer[0], data.decode(errors="replace"), flush=True)
            conn.close()
        else:
            data, peer = udp.recvfrom(100)
            print("udp", peer[0], data.decode(errors="replace"), flush=True)
            udp.sendto(b"seen", peer)
"""


def service(host: Netns) -> tuple[subprocess.Popen[bytes], Lines]:
    proc = host.popen([PY, "-c", SERVICE, str(PORT)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    lines = Lines(proc.stdout)
    assert lines.next(what="the host service to listen") == b"listening\n"
    return proc, lines


def first_report_is_the_marker(host: Netns, lines: Lines) -> None:
    """Connect on the host itself; the service's next report must be that connection."""
    host.run(
        [PY, "-c", f"import socket; socket.create_connection(('127.0.0.1', {PORT})).send(b'end')"]
    )
    report = lines.next(what="the marker connection").decode()
    assert report.split() == ["tcp", "::ffff:127.0.0.1", "end"], (
        f"the host service saw something from the guest first: {report!r}"
    )


def probes(topo: Topology, *targets: str, port: int = PORT) -> dict[str, Any]:
    """Each ``KIND:DST`` probed from the guest (rawframes.py); "KIND DST" -> the answer."""
    argv = [PY, RAWFRAMES, "probe", topo.host_v4, topo.host_v6, str(port), *targets]
    return dict(json.loads(topo.guest.run(argv, timeout=120).stdout))


def probe(topo: Topology, kind: str, dst: str, port: int = PORT) -> dict[str, Any]:
    answer: dict[str, Any] = probes(topo, f"{kind}:{dst}", port=port)[f"{kind} {dst}"]
    return answer


def start(topo: Topology, start_ferryd: StartFerryd, *args: str) -> FerrydProcess:
    return start_ferryd(topo, "-D", "none", *args, config_net=True)


def _add_host_addresses(topo: Topology) -> None:
    topo.host.run(["ip", "addr", "add", f"{HOST_OTHER_V4}/32", "dev", "lo"])
    topo.host.run(["ip", "addr", "add", f"{HOST_OTHER_V6}/128", "dev", "lo"])


UNREACHABLE4 = {"answer": "unreachable", "type": 3, "code": 13}
UNREACHABLE6 = {"answer": "unreachable", "type": 1, "code": 1}


def test_guest_cannot_reach_the_host_itself(topology: Topology, start_ferryd: StartFerryd) -> None:
    topo = topology
    _add_host_addresses(topo)
    proc, lines = service(topo.host)
    try:
        ferryd = start(topo, start_ferryd)
        targets = [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "::",
            topo.host_v4,
            topo.host_v6,
            HOST_OTHER_V4,
            HOST_OTHER_V6,
        ]
        answers = probes(topo, *(f"{k}:{d}" for d in targets for k in ("tcp", "udp", "icmp")))
        expected = {
            f"{kind} {dst}": (
                {"answer": "rst"} if kind == "tcp" else UNREACHABLE6 if ":" in dst else UNREACHABLE4
            )
            for dst in targets
            for kind in ("tcp", "udp", "icmp")
        }
        # The guest's own address (the host's, passt's way): ICMP echo to it
        # was always dropped unanswered.
        expected[f"icmp {topo.host_v4}"] = expected[f"icmp {topo.host_v6}"] = {"answer": "none"}
        assert answers == expected
        first_report_is_the_marker(topo.host, lines)
        counters = ferryd.request("status")["counters"]
        assert counters["refused"] == {"tcp": 10, "udp": 10, "icmp": 8}
        assert counters["refusals_unanswered"] == 0
        assert ferryd.request("flows")["flows"] == []
    finally:
        proc.kill()
        proc.wait()


def test_map_gw_reaches_the_host_through_the_gateway(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    topo = topology
    proc, lines = service(topo.host)
    try:
        start(topo, start_ferryd, "--map-gw")
        gateway = topo.peers_v4[0]
        # An ordinary guest socket, through the guest's routes.
        code = f"import socket; socket.create_connection(('{gateway}', {PORT}), 5).send(b'gw')"
        topo.guest.run([PY, "-c", code])
        report = lines.next(what="the guest's connection through the gateway").decode()
        assert report.split() == ["tcp", "::ffff:127.0.0.1", "gw"]
        # Loopback itself is still refused.
        assert probe(topo, "tcp", "127.0.0.1") == {"answer": "rst"}
        assert probe(topo, "udp", "::1") == UNREACHABLE6
        first_report_is_the_marker(topo.host, lines)
    finally:
        proc.kill()
        proc.wait()


def test_no_link_local_refuses_metadata(topology: Topology, start_ferryd: StartFerryd) -> None:
    topo = topology
    ferryd = start(topo, start_ferryd, "--no-link-local")
    assert probe(topo, "udp", "169.254.169.254", 80) == UNREACHABLE4
    assert probe(topo, "tcp", "169.254.169.254", 80) == {"answer": "rst"}
    assert probe(topo, "udp", "fe80::a9fe:a9fe", 80) == UNREACHABLE6
    assert ferryd.request("status")["counters"]["refused"] == {"tcp": 1, "udp": 2, "icmp": 0}


def test_refusal_answers_are_rate_limited(topology: Topology, start_ferryd: StartFerryd) -> None:
    """A flood of refused datagrams: each is counted, the answers are not all sent."""
    topo = topology
    ferryd = start(topo, start_ferryd)
    count = 800  # within the tap's queue (txqueuelen 1000): none lost before ferryd
    flood = topo.guest.popen(
        [PY, RAWFRAMES, "--wait", "20", "flood", topo.host_v4, "127.0.0.1", str(PORT), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert flood.stdin is not None and flood.stdout is not None
    try:
        assert json.loads(flood.stdout.readline()) == {"sent": count}
        counters = wait_for(
            lambda: (c := ferryd.request("status")["counters"])["refused"]["udp"] == count and c,
            timeout=30,
            what="ferryd to count every refused datagram",
        )
        answered = count - counters["refusals_unanswered"]
        print(f"{count} refused datagrams, {answered} answered")
        assert 50 <= answered < count
        flood.stdin.write(f"{answered}\n")
        flood.stdin.flush()
        assert json.loads(flood.stdout.readline()) == {"errors": answered}
    finally:
        flood.kill()
        flood.wait()


def test_an_address_added_later_is_refused_too(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    """The host's addresses are followed (netlink notifications), not only read at start."""
    topo = topology
    start(topo, start_ferryd)
    new = "198.18.0.77"
    assert probe(topo, "icmp", new, 0) == {"answer": "none"}  # nobody there yet
    topo.host.run(["ip", "addr", "add", f"{new}/32", "dev", "lo"])
    # Until ferryd has re-read the set, the host itself answers the echo.
    wait_for(
        lambda: probe(topo, "icmp", new, 0) == UNREACHABLE4,
        timeout=30,
        what=f"ferryd to refuse {new} once the host owns it",
    )
