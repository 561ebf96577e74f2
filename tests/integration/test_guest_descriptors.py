"""ferryd under a low RLIMIT_NOFILE: a guest (or a local client) cannot exhaust it to death.

Issue 9 item 4: a guest that opened more UDP flows than descriptors, then
TCP connections, made socket() raise EMFILE outside any handler and ferryd
died; under a low limit accept() on the control socket did the same. Here
ferryd runs under ``prlimit --nofile=200:200`` (its budget for flows is
then 200 - 64 kept back = 136): the guest opens more UDP flows than that,
then TCP connections; the excess must be refused (ICMP, RST), counted, and
the control socket must keep answering. A lower limit imposed behind
ferryd's back must be survived too (EMFILE from socket()), and so must a
flood of control connections.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed.ferryd_process import RUNAS_UID, FerrydProcess
from testbed.paths import FERRYD, TCPTOOL
from testbed.topology import Topology
from testbed.wait import wait_for
from tests.integration.conftest import StartFerryd

PY = sys.executable
HERE = Path(__file__).resolve().parent
FDFLOOD = str(HERE / "fdflood.py")
NOFILE = 200
#: prlimit on ferryd runs as ferryd's own user: another uid needs CAP_SYS_RESOURCE,
#: which root lacks in some sandboxes (this machine's, for one).
AS_FERRYD = ["setpriv", f"--reuid={RUNAS_UID}", f"--regid={RUNAS_UID}", "--clear-groups"]
FOR_FLOWS = NOFILE - 64


@pytest.fixture
def ferryd_command() -> list[str]:
    """ferryd under a low descriptor limit (prlimit execs it: the pid is ferryd's)."""
    return ["prlimit", f"--nofile={NOFILE}:{NOFILE}", str(FERRYD)]


def _descriptors(ferryd: FerrydProcess) -> dict[str, Any]:
    """The budget and its refusals, as ``status`` shows them (each once)."""
    status = ferryd.request("status")
    return {**status["descriptors"], **status["counters"]["descriptors"]}


def _start_tool(ns: Any, *args: object) -> subprocess.Popen[str]:
    proc: subprocess.Popen[str] = ns.popen(
        [PY, FDFLOOD, *(str(a) for a in args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def test_guest_flows_beyond_the_descriptor_budget_are_refused(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    ferryd = start_ferryd(topology, config_net=True)
    peer = topology.peers_v4[1]
    server = topology.peer.popen([PY, TCPTOOL, "sink", peer, "7400"], stdout=subprocess.PIPE)
    assert server.stdout is not None and server.stdout.readline() == b"listening\n"

    # More UDP flows than the budget holds (the frames are handled in order:
    # these flows exist before the TCP connections below are tried)...
    flood = _start_tool(topology.guest, "udp", peer, 9, FOR_FLOWS + 40)
    assert _line(flood) == "sent"
    # ... then TCP connections: refused at once (RST), not left to time out.
    result = topology.guest.run([PY, FDFLOOD, "tcp", peer, "7400", "5"], timeout=120)
    assert ferryd.proc.poll() is None, "ferryd died when its descriptors ran out"
    assert json.loads(result.stdout) == {"refused": 5}

    wait_for(lambda: _descriptors(ferryd)["refused"] >= 45, what="45 flows refused")
    assert flood.stdin is not None
    flood.stdin.write("\n")
    flood.stdin.flush()
    udp_errors = json.loads(_line(flood))
    # ICMP administratively prohibited reads as EHOSTUNREACH (the peer's own
    # port unreachables, ECONNREFUSED, come on top, rate-limited by its kernel).
    assert 0 < udp_errors["kinds"].get("EHOSTUNREACH", 0) <= 40, udp_errors
    # What `ferryctl status` shows: the budget, full, and what it refused.
    status = json.loads(ferryd.ctl("status", "--json").stdout)
    budget = status["descriptors"]
    assert budget["limit"] == NOFILE and budget["for_flows"] == FOR_FLOWS
    assert budget["in_use"] == FOR_FLOWS and "refused" not in budget  # shown once:
    assert status["counters"]["descriptors"]["refused"] >= 45
    assert ferryd.proc.poll() is None
    flood.kill()


def test_emfile_behind_ferryds_back_is_survived(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    """The kernel refuses before the budget does (limit lowered while running)."""
    ferryd = start_ferryd(topology, "-t", "7500:7500", config_net=True)
    peer = topology.peers_v4[1]
    flood = _start_tool(topology.guest, "udp", peer, 9, 60)
    assert _line(flood) == "sent"
    wait_for(lambda: _descriptors(ferryd)["in_use"] >= 60, what="60 UDP flows open")
    # Room for what ferryd holds now and little more.
    fds = len(list(Path(f"/proc/{ferryd.pid}/fd").iterdir()))
    subprocess.run(
        [*AS_FERRYD, "prlimit", "--pid", str(ferryd.pid), f"--nofile={fds + 2}:{NOFILE}"],
        check=True,
    )
    more = _start_tool(topology.guest, "udp", peer, 9, 20)
    assert _line(more) == "sent"
    wait_for(lambda: _descriptors(ferryd)["exhausted"] >= 10, what="EMFILE counted")
    result = topology.guest.run([PY, FDFLOOD, "tcp", peer, "7400", "3"], timeout=120)
    assert json.loads(result.stdout) == {"refused": 3}
    # An inbound connection to a forwarded port: accept() fails with EMFILE
    # and ferryd backs off; it must not die or spin.
    topology.peer.run(
        [PY, TCPTOOL, "connect", topology.host_v4, "7500", "1"], check=False, timeout=60
    )
    assert ferryd.proc.poll() is None
    subprocess.run(
        [*AS_FERRYD, "prlimit", "--pid", str(ferryd.pid), f"--nofile={NOFILE}:{NOFILE}"],
        check=True,
    )
    assert topology.guest.ping(topology.peers_v4[0])
    flood.kill()
    more.kill()


def test_control_connection_flood_under_a_low_limit(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    ferryd = start_ferryd(topology)
    flood = _start_tool(topology.host, "control", ferryd.control, 2 * NOFILE)
    opened = _line(flood)
    assert opened.startswith("open ")
    # ferryd serves a bounded number at once; the rest wait in the backlog.
    wait_for(
        lambda: len(list(Path(f"/proc/{ferryd.pid}/fd").iterdir())) > 16,
        what="ferryd to accept control connections",
    )
    assert ferryd.proc.poll() is None
    assert flood.stdin is not None
    flood.stdin.write("\n")
    flood.stdin.flush()
    flood.wait(timeout=30)
    assert json.loads(ferryd.ctl("status", "--json").stdout)["ready"] is True
    assert ferryd.proc.poll() is None
