"""Checked TCP traffic inside a test VM (busybox only), against tcptool's echo server.

What the VM migration tests share (tests/integration/vm: the stream
netdev driven by ferryctl, vhost-user driven by QEMU): one *busy*
connection carrying data both ways for the whole test (a loop writes
random 16 KiB blocks, recorded by ``tee``, into ``nc``; what comes back is
written to a file) and *idle* ones (``nc`` reading a FIFO whose writer
stays open), each of which echoes a line when asked. :func:`finish`
ends them all and checks that every byte crossed both ways, in order
(the byte count and SHA-256 of what the busy connection sent and of what
came back are equal) and that each idle connection ends cleanly on its
half-close.

Many connections at once (the bench, ``make demo VM=1``): the guest's
``/bin/guest_conns`` (testbed/guest_conns.c, one process, every byte
checked as it comes back) is started by :func:`start_conns`, waited for
by :func:`wait_conns_ready` and, after the migration, told to finish and
read by :func:`finish_conns`.

:func:`inbound` checks the other direction: a connection from the peer
through a port the back-end forwards reaches a listener in the guest.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from testbed.netns import Netns
from testbed.vm import Guest
from testbed.wait import wait_for

__all__ = [
    "BLOCK",
    "ECHO_PORT",
    "ConnsResult",
    "echo_idle",
    "finish",
    "finish_conns",
    "idle_still_running",
    "inbound",
    "open_connections",
    "size",
    "start_conns",
    "wait_conns_ready",
    "wait_echoed",
]

#: Where the tests' echo server (tcptool ``echo``) listens on the peer.
ECHO_PORT = 7000
#: The busy connection's writer: 16 KiB of random data, then a 20 ms pause
#: (bounded: everything sent and echoed is kept in the guest's tmpfs).
BLOCK = 16 << 10


def size(vm: Guest, path: str) -> int:
    """The size of a file in the guest; 0 while it does not exist.

    A program started in the guest's background (``cmd &``) may not have
    created its output yet when the command channel answers.
    """
    output = vm.check(f"if [ -e {path} ]; then wc -c <{path}; else echo 0; fi").strip()
    return int(output)


def open_connections(vm: Guest, peer: str, idle: int, port: int = ECHO_PORT) -> None:
    """The busy connection (data both ways until /tmp/stop exists) and *idle* idle ones."""
    vm.check(
        "rm -f /tmp/stop; (while [ ! -e /tmp/stop ]; do"
        f" dd if=/dev/urandom bs={BLOCK} count=1 2>/dev/null; usleep 20000; done)"
        f" | tee /tmp/sent | nc {peer} {port} >/tmp/echoed 2>/tmp/busy.err &"
        " echo $! >/tmp/busy.pid"
    )
    # Each idle nc reads a FIFO whose writer (a sleep) stays open: no EOF until it is killed.
    vm.check(
        f"for i in $(seq {idle}); do mkfifo /tmp/in$i;"
        " sleep 600 >/tmp/in$i & echo $! >/tmp/hold$i;"
        f" nc {peer} {port} </tmp/in$i >/tmp/out$i 2>&1 & echo $! >/tmp/idle$i.pid;"
        " done"
    )


def wait_echoed(vm: Guest, at_least: int, what: str, timeout: float = 60) -> None:
    """Until the busy connection got back at least *at_least* bytes in all."""
    wait_for(
        lambda: size(vm, "/tmp/echoed") >= at_least,
        timeout=timeout,
        interval=0.2,
        what=what,
    )


def echo_idle(vm: Guest, idle: int, word: str) -> None:
    """Each idle connection sends one line; wait until each got back all it sent so far."""
    vm.check(f"for i in $(seq {idle}); do echo {word}-$i >/tmp/in$i; done")
    words = ("before", word) if word != "before" else ("before",)
    want = "".join(f"{w}-{i}\n" for i in range(1, idle + 1) for w in words)
    wait_for(
        lambda: vm.run(f"for i in $(seq {idle}); do cat /tmp/out$i; done").output == want,
        timeout=30,
        interval=0.2,
        what=f"the idle connections to echo {word}",
    )


def idle_still_running(vm: Guest, idle: int) -> str:
    """The idle connections whose nc has not ended, as a list of numbers."""
    return vm.check(
        f"for i in $(seq {idle}); do kill -0 $(cat /tmp/idle$i.pid) 2>/dev/null && echo $i; done;"
        " true"
    )


def finish(vm: Guest, idle: int) -> int:
    """End every connection and check them (see the module docstring); the bytes sent each way.

    The writer stops, the busy nc half-closes, the echo server closes; then
    the idle connections' FIFO writers go and each nc must end.
    """
    assert vm.check("cat /tmp/busy.err") == ""
    vm.check("touch /tmp/stop")
    wait_for(
        lambda: vm.run("kill -0 $(cat /tmp/busy.pid)").status != 0,
        timeout=30,
        interval=0.2,
        what="the busy nc to end on the echo server's close",
    )
    sent = vm.check("wc -c </tmp/sent; sha256sum </tmp/sent").split()
    echoed = vm.check("wc -c </tmp/echoed; sha256sum </tmp/echoed").split()
    assert sent[:2] == echoed[:2], f"sent {sent[:2]}, echoed {echoed[:2]}"
    vm.check(f"for i in $(seq {idle}); do kill $(cat /tmp/hold$i); done")
    wait_for(
        lambda: idle_still_running(vm, idle) == "",
        timeout=30,
        interval=0.2,
        what="every idle nc to end after its half-close",
    )
    return int(sent[0])


def inbound(peer: Netns, vm: Guest, address: str, port: int, guest_port: int) -> None:
    """A connection from *peer* to *address*:*port* (forwarded by the back-end to the
    guest's *guest_port*) reaches a listener in the guest: its line arrives there."""
    vm.check(f"nc -l -p {guest_port} >/tmp/inbound 2>&1 & echo $! >/tmp/listener.pid")
    # Listening before the peer connects: the back-end accepts on the host at
    # once, and a SYN it forwards before nc listens is answered by a reset,
    # which the peer, its line already sent, never hears of.
    wait_for(
        lambda: f":{guest_port} " in vm.run("netstat -ltn 2>/dev/null").output,
        timeout=30,
        interval=0.1,
        what=f"the guest's nc to listen on port {guest_port}",
    )
    hello = (
        "import socket;"
        f"s = socket.create_connection(({address!r}, {port}), timeout=30);"
        "s.sendall(b'inbound\\n'); s.close()"
    )
    wait_for(
        lambda: peer.run([sys.executable, "-c", hello], check=False).returncode == 0,
        timeout=30,
        interval=0.2,
        what="the peer to connect to the forwarded port",
    )
    wait_for(
        lambda: vm.run("cat /tmp/inbound").output == "inbound\n",
        timeout=30,
        interval=0.2,
        what="the guest's listener to get the peer's line",
    )


# guest_conns: many checked connections in one guest process


@dataclass(frozen=True)
class ConnsResult:
    """guest_conns' last line (``done ok=N failed=M echoed=E sent=BYTES``) and its stderr.

    ``ok``: every byte came back in order and the close completed both ways;
    ``echoed``: every byte came back (whatever the close did); ``sent``: the
    bytes sent in all, which, when every connection is ok, is also what came
    back; ``errors``: why each failed connection failed (at most 20 lines).
    """

    ok: int
    failed: int
    echoed: int
    sent: int
    errors: list[str]


def _guest_file(vm: Guest, path: str) -> str:
    return vm.run(f"cat {path} 2>/dev/null").output


def start_conns(
    vm: Guest, peer: str, count: int, busy: int, rate: float, timeout: float, port: int = ECHO_PORT
) -> None:
    """Start guest_conns in the background: *count* connections to the echo server at
    *peer*, *busy* of them streaming both ways at *rate* bytes/s in all (0: no limit);
    *timeout*: how long its final check may take (testbed/guest_conns.c)."""
    vm.check(
        f"guest_conns {peer} {port} {count} {busy} {rate:.0f} {timeout:.0f}"
        " >/tmp/conns.out 2>/tmp/conns.err & echo $! >/tmp/conns.pid"
    )


def wait_conns_ready(vm: Guest, count: int, timeout: float) -> None:
    """Until every connection has had its first chunk echoed (``ready``); fails at once,
    with its output, if guest_conns ended first (a connection refused, ...)."""

    def ready() -> bool:
        out = _guest_file(vm, "/tmp/conns.out")
        if "done" in out or vm.run("kill -0 $(cat /tmp/conns.pid)").status != 0:
            raise AssertionError(
                f"guest_conns ended before the migration: {out} {_guest_file(vm, '/tmp/conns.err')}"
            )
        return "ready" in out

    wait_for(ready, timeout=timeout, interval=0.2, what=f"{count} connections to open")


def finish_conns(vm: Guest, timeout: float) -> ConnsResult:
    """Start guest_conns' final check (SIGUSR1: another chunk each, the echo of
    everything, a half-close each way) and return its result once it has one."""
    vm.check("kill -USR1 $(cat /tmp/conns.pid)")
    wait_for(
        lambda: "done" in _guest_file(vm, "/tmp/conns.out"),
        timeout=timeout,
        interval=0.5,
        what="guest_conns to finish its check",
    )
    out = _guest_file(vm, "/tmp/conns.out")
    match = re.search(r"done ok=(\d+) failed=(\d+) echoed=(\d+) sent=(\d+)", out)
    if match is None:
        raise AssertionError(f"guest_conns said {out!r}")
    ok, failed, echoed, sent = (int(g) for g in match.groups())
    errors = _guest_file(vm, "/tmp/conns.err").splitlines()
    return ConnsResult(ok, failed, echoed, sent, errors)
