"""testbed/guest_conns.c, the guest's checked connections, judged from outside.

The program runs in the VM benchmarks' guest (bench/qemu_migration.py)
and is the only judge there of whether a connection survived a migration;
a judge that cannot fail would make every row "survived". So it is
compiled here as the guest image compiles it (``gcc -static``) and run on
the host, against three echo servers on loopback: a faithful one
(every connection must pass, with data streaming both ways on the busy
ones), one that changes a single byte of one connection's echo, and one
that closes one connection before echoing all of it, and one that echoes
everything but never closes one connection (each must be reported as
exactly one failed connection, with the reason; only the last one counts
as echoed).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.guest_image import GUEST_CONNS_SOURCE

pytestmark = [pytest.mark.integration]

Handler = Callable[[socket.socket, int], None]


@pytest.fixture(scope="module")
def guest_conns(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing (the guest image needs it too)")
    binary = tmp_path_factory.mktemp("gc") / "guest_conns"
    subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-o", str(binary), str(GUEST_CONNS_SOURCE)],
        check=True,
        capture_output=True,
    )
    return binary


def _faithful(conn: socket.socket, number: int) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def _flips_byte(conn: socket.socket, number: int) -> None:
    """Connection number 3 gets its byte 1,500 back changed; the others are echoed."""
    offset = 0
    while data := bytearray(conn.recv(65536)):
        if number == 3 and offset <= 1500 < offset + len(data):
            data[1500 - offset] ^= 0x01
        offset += len(data)
        conn.sendall(data)


def _closes_early(conn: socket.socket, number: int) -> None:
    """Connection number 5 is closed after its first 1,000 bytes; the others are echoed."""
    offset = 0
    while data := conn.recv(65536):
        conn.sendall(data)
        offset += len(data)
        if number == 5 and offset >= 1000:
            return


def _never_closes(conn: socket.socket, number: int) -> None:
    """Connection number 7 is echoed whole, never closed (as passt left some after migrating)."""
    _faithful(conn, number)
    if number == 7:
        threading.Event().wait(30)


def _serve(handler: Handler) -> tuple[int, Callable[[], None]]:
    """An echo server on loopback (an ephemeral port), *handler* per connection in a thread.

    Returns the port and a function that closes the listener.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)

    def serve(conn: socket.socket, number: int) -> None:
        with conn, contextlib.suppress(OSError):
            handler(conn, number)

    def accept() -> None:
        for number in itertools.count():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn, number), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1], listener.close


def _run_conns(
    binary: Path, handler: Handler, count: int, busy: int, timeout: int = 20
) -> tuple[int, str, str]:
    """guest_conns against an echo server; SIGUSR1 once it is ready; (status, stdout, stderr)."""
    port, close = _serve(handler)
    proc = subprocess.Popen(
        [str(binary), "127.0.0.1", str(port), str(count), str(busy), "2000000", str(timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first == f"ready {count}\n", (first, proc.stderr.read() if proc.stderr else "")
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, first + out, err
    finally:
        close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _done(out: str) -> dict[str, int]:
    match = re.search(r"^done ok=(\d+) failed=(\d+) echoed=(\d+) sent=(\d+)$", out, re.M)
    assert match is not None, out
    return {
        k: int(v) for k, v in zip(("ok", "failed", "echoed", "sent"), match.groups(), strict=True)
    }


def test_every_connection_passes_through_a_faithful_echo(guest_conns: Path) -> None:
    status, out, err = _run_conns(guest_conns, _faithful, count=200, busy=4)
    done = _done(out)
    assert (status, done["ok"], done["failed"], done["echoed"], err) == (0, 200, 0, 200, "")
    # Every connection sent two chunks of 1,000 bytes, the busy ones more.
    assert done["sent"] > 200 * 2000


def test_one_changed_byte_fails_that_connection_only(guest_conns: Path) -> None:
    status, out, err = _run_conns(guest_conns, _flips_byte, count=10, busy=0)
    assert status == 1
    assert (_done(out)["ok"], _done(out)["failed"], _done(out)["echoed"]) == (9, 1, 9)
    assert "echoed byte 1500 differs" in err, err


def test_an_early_close_fails_that_connection_only(guest_conns: Path) -> None:
    status, out, err = _run_conns(guest_conns, _closes_early, count=10, busy=2)
    assert status == 1
    assert (_done(out)["ok"], _done(out)["failed"], _done(out)["echoed"]) == (9, 1, 9)
    assert "connection" in err and ("EOF from the server" in err or "recv" in err), err


def test_a_close_that_never_comes_fails_but_counts_as_echoed(guest_conns: Path) -> None:
    status, out, err = _run_conns(guest_conns, _never_closes, count=10, busy=0, timeout=2)
    assert status == 1
    assert (_done(out)["ok"], _done(out)["failed"], _done(out)["echoed"]) == (9, 1, 10)
    assert "timeout: 2000 sent, 2000 echoed" in err, err
