"""TCP through a real ferryd: bulk, many connections, half-close, resets, stalls, forwarding.

The guest is a network namespace on ferryd's tap, configured with
``--config-net``; the peer is another namespace behind a veth pair
(testbed/topology.py draws the picture). Both ends are real kernel TCP stacks,
so what is checked is what an application would see. Payloads are
deterministic streams checked by SHA-256 at the receiving end
(testbed/tcptool.py), or files fetched and uploaded by curl.

The no-buffer tests check DESIGN.md's invariant from the outside: with the
receiving application stalled, every byte the sender's kernel got rid of
is in a kernel queue (``ss`` shows them all, exactly), and ferryd's own
memory does not follow the amount of data in the path.
"""

from __future__ import annotations

import hashlib
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.ferryd_process import FerrydProcess
from testbed.netns import Netns
from testbed.tcptool import expected, stream
from testbed.tcptool_process import client, server, spawn
from testbed.topology import Topology
from testbed.wait import wait_for
from tests.integration.conftest import StartFerryd

MB = 1_000_000
PORT = 5000


# --- helpers ----------------------------------------------------------------


def start(topo: Topology, start_ferryd: StartFerryd, *args: str) -> FerrydProcess:
    return start_ferryd(topo, "-D", "none", *args, config_net=True)


def tcp_flows(ferryd: FerrydProcess, port: int | None = None) -> list[dict[str, Any]]:
    flows = ferryd.request("flows")["flows"]
    return [
        f
        for f in flows
        if f["proto"] == "tcp" and (port is None or port in (f["remote_port"], f["guest_port"]))
    ]


def no_tcp_flows(ferryd: FerrydProcess) -> None:
    """Every connection was closed and forgotten: nothing lingers in ferryd's table."""
    wait_for(lambda: not tcp_flows(ferryd), timeout=10, what="ferryd's TCP flows to be gone")


def peer_addr(topo: Topology, family: int) -> str:
    return topo.peers_v4[1] if family == 4 else topo.peers_v6[1]


def host_addr(topo: Topology, family: int) -> str:
    return topo.host_v4 if family == 4 else topo.host_v6


def as_seen_on_dual_stack(addr: str) -> str:
    """How a dual-stack (``::``) listener reports a peer address."""
    return addr if ":" in addr else f"::ffff:{addr}"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True)
class SockInfo:
    """One connected socket as ``ss -tin`` shows it."""

    local_port: int
    remote_port: int
    recv_q: int
    send_q: int
    bytes_acked: int
    bytes_received: int
    segs_in: int
    """Segments the socket received (tcpi_segs_in), pure ACKs and window probes included."""


def sockets(ns: Netns, port: int) -> list[SockInfo]:
    """Connected TCP sockets in *ns* (any state but listening) with *port* at either end."""
    out = ns.run(
        ["ss", "-tinH", "state", "connected", f"( sport = :{port} or dport = :{port} )"]
    ).stdout
    found = []
    lines = out.splitlines()
    for head, info in zip(lines[::2], lines[1::2], strict=True):
        recv_q, send_q, local, remote = head.split()[1:5]

        def field(name: str, info: str = info) -> int:
            m = re.search(rf"\b{name}:(\d+)", info)
            return int(m.group(1)) if m else 0

        found.append(
            SockInfo(
                int(local.rsplit(":", 1)[1]),
                int(remote.rsplit(":", 1)[1]),
                int(recv_q),
                int(send_q),
                # Both count the SYN when non-zero (ss prints tcpi_bytes_acked as is).
                max(0, field("bytes_acked") - 1),
                field("bytes_received"),
                field("segs_in"),
            )
        )
    return found


def one_socket(ns: Netns, port: int) -> SockInfo:
    socks = sockets(ns, port)
    assert len(socks) == 1, f"expected one connection on port {port} in {ns.name}: {socks}"
    return socks[0]


