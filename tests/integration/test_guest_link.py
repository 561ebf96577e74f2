"""The guest's link through a real ferryd: addressing, ping, UDP, forwarding.

Real components only: the guest is a network namespace whose tap device
ferryd creates, configured by real clients (busybox udhcpc, ISC dhclient,
the kernel's own SLAAC); the peer is another namespace behind a veth pair
(testbed/topology.py draws the picture). Payloads are compared byte for byte by
testbed/udptool.py.
"""

import json
import os
import pickle
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ferryd.control import ControlRequestFailed
from testbed.ferryd_process import FerrydProcess
from testbed.paths import UDPTOOL
from testbed.topology import Topology
from testbed.wait import wait_for
from tests.integration.conftest import StartFerryd

PY = sys.executable
DNS = "10.77.0.53"
DNS6 = "fd00:77::53"
# ferryd's default MAC 9a:55:9a:55:9a:55 as a modified EUI-64 link-local
# address: the IPv6 router when the host's own gateway is not link-local.
ROUTER_LL = "fe80::9855:9aff:fe55:9a55"

# A client script for udhcpc/dhclient that records what it was told and
# applies only the address: the stock scripts would rewrite resolv.conf,
# which `ip netns exec` shares with the real host.
RECORDER = """#!/bin/sh
env > "{out}.$1.${{reason:-udhcpc}}"
case "$1$reason" in
  bound|renew) ip addr add "$ip/$mask" dev "$interface" ;;
  BOUND6|RENEW6|REBIND6) ip -6 addr add "$new_ip6_address/128" dev "$interface" nodad ;;
esac
exit 0
"""


def _recorder(tmp: Path) -> tuple[Path, Path]:
    script = tmp / "record.sh"
    out = tmp / "lease"
    script.write_text(RECORDER.format(out=out))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, out


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _start(
    topo: Topology, start_ferryd: StartFerryd, *args: str, config_net: bool = False
) -> FerrydProcess:
    return start_ferryd(topo, "-D", DNS, "-D", DNS6, *args, config_net=config_net)


def test_udhcpc_gets_the_host_address(
    topology: Topology, start_ferryd: StartFerryd, short_tmp: Path
) -> None:
    _start(topology, start_ferryd)
    script, out = _recorder(short_tmp)
    topology.guest.run(
        [
            "busybox",
            "udhcpc",
            "-i",
            "tap0",
            "-f",
            "-q",
            "-n",
            "-t",
            "5",
            "-T",
            "1",
            "-s",
            str(script),
        ],
        timeout=30,
    )
    lease = _env_file(Path(f"{out}.bound.udhcpc"))
    assert lease["ip"] == topology.host_v4
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"].split() == [topology.gateway_v4]
    assert lease["dns"].split() == [DNS]
    assert lease["mtu"] == "65520"
    assert lease["serverid"] == topology.gateway_v4
    assert (
        f"inet {topology.host_v4}/24"
        in topology.guest.run(["ip", "-4", "addr", "show", "tap0"]).stdout
    )


def test_dhclient_gets_ipv4_and_dhcpv6(
    topology: Topology, start_ferryd: StartFerryd, short_tmp: Path
) -> None:
    _start(topology, start_ferryd)
    script, out = _recorder(short_tmp)
    common = [
        "-1",
        "-sf",
        str(script),
        "-pf",
        str(short_tmp / "pid"),
        "-lf",
        str(short_tmp / "leases"),
    ]
    topology.guest.run(["dhclient", "-4", *common, "tap0"], timeout=30)
    v4 = _env_file(Path(f"{out}..BOUND"))
    assert v4["new_ip_address"] == topology.host_v4
    assert v4["new_routers"] == topology.gateway_v4
    assert v4["new_interface_mtu"] == "65520"
    assert v4["new_domain_name_servers"] == DNS
    # dhclient -6 needs the tap's link-local address; DAD is off in the fixture.
    wait_for(
        lambda: "fe80" in topology.guest.run(["ip", "-6", "addr", "show", "tap0"]).stdout,
        what="link-local",
    )
    topology.guest.run(
        ["dhclient", "-6", *common[:-1], str(short_tmp / "leases6"), "tap0"], timeout=30
    )
    v6 = _env_file(Path(f"{out}..BOUND6"))
    assert v6["new_ip6_address"] == topology.host_v6
    assert v6["new_dhcp6_name_servers"] == DNS6


