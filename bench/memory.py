"""ferryd's own memory per idle TCP flow, at 1,000 and 16,384 connections.

Run as root: ``python -m bench.memory [--counts 1000 16384]`` (bench/README.md).

It builds the throughput bench's namespaces (testbed/topology.py: guest ──
ferryd, tap mode ── host ── veth ── peer), starts ``ferryd --tap tap0
--config-net --max-flows MAX`` in the host namespace, and a connection
holder in the guest that opens idle TCP connections to a holder in the peer
(two peer addresses × two ports, so that neither side runs short of
ephemeral ports), in steps: first a warm-up of ``--warmup`` connections
(what the first flows allocate once: code paths, caches, the table's first
sizes), then up to each count. After each step, once ferryd's status counts
every connection, it reads ferryd's /proc/PID/smaps_rollup: Rss, Pss and
private (Private_Clean + Private_Dirty: the USS, what ferryd alone costs).
The per-flow figure is the growth since the warm-up divided by the flows
added since. The reference is the kernel's own cost of one of ferryd's
host sockets, from /proc/slabinfo (the TCP or TCPv6 socket, its file, its
dentry and inode, its epoll item): what every flow costs the machine
whatever ferryd does. The target (issue 12): ≤ 1 KiB per idle flow.

Nothing is asserted; the exit status is 0 unless the bench cannot run (2:
not root; 1: ferryd or the holders failed, with the reason).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import end_on_signals
from ferryd.control import request
from testbed.netns import Netns
from testbed.paths import FERRYD
from testbed.topology import Topology, build_topology
from testbed.wait import wait_for

COUNTS = (1000, 16384)
PORTS = (9500, 9501)
TARGET_BYTES = 1024
#: Slab caches one of ferryd's host sockets occupies an object in (the
#: socket's family decides between TCP and TCPv6; these are IPv4).
KERNEL_SLABS = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi")


def _raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard one (16,384 flows need ~16,500 descriptors
    in each of ferryd and the two holders; the hard limit itself may not be raised
    in a container without CAP_SYS_RESOURCE)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the connection holders (run in the namespaces) ---------------------------


def serve(addrs: Sequence[str], ports: Sequence[int]) -> None:
    """Accept on every address and port and keep every connection open, idle."""
    _raise_nofile()
    held: list[socket.socket] = []
    listeners = []
    for addr in addrs:
        for port in ports:
            lst = socket.socket()
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind((addr, port))
            lst.listen(4096)
            listeners.append(lst)
    print("listening", flush=True)
    poller = select.poll()
    by_fd = {lst.fileno(): lst for lst in listeners}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            conn, _peer = by_fd[fd].accept()
            held.append(conn)


def connect(addrs: Sequence[str], ports: Sequence[int]) -> None:
    """Read "open N" lines: open idle connections until N are open, answer "open N"."""
    _raise_nofile()
    targets = [(a, p) for a in addrs for p in ports]
    held: list[socket.socket] = []
    for line in sys.stdin:
        want = int(line.split()[1])
        while len(held) < want:
            batch: list[socket.socket] = []
            for _ in range(min(256, want - len(held))):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                sock.connect_ex(targets[(len(held) + len(batch)) % len(targets)])
                batch.append(sock)
            for sock in batch:
                poller = select.poll()  # (select() stops at descriptor 1023)
                poller.register(sock, select.POLLOUT)
                poller.poll(30_000)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    print(json.dumps({"error": os.strerror(err), "open": len(held)}), flush=True)
                    return
                held.append(sock)
        print(json.dumps({"open": len(held)}), flush=True)


# --- the bench -------------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Pss and private bytes (USS) of ``pid``, from /proc/PID/smaps_rollup."""
    kb: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        kb[key] = int(rest.split()[0])
    return {
        "rss": kb["Rss"] * 1024,
        "pss": kb["Pss"] * 1024,
        "private": (kb["Private_Clean"] + kb["Private_Dirty"]) * 1024,
    }


def kernel_socket_bytes() -> tuple[int, str]:
    """One socket's slab objects (KERNEL_SLABS found in /proc/slabinfo): total and detail."""
    sizes = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
            fields = line.split()
            if fields[0] in KERNEL_SLABS:
                sizes[fields[0]] = int(fields[3])
    detail = " + ".join(f"{name} {size}" for name, size in sizes.items())
    return sum(sizes.values()), detail


