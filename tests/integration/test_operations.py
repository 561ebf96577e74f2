"""Operations on real ferryds: log lines, ``--pcap``, metrics and ferryctl's two outputs.

- ``--pcap``: a guest namespace takes its address by DHCP, resolves the
  peer by ARP and exchanges a TCP stream both ways with it; tshark reads
  the file ferryd wrote and must find the DHCP ACK, ferryd's ARP answer,
  and each direction's payload, reassembled, with the hash of the bytes
  the programs sent.
- log lines: ``LEVEL name: message`` on a plain stderr, ``<N>name:
  message`` when stderr is the stream JOURNAL_STREAM names.
- metrics after a real migration (the two-host bed): both ferryds show the
  migration in ``ferryctl metrics`` (parsed with prometheus_client's
  parser) and over ``--metrics`` HTTP, with outcome, flows moved and
  downtime, and every counter equal to ``ferryctl counters --json``;
  ``ferryctl`` status, flows, counters and history read the same in their
  human form and as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testbed.ferryd_process import FerrydProcess, launch
from testbed.migrationbed import MigrationBed
from testbed.paths import FERRYD
from testbed.qemu_stand_in import StreamRelay, dhcp, launch_stream_ferryd
from testbed.streams import Streams
from testbed.topology import Topology
from tests.integration.conftest import StartFerryd

UP, DOWN = 300_000, 700_000
"""Bytes the guest sends, and the peer answers, in the --pcap test."""
PORT = 9400

# Payloads from a seed, the same in the test and in the two programs.
PAYLOAD = "import random, sys; data = random.Random(int(sys.argv[1])).randbytes(int(sys.argv[2]))"
SERVER = (
    PAYLOAD
    + """
import socket
srv = socket.create_server(("0.0.0.0", int(sys.argv[3])))
print("listening", flush=True)
conn, _ = srv.accept()
got = b""
while chunk := conn.recv(65536):
    got += chunk
conn.sendall(data)
conn.close()
print(len(got), flush=True)
"""
)
CLIENT = (
    PAYLOAD
    + """
import socket
conn = socket.create_connection((sys.argv[3], int(sys.argv[4])), timeout=30)
conn.sendall(data)
conn.shutdown(socket.SHUT_WR)
got = b""
while chunk := conn.recv(65536):
    got += chunk