def test_slaac_address_and_default_route(topology: Topology, start_ferryd: StartFerryd) -> None:
    _start(topology, start_ferryd)

    def configured() -> bool:
        addrs = topology.guest.run(["ip", "-6", "addr", "show", "tap0", "scope", "global"]).stdout
        routes = topology.guest.run(["ip", "-6", "route", "show", "default"]).stdout
        return "fd00:77::" in addrs and "dynamic" in addrs and f"via {ROUTER_LL}" in routes

    wait_for(configured, timeout=20, what="SLAAC address and default route from ferryd's RA")
    mtu = topology.guest.run(["cat", "/proc/sys/net/ipv6/conf/tap0/mtu"]).stdout.strip()
    assert mtu == "65520"


def test_ping_gateway_and_peer_both_families(topology: Topology, start_ferryd: StartFerryd) -> None:
    ferryd = _start(topology, start_ferryd, config_net=True)
    for addr in (*topology.peers_v4, *topology.peers_v6):
        assert topology.guest.ping(addr, count=3), f"no echo reply from {addr}"
    assert topology.guest.run(["ip", "route", "show", "default"]).stdout.startswith(
        f"default via {topology.gateway_v4} dev tap0"
    )
    status = ferryd.request("status")
    assert status["counters"]["malformed"] == 0


