"""A real VM on QEMU's stream netdev: DHCP from the back-end and byte-exact TCP both ways.

The guest (testbed/guest_image.py: a Debian kernel and a busybox
initramfs) boots under QEMU with its virtio-net device on the stream
netdev, the protocol of passt's default mode and of ``ferryd --socket``.
The test runs against both back-ends: ``ferryd --socket`` and passt
(Debian 12's), the reference, which also checks the bed itself (guest,
QEMU, command channel) independently of ferryd.

The guest has no Python: it checks its streams with busybox (dd from
/dev/urandom, sha256sum, nc). Upstream, it sends a random file to
tcptool's sink, which answers with the byte count and SHA-256 of what
arrived; downstream, it asks tcptool's source for a seeded stream and the
test compares the SHA-256 the guest computes with tcptool's own.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.ferryd_process import FerrydProcess, describe_status, launch
from testbed.paths import FERRYD
from testbed.tcptool import expected
from testbed.tcptool_process import server
from testbed.topology import Topology
from testbed.vm import stream_netdev
from testbed.wait import WaitTimeout, wait_for
from tests.integration.conftest import _test_failed
from tests.integration.vm.conftest import StartPasst, StartVm

SINK_PORT = 5001
SOURCE_PORT = 5002
#: 2 MiB each way: many windows' worth, so that flow control and segmentation take part.
NBYTES = 2 << 20


@dataclass(frozen=True)
class Backend:
    """What serves the VM's stream netdev, in the host namespace."""

    name: str
    socket_path: Path
    log: Callable[[], str]
    #: Whether the peer's close reaches the guest after the guest half-closed:
    #: Debian 12's passt (2023-03) never sends that FIN (the guest stays in FIN_WAIT2).
    closes_after_half_close: bool


#: Debian 12's passt is the reference here, not what is tested: in one CI run
#: of many (2026-12-05, the whole suite beside it) its guest's download
#: never ended; it passed at once when run again. A rerun keeps a stall of
#: the reference from failing the suite; ferryd's runs get none.
PASST_REFERENCE = pytest.param("passt", marks=pytest.mark.flaky(reruns=2))


@pytest.fixture(params=["ferryd", PASST_REFERENCE])
def backend(
    request: pytest.FixtureRequest,
    topology: Topology,
    short_tmp: Path,
    start_passt_backend: StartPasst,
) -> Iterator[Backend]:
    """``ferryd --socket`` or passt in the host namespace, serving one VM."""
    if request.param == "passt":
        passt = start_passt_backend()
        yield Backend("passt", passt.socket_path, passt.log, closes_after_half_close=False)
        return
    socket_path, control = short_tmp / "ferryd.sock", str(short_tmp / "ferryd.ctl")
    argv = [str(FERRYD), "--socket", str(socket_path), "--control", control]
    started: list[FerrydProcess] = []
    try:
        ferryd = launch(topology.host, argv, control, short_tmp / "ferryd.log", started)
        yield Backend("ferryd", socket_path, ferryd.log, closes_after_half_close=True)
    finally:
        for process in started:
            status = process.stop()
            if _test_failed(request.node):
                print(f"--- ferryd's log ({describe_status(status)}) ---\n{process.log()}")
            elif status not in process.ok_exit and not process.reported:
                pytest.fail(f"ferryd ended with {describe_status(status)}:\n{process.log()}")


def test_guest_takes_its_address_by_dhcp_and_streams_both_ways(
    topology: Topology, backend: Backend, start_vm: StartVm
) -> None:
    # passt maps the gateway's address (the peer's first) to the host itself.
    peer = topology.peers_v4[1]
    server(topology.peer, "sink", peer, SINK_PORT)
    server(topology.peer, "source", peer, SOURCE_PORT)
    began = time.monotonic()
    vm = start_vm(stream_netdev(backend.socket_path))
    boot = vm.wait_ready()
    lease = vm.wait_lease()
    leased = time.monotonic() - began
    print(f"{backend.name}, {vm.accel}: ready {boot:.1f} s after start, leased at {leased:.1f} s")

    # Both hand the guest the host's own address and gateway.
    assert (lease["ip"], lease["mask"], lease["router"]) == (
        topology.host_v4,
        str(topology.prefix_v4),
        topology.gateway_v4,
    )
    assert f"{topology.host_v4}/{topology.prefix_v4}" in vm.addresses()
    # IPv6 by SLAAC, from the back-end's router advertisement of the host's prefix.
    host_net6 = ipaddress.ip_interface(f"{topology.host_v6}/{topology.prefix_v6}").network
    wait_for(
        lambda: any(
            ipaddress.ip_interface(a).network == host_net6 for a in vm.addresses() if ":" in a
        ),
        timeout=30,
        interval=0.5,
        what=f"an address in {host_net6} by SLAAC",
    )

    # Guest to peer: the sink reads to the guest's FIN, then answers with the
    # count and hash of what arrived and the address it came from, and closes.
    # nc ends on that close, which Debian 12's passt never passes on after the
    # guest's half-close: with passt the answer is awaited, then nc is killed.
    digest = vm.check(
        f"dd if=/dev/urandom of=/tmp/up bs=64k count={NBYTES >> 16} 2>/dev/null"
        " && sha256sum /tmp/up"
    ).split()[0]
    nc_up = vm.check(f"nc {peer} {SINK_PORT} </tmp/up >/tmp/up.answer 2>&1 & echo $!").strip()
    count, received_digest, source_address = wait_for(
        lambda: vm.run("cat /tmp/up.answer").output.split(),
        timeout=60,
        interval=0.5,
        what="the sink's answer",
    )
    assert (int(count), received_digest) == (NBYTES, digest)
    assert source_address == topology.host_v4
    if backend.closes_after_half_close:
        wait_for(
            lambda: vm.run(f"kill -0 {nc_up}").status != 0,
            timeout=30,
            interval=0.5,
            what="nc to end on the peer's close after its half-close",
        )
    else:
        vm.run(f"kill {nc_up}")

    # Peer to guest: a seeded stream, checked by the guest's sha256sum. The
    # request goes through a FIFO whose writer stays open, so the guest does
    # not half-close first (Debian 12's passt then drops what its socket still
    # holds when the peer closes: 1.1 of 2 MiB arrived); the peer closes first
    # and nc exits on it.
    seed = 11
    vm.check(
        "mkfifo /tmp/request; sleep 600 >/tmp/request & echo $! >/tmp/holder;"
        f" nc {peer} {SOURCE_PORT} </tmp/request >/tmp/down 2>&1 & echo $! >/tmp/nc.pid;"
        f" echo '{NBYTES} {seed}' >/tmp/request"
    )
    try:
        wait_for(
            lambda: vm.run("kill -0 $(cat /tmp/nc.pid)").status != 0,
            timeout=60,
            interval=0.5,
            what="nc to end on the peer's close",
        )
    except WaitTimeout as exc:
        arrived = vm.run("wc -c </tmp/down").output.strip()
        raise AssertionError(f"{exc}: {arrived} of {NBYTES} bytes arrived") from None
    vm.check("kill $(cat /tmp/holder)")
    count, down_digest = vm.check("wc -c </tmp/down && sha256sum /tmp/down").split()[:2]
    assert (int(count), down_digest) == (NBYTES, expected(NBYTES, seed))