print(len(got), flush=True)
"""
)


def _payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _tshark(pcap: Path, *args: str) -> str:
    return subprocess.run(
        ["tshark", "-r", str(pcap), *args], capture_output=True, text=True, check=True, timeout=120
    ).stdout


def _follow(pcap: Path) -> tuple[bytes, bytes]:
    """The TCP stream's bytes each way (client to server, server to client), per tshark."""
    out = _tshark(pcap, "-q", "-z", "follow,tcp,raw,0")
    sides: list[bytearray] = [bytearray(), bytearray()]
    body = out.split("Node 1:", 1)[1].split("\n", 1)[1]
    for line in body.splitlines():
        if line.startswith("===="):
            break
        if line.strip():
            sides[line.startswith("\t")] += bytes.fromhex(line.strip())
    return bytes(sides[0]), bytes(sides[1])


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark (scripts/bootstrap.sh)")
@pytest.mark.parametrize("frontend", ["tap", "stream"])
def test_pcap_holds_dhcp_arp_and_both_directions(
    topology: Topology, start_ferryd: StartFerryd, short_tmp: Path, frontend: str
) -> None:
    """The same guest traffic through a tap, or QEMU's stream netdev (played by a relay)."""
    pcap = short_tmp / "guest.pcap"
    started: list[FerrydProcess] = []
    relay: StreamRelay | None = None
    try:
        if frontend == "tap":
            ferryd = start_ferryd(topology, "--pcap", str(pcap))
        else:
            short_tmp.chmod(0o755)
            ferryd, path = launch_stream_ferryd(
                topology.host, short_tmp, "vm", "--pcap", str(pcap), started=started
            )
            relay = StreamRelay(topology.guest, path)
            relay.wait_connections(1)
        _check_capture(topology, ferryd, pcap, short_tmp)
    finally:
        if relay is not None:
            relay.stop()
        for ferryd in started:
            assert ferryd.stop() in ferryd.ok_exit, ferryd.log()


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark (scripts/bootstrap.sh)")
def test_pcap_through_vhost_user(topology: Topology, short_tmp: Path) -> None:
    """vhost-user (QEMU and the guest's driver played from Python: testbed/vhost_user_driver.py):
    an ARP exchange and a 20 KB echo whose reply spans several receive buffers."""
    from ferryd.wire.arp import ARP_REQUEST, ArpPacket, build_arp
    from ferryd.wire.ethernet import build_ethernet
    from ferryd.wire.icmp import build_icmp, echo_rest
    from ferryd.wire.ip import IPPROTO_ICMP, build_ip
    from testbed.vhost_user_driver import VhostUserQemu

    guest_mac, ferry_mac = bytes.fromhex("525400123456"), bytes.fromhex("9a559a559a55")
    pcap = short_tmp / "vhost.pcap"
    socket_path, control = short_tmp / "ferryd.sock", str(short_tmp / "ferryd.ctl")
    argv = [str(FERRYD), "--vhost-user", "--socket", str(socket_path), "--control", control]
    started: list[FerrydProcess] = []
    guest, peer = IPv4Address(topology.host_v4), IPv4Address(topology.peers_v4[1])
    body = bytes(range(256)) * 78 + b"end!"
    try:
        ferryd = launch(
            topology.host, [*argv, "--pcap", str(pcap)], control, short_tmp / "f.log", started
        )
        with VhostUserQemu(socket_path) as qemu:
            qemu.start()
            qemu.post_rx()
            ask = ArpPacket(
                ARP_REQUEST, guest_mac, guest, bytes(6), IPv4Address(topology.gateway_v4)
            )
            qemu.transmit(build_ethernet(b"\xff" * 6, guest_mac, 0x0806, build_arp(ask)))
            qemu.receive(1)
            icmp = build_icmp(guest, peer, 8, 0, echo_rest(0x4242, 1), body)
            ip = build_ip(guest, peer, IPPROTO_ICMP, icmp)
            qemu.transmit(build_ethernet(ferry_mac, guest_mac, 0x0800, ip))
            qemu.receive(1)
        ferryd.stop()
    finally:
        for ferryd in started:
            assert ferryd.stop() in ferryd.ok_exit, ferryd.log()
    # (ferryd's own router advertisements aside: IPv6 is on too.)
    fields = ["-Y", "arp || icmp", "-T", "fields", "-e", "eth.src", "-e", "arp.opcode"]
    fields += ["-e", "icmp.type"]
    assert _tshark(pcap, *fields).splitlines() == [
        "52:54:00:12:34:56\t1\t",
        "9a:55:9a:55:9a:55\t2\t",
        "52:54:00:12:34:56\t\t8",
        "9a:55:9a:55:9a:55\t\t0",
    ]
    reply = _tshark(pcap, "-Y", "icmp.type == 0", "-T", "fields", "-e", "data.data")
    assert bytes.fromhex(reply.strip().replace(":", "")) == body


