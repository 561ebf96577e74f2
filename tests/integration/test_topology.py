"""Checks of the integration harness itself: namespaces, wiring, cleanup, ferryd start/stop.

If these fail, every other integration test's failure is suspect, so they
are kept small and direct. The ferryd harness is exercised with a stand-in
daemon (a few lines serving the real control protocol), so the fixture's
readiness wait, failure reporting and shutdown are tested independently
of ferryd itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from testbed.ferryd_process import FerrydFailed, FerrydProcess
from testbed.netns import NETNS_PREFIX, Netns, ip
from testbed.topology import Topology, build_topology
from testbed.wait import WaitTimeout, wait_for
from tests.integration.conftest import StartFerryd


def netns_names() -> set[str]:
    out = ip("netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    """True if *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------
# topology


@pytest.mark.parametrize("addr", ["10.77.0.2", "10.77.0.3", "fd00:77::2", "fd00:77::3"])
def test_host_reaches_peer_addresses(topology: Topology, addr: str) -> None:
    assert addr in (*topology.peers_v4, *topology.peers_v6)
    assert topology.host.ping(addr), f"host cannot ping peer address {addr}"


def test_host_default_routes_point_at_gateway(topology: Topology) -> None:
    v4 = topology.host.run(["ip", "-4", "route", "show", "default"]).stdout
    v6 = topology.host.run(["ip", "-6", "route", "show", "default"]).stdout
    assert f"via {topology.gateway_v4} dev {topology.uplink}" in v4
    assert f"via {topology.gateway_v6} dev {topology.uplink}" in v6


@pytest.mark.parametrize("addr", ["10.77.0.1", "fd00:77::1"])
def test_peer_reaches_host(topology: Topology, addr: str) -> None:
    assert topology.peer.ping(addr), f"peer cannot ping host address {addr}"


def test_uplink_mtu(topology: Topology) -> None:
    for ns in (topology.host, topology.peer):
        out = ns.run(["ip", "-o", "link", "show", topology.uplink]).stdout
        assert " mtu 65520 " in out


def test_guest_exists_and_is_empty(topology: Topology) -> None:
    guest = topology.guest
    assert os.path.exists(guest.path)
    assert guest.name in netns_names()
    assert guest.links() == ["lo"]
    addrs = guest.run(["ip", "-o", "addr", "show"]).stdout
    assert {line.split()[1] for line in addrs.splitlines()} == {"lo"}
    assert guest.pids() == []
    assert not guest.ping(topology.host_v4, wait=1), "guest should have no route out"


def test_namespace_settings(topology: Topology) -> None:
    for ns in topology.namespaces:
        out = ns.run(
            ["sysctl", "-n", "net.ipv6.conf.default.accept_dad", "net.ipv4.ping_group_range"]
        ).stdout.split()
        assert out == ["0", "0", "2147483647"], ns
    # IPv6 addresses are usable at once: none is tentative.
    addrs = topology.host.run(["ip", "-6", "-o", "addr", "show", "dev", "up0"]).stdout
    assert "tentative" not in addrs


def test_names_unique_and_prefixed(topology: Topology) -> None:
    names = [ns.name for ns in topology.namespaces]
    assert len(set(names)) == 3
    assert all(name.startswith(NETNS_PREFIX) for name in names)


# ---------------------------------------------------------------------------
# cleanup

_fixture_names: list[str] = []


def test_fixture_namespaces_recorded(topology: Topology) -> None:
    """Records the fixture's names; the next test checks they are gone."""
    _fixture_names.extend(ns.name for ns in topology.namespaces)
    topology.host.popen(["sleep", "1000"])  # a leftover process must not block cleanup


def test_fixture_namespaces_removed_after_test() -> None:
    if not _fixture_names:
        pytest.skip("runs after test_fixture_namespaces_recorded (deselected?)")
    assert not netns_names() & set(_fixture_names)
    assert not any(os.path.exists(f"/run/netns/{name}") for name in _fixture_names)