def stable(sample: Any, settle: float = 0.5, timeout: float = 30, what: str = "") -> Any:
    """Wait until ``sample()`` returns the same value twice *settle* seconds apart."""
    last: list[Any] = [sample()]

    def same() -> Any:
        time.sleep(settle)
        now = sample()
        if now == last[0]:
            return now or True
        last[0] = now
        return None

    return wait_for(same, timeout=timeout, interval=0, what=what or "a stable state")


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "www"
    root.mkdir()
    yield root


def write_stream(path: Path, nbytes: int, seed: int) -> str:
    with path.open("wb") as f:
        for chunk in stream(nbytes, seed):
            f.write(chunk)
    return expected(nbytes, seed)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


FAMILIES = [pytest.param(4, 200 * MB, id="ipv4-200MB"), pytest.param(6, 50 * MB, id="ipv6-50MB")]


# --- bulk -------------------------------------------------------------------


@pytest.mark.parametrize(("family", "size"), FAMILIES)
def test_bulk_curl_both_ways(
    topology: Topology, start_ferryd: StartFerryd, http_root: Path, family: int, size: int
) -> None:
    """curl downloads a file from the peer's HTTP server and uploads it back (PUT)."""
    ferryd = start(topology, start_ferryd)
    digest = write_stream(http_root / "blob", size, 7)
    server(topology.peer, "http", "::", 8000, http_root)
    addr = peer_addr(topology, family)
    host = f"[{addr}]" if family == 6 else addr
    got = http_root.parent / "got"
    frames_before = ferryd.request("status")["counters"]["frames_in"]
    topology.guest.run(
        ["curl", "-sS", "--fail", "-o", str(got), f"http://{host}:8000/blob"], timeout=120
    )
    assert got.stat().st_size == size
    assert sha256_file(got) == digest
    answer = topology.guest.run(
        ["curl", "-sS", "--fail", "-H", "Expect:", "-T", str(got), f"http://{host}:8000/up"],
        timeout=120,
    ).stdout.split()
    assert answer[:2] == [str(size), digest]
    # It left through a host socket: the peer saw the host's address.
    assert answer[2] == as_seen_on_dual_stack(host_addr(topology, family))
    frames = ferryd.request("status")["counters"]["frames_in"] - frames_before
    assert frames >= size // 65536, "the upload did not go through ferryd"
    no_tcp_flows(ferryd)


@pytest.mark.parametrize(("family", "size"), FAMILIES)
def test_bulk_python_both_ways(
    topology: Topology, start_ferryd: StartFerryd, family: int, size: int
) -> None:
    """tcptool streams to a sink on the peer and fetches from a source there."""
    ferryd = start(topology, start_ferryd)
    server(topology.peer, "sink", "::", PORT)
    server(topology.peer, "source", "::", PORT + 1)
    addr = peer_addr(topology, family)
    sent = client(topology.guest, "send", addr, PORT, size, 11)
    assert sent["ok"] and sent["peer_saw"] == as_seen_on_dual_stack(host_addr(topology, family))
    fetched = client(topology.guest, "fetch", addr, PORT + 1, size, 12)
    assert fetched["ok"] and fetched["bytes"] == size
    no_tcp_flows(ferryd)


def test_many_small_round_trips(topology: Topology, start_ferryd: StartFerryd) -> None:
    start(topology, start_ferryd)
    server(topology.peer, "echo", "::", PORT)
    result = client(topology.guest, "rr", topology.peers_v4[1], PORT, 2000)
    assert result["ok"]


# --- many connections -------------------------------------------------------


def test_thousand_concurrent_connections(topology: Topology, start_ferryd: StartFerryd) -> None:
    """1,000 connections open at once, each carrying its own 64 KiB stream."""
    ferryd = start(topology, start_ferryd)
    server(topology.peer, "sink", "::", PORT)
    many = spawn(topology.guest, "many", topology.peers_v4[1], PORT, 1000, 65536)
    assert many.out.json(timeout=120, what="1000 connections")["connected"] == 1000
    flows = tcp_flows(ferryd, PORT)
    assert len(flows) == 1000
    assert {f["state"] for f in flows} == {"established"}
    assert len({f["guest_port"] for f in flows}) == 1000
    many.tell()
    result = many.out.json(timeout=120, what="every connection's answer")
    assert result["ok"], result["bad"]
    assert result["peers"] == [as_seen_on_dual_stack(topology.host_v4)]
    assert many.finish() == 0
    no_tcp_flows(ferryd)


