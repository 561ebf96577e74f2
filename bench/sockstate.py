"""What moving a TCP connection costs in the kernel half: sockstate's phases per connection.

Run as root: ``python -m bench.sockstate [--sizes 1000 5000] [--rounds 3] [--queued 0 65536]``.

The benchmark re-executes itself in a private network namespace (``unshare
--net``), so it never touches the machine's own network. There, for each N
and each queue size Q, it makes N loopback connections, has each end write
Q bytes that the other does not read (so every connection has Q bytes in
its send queue or the peer's receive queue, and Q in its own receive queue), and
moves the client ends as ferryd would on one host (REFERENCE.md "same
host"): freeze intake + repair ON, dump, then create + repair ON, close the
source silently + restore, repair OFF, finish. Repair mode is set directly
(set_repair_direct), so the helper's cost is not included: bench.repair
measures that. Every connection is then checked to carry one more message
each way. The best of ``--rounds`` is printed per phase, in microseconds per
connection; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ferryd.migration.kernel_state import TcpKernelState
from ferryd.migration.repair_client import RepairMode
from ferryd.migration.sockstate import (
    close_silently,
    dump_tcp,
    finish_restore,
    new_socket_for,
    restore_in_repair,
)
from testbed.sockstate_tools import freeze_intake, set_repair_direct

REPO = Path(__file__).resolve().parents[1]
PHASES = ("freeze+repair on", "dump", "create+repair on", "close+restore", "repair off", "finish")


def make_pairs(n: int, queued: int) -> list[tuple[socket.socket, socket.socket]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    pairs = []
    payload = b"q" * queued
    for _ in range(n):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        if queued:
            client.sendall(payload)
            server.sendall(payload)
        pairs.append((client, server))
    listener.close()
    return pairs


def timed(phase: str, times: dict[str, float], fn: Callable[[], object]) -> object:
    start = time.perf_counter()
    result = fn()
    times[phase] = time.perf_counter() - start
    return result


def one_round(n: int, queued: int) -> dict[str, float]:
    pairs = make_pairs(n, queued)
    sources = [client for client, _ in pairs]
    times: dict[str, float] = {}

    def freeze() -> None:
        for sock in sources:
            freeze_intake(sock)
        set_repair_direct(sources, RepairMode.ON)

    timed("freeze+repair on", times, freeze)
    states: list[TcpKernelState] = []
    timed("dump", times, lambda: states.extend(dump_tcp(sock) for sock in sources))

    targets: list[socket.socket] = []

    def create() -> None:
        targets.extend(new_socket_for(state, socket.socket) for state in states)
        set_repair_direct(targets, RepairMode.ON)

    timed("create+repair on", times, create)

    def restore() -> None:
        for source, target, state in zip(sources, targets, states, strict=True):
            close_silently(source)
            restore_in_repair(target, state)

    timed("close+restore", times, restore)
    timed("repair off", times, lambda: set_repair_direct(targets, RepairMode.OFF))

    def finish() -> None:
        for target, state in zip(targets, states, strict=True):
            target.setblocking(False)
            if finish_restore(target, state) != state.unsent:
                raise SystemExit("a restored send queue did not fit at once; lower --queued")

    timed("finish", times, finish)
    check(targets, [server for _, server in pairs], queued)
    for sock in targets + [server for _, server in pairs]:
        # Abort (RST) rather than close: no TIME_WAIT, so later rounds find free ports.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return times


def check(targets: list[socket.socket], servers: list[socket.socket], queued: int) -> None:
    """Each moved connection delivers its queue plus one message, both ways."""
    for target, server in zip(targets, servers, strict=True):
        target.settimeout(10)
        target.sendall(b"!")
        server.sendall(b"!")
        for sock in (target, server):
            got = 0
            sock.settimeout(10)
            while got < queued + 1:
                try:
                    data = sock.recv(1 << 20)
                except TimeoutError:
                    raise SystemExit("a moved connection stalled") from None
                if not data:
                    raise SystemExit("a moved connection was closed")
                got += len(data)


def inner(args: argparse.Namespace) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(
        f"{'N':>6} {'queued':>8}  " + "  ".join(f"{p:>16}" for p in PHASES) + "  total us/conn",
        flush=True,
    )
    for n in args.sizes:
        for queued in args.queued:
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for phase, secs in one_round(n, queued).items():
                    best[phase] = min(best.get(phase, secs), secs)
            per = {phase: best[phase] / n * 1e6 for phase in PHASES}
            cells = "  ".join(f"{per[p]:>16.1f}" for p in PHASES)
            print(f"{n:>6} {queued:>8}  {cells}  {sum(per.values()):>13.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000])
    parser.add_argument("--queued", type=int, nargs="+", default=[0, 65536])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root: TCP_REPAIR needs CAP_NET_ADMIN")
    print("per-connection cost in microseconds (best of rounds), loopback, direct repair")
    command = ["unshare", "--net", sys.executable, "-m", "bench.sockstate", "--inner"]
    command += ["--sizes", *map(str, args.sizes), "--queued", *map(str, args.queued)]
    command += ["--rounds", str(args.rounds)]
    raise SystemExit(subprocess.run(command, cwd=REPO, check=False).returncode)


if __name__ == "__main__":
    main()