class Holder:
    """One of this module's holders (serve / connect) in a namespace."""

    def __init__(self, ns: Netns, role: str, addrs: Sequence[str]) -> None:
        argv = [sys.executable, "-m", "bench.memory", f"--{role}", ",".join(addrs)]
        self.proc = ns.popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
        )
        self.lines: list[str] = []
        self._ready = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._ready:
                self.lines.append(line.strip())
                self._ready.notify_all()

    def wait_line(self, timeout: float = 300) -> str:
        with self._ready:
            answered = self._ready.wait_for(
                lambda: self.lines or self.proc.poll() is not None, timeout
            )
            if not answered:
                raise RuntimeError("holder: no answer")
            if not self.lines:
                raise RuntimeError(f"holder exited with status {self.proc.returncode}")
            return self.lines.pop(0)

    def tell(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


#: ``--trace``: ferryd under tracemalloc; each SIGUSR1 writes a snapshot to
#: the next of PATH.0, PATH.1, ... (opened at start: ferryd's syscall filter
#: forbids opening a file for writing later). For finding the biggest
#: per-flow allocations, not for the figures: tracing costs memory of its own.
_TRACED_FERRYD = """
import pickle, signal, sys, tracemalloc
path = sys.argv.pop(1)
files = [open(f"{path}.{i}", "wb") for i in range(8)]
def dump(*_):
    out = files.pop(0)
    pickle.dump(tracemalloc.take_snapshot(), out, pickle.HIGHEST_PROTOCOL)
    out.close()
tracemalloc.start(4)
signal.signal(signal.SIGUSR1, dump)
sys.argv[0] = "ferryd"
from ferryd.main import main
sys.exit(main())
"""


@contextlib.contextmanager
def _ferryd(
    topo: Topology, workdir: Path, max_flows: int, trace: bool
) -> Iterator[tuple[int, str]]:
    control = str(workdir / "ferryd.sock")
    traced = [sys.executable, "-c", _TRACED_FERRYD, str(workdir / "snapshot")]
    argv = [
        *(traced if trace else [str(FERRYD)]),
        "--netns", topo.guest.path, "--tap", "tap0", "--config-net",
        "--control", control, "--max-flows", str(max_flows),
    ]  # fmt: skip
    with (workdir / "ferryd.log").open("wb") as log:
        proc = topo.host.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_for(
            lambda: proc.poll() is not None or Path(control).exists(),
            timeout=120,  # (slow to start under --trace)
            what="ferryd's control",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"ferryd exited: {(workdir / 'ferryd.log').read_text()[-500:]}")
        wait_for(lambda: _tcp_flows(control) >= 0, what="ferryd to answer")
        yield proc.pid, control
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _tcp_flows(control: str) -> int:
    try:
        status: dict[str, Any] = request(control, "status")
    except OSError:
        return -1
    return int(status["flows"]["tcp"])


def measure(counts: Sequence[int], warmup: int, trace: bool = False) -> list[dict[str, Any]]:
    """Memory of one ferryd after warmup, then after each count of idle connections."""
    rows: list[dict[str, Any]] = []
    snapshots: list[tracemalloc.Snapshot] = []
    with (
        tempfile.TemporaryDirectory(prefix="ferry-memory-") as tmp,
        build_topology() as topo,
        _ferryd(topo, Path(tmp), max(counts) + 100, trace) as (pid, control),
    ):
        addrs = list(topo.peers_v4)
        server = Holder(topo.peer, "serve", addrs)
        client = Holder(topo.guest, "connect", addrs)
        try:
            server.wait_line()
            for count in (warmup, *counts):
                client.tell(f"open {count}")
                answer = json.loads(client.wait_line())
                if "error" in answer:
                    raise RuntimeError(f"the guest could not open {count}: {answer}")
                wait_for(
                    lambda c=count: _tcp_flows(control) >= c,  # type: ignore[misc]
                    timeout=120,
                    what=f"ferryd to count {count} TCP flows",
                )
                rows.append({"flows": _tcp_flows(control), **smaps_rollup(pid)})
                if trace:
                    path = Path(tmp) / f"snapshot.{len(snapshots)}"
                    snapshots.append(_snapshot(pid, path))
        finally:
            client.stop()
            server.stop()
    if trace:
        added = rows[-1]["flows"] - rows[0]["flows"]
        print(f"biggest allocations per flow (tracemalloc, {added} flows added):")
        for stat in snapshots[-1].compare_to(snapshots[0], "lineno")[:25]:
            per_flow = f"{stat.size_diff / added:8.0f} B {stat.count_diff / added:5.2f}"
            print(f"  {per_flow}  {stat.traceback}")
    return rows


def _snapshot(pid: int, path: Path) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    found: list[tracemalloc.Snapshot] = []

    def written() -> bool:
        try:
            found.append(tracemalloc.Snapshot.load(str(path)))
        except (EOFError, pickle.UnpicklingError):  # (still being written)
            return False
        return True

    wait_for(written, timeout=120, what="ferryd's snapshot")
    return found[0]


def report(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    kernel, detail = kernel_socket_bytes()
    lines = [
        f"ferryd memory per idle TCP flow (growth since {base['flows']} warm-up flows:"
        f" Rss {base['rss'] / 2**20:.1f} MiB, private {base['private'] / 2**20:.1f} MiB)",
        f"reference: the kernel's own objects per host socket, {kernel} B ({detail})",
        f"{'flows':>7} {'Rss MiB':>8} {'Pss MiB':>8} {'USS MiB':>8}"
        f" {'Rss B/flow':>11} {'USS B/flow':>11} {'USS/kernel':>10}  target ≤ {TARGET_BYTES} B",
    ]
    for row in rows[1:]:
        added = row["flows"] - base["flows"]
        rss = (row["rss"] - base["rss"]) / added
        uss = (row["private"] - base["private"]) / added
        verdict = "met" if uss <= TARGET_BYTES else "not met"
        ratio = f"{uss / kernel:.2f}" if kernel else "-"
        lines.append(
            f"{row['flows']:>7} {row['rss'] / 2**20:>8.1f} {row['pss'] / 2**20:>8.1f}"
            f" {row['private'] / 2**20:>8.1f} {rss:>11,.0f} {uss:>11,.0f} {ratio:>10}  {verdict}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="also print the raw figures")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="run ferryd under tracemalloc and print the biggest allocations per flow",
    )
    parser.add_argument("--serve", metavar="ADDRS", help=argparse.SUPPRESS)
    parser.add_argument("--connect", metavar="ADDRS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve.split(","), PORTS)
        return 0
    if args.connect:
        connect(args.connect.split(","), PORTS)
        return 0
    if os.geteuid() != 0:
        print("bench.memory needs root (network namespaces, taps)", file=sys.stderr)
        return 2
    _raise_nofile()  # ferryd inherits it: its budget covers the largest count
    end_on_signals()
    try:
        rows = measure(sorted(args.counts), args.warmup, args.trace)
    except (RuntimeError, AssertionError) as exc:
        print(f"bench.memory failed: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(report(rows))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
