"""The main job, end to end, in throwaway network namespaces (run as root).

1. Build two "hosts" that carry the same address and MAC (A, the source,
   and B, the target), a peer behind a bridge that A is plugged into, and
   an empty "guest" namespace. Start ferry-repair (the one privileged
   helper).
2. Start ferryd in host A; it creates tap0 in the guest.
3. The guest configures itself the way a VM would: busybox udhcpc for IPv4
   (DHCP from ferryd) and the kernel's SLAAC for IPv6 (router
   advertisements from ferryd); it pings the peer over both families.
4. The guest opens 200 TCP connections to the peer: 10 move data both ways
   at full speed, 190 sit idle; every byte is checked against a pattern.
5. A second ferryd starts in host B with --incoming; ``ferryctl migrate``
   moves every connection from A to B while the streams run, and the
   peer's link is switched from A to B, as a data centre fabric would.
6. The streams go on through B; then every connection, busy and idle,
   exchanges its last bytes and is checked end to end.

Everything is removed at the end, also on failure or Ctrl-C.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from testbed.netns import Netns
from testbed.paths import FERRY_REPAIR, FERRYCTL, FERRYD, STREAMTOOL, VENV_BIN
from testbed.topology import TwoHostTopology, two_host_topology
from testbed.wait import wait_for

PY = str(VENV_BIN / "python")
RECORDER = """#!/bin/sh
[ "$1" = bound ] && ip addr add "$ip/$mask" dev "$interface" && ip route add default via "$router"
env > "{out}"
"""
BUSY, IDLE = 10, 190


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def ferryctl(*args: str) -> str:
    return subprocess.run([str(FERRYCTL), *args], check=True, capture_output=True, text=True).stdout


def ask(client: subprocess.Popen[str], line: str) -> dict[str, Any]:
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(line + "\n")
    client.stdin.flush()
    answer: dict[str, Any] = json.loads(client.stdout.readline())
    return answer


def start_ferryd(ns: Netns, log: IO[bytes], *args: str) -> subprocess.Popen[bytes]:
    return ns.popen([str(FERRYD), *args], stdout=log, stderr=subprocess.STDOUT)


def run_demo(topo: TwoHostTopology, guest: Netns, tmp: Path) -> None:
    repair_sock, ctl_a, ctl_b = str(tmp / "repair.sock"), str(tmp / "a.sock"), str(tmp / "b.sock")
    logs = {name: (tmp / f"{name}.log").open("wb") for name in ("repair", "a", "b")}
    procs: list[subprocess.Popen[bytes]] = []
    addressing = ["-a", f"{topo.host_v4}/24", "-g", topo.peers_v4[0], "-a", f"{topo.host_v6}/64"]
    try:
        step("ferry-repair, the privileged helper (CAP_NET_ADMIN only)")
        procs.append(
            subprocess.Popen(
                # ferryd runs as nobody once set up (daemon/privileges.py).
                [str(FERRY_REPAIR), "--listen", repair_sock, "--allow-uid", "65534"],
                stdout=logs["repair"],
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(lambda: os.path.exists(repair_sock), what="ferry-repair's socket")

        step("ferryd in host A, serving tap0 in the guest namespace")
        procs.append(
            start_ferryd(
                topo.host_a,
                logs["a"],
                "--netns",
                guest.path,
                "--control",
                ctl_a,
                "--repair-socket",
                repair_sock,
                "-D",
                topo.peers_v4[0],
                *addressing,
            )
        )
        ferryctl("--control", ctl_a, "status", "--wait", "15")
        print(f"ferryd A (pid {procs[-1].pid}) is ready")

        step("guest: DHCP with busybox udhcpc, SLAAC from ferryd's router advertisements")
        script = tmp / "udhcpc.sh"
        script.write_text(RECORDER.format(out=tmp / "lease"))
        script.chmod(0o755)
        guest.run(
            ["busybox", "udhcpc", "-i", "tap0", "-f", "-q", "-n", "-s", str(script)], timeout=30
        )
        lines = (tmp / "lease").read_text().splitlines()
        lease = dict(line.split("=", 1) for line in lines if "=" in line)
        print(f"DHCP lease: ip={lease['ip']} router={lease['router']} mtu={lease.get('mtu')}")
        wait_for(
            lambda: (
                "dynamic"
                in guest.run(["ip", "-6", "addr", "show", "tap0", "scope", "global"]).stdout
            ),
            timeout=20,
            what="a SLAAC address",
        )
        for addr in (topo.peers_v4[0], topo.peers_v6[0]):
            ok = guest.ping(addr, count=2)
            print(f"ping {addr}: {'ok' if ok else 'FAILED'}")
            if not ok:
                raise SystemExit(f"demo failed: no reply from {addr}")

        step(f"guest -> peer: {BUSY} busy and {IDLE} idle TCP connections, every byte checked")
        server = topo.peer.popen(
            [PY, STREAMTOOL, "server", "0.0.0.0", "7000"], stdout=subprocess.PIPE, text=True
        )
        procs.append(server)
        assert server.stdout is not None
        server.stdout.readline()  # {"listening": 7000}: only then may the guest connect
        client = guest.popen(
            [PY, STREAMTOOL, "client", topo.peers_v4[0], "7000", f"busy:{BUSY}", f"idle:{IDLE}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        print(client.stdout.readline().strip())
        time.sleep(1)
        before = ask(client, "report")
        print(f"so far: {json.dumps(before)}")

        step("ferryd in host B as the migration target (--incoming)")
        procs.append(
            start_ferryd(
                topo.host_b,
                logs["b"],
                "--incoming",
                "--netns",
                guest.path,
                "--control",
                ctl_b,
                "--repair-socket",
                repair_sock,
                *addressing,
            )
        )
        ferryctl("--control", ctl_b, "status", "--wait", "15")

        step(
            "ferryctl migrate --source A --target B (streams still running), then the fabric moves"
        )
        print(ferryctl("migrate", "--source", ctl_a, "--target", ctl_b).rstrip())
        topo.switch_to_b()
        print("fabric: the peer's link now goes to host B")

        time.sleep(2)
        after = ask(client, "report")
        print(f"2 s later, through host B: {json.dumps(after)}")
        flows = json.loads(ferryctl("--control", ctl_b, "flows", "--json"))
        print(f"(host B now holds {len(flows)} flows)")

        step("every connection finishes its exchange; both ends check every byte")
        assert client.stdin is not None
        client.stdin.write("stop\n")
        client.stdin.flush()
        final: dict[str, Any] = {}
        for line in client.stdout:
            final = json.loads(line)
            if final.get("done"):
                break
        totals = final.get("report", {})
        print(f"checked: {json.dumps(totals)}; bad connections: {final.get('bad_count')}")
        if not final.get("ok"):
            raise SystemExit("demo failed: a connection lost or corrupted data")
        print(f"\ndemo finished: {BUSY + IDLE} connections survived the migration byte-exact.")
    except BaseException:
        for name in ("a", "b", "repair"):
            logs[name].flush()
            print(
                f"\n--- {name} log ---\n" + (tmp / f"{name}.log").read_text()[-3000:],
                file=sys.stderr,
            )
        raise
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs.values():
            log.close()


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("the demo needs root: it creates network namespaces and a tap device")
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="ferry-demo-") as tmp,
        two_host_topology() as topo,
        Netns("guest") as guest,
    ):
        Path(tmp).chmod(0o755)  # ferryd, as nobody, reaches ferry-repair's socket in it
        run_demo(topo, guest, Path(tmp))
    print(f"(took {time.monotonic() - started:.1f} s; namespaces removed)")


if __name__ == "__main__":
    main()