def test_cleanup_kills_processes_and_removes_namespaces() -> None:
    with build_topology() as topo:
        names = {ns.name for ns in topo.namespaces}
        tracked = topo.host.popen(["sleep", "1000"])
        # A process the harness never saw: started by a shell that exits.
        topo.peer.run(["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 < /dev/null &"])
        stray = wait_for(topo.peer.pids, what="the stray sleep to appear in the peer namespace")
        assert names <= netns_names()
    assert not netns_names() & names
    assert tracked.returncode is not None
    assert not any(alive(pid) for pid in stray), "stray process survived namespace cleanup"


def test_cleanup_after_failure() -> None:
    names: set[str] = set()
    with pytest.raises(RuntimeError, match="test failed"), build_topology() as topo:
        names = {ns.name for ns in topo.namespaces}
        raise RuntimeError("test failed")
    assert names
    assert not netns_names() & names


def test_netns_close_is_idempotent() -> None:
    ns = Netns("x")
    with ns:
        pass
    ns.close()
    assert ns.name not in netns_names()


def test_wait_for() -> None:
    values = iter([None, 0, "", "done"])
    assert wait_for(lambda: next(values), timeout=5, interval=0) == "done"
    with pytest.raises(WaitTimeout, match="waiting for the impossible"):
        wait_for(lambda: False, timeout=0.05, what="the impossible")


# ---------------------------------------------------------------------------
# the ferryd harness, with a stand-in daemon

# Speaks the real control protocol; an extra argument "crash" makes it fail at start.
FAKE_FERRYD = textwrap.dedent(
    """
    import argparse, os, sys, trio
    from ferryd.control import ControlServer

    p = argparse.ArgumentParser()
    p.add_argument("--netns", required=True)
    p.add_argument("--tap", required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--config-net", action="store_true")
    args, extra = p.parse_known_args()
    mode = extra[0] if extra else "ok"
    print("fake ferryd starting", args, extra, flush=True)
    if mode == "crash":
        print("fake ferryd: cannot open tap", flush=True)
        sys.exit(3)
    assert os.path.exists(args.netns), args.netns
    calls = 0

    async def status(req, fds):
        global calls
        calls += 1
        return {"ready": calls > 2, "netns": args.netns, "tap": args.tap,
                "config_net": args.config_net, "netns_inode": os.stat("/proc/self/ns/net").st_ino}

    async def main():
        server = ControlServer(args.control)
        server.register("status", status)
        await server.serve()

    trio.run(main)
    """
)


@pytest.fixture
def ferryd_command(short_tmp: Path) -> list[str]:
    script = short_tmp / "fake_ferryd.py"
    script.write_text(FAKE_FERRYD)
    return [sys.executable, str(script)]


def test_start_ferryd_ready_and_stopped(topology: Topology, start_ferryd: StartFerryd) -> None:
    ferryd: FerrydProcess = start_ferryd(topology, config_net=True)
    status = ferryd.request("status")
    assert status["ready"] is True
    assert status["netns"] == topology.guest.path
    assert status["tap"] == "tap0"
    assert status["config_net"] is True
    host_inode = topology.host.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout
    assert status["netns_inode"] == int(host_inode), "ferryd does not run in the host namespace"
    assert ferryd.pid in topology.host.pids()
    assert '"ready": true' in ferryd.ctl("status", "--json").stdout
    assert "fake ferryd starting" in ferryd.log()
    assert ferryd.stop() in ferryd.ok_exit
    assert not alive(ferryd.pid)


def test_start_ferryd_reports_early_exit(topology: Topology, start_ferryd: StartFerryd) -> None:
    with pytest.raises(FerrydFailed) as info:
        start_ferryd(topology, "crash")
    message = str(info.value)
    assert "exited with status 3 before it was ready" in message
    assert "fake ferryd: cannot open tap" in message


def test_netns_run_reports_failure(topology: Topology) -> None:
    with pytest.raises(Exception, match=r"exit 1.*\n.*\n.*stderr: boom"):
        topology.host.run(["sh", "-c", "echo boom >&2; exit 1"])
    result = topology.host.run(["sh", "-c", "exit 4"], check=False)
    assert result.returncode == 4
    assert isinstance(result, subprocess.CompletedProcess)
