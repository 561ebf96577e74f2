"""The networks tests run on: namespaces joined by veth pairs, addressed like real hosts.

:func:`build_topology` gives the standard picture (a host that runs ferryd,
a peer behind its uplink, an empty guest); :func:`two_host_topology` gives
two hosts with one identity and a fabric that moves between them, the
picture of a live migration. Both remove every namespace on exit, also when
setup fails halfway (testbed/netns.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from testbed.netns import Netns, NetnsError, ip

__all__ = [
    "Topology",
    "TwoHostTopology",
    "build_topology",
    "two_host_topology",
    "veth",
]


def veth(ns_a: Netns, if_a: str, ns_b: Netns, if_b: str, mtu: int = 65520) -> None:
    """Join two namespaces with a veth pair and bring both ends up.

    Both ends are created directly inside their namespaces, so the names
    never pass through (and never clash in) the root namespace, where other
    test runs may use the same interface names.
    """
    ip(
        "link",
        "add",
        if_a,
        "netns",
        ns_a.name,
        "mtu",
        str(mtu),
        "type",
        "veth",
        "peer",
        "name",
        if_b,
        "netns",
        ns_b.name,
        "mtu",
        str(mtu),
    )
    ns_a.link_up(if_a)
    ns_b.link_up(if_b)


@dataclass(frozen=True)
class Topology:
    """The standard integration topology (see :func:`build_topology`).

    ::

        guest ns            host ns                          peer ns
        (tap0, made     ferryd --netns guest          up0 10.77.0.2/24 fd00:77::2/64
         by ferryd)     up0 10.77.0.1/24 fd00:77::1/64 ──  10.77.0.3/24 fd00:77::3/64
                        default via .2 / ::2
    """

    host: Netns
    peer: Netns
    guest: Netns
    uplink: str = "up0"
    host_v4: str = "10.77.0.1"
    host_v6: str = "fd00:77::1"
    prefix_v4: int = 24
    prefix_v6: int = 64
    gateway_v4: str = "10.77.0.2"
    gateway_v6: str = "fd00:77::2"
    #: The peer's addresses: two, so that tests have two distinct remote hosts.
    peers_v4: tuple[str, ...] = ("10.77.0.2", "10.77.0.3")
    peers_v6: tuple[str, ...] = ("fd00:77::2", "fd00:77::3")

    @property
    def namespaces(self) -> tuple[Netns, Netns, Netns]:
        return (self.host, self.peer, self.guest)


@contextlib.contextmanager
def build_topology() -> Iterator[Topology]:
    """Create host, peer and guest namespaces wired as in :class:`Topology`.

    The host is configured like a machine ferryd would run on: one uplink,
    an address per family, default routes to the gateway. The peer holds
    the gateway address and a second address, with default routes back to
    the host. The guest has only lo: ferryd creates its tap there. All three
    namespaces are removed on exit, also when setup fails halfway.
    """
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(Netns("host"))
        peer = stack.enter_context(Netns("peer"))
        guest = stack.enter_context(Netns("guest"))
        topo = Topology(host=host, peer=peer, guest=guest)
        veth(host, topo.uplink, peer, topo.uplink)
        host.add_addr(topo.uplink, f"{topo.host_v4}/{topo.prefix_v4}")
        host.add_addr(topo.uplink, f"{topo.host_v6}/{topo.prefix_v6}")
        host.add_route("default", topo.gateway_v4)
        host.add_route("default", topo.gateway_v6)
        for addr in topo.peers_v4:
            peer.add_addr(topo.uplink, f"{addr}/{topo.prefix_v4}")
        for addr in topo.peers_v6:
            peer.add_addr(topo.uplink, f"{addr}/{topo.prefix_v6}")
        peer.add_route("default", topo.host_v4)
        peer.add_route("default", topo.host_v6)
        yield topo


@dataclass
class TwoHostTopology:
    """Two hosts with the same addresses and MAC, and a peer the fabric moves between them.

    ::

        host_a ns                         peer ns
        up0 10.88.0.1/24 fd00:88::1/64 ── pa ─┐
            MAC 02:88:00:00:00:01             br0 10.88.0.2/24 fd00:88::2/64
        host_b ns                             │   (+ .3 / ::3)
        up0 (same addresses, same MAC) ─── pb ┘  pb: down, not in br0 until switch

    This is the real case of a migration: the target host carries the
    source's address and MAC, so the peer's neighbour cache stays valid and
    the peer never learns that anything moved. The peer's addresses live on
    a bridge, so that moving the link does not take them away. Before
    :meth:`switch_to_b` only host A is reachable (host B's up0 has no
    carrier: binding and connecting there works, nothing reaches the wire);
    after it only host B is: A's veth pair is deleted (so A's frozen
    sockets can never answer the peer, not even with an RST) and B's
    peer-side end joins the bridge.
    """

    host_a: Netns
    host_b: Netns
    peer: Netns
    uplink: str = "up0"
    bridge: str = "br0"
    port_a: str = "pa"
    port_b: str = "pb"
    host_mac: str = "02:88:00:00:00:01"
    host_v4: str = "10.88.0.1"
    host_v6: str = "fd00:88::1"
    prefix_v4: int = 24
    prefix_v6: int = 64
    peers_v4: tuple[str, ...] = ("10.88.0.2", "10.88.0.3")
    peers_v6: tuple[str, ...] = ("fd00:88::2", "fd00:88::3")
    switched: bool = False

    @property
    def namespaces(self) -> tuple[Netns, Netns, Netns]:
        return (self.host_a, self.host_b, self.peer)

    def switch_to_b(self) -> None:
        """Move the fabric from host A to host B (two ``ip`` commands; safe to call once)."""
        if self.switched:
            raise NetnsError("the fabric was already switched to host B")
        self.host_a.run(["ip", "link", "del", self.uplink])
        self.peer.run(["ip", "link", "set", self.port_b, "master", self.bridge, "up"])
        self.switched = True

    def standby_a(self) -> None:
        """After :meth:`switch_to_b`: give host A a new uplink, not yet on the fabric.

        The same picture as host B's at the start (same address and MAC, its
        peer-side end down and outside the bridge), so that a ferryd started
        in A can be the target of a migration back (A→B→A).
        """
        if not self.switched:
            raise NetnsError("host A is still on the fabric")
        self._add_uplink(self.host_a, self.port_a)

    def switch_to_a(self) -> None:
        """Move the fabric back from host B to host A (after :meth:`standby_a`)."""
        if not self.switched:
            raise NetnsError("the fabric is already on host A")
        self.host_b.run(["ip", "link", "del", self.uplink])
        self.peer.run(["ip", "link", "set", self.port_a, "master", self.bridge, "up"])
        self.switched = False

    def _add_uplink(self, host: Netns, port: str) -> None:
        ip(
            "link", "add", self.uplink, "netns", host.name, "address", self.host_mac,
            "mtu", "65520", "type", "veth",
            "peer", "name", port, "netns", self.peer.name, "mtu", "65520",
        )  # fmt: skip
        host.add_addr(self.uplink, f"{self.host_v4}/{self.prefix_v4}")
        host.add_addr(self.uplink, f"{self.host_v6}/{self.prefix_v6}")
        host.link_up(self.uplink)


@contextlib.contextmanager
def two_host_topology() -> Iterator[TwoHostTopology]:
    """Create host A, host B and a peer wired as in :class:`TwoHostTopology`.

    All three namespaces are removed on exit, also when setup fails halfway.
    The bridge runs no STP, so a new port forwards at once.
    """
    with contextlib.ExitStack() as stack:
        host_a = stack.enter_context(Netns("hosta"))
        host_b = stack.enter_context(Netns("hostb"))
        peer = stack.enter_context(Netns("peer"))
        topo = TwoHostTopology(host_a=host_a, host_b=host_b, peer=peer)
        peer.run(["ip", "link", "add", topo.bridge, "type", "bridge", "stp_state", "0"])
        peer.link_up(topo.bridge)
        for addr in topo.peers_v4:
            peer.add_addr(topo.bridge, f"{addr}/{topo.prefix_v4}")
        for addr in topo.peers_v6:
            peer.add_addr(topo.bridge, f"{addr}/{topo.prefix_v6}")
        for host, port in ((host_a, topo.port_a), (host_b, topo.port_b)):
            ip(
                "link", "add", topo.uplink, "netns", host.name, "address", topo.host_mac,
                "mtu", "65520", "type", "veth",
                "peer", "name", port, "netns", peer.name, "mtu", "65520",
            )  # fmt: skip
            host.add_addr(topo.uplink, f"{topo.host_v4}/{topo.prefix_v4}")
            host.add_addr(topo.uplink, f"{topo.host_v6}/{topo.prefix_v6}")
            host.link_up(topo.uplink)
        peer.run(["ip", "link", "set", topo.port_a, "master", topo.bridge, "up"])
        yield topo
