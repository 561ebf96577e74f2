"""The services against real clients: busybox udhcpc, ISC dhclient (v4 and v6), Linux.

No daemon is involved. Each test makes a throwaway namespace (testbed/netns.py)
with a tap device in it, opened by a thread that joins the namespace just for
the open() (a tap lives in the namespace it was opened in; the fd then works
from anywhere). A small pump thread plays ferryd's part: it reads the frames
the guest-side client sends, hands them to the services exactly as the stack
does, and writes the answers back into the tap. The test then checks what
the client did with them: the address, route and MTU it configured, the DNS
servers its script was given, and that duplicate address detection succeeded.

Every wait polls a condition (testbed/wait.py: wait_for); nothing sleeps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from ferryd.link import Ip4Config, Ip6Config, LinkConfig
from ferryd.services.arp import answer_arp
from ferryd.services.dhcp import answer_dhcp_untrusted
from ferryd.services.dhcpv6 import answer_dhcpv6_untrusted
from ferryd.services.ndp import NdpResponder
from ferryd.wire.arp import parse_arp_untrusted
from ferryd.wire.errors import MalformedPacket
from ferryd.wire.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, parse_ethernet_untrusted
from ferryd.wire.icmp import parse_icmp_untrusted
from ferryd.wire.ip import (
    IPPROTO_ICMPV6,
    IPPROTO_UDP,
    parse_ipv4_untrusted,
    parse_ipv6_untrusted,
)
from ferryd.wire.udp import parse_udp_untrusted
from testbed.netns import Netns, ping_command
from testbed.wait import wait_for

FERRY_MAC = bytes.fromhex("9a55e0000001")
GUEST4 = IPv4Address("10.77.0.5")
GW4 = IPv4Address("10.77.0.1")
GUEST6 = IPv6Address("2001:db8:77::5")
GW6 = IPv6Address("fe80::1")
LINK = LinkConfig(
    mac=FERRY_MAC,
    mtu=9000,
    ipv4=Ip4Config(GUEST4, 24, GW4, (IPv4Address("10.77.0.53"),)),
    ipv6=Ip6Config(GUEST6, 64, GW6, (IPv6Address("2001:db8:77::53"),)),
)
TAP = "tap0"

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000


def open_tap_in(netns_path: str, name: str) -> int:
    """Open a tap device inside the namespace at *netns_path*; return its fd.

    setns() moves only the calling thread, so a short-lived thread joins the
    namespace, opens /dev/net/tun there (which puts the tap in it) and exits.
    """
    result: dict[str, int | BaseException] = {}

    def opener() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            nsfd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(nsfd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns_path}: {os.strerror(err)}")
            finally:
                os.close(nsfd)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.ioctl(
                    fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI)
                )
            except BaseException:
                os.close(fd)
                raise
            result["fd"] = fd
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=opener)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    fd = result["fd"]
    assert isinstance(fd, int)
    return fd


class FakeFerry:
    """ferryd's service dispatch over a tap fd, in a thread; records what it saw."""

    def __init__(self, fd: int, link: LinkConfig) -> None:
        self.fd = fd
        self.link = link
        self.ndp = NdpResponder(link, time.monotonic())
        self.received: list[tuple[str, bytes, bool]] = []
        """(kind, frame, answered) for every frame the guest sent."""
        self.malformed: list[tuple[bytes, str]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeFerry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.error is not None:
            raise AssertionError("the responder thread failed") from self.error

    def seen(self, kind: str) -> list[tuple[bytes, bool]]:
        with self._lock:
            return [(frame, answered) for k, frame, answered in self.received if k == kind]

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by __exit__
            self.error = exc

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            due = self.ndp.next_timer()
            timeout = 0.05 if due is None else max(0.0, min(0.05, due - now))
            readable, _, _ = select.select([self.fd], [], [], timeout)
            if readable:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        self._handle(os.read(self.fd, 65536))
            for frame in self.ndp.handle_timer(time.monotonic()):
                self._write(frame)

    def _write(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the tap is not up yet
                raise

    def _handle(self, frame: bytes) -> None:
        try:
            kind, answers = self._dispatch_untrusted(frame)
        except MalformedPacket as exc:
            self.malformed.append((frame, str(exc)))
            return
        with self._lock:
            self.received.append((kind, frame, bool(answers)))
        for answer in answers:
            self._write(answer)

    def _dispatch_untrusted(self, frame: bytes) -> tuple[str, list[bytes]]:
        """What daemon/stack.py does with the frames the services handle."""
        eth = parse_ethernet_untrusted(frame)
        if eth.ethertype == ETH_P_ARP:
            answer = answer_arp(self.link, eth, parse_arp_untrusted(eth.payload))
            return "arp", [answer] if answer else []
        if eth.ethertype == ETH_P_IP:
            ip = parse_ipv4_untrusted(eth.payload)
            if ip.proto == IPPROTO_UDP:
                udp = parse_udp_untrusted(ip)
                if udp.dport == 67:
                    answer = answer_dhcp_untrusted(self.link, eth, ip, udp)
                    return "dhcp", [answer] if answer else []
            return "other", []
        if eth.ethertype == ETH_P_IPV6:
            ip = parse_ipv6_untrusted(eth.payload)
            if ip.proto == IPPROTO_UDP:
                udp = parse_udp_untrusted(ip)
                if udp.dport == 547:
                    answer = answer_dhcpv6_untrusted(self.link, eth, ip, udp)
                    return "dhcpv6", [answer] if answer else []
            if ip.proto == IPPROTO_ICMPV6:
                icmp = parse_icmp_untrusted(ip)
                if icmp.type in (133, 135):
                    kind = "rs" if icmp.type == 133 else "ns"
                    return kind, self.ndp.receive_untrusted(eth, ip, icmp, time.monotonic())
        return "other", []


@pytest.fixture
def guest() -> Iterator[Netns]:
    with Netns("svc") as ns:
        yield ns


@pytest.fixture
def tap_fd(guest: Netns) -> Iterator[int]:
    fd = open_tap_in(guest.path, TAP)
    try:
        guest.run(["ip", "link", "set", TAP, "mtu", "65520"])
        yield fd
    finally:
        os.close(fd)


def sysctl(ns: Netns, *settings: str) -> None:
    ns.run(["sysctl", "-q", "-w", *settings])


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def addresses(ns: Netns, family: str) -> str:
    return ns.run(["ip", family, "addr", "show", "dev", TAP]).stdout


def default_route(ns: Netns, family: str) -> str:
    return ns.run(["ip", family, "route", "show", "default"]).stdout


def env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if "=" in line]
    return {key: value for key, _, value in (line.partition("=") for line in lines)}


needs = pytest.mark.skipif


@needs(shutil.which("busybox") is None, reason="busybox is not installed")
def test_udhcpc_configures_address_and_arp(guest: Netns, tap_fd: int, tmp_path: Path) -> None:
    out = tmp_path / "bound.env"
    script = write_script(
        tmp_path / "udhcpc.sh",
        f"""[ "$1" = bound ] || exit 0
ip addr add "$ip/$mask" dev "$interface"
ip link set "$interface" mtu "$mtu"
ip route add default via "$router" dev "$interface"
env > {out}
""",
    )
    guest.link_up(TAP)
    with FakeFerry(tap_fd, LINK) as ferry:
        result = guest.run(
            [
                "busybox",
                "udhcpc",
                "-f",
                "-q",
                "-n",
                "-t",
                "5",
                "-T",
                "1",
                "-O",
                "mtu",
                "-i",
                TAP,
                "-s",
                str(script),
            ],
            timeout=20,
        )
        assert result.returncode == 0, result.stderr
        env = env_file(out)
        assert (env["ip"], env["mask"], env["router"]) == ("10.77.0.5", "24", "10.77.0.1")
        assert (env["dns"].strip(), env["mtu"], env["serverid"]) == (
            "10.77.0.53",
            "9000",
            "10.77.0.1",
        )
        assert env["lease"] == str(0xFFFFFFFF)
        assert "inet 10.77.0.5/24" in addresses(guest, "-4")
        assert "default via 10.77.0.1" in default_route(guest, "-4")
        assert "mtu 9000" in guest.run(["ip", "link", "show", TAP]).stdout
        assert [kind for kind, _f, _a in ferry.received].count("dhcp") >= 2

        # ARP: the gateway and any other on-link address resolve to ferryd's MAC ...
        for peer in ("10.77.0.1", "10.77.0.99"):
            arping = ["busybox", "arping", "-f", "-c", "3", "-w", "5", "-I", TAP, peer]
            reply = guest.run(arping, check=False)
            assert reply.returncode == 0, reply.stdout + reply.stderr
            assert "[9a:55:e0:00:00:01]" in reply.stdout.lower(), reply.stdout
        # ... and a duplicate address check of the guest's own address finds it free.
        dad = ["busybox", "arping", "-D", "-c", "1", "-w", "1", "-I", TAP, "10.77.0.5"]
        assert guest.run(dad, check=False).returncode == 0
        probes = [f for f, answered in ferry.seen("arp") if f[28:32] == bytes(4)]
        assert probes and not any(a for f, a in ferry.seen("arp") if f in probes)
    assert not ferry.malformed


DHCLIENT_SCRIPT = """case "$reason" in
BOUND|REBOOT)
    ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface"
    ip route add default via "$new_routers" dev "$interface" ;;
BOUND6|REBOOT6)
    ip -6 addr add "$new_ip6_address/$new_ip6_prefixlen" dev "$interface" nodad ;;
*) exit 0 ;;
esac
env > {out}
"""


def dhclient(guest: Netns, tmp_path: Path, family: str) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / f"dhclient{family}.env"
    script = write_script(tmp_path / "dhclient.sh", DHCLIENT_SCRIPT.format(out=out))
    argv = [
        "dhclient",
        family,
        "-d",
        "-1",
        "-sf",
        str(script),
        "-lf",
        str(tmp_path / "lease"),
        "-pf",
        str(tmp_path / f"pid{family}"),
        TAP,
    ]
    proc = guest.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, out


def wait_bound(proc: subprocess.Popen[bytes], out: Path) -> dict[str, str]:
    def bound() -> dict[str, str] | None:
        if proc.poll() is not None:
            raise AssertionError(f"dhclient exited {proc.returncode}: {proc.stderr!r}")
        env = env_file(out)
        return env if "reason" in env else None

    return wait_for(bound, timeout=15, what="dhclient to bind")


@needs(shutil.which("dhclient") is None, reason="isc-dhcp-client is not installed")
def test_dhclient_v4(guest: Netns, tap_fd: int, tmp_path: Path) -> None:
    guest.link_up(TAP)
    with FakeFerry(tap_fd, LINK) as ferry:
        proc, out = dhclient(guest, tmp_path, "-4")
        env = wait_bound(proc, out)
        assert env["reason"] == "BOUND"
        assert env["new_ip_address"] == "10.77.0.5"
        assert env["new_subnet_mask"] == "255.255.255.0"
        assert env["new_routers"] == "10.77.0.1"
        assert env["new_domain_name_servers"] == "10.77.0.53"
        assert env["new_dhcp_server_identifier"] == "10.77.0.1"
        assert env["new_dhcp_lease_time"] == str(0xFFFFFFFF)
        assert env["new_interface_mtu"] == "9000"
        assert "inet 10.77.0.5/24" in addresses(guest, "-4")
        assert "default via 10.77.0.1" in default_route(guest, "-4")
    assert not ferry.malformed


@needs(shutil.which("dhclient") is None, reason="isc-dhcp-client is not installed")
def test_dhclient_v6(guest: Netns, tap_fd: int, tmp_path: Path) -> None:
    guest.link_up(TAP)
    with FakeFerry(tap_fd, LINK) as ferry:
        proc, out = dhclient(guest, tmp_path, "-6")
        env = wait_bound(proc, out)
        assert env["reason"] == "BOUND6"
        assert env["new_ip6_address"] == "2001:db8:77::5"
        assert env["new_dhcp6_name_servers"] == "2001:db8:77::53"
        server_id = bytes(int(part, 16) for part in env["new_dhcp6_server_id"].split(":"))
        assert server_id == bytes.fromhex("00030001") + FERRY_MAC  # DUID-LL
        assert "inet6 2001:db8:77::5/" in addresses(guest, "-6")
        assert ferry.seen("dhcpv6")
    assert not ferry.malformed


def test_kernel_slaac_router_and_neighbour_discovery(guest: Netns, tap_fd: int) -> None:
    """Linux's own RS, DAD and NS against the NDP responder."""
    conf = f"net.ipv6.conf.{TAP}"
    sysctl(
        guest,
        f"{conf}.accept_dad=1",  # Netns turns DAD off; this test wants it
        f"{conf}.dad_transmits=1",
        f"net.ipv6.neigh.{TAP}.retrans_time_ms=100",  # DAD waits one retrans time
        f"{conf}.router_solicitation_delay=0",
        f"{conf}.accept_ra=1",
    )
    guest.link_up(TAP)  # before the responder starts, so its first RA is delivered
    with FakeFerry(tap_fd, LINK) as ferry:

        def slaac_address() -> str | None:
            text = addresses(guest, "-6")
            lines = [line for line in text.splitlines() if "inet6 2001:db8:77:" in line]
            return lines[0] if lines and "tentative" not in text else None

        line = wait_for(slaac_address, timeout=10, what="a SLAAC address from the RA")
        assert "/64" in line and "dadfailed" not in addresses(guest, "-6")
        assert ferry.seen("rs"), "the kernel's router solicitation was not seen"
        dad_probes = [f for f, _answered in ferry.seen("ns") if f[22:38] == bytes(16)]
        assert dad_probes and not any(
            answered for f, answered in ferry.seen("ns") if f in dad_probes
        )
        route = wait_for(lambda: default_route(guest, "-6"), what="a default route from the RA")
        assert f"via fe80::1 dev {TAP}" in route
        mtu = guest.run(["sysctl", "-n", f"{conf}.mtu"]).stdout.strip()
        assert mtu == "9000"

        # Neighbour discovery for an on-link peer resolves to ferryd's MAC.
        ping = guest.popen(
            ping_command("2001:db8:77::99", wait=5),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            neigh = wait_for(
                lambda: (
                    "9a:55:e0:00:00:01"
                    in guest.run(
                        ["ip", "-6", "neigh", "show", "2001:db8:77::99", "dev", TAP]
                    ).stdout
                ),
                what="a neighbour entry for 2001:db8:77::99",
            )
            assert neigh
        finally:
            ping.kill()
            ping.wait()
    assert not ferry.malformed
