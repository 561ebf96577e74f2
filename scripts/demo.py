"""The main job, end to end, in throwaway network namespaces (run as root).

1. Build a small network: a "host" namespace with an uplink to a "peer"
   namespace (two peer addresses per family), and an empty "guest"
   namespace.
2. Start ferryd in the host namespace; it creates tap0 in the guest.
3. The guest configures itself the way a VM would: busybox udhcpc for
   IPv4 (DHCP from ferryd) and the kernel's SLAAC for IPv6 (router
   advertisements from ferryd).
4. The guest pings both peers over both families and exchanges checked UDP
   datagrams with a peer; the peer reaches a guest server through an
   inbound UDP forward.
5. ``ferryctl status`` and ``ferryctl flows`` show what ferryd holds.

Everything is removed at the end, also on failure or Ctrl-C.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.netns import Topology, build_topology, wait_for

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
UDPTOOL = str(REPO / "tests" / "integration" / "udptool.py")
PY = str(BIN / "python")
RECORDER = """#!/bin/sh
[ "$1" = bound ] && ip addr add "$ip/$mask" dev "$interface" && ip route add default via "$router"
env > "{out}"
"""


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(cmd: list[str], ns_prefix: list[str] | None = None) -> str:
    full = [*(ns_prefix or []), *cmd]
    print("$ " + " ".join(cmd), flush=True)
    out = subprocess.run(full, check=True, capture_output=True, text=True).stdout
    print(out.rstrip(), flush=True)
    return out


def run_demo(topo: Topology, tmp: Path) -> None:
    ctl = str(tmp / "ferryd.sock")
    step("starting ferryd in the host namespace, serving tap0 in the guest namespace")
    log = (tmp / "ferryd.log").open("wb")
    ferryd = topo.host.popen(
        [
            str(BIN / "ferryd"),
            "--netns",
            topo.guest.path,
            "--tap",
            "tap0",
            "--control",
            ctl,
            "-D",
            "10.77.0.2",
            "-u",
            "5300:5300",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        subprocess.run(
            [str(BIN / "ferryctl"), "--control", ctl, "status", "--wait", "15"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        print(f"ferryd (pid {ferryd.pid}) is ready")

        step("guest: DHCP with busybox udhcpc")
        script = tmp / "udhcpc.sh"
        script.write_text(RECORDER.format(out=tmp / "lease"))
        script.chmod(0o755)
        topo.guest.run(
            ["busybox", "udhcpc", "-i", "tap0", "-f", "-q", "-n", "-s", str(script)], timeout=30
        )
        lines = (tmp / "lease").read_text().splitlines()
        lease = dict(line.split("=", 1) for line in lines if "=" in line)
        print(f"lease: ip={lease['ip']} router={lease['router']}", end=" ")
        print(f"dns={lease.get('dns')} mtu={lease.get('mtu')}")

        step("guest: IPv6 by SLAAC from ferryd's router advertisements")
        wait_for(
            lambda: (
                "dynamic"
                in topo.guest.run(["ip", "-6", "addr", "show", "tap0", "scope", "global"]).stdout
            ),
            timeout=20,
            what="a SLAAC address",
        )
        show(["ip", "addr", "show", "tap0"], topo.guest.exec_prefix())
        show(["ip", "-6", "route", "show", "default"], topo.guest.exec_prefix())

        step("guest: ping both peers over both families")
        for addr in (*topo.peers_v4, *topo.peers_v6):
            ok = topo.guest.ping(addr, count=2)
            print(f"ping {addr}: {'ok' if ok else 'FAILED'}")
            if not ok:
                raise SystemExit(f"demo failed: no reply from {addr}")

        step("guest -> peer: 1,000 UDP datagrams, each checked byte for byte")
        server = topo.peer.popen(
            [PY, UDPTOOL, "server", topo.peers_v4[1], "7000"], stdout=subprocess.PIPE
        )
        assert server.stdout is not None
        server.stdout.readline()
        res = topo.guest.run([PY, UDPTOOL, "client", topo.peers_v4[1], "7000", "1000"], timeout=60)
        print(res.stdout.strip())

        step("peer -> guest: inbound UDP forward host:5300 -> guest:5300")
        gserver = topo.guest.popen([PY, UDPTOOL, "server", "::", "5300"], stdout=subprocess.PIPE)
        assert gserver.stdout is not None
        gserver.stdout.readline()
        res = topo.peer.run([PY, UDPTOOL, "client", topo.host_v4, "5300", "100"], timeout=60)
        print(res.stdout.strip(), "(the guest saw the peer's own address)")

        step("ferryctl status / flows")
        status = json.loads(show([str(BIN / "ferryctl"), "--control", ctl, "status"]))
        show([str(BIN / "ferryctl"), "--control", ctl, "flows"])
        print(
            f"\nframes in/out: {status['counters']['frames_in']}/{status['counters']['frames_out']}"
        )
        print("\ndemo finished: the guest got its addresses from ferryd and reached its peers.")
    except BaseException:
        print("\n--- ferryd log ---\n" + (tmp / "ferryd.log").read_text(), file=sys.stderr)
        raise
    finally:
        ferryd.terminate()
        ferryd.wait(10)
        log.close()


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("the demo needs root: it creates network namespaces and a tap device")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ferry-demo-") as tmp, build_topology() as topo:
        run_demo(topo, Path(tmp))
    print(f"(took {time.monotonic() - started:.1f} s; namespaces removed)")


if __name__ == "__main__":
    main()