# --- half-close -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["guest-first", "peer-first"])
def test_half_close_with_data_after_it(
    topology: Topology, start_ferryd: StartFerryd, mode: str
) -> None:
    """One side shuts down writing; data keeps flowing the other way until its EOF.

    guest-first: the guest sends 5 MB and half-closes; the peer sees EOF and
    only then sends 5 MB back. peer-first: the peer sends 5 MB and
    half-closes; the guest reads to EOF and only then sends its 5 MB.
    """
    ferryd = start(topology, start_ferryd)
    peer = server(topology.peer, "peer", "::", PORT)
    guest = client(
        topology.guest, "halfclose", topology.peers_v4[1], PORT, mode, 5 * MB, 21, 5 * MB, 22
    )
    assert guest["down"]["ok"], guest
    seen = peer.out.json(what="the peer's verdict")
    assert seen["scenario"] == mode and seen["up"]["ok"], seen
    if mode == "guest-first":
        assert seen["eof_after_close"], "the peer did not see a clean close after its data"
    else:
        assert guest["down"]["eof_after_close"], "the guest did not see a clean close"
    no_tcp_flows(ferryd)


# --- resets and failed connects ---------------------------------------------


def test_peer_reset_reaches_the_guest(topology: Topology, start_ferryd: StartFerryd) -> None:
    ferryd = start(topology, start_ferryd)
    peer = server(topology.peer, "peer", "::", PORT)
    assert client(topology.guest, "rstrecv", topology.peers_v4[1], PORT, timeout=30)["reset"]
    assert peer.out.json()["scenario"] == "reset-me"
    no_tcp_flows(ferryd)


def test_guest_reset_reaches_the_peer(topology: Topology, start_ferryd: StartFerryd) -> None:
    ferryd = start(topology, start_ferryd)
    peer = server(topology.peer, "peer", "::", PORT)
    client(topology.guest, "rstsend", topology.peers_v4[1], PORT, timeout=30)
    seen = peer.out.json(what="the peer's verdict")
    assert seen["scenario"] == "expect-reset" and seen["reset"], seen
    no_tcp_flows(ferryd)


@pytest.mark.parametrize("family", [4, 6])
def test_connect_to_closed_port_is_refused_at_once(
    topology: Topology, start_ferryd: StartFerryd, family: int
) -> None:
    ferryd = start(topology, start_ferryd)
    result = client(topology.guest, "connect", peer_addr(topology, family), 9, 15)
    assert result["error"] == "ECONNREFUSED"
    assert result["seconds"] < 2
    no_tcp_flows(ferryd)


