"""How much the helper costs: TCP_REPAIR on/off through ferry-repair vs direct setsockopt().

Run as root: ``python -m bench.repair [--sizes 1000 10000] [--rounds 5]``.

For each N, N established loopback TCP connections are made (the accepting
ends live in a child process, so that this process holds only N sockets:
the open-file hard limit here is 20,000). Then, in the same run and on the
same sockets:

* direct: this process does to each socket what the helper does — with
  repair ON, attach the drop-all filter that freezes intake, then
  setsockopt(TCP_REPAIR); with OFF, detach it, then clear TCP_REPAIR —
  which is what ferryd would do if it held CAP_NET_ADMIN itself (the
  reference). The filter is the helper's eBPF program, loaded once and
  attached by reference (~1.4 µs a socket); a classic BPF filter would be
  compiled per socket (~10 µs), far more than TCP_REPAIR itself;
* helper: ferryd's RepairClient hands them to a ferry-repair (``--listen``)
  in batches of up to 253, pipelined.

Each is timed for repair on and repair off (with the kernel's window probe,
as in a real rollback or restore); rounds alternate direct and helper so that
both see the same machine, and the best of ``--rounds`` counts. The
per-socket cost and the helper/direct ratio (on+off) are printed. Target:
ratio <= 2.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from ferry_repair.dropall import SO_ATTACH_BPF, load_drop_all
from ferry_repair.protocol import TCP_REPAIR
from ferry_repair.repair import DROP_ALL_FPROG, SO_ATTACH_FILTER, SO_DETACH_FILTER
from ferryd.linux import TCP_REPAIR_QUEUE
from ferryd.migration.repair_client import RepairClient, RepairMode
from testbed.repair import raise_fd_limit

REPO = Path(__file__).resolve().parents[1]

# The accepting side: listens, reports its port, accepts n, holds them until stdin closes.
PEER = """
import socket, sys
n = int(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
print(listener.getsockname()[1], flush=True)
held = [listener.accept()[0] for _ in range(n)]
print("accepted", flush=True)
sys.stdin.read()
"""


def connections(n: int) -> tuple[list[socket.socket], subprocess.Popen[str]]:
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=raise_fd_limit,
    )
    assert peer.stdout is not None
    port = int(peer.stdout.readline())
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    assert peer.stdout.readline().strip() == "accepted"
    return socks, peer


#: The helper's drop-all eBPF program (repair_helper/dropall.py), loaded as it does.
DROP_ALL_BPF = load_drop_all()


def direct(socks: list[socket.socket], value: int) -> None:
    for sock in socks:
        if value == 1 and DROP_ALL_BPF is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, DROP_ALL_BPF)
        elif value == 1:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, DROP_ALL_FPROG)
        else:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, value)


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def compare(path: Path, socks: list[socket.socket], rounds: int) -> dict[str, float]:
    """Best time of each of the four operations; rounds interleave direct and helper."""

    async def main() -> dict[str, float]:
        best = dict.fromkeys(("direct on", "direct off", "helper on", "helper off"), math.inf)

        async def helper_time(mode: RepairMode) -> float:
            start = time.perf_counter()
            await client.set_repair(socks, mode)
            return time.perf_counter() - start

        async with await RepairClient.connect(path) as client:
            for _ in range(rounds):
                times = {
                    "direct on": timed(lambda: direct(socks, 1)),
                    "direct off": timed(lambda: direct(socks, 0)),
                    "helper on": await helper_time(RepairMode.ON),
                    "helper off": await helper_time(RepairMode.OFF),
                }
                best = {key: min(best[key], times[key]) for key in best}
        return best

    return trio.run(main)


def in_repair(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, 0)
    except PermissionError:
        return False
    return True


def start_helper(path: Path) -> subprocess.Popen[bytes]:
    helper = subprocess.Popen(
        [sys.executable, "-m", "ferry_repair.main", "--listen", str(path)],
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    assert helper.stderr is not None
    for line in helper.stderr:  # wait for it to serve
        if b"serving" in line:
            return helper
    raise RuntimeError(f"ferry-repair did not start (exit status {helper.wait()})")


def measure(n: int, rounds: int, path: Path) -> None:
    socks, peer = connections(n)
    try:
        best = compare(path, socks, rounds)
        d_on, d_off = best["direct on"], best["direct off"]
        h_on, h_off = best["helper on"], best["helper off"]
        # Sanity: the helper really switched them (off now, on after one more ON).
        assert not any(in_repair(s) for s in socks)
        d_total, h_total = d_on + d_off, h_on + h_off
        us = 1e6 / n
        print(
            f"N={n:>6}  direct: on {d_on * us:5.2f} off {d_off * us:5.2f} = {d_total * us:5.2f} us"
            f"/socket | helper: on {h_on * us:5.2f} off {h_off * us:5.2f} ="
            f" {h_total * us:5.2f} us/socket | ratio {h_total / d_total:.2f}"
            f" (on {h_on / d_on:.2f}, off {h_off / d_off:.2f})"
        )
    finally:
        for sock in socks:
            sock.close()
        if peer.stdin is not None:
            peer.stdin.close()
        peer.wait()
        if peer.stdout is not None:
            peer.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.repair: TCP_REPAIR needs root (run as root)")
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        path = Path(tmp) / "repair.sock"
        helper = start_helper(path)
        try:
            print(f"TCP_REPAIR on+off, best of {args.rounds}; helper = ferry-repair, pipelined")
            for n in args.sizes:
                measure(n, args.rounds, path)
        finally:
            helper.terminate()
            helper.wait()
            if helper.stderr is not None:
                helper.stderr.close()


if __name__ == "__main__":
    main()
