"""UDP round-trip time guest → peer → guest: ferryd against a veth pair, one run.

``python -m bench.udp_rtt [--count N]`` (root). The same topology as
bench.throughput (guest ↔ thing under test ↔ host ↔ veth ↔ peer); the
peer runs testbed/udptool.py's echo server and the guest sends
N datagrams of 64 bytes one at a time, timing each round trip. Prints the
mean, median and p99 per variant and ferryd's ratio to veth. A benchmark,
never a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import percentile
from bench.throughput import attach_ferryd, attach_veth
from testbed.paths import UDPTOOL, VENV_BIN
from testbed.topology import build_topology

PY = str(VENV_BIN / "python")

CLIENT = """
import json, socket, sys, time
addr, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
s.connect((addr, port))
times = []
for i in range(count + 100):
    payload = i.to_bytes(8, "big") * 8
    t = time.perf_counter()
    s.send(payload)
    while not s.recv(65535).startswith(payload):
        pass
    if i >= 100:
        times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def measure(variant: str, count: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="ferry-udp-") as tmp, build_topology() as topo:
        attach = attach_veth if variant == "veth" else attach_ferryd
        with attach(topo, Path(tmp)):
            server = topo.peer.popen(
                [PY, UDPTOOL, "server", "0.0.0.0", "7000"], stdout=subprocess.PIPE
            )
            assert server.stdout is not None
            server.stdout.readline()  # "listening": bound before the first datagram
            try:
                out = topo.guest.run(
                    [PY, "-c", CLIENT, topo.peers_v4[0], "7000", str(count)], timeout=120
                ).stdout
            finally:
                server.terminate()
                server.wait()
    return sorted(json.loads(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="round trips per variant")
    args = parser.parse_args(argv)
    results = {name: measure(name, args.count) for name in ("veth", "ferryd")}
    print(f"UDP round trips, 64-byte datagrams, {args.count} per variant")
    print(f"{'variant':8} {'mean µs':>9} {'p50 µs':>8} {'p99 µs':>8}")
    for name, times in results.items():
        mean = sum(times) / len(times) * 1e6
        print(
            f"{name:8} {mean:9.1f} {percentile(times, 0.5) * 1e6:8.1f} "
            f"{percentile(times, 0.99) * 1e6:8.1f}"
        )
    ratio = sum(results["ferryd"]) / sum(results["veth"])
    print(f"ferryd mean / veth mean: {ratio:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