def test_connect_to_unreachable_addresses_fails(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    """An on-link address nobody holds, and one the peer (not a router) drops.

    ferryd's connect() fails (no neighbour) or times out (10 s); either way
    the guest's connect() must fail, not hang. Both run at once.
    """
    ferryd = start(topology, start_ferryd)
    tries = [
        spawn(topology.guest, "connect", addr, PORT, 20) for addr in ("10.77.0.99", "192.0.2.1")
    ]
    for tool in tries:
        result = tool.out.json(timeout=25, what="connect() to fail")
        assert result["error"] is not None and result["seconds"] < 15, result
    no_tcp_flows(ferryd)


# --- stalled receivers (zero window) ----------------------------------------


def test_peer_stops_reading_then_resumes(topology: Topology, start_ferryd: StartFerryd) -> None:
    """The guest sends 30 MB; the peer reads nothing until the path is full, then all of it."""
    ferryd = start(topology, start_ferryd)
    peer = server(topology.peer, "hold", "::", PORT)
    sender = spawn(topology.guest, "send", topology.peers_v4[1], PORT, 30 * MB, 31)
    peer.out.json(what="the peer to accept")
    # Full: nothing moves any more, and the sender is still blocked.
    stable(
        lambda: (one_socket(topology.peer, PORT).recv_q, one_socket(topology.host, PORT).send_q),
        what="the path to fill up",
    )
    assert sender.proc.poll() is None, "the sender finished while the peer read nothing"
    assert one_socket(topology.peer, PORT).recv_q > 0
    peer.tell()
    assert sender.out.json(timeout=60, what="the sender's verdict")["ok"]
    assert sender.finish() == 0
    no_tcp_flows(ferryd)


def test_guest_stops_reading_then_resumes(topology: Topology, start_ferryd: StartFerryd) -> None:
    """The peer sends 30 MB; the guest application reads nothing for a while, then all of it."""
    ferryd = start(topology, start_ferryd)
    server(topology.peer, "source", "::", PORT)
    guest = spawn(topology.guest, "holdfetch", topology.peers_v4[1], PORT, 30 * MB, 32, 0)
    guest.out.json(what="the request")
    stable(
        lambda: (one_socket(topology.guest, PORT).recv_q, one_socket(topology.host, PORT).recv_q),
        what="the path to fill up",
    )
    stalled = one_socket(topology.guest, PORT)
    assert stalled.recv_q > 0
    # Stay stalled until ferryd probed the zero window (RFC 9293 §3.8.6.1):
    # nothing else reaches the guest while its window is closed.
    wait_for(
        lambda: one_socket(topology.guest, PORT).segs_in > stalled.segs_in,
        timeout=30,
        what="ferryd to probe the guest's zero window",
    )
    guest.tell()
    assert guest.out.json(timeout=60, what="the guest's verdict")["ok"]
    assert guest.finish() == 0
    no_tcp_flows(ferryd)


# --- inbound forwarding -----------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_inbound_forward_preserves_peer_address(
    topology: Topology, start_ferryd: StartFerryd, family: int
) -> None:
    """``-t HOST:GUEST``: the peer connects to the host; the guest sees the peer's address."""
    ferryd = start(topology, start_ferryd, "-t", "8080:9090", "-t", "8081:9091")
    server(topology.guest, "sink", "::", 9090)
    server(topology.guest, "source", "::", 9091)
    dest = host_addr(topology, family)
    peers = topology.peers_v4 if family == 4 else topology.peers_v6
    sent = client(topology.peer, "send", dest, 8080, 20 * MB, 41)
    assert sent["ok"]
    assert sent["peer_saw"] in [as_seen_on_dual_stack(a) for a in peers], sent
    fetched = client(topology.peer, "fetch", dest, 8081, 20 * MB, 42)
    assert fetched["ok"]
    no_tcp_flows(ferryd)