def _check_capture(topology: Topology, ferryd: FerrydProcess, pcap: Path, tmp: Path) -> None:
    assert (pcap.stat().st_mode & 0o777) == 0o600
    dhcp(topology.guest, tmp)
    peer = topology.peers_v4[-1]
    server = topology.peer.popen(
        [sys.executable, "-c", SERVER, "2", str(DOWN), str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline() == "listening\n"
    client = topology.guest.run(
        [sys.executable, "-c", CLIENT, "1", str(UP), peer, str(PORT)], timeout=60
    )
    assert client.stdout == f"{DOWN}\n"
    assert server.communicate(timeout=30)[0] == f"{UP}\n"
    frames = ferryd.request("counters")["counters"]["pcap"]["frames"]
    ferryd.stop()  # every record is on disk already (one write each); now nothing is added

    # DHCP: ferryd's ACK with the address the guest took (the host's, as passt does).
    acks = _tshark(pcap, "-Y", "dhcp.option.dhcp == 5", "-T", "fields", "-e", "dhcp.ip.your")
    assert acks.split() == [topology.host_v4]
    # ARP: the guest asked for the peer and ferryd answered.
    arp = _tshark(
        pcap, "-Y", f"arp.opcode == 2 && arp.src.proto_ipv4 == {peer}", "-T", "fields",
        "-e", "arp.dst.proto_ipv4",
    )  # fmt: skip
    assert topology.host_v4 in arp.split()
    # TCP: each direction reassembled by tshark is exactly what was sent.
    up, down = _follow(pcap)
    assert hashlib.sha256(up).hexdigest() == hashlib.sha256(_payload(1, UP)).hexdigest()
    assert hashlib.sha256(down).hexdigest() == hashlib.sha256(_payload(2, DOWN)).hexdigest()
    assert int(_tshark(pcap, "-T", "fields", "-e", "frame.number").split()[-1]) == frames


def test_log_lines_plain_and_on_the_journal(topology: Topology, short_tmp: Path) -> None:
    """One line per event, its level first; journald's <N> when stderr is the journal."""
    started: list[FerrydProcess] = []
    try:
        for journal in (False, True):
            log = short_tmp / f"journal-{journal}.log"
            log.touch()  # launch truncates it: the inode JOURNAL_STREAM names stays
            st = os.stat(log if journal else short_tmp)
            control = str(short_tmp / f"log{int(journal)}.sock")
            argv = [
                "env",
                f"JOURNAL_STREAM={st.st_dev}:{st.st_ino}",
                str(FERRYD),
                "--netns",
                topology.guest.path,
                "--tap",
                f"tap{int(journal)}",
                "--control",
                control,
                "--repair-socket",
                str(short_tmp / "nobody-listens.sock"),
            ]
            ferryd = launch(topology.host, argv, control, log, started)
            ferryd.stop()
            lines = ferryd.log().splitlines()
            prefix = ("<4>", "<6>") if journal else ("WARNING ", "INFO ")
            assert any(line.startswith(f"{prefix[0]}ferryd: --repair-socket ") for line in lines)
            assert any(line.startswith(f"{prefix[1]}ferryd: ready (running)") for line in lines)
            assert all(line.startswith(("<", "WARNING ", "INFO ")) for line in lines), lines
            assert all(line.startswith("<") == journal for line in lines), lines
    finally:
        for ferryd in started:
            ferryd.stop()


@pytest.mark.parametrize("address", ["127.0.0.1:9650", "[::1]:9650"])
def test_metrics_over_tcp(topology: Topology, start_ferryd: StartFerryd, address: str) -> None:
    """--metrics on a TCP address, served by a ferryd running as nobody under seccomp."""
    ferryd = start_ferryd(topology, "--metrics", address)
    url = f"http://{address}/metrics"
    scrape = topology.host.run(["curl", "-sS", "-g", "--max-time", "10", url]).stdout
    families = _families(scrape)
    assert _sample(families, "ferry_ready") == 1
    assert _sample(families, "ferry_role", ferry_role="running") == 1
    assert not families["ferry_migration_flows_moved"]  # no migration yet
    refused = topology.host.run(
        ["curl", "-sS", "-g", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
         "-X", "POST", url]
    ).stdout  # fmt: skip
    assert refused == "405"
    assert ferryd.request("status")["ready"] is True  # and ferryd serves on


# ---------------------------------------------------------------------------
# metrics after a real migration


def _families(text: str) -> dict[str, list[Any]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _sample(families: dict[str, list[Any]], name: str, **labels: str) -> float:
    found = [
        s.value for s in families[name] if all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, labels, families.get(name))
    return float(found[0])


def _scrape(path: str) -> str:
    """GET /metrics over ferryd's --metrics Unix socket (as curl --unix-socket would)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: ferry\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    return body.decode()


def _counters_match(families: dict[str, list[Any]], counters: dict[str, dict[str, float]]) -> None:
    """Every counter of ``ferryctl counters --json`` is in the metrics, with its value."""
    for group, values in counters.items():
        for name, value in values.items():
            metric = f"ferry_{group}_{name}"
            samples = families.get(metric) or families.get(f"{metric}_total")
            assert samples is not None, f"{metric} missing"
            assert samples[0].value == value, (metric, samples[0].value, value)


def test_metrics_after_a_migration(two_hosts: MigrationBed) -> None:
    bed = two_hosts
    metrics_a, metrics_b = str(bed.tmp / "a-metrics.sock"), str(bed.tmp / "b-metrics.sock")
    source = bed.start_source("--metrics", metrics_a)
    target = bed.start_target("--metrics", metrics_b)
    streams = Streams(bed.peer, bed.guest, "0.0.0.0", bed.peer_v4, 9300, "busy:2", "idle:3")
    try:
        streams.wait_flowing("busy", 1 << 20)
        summary = bed.migrate_ok(source, target)
        moved = summary["flows"]["tcp"]
        assert moved == 5
        streams.wait_more("busy", streams.report()["busy"], 1 << 20, "after the move")
        streams.finish()
    finally:
        streams.close()
    # Quiet now: each daemon's counters stand still, so every reading agrees.
    for ferryd, path, direction, role in (
        (source, metrics_a, "out", "migrated"),
        (target, metrics_b, "in", "running"),
    ):
        text = ferryd.ctl("metrics").stdout
        families = _families(text)
        labels = {"seq": "1", "direction": direction, "outcome": "completed"}
        assert _sample(families, "ferry_migration_flows_moved", kind="tcp", **labels) == moved
        assert _sample(families, "ferry_migration_downtime_seconds", **labels) > 0
        assert _sample(families, "ferry_role", ferry_role=role) == 1
        counters = json.loads(ferryd.ctl("counters", "--json").stdout)
        _counters_match(families, counters)
        completed = "out_completed" if direction == "out" else "in_completed"
        assert _sample(families, f"ferry_migration_{completed}") == 1
        # The same over HTTP (--metrics): the same families, the same values.
        assert _families(_scrape(path)) == families
        # ferryctl history: the record in words and in JSON.
        (record,) = json.loads(ferryd.ctl("history", "--json").stdout)
        assert (record["direction"], record["outcome"], record["flows"]["tcp"]) == (
            direction,
            "completed",
            moved,
        )
        assert record["downtime_ms"] == pytest.approx(
            1e3 * _sample(families, "ferry_migration_downtime_seconds", **labels)
        )
        table = ferryd.ctl("history").stdout.splitlines()
        assert table[0].split()[:4] == ["SEQ", "FINISHED", "DIR", "OUTCOME"]
        assert table[1].split()[3:5] == [direction, "completed"]  # after SEQ, date, time
        assert f"{moved} TCP, 0 UDP" in table[1]

    # ferryctl's human and JSON forms of the target, after the traffic.
    status = json.loads(target.ctl("status", "--json").stdout)
    human = target.ctl("status").stdout
    assert human.splitlines()[0].split() == ["role:", "running", "(ready)"]
    assert f"MTU {status['link']['mtu']}" in human
    assert f"{status['flows']['tcp']} TCP, {status['flows']['udp']} UDP" in human
    counters = json.loads(target.ctl("counters", "--json").stdout)
    rows = {
        tuple(line.split()[:2]): line.split()[2]
        for line in target.ctl("counters").stdout.splitlines()[1:]
    }
    assert rows[("frontend", "frames_in")] == str(counters["frontend"]["frames_in"])
    assert rows[("migration", "in_completed")] == "1"
    flows = json.loads(target.ctl("flows", "--json").stdout)
    table = target.ctl("flows").stdout.splitlines()
    assert len(table) == 1 + len(flows)
