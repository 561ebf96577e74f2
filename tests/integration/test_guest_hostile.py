"""A hostile guest against a real ferryd (issue 9, items 2-4).

Frames no real guest kernel sends are built with ferry's wire builders and
sent on the tap from inside the guest namespace (testbed/rawframes.py,
an AF_PACKET socket); what ferryd answers is read back there.
Each test checks that ferryd keeps running and keeps serving.
"""

import json
import struct
import subprocess
import sys
from ipaddress import IPv6Address
from pathlib import Path

from ferryd.services import dhcpv6
from ferryd.wire.ethernet import ETH_P_IPV6, build_ethernet, parse_ethernet_untrusted
from ferryd.wire.ip import IPPROTO_UDP, build_ip, parse_ipv6_untrusted
from ferryd.wire.udp import build_udp, parse_udp_untrusted
from testbed.paths import RAWFRAMES, TCPTOOL
from testbed.topology import Topology
from tests.integration.conftest import StartFerryd

PY = sys.executable


def _opt(code: int, value: bytes = b"") -> bytes:
    return struct.pack("!HH", code, len(value)) + value


def _guest_mac(topology: Topology) -> bytes:
    text = topology.guest.run(["cat", "/sys/class/net/tap0/address"]).stdout.strip()
    return bytes.fromhex(text.replace(":", ""))


def _raw(topology: Topology, *args: object, timeout: float = 120) -> dict[str, object]:
    result = topology.guest.run(
        [PY, RAWFRAMES, *(str(a) for a in args)], check=False, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(json.loads(result.stdout))


def test_solicit_with_thousands_of_ia_na_leaves_ferryd_serving(
    topology: Topology, start_ferryd: StartFerryd, short_tmp: Path
) -> None:
    """Item 2: the Solicit whose reply once outgrew an IP packet and stopped ferryd."""
    ferryd = start_ferryd(topology, "-D", "fd00:77::53", config_net=True)
    mac = _guest_mac(topology)
    src, dst = IPv6Address("fe80::1:2"), IPv6Address("ff02::1:2")
    client_id = bytes.fromhex("00030001") + mac
    solicit = bytes((1,)) + b"\x12\x34\x56" + _opt(1, client_id)
    solicit += b"".join(_opt(3, struct.pack("!III", i, 0, 0)) for i in range(3000))
    datagram = build_udp(src, dst, 546, 547, solicit)
    frame = build_ethernet(
        b"\x33\x33\x00\x01\x00\x02", mac, ETH_P_IPV6, build_ip(src, dst, IPPROTO_UDP, datagram)
    )
    assert len(frame) > 48_000
    hexfile = short_tmp / "frames.hex"
    hexfile.write_text(frame.hex() + "\n")
    before = ferryd.request("status")["counters"]

    got = _raw(topology, "frames", hexfile, 546, 10)

    assert ferryd.proc.poll() is None, "ferryd died of one DHCPv6 Solicit"
    assert got["reply"] is not None, "no Advertise for the Solicit"
    reply = bytes.fromhex(str(got["reply"]))
    ip = parse_ipv6_untrusted(parse_ethernet_untrusted(reply).payload)
    msg = dhcpv6.parse_dhcpv6_untrusted(parse_udp_untrusted(ip).payload)
    assert msg.msg_type == dhcpv6.Dhcpv6Type.ADVERTISE and msg.xid == 0x123456
    assert [c for c, _ in msg.options].count(dhcpv6.OPT_IA_NA) == 1
    assert len(reply) < 1280
    # Still serving: both families, and the control socket.
    for addr in (topology.peers_v4[1], topology.peers_v6[1]):
        assert topology.guest.ping(addr), f"ferryd stopped forwarding to {addr}"
    status = json.loads(ferryd.ctl("status", "--json").stdout)
    counters = status["counters"]
    assert counters["frames_in"] > before["frames_in"]
    assert counters["frame_errors"] == 0 and counters["malformed"] == before["malformed"]


def test_syn_advertising_mss_1_gets_48_byte_segments(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    """Item 3: a SYN with MSS 1 once made ferryd send a peer's data byte by byte.

    The guest namespace has no address (no --config-net), so its kernel
    ignores the hand-made connection instead of resetting it.
    """
    ferryd = start_ferryd(topology)
    server = topology.peer.popen(
        [PY, TCPTOOL, "source", topology.peers_v4[1], "7300"], stdout=subprocess.PIPE
    )
    assert server.stdout is not None
    assert server.stdout.readline() == b"listening\n"
    nbytes = 48 * 1000

    got = _raw(topology, "mss", topology.host_v4, topology.peers_v4[1], 7300, 1, nbytes)

    assert got["bytes"] == nbytes and got["fin"], got
    assert got["largest"] == 48, got
    assert int(str(got["segments"])) < nbytes // 48 * 2, got
    assert ferryd.proc.poll() is None


def test_guest_deleting_its_tap_ends_ferryd_with_one_line(
    topology: Topology, start_ferryd: StartFerryd
) -> None:
    # A namespace guest can delete the device ferryd reads; that ends the
    # guest's own network, and ferryd with one clear line, not a traceback.
    ferryd = start_ferryd(topology)
    topology.guest.run(["ip", "link", "del", "tap0"])
    assert ferryd.proc.wait(timeout=10) == 1
    ferryd.ok_exit = frozenset({1})
    log = ferryd.log()
    assert "Traceback" not in log
    assert "ferryd: error: the guest's tap device is gone: File descriptor in bad state" in log