def _udp_exchange(
    topo: Topology, server_ns_addr: str, count: int, size: int = 512
) -> dict[str, object]:
    server = topo.peer.popen(
        [PY, UDPTOOL, "server", server_ns_addr, "7000"], stdout=subprocess.PIPE
    )
    assert server.stdout is not None
    assert server.stdout.readline() == b"listening\n"
    result = topo.guest.run(
        [PY, UDPTOOL, "client", server_ns_addr, "7000", str(count), str(size)],
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(json.loads(result.stdout))


def test_udp_exchange_ipv4(topology: Topology, start_ferryd: StartFerryd) -> None:
    ferryd = _start(topology, start_ferryd, config_net=True)
    summary = _udp_exchange(topology, topology.peers_v4[1], 1000)
    assert summary["received"] == 1000
    # The peer sees the host's address: the guest's datagrams left from a host socket.
    assert summary["seen"] == [topology.host_v4]
    flows = ferryd.request("flows")["flows"]
    udp = [f for f in flows if f["proto"] == "udp" and f["host_port"] != 0]
    assert len(udp) == 1 and udp[0]["bytes_from_guest"] >= 1000 * 512
    # The control server's rule, as ferryd registers its read-only commands: no descriptors.
    r, w = os.pipe()
    with os.fdopen(r, "rb"), os.fdopen(w, "wb"):
        for command in ("status", "counters", "flows", "metrics", "history"):
            refused = f"'{command}' takes no file descriptors, not 1"
            with pytest.raises(ControlRequestFailed, match=refused):
                ferryd.request(command, fds=[w])


def test_udp_exchange_ipv6(topology: Topology, start_ferryd: StartFerryd) -> None:
    _start(topology, start_ferryd, config_net=True)
    summary = _udp_exchange(topology, topology.peers_v6[1], 1000)
    assert summary["received"] == 1000
    assert summary["seen"] == [topology.host_v6]


def test_udp_large_datagrams(topology: Topology, start_ferryd: StartFerryd) -> None:
    _start(topology, start_ferryd, config_net=True)
    summary = _udp_exchange(topology, topology.peers_v4[0], 50, size=60000)
    assert summary["received"] == 50


def test_inbound_udp_forward_preserves_peer_address(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    _start(topology, start_ferryd, "-u", "7100:7200", config_net=True)
    server = topology.guest.popen([PY, UDPTOOL, "server", "::", "7200"], stdout=subprocess.PIPE)
    assert server.stdout is not None
    assert server.stdout.readline() == b"listening\n"
    # The peer's kernel picks one of its two addresses per family as source;
    # whichever it picked must be what the guest sees (IPv4 arrives on the
    # dual-stack server as a v4-mapped address).
    for dest, peers in (
        (topology.host_v4, ["::ffff:" + a for a in topology.peers_v4]),
        (topology.host_v6, list(topology.peers_v6)),
    ):
        result = topology.peer.run(
            [PY, UDPTOOL, "client", dest, "7100", "200"], check=False, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        seen = json.loads(result.stdout)["seen"]
        assert len(seen) == 1 and seen[0] in peers, seen


def test_garbage_from_the_guest_changes_nothing(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    """Random and mutated frames on the tap: ferryd counts them and keeps serving."""
    ferryd = _start(topology, start_ferryd, config_net=True)
    assert topology.guest.ping(topology.peers_v4[0])
    mac = bytes.fromhex("9a559a559a55")
    rng = random.Random(2)
    frames = [rng.randbytes(rng.randrange(0, 200)) for _ in range(500)]
    # Valid-looking Ethernet headers towards ferryd with random IP/ARP bodies.
    for ethertype in (b"\x08\x00", b"\x86\xdd", b"\x08\x06"):
        frames += [
            mac + b"\x02\x00\x00\x00\x00\x01" + ethertype + rng.randbytes(rng.randrange(0, 120))
            for _ in range(500)
        ]
    code = (
        "import socket,sys,pickle\n"
        "s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n"
        "s.bind(('tap0',0))\n"
        "n=0\n"
        "for f in pickle.load(sys.stdin.buffer):\n"
        "    try: s.send(f); n+=1\n"
        "    except OSError: pass\n"
        "print(n)\n"
    )
    before = ferryd.request("status")["counters"]["frames_in"]
    sent = int(
        subprocess.run(
            [*topology.guest.exec_prefix(), PY, "-c", code],
            input=pickle.dumps(frames),
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    )
    assert sent > 1000
    # The tap's queue (tx_queue_len 1000) may drop some of a burst, so count
    # what arrived rather than expecting all of it.
    wait_for(
        lambda: ferryd.request("status")["counters"]["malformed"] >= 300,
        what="malformed frames counted",
    )
    assert ferryd.request("status")["counters"]["frames_in"] > before + 300
    for addr in (topology.peers_v4[0], topology.peers_v6[0]):
        assert topology.guest.ping(addr), f"ferryd stopped answering after garbage ({addr})"
    assert ferryd.proc.poll() is None
    # ferryctl counters: every component's counters, read in one snapshot
    # (the frames are counted once, by the frontend; status shows the same).
    counters = json.loads(ferryd.ctl("counters", "--json").stdout)
    assert counters["stack"]["malformed"] >= 300
    assert counters["frontend"]["frames_in"] > before + 300
    assert set(counters) >= {
        "frontend",
        "migration",
        "refusals",
        "descriptors",
        "stack",
        "tcp",
        "udp",
        "icmp",
    }


def test_ferryd_holds_no_capability_once_running(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    """Setup needs privilege; the data path must run without any (DESIGN.md)."""
    ferryd = _start(topology, start_ferryd, config_net=True)
    status = Path(f"/proc/{ferryd.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert "ferryd" in Path(f"/proc/{ferryd.pid}/cmdline").read_text()
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[name], 16) == 0, (name, fields[name])
    assert fields["NoNewPrivs"].strip() == "1"
    assert topology.guest.ping(topology.peers_v4[0])  # and it still works