def test_shutdown_with_forward_listeners_is_clean(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    ferryd = start_ferryd(topology, "-D", "none", "-t", "8080", config_net=True)
    status = ferryd.stop()
    ferryd.reported = True  # judged here, not again at teardown
    assert status in ferryd.ok_exit, ferryd.log()


# --- the no-buffer invariant ------------------------------------------------

#: Receive and send buffers for the stalled ends: large, so that far more
#: data is in the path than ferryd's memory could hide.
BIG_BUFFER = 64 << 20
#: How much ferryd's RSS may grow while the path fills up.
RSS_SLACK_KIB = 20 << 10
#: How much must be in the path for the test to mean something.
MIN_IN_PATH = 60 * MB


def test_no_buffer_guest_to_peer(topology: Topology, start_ferryd: StartFerryd) -> None:
    """The guest pushes 200 MB at a peer that reads nothing.

    Everything ferryd acknowledged to the guest must be in the host socket's
    send queue or in the peer's receive queue, to the byte.
    """
    ferryd = start(topology, start_ferryd)
    assert "ferryd" in Path(f"/proc/{ferryd.pid}/cmdline").read_text()
    peer = server(topology.peer, "hold", "::", PORT, BIG_BUFFER)
    rss_before = rss_kib(ferryd.pid)
    sender = spawn(topology.guest, "send", topology.peers_v4[1], PORT, 200 * MB, 51)
    peer.out.json(what="the peer to accept")

    def sample() -> tuple[int, int, int, int]:
        g = one_socket(topology.guest, PORT)
        h = one_socket(topology.host, PORT)
        p = one_socket(topology.peer, PORT)
        return g.bytes_acked, h.bytes_acked + h.send_q, p.recv_q, h.bytes_acked

    acked_to_guest, written_by_ferryd, peer_queue, host_acked = stable(
        sample, what="the path to fill up"
    )
    rss_after = rss_kib(ferryd.pid)
    assert acked_to_guest == written_by_ferryd, "ferryd acked the guest for bytes not written"
    assert host_acked == peer_queue
    assert acked_to_guest >= MIN_IN_PATH, f"only {acked_to_guest} bytes got through"
    assert rss_after - rss_before < RSS_SLACK_KIB, (rss_before, rss_after, acked_to_guest)
    peer.tell()
    assert sender.out.json(timeout=60, what="the sender's verdict")["ok"]
    no_tcp_flows(ferryd)


def test_no_buffer_peer_to_guest(topology: Topology, start_ferryd: StartFerryd) -> None:
    """A peer pushes 200 MB through ``-t`` to a guest server that accepts and reads nothing.

    Everything the host kernel acknowledged to the peer must be in the host
    socket's receive queue (peeked, not taken) or in the guest's receive
    queue, to the byte.
    """
    ferryd = start(topology, start_ferryd, "-t", "8080:9090")
    guest = server(topology.guest, "hold", "::", 9090, BIG_BUFFER)
    rss_before = rss_kib(ferryd.pid)
    sender = spawn(topology.peer, "send", topology.host_v4, 8080, 200 * MB, 52, BIG_BUFFER)
    guest.out.json(what="the guest to accept")

    def sample() -> tuple[int, int, int, int]:
        p = one_socket(topology.peer, 8080)
        h = one_socket(topology.host, 8080)
        g = one_socket(topology.guest, 9090)
        return p.bytes_acked, h.bytes_received, h.recv_q, g.recv_q

    peer_acked, host_received, host_queue, guest_queue = stable(sample, what="the path to fill up")
    rss_after = rss_kib(ferryd.pid)
    assert peer_acked == host_received
    assert host_received == host_queue + guest_queue, "bytes went missing inside ferryd"
    assert guest_queue >= MIN_IN_PATH // 2, f"only {guest_queue} bytes got through ferryd"
    assert peer_acked >= MIN_IN_PATH, f"only {peer_acked} bytes in the path"
    assert rss_after - rss_before < RSS_SLACK_KIB, (rss_before, rss_after, peer_acked)
    guest.tell()
    assert sender.out.json(timeout=60, what="the sender's verdict")["ok"]
    no_tcp_flows(ferryd)


# --- stopped and continued ----------------------------------------------------


def test_stopped_and_continued_while_streaming(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    """SIGSTOP and SIGCONT (job control, a debugger, the cgroup freezer) mid-stream.

    The bytes arrive whole both ways and ferryd, under its seccomp filter,
    lives on. (ferry-repair died of this: test_repair_helper.py.)
    """
    ferryd = start(topology, start_ferryd)
    server(topology.peer, "sink", "::", PORT)
    server(topology.peer, "source", "::", PORT + 1)
    addr = topology.peers_v4[1]
    size = 200 * MB
    up = spawn(topology.guest, "send", addr, PORT, size, 21)
    down = spawn(topology.guest, "fetch", addr, PORT + 1, size, 22)
    for _ in range(50):
        ferryd.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.002)
        ferryd.proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    assert ferryd.proc.poll() is None, "ferryd died of being stopped"
    sent, fetched = up.out.json(timeout=120), down.out.json(timeout=120)
    assert sent["ok"] and fetched["ok"] and fetched["bytes"] == size
    assert up.finish() == 0 and down.finish() == 0
    assert ferryd.proc.poll() is None
    no_tcp_flows(ferryd)
