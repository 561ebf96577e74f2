"""Issue 9, item 5: an allowed caller must not take over another user's port.

TCP_REPAIR=1 sets the socket's sk_reuse to SK_FORCE_REUSE (net/ipv4/tcp.c,
do_tcp_setsockopt), and inet_csk_get_port() lets a socket so marked bind
any port whatever else is bound there, a listener included. So before the
fix an allowed caller (uid 65534 here, as a guest-exploited ferryd would
be) could have repair turned on for a socket of its own, bind it to a port
root's service listens on, listen, and receive root's clients: a socket
bound to the exact address wins over root's wildcard listener
(inet_lhash2_lookup's scoring).

The attacker runs as a real second process (uid 65534, setuid in a forked
interpreter); root's service is a real listener; root's client is a real
connect(). Two ways in: a fresh (unbound) socket, and a connected socket
whose automatically chosen port is released again by connect(AF_UNSPEC)
in repair mode (tcp_disconnect → tcp_set_state(TCP_CLOSE) → inet_put_port,
since no bind() locked the port): "bound or connected" alone is no rule.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry_repair.protocol import TCP_REPAIR, RequestRefused
from ferry_repair.repair import _drop_forced_reuse_untrusted
from testbed.repair import WAIT_SECONDS, listening_helper
from tests.integration.test_repair_support import (
    TcpConnections,
    clear_repair,
    public_tmp_dir,
    repair_states,
    send_batch,
    unix_client,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("root_only")]

# The attacker: uid 65534, allowed by --allow-uid 65534. Prints one line per
# step so the test sees how far it got. argv: helper socket, victim port, way.
ATTACKER = r"""
import array, ctypes, errno, os, socket, struct, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
path, port, way = sys.argv[1], int(sys.argv[2]), sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)

def say(*words):
    print(*words, flush=True)

sock = socket.socket()
if way == "disconnect":
    own = socket.socket(); own.bind(("127.0.0.1", 0)); own.listen()
    sock.connect(own.getsockname())  # bound and connected: an automatic port
unix = socket.socket(socket.AF_UNIX); unix.settimeout(30); unix.connect(path)
unix.sendmsg([b"\x01"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))])
try:
    reply = unix.recv(1)
except ConnectionResetError:
    reply = b""
if reply != b"\x01":
    say("refused"); sys.exit()
sock.setsockopt(socket.SOL_SOCKET, 27, 0)  # SO_DETACH_FILTER: the helper's intake freeze
if way == "disconnect":
    unspec = ctypes.create_string_buffer(16)  # sa_family = AF_UNSPEC
    if libc.connect(sock.fileno(), unspec, 16) != 0:
        say("disconnect", errno.errorcode[ctypes.get_errno()]); sys.exit()
try:
    sock.bind(("127.0.0.1", port))
    sock.listen()
except OSError as exc:
    say("bind/listen", errno.errorcode[exc.errno]); sys.exit()
say("listening")
sock.settimeout(30)
conn, peer = sock.accept()  # (a child of a repair-mode listener is in repair mode too)
say("accepted root's client from", peer)
"""


@pytest.fixture
def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a second uid and TCP_REPAIR")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    with public_tmp_dir() as directory:
        yield directory


@pytest.fixture
def victim() -> Iterator[socket.socket]:
    """root's service: a listener on every address, an unused port."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        listener.settimeout(WAIT_SECONDS)
        yield listener


@pytest.mark.parametrize(
    ("way", "expected"),
    [
        # An unbound socket is refused: nothing may bind after repair ON.
        ("fresh", "refused"),
        # Switched, but without forced reuse: bind() obeys the usual rules.
        ("disconnect", "bind/listen EADDRINUSE"),
    ],
)
def test_allowed_caller_cannot_take_over_roots_port(
    public_dir: Path, victim: socket.socket, way: str, expected: str
) -> None:
    path = public_dir / "helper.sock"
    port = victim.getsockname()[1]
    with listening_helper(path, "--allow-uid", "65534") as helper:
        with subprocess.Popen(
            [sys.executable, "-c", ATTACKER, str(path), str(port), way],
            stdout=subprocess.PIPE,
            text=True,
        ) as attacker:
            try:
                assert attacker.stdout is not None
                outcome = attacker.stdout.readline().strip()
                # root's client: whoever accepts it owns root's port.
                with socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS):
                    if outcome == "listening":
                        stolen = attacker.communicate(timeout=WAIT_SECONDS)[0].strip()
                        pytest.fail(f"uid 65534 took over root's port {port}: {stolen}")
                    conn, _ = victim.accept()  # root's own service got its client
                    conn.close()
            finally:
                attacker.kill()
        assert outcome == expected
        if expected == "refused":
            assert "is not bound" in helper.wait_for_line("refused client")


OWNER_PROBE = r"""
import array, os, socket, sys
fd = int(sys.argv[2])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
unix = socket.socket(socket.AF_UNIX); unix.settimeout(30); unix.connect(sys.argv[1])
unix.sendmsg([b"\x01"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
try:
    print(unix.recv(1).hex() or "refused")
except ConnectionResetError:
    print("refused")
"""


def test_caller_cannot_repair_another_users_socket(public_dir: Path) -> None:
    """A socket root created, handed to (or inherited by) uid 65534, is not 65534's to repair."""
    path = public_dir / "helper.sock"
    with listening_helper(path, "--allow-uid", "65534") as helper, TcpConnections(1) as conns:
        mine = conns.clients[0]
        out = subprocess.run(
            [sys.executable, "-c", OWNER_PROBE, str(path), str(mine.fileno())],
            pass_fds=[mine.fileno()],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.strip() == "refused"
        line = helper.wait_for_line("refused client")
        assert "owned by uid 0" in line
        assert repair_states(conns.clients) == [False]


def test_root_caller_may_repair_any_owners_socket(public_dir: Path) -> None:
    """uid 0 owns the system whatever capabilities it holds: the owner rule spares it."""
    path = public_dir / "helper.sock"
    with listening_helper(path) as helper, unix_client(path) as unix:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            os.seteuid(65534)  # the socket's inode takes our fsuid (sock_alloc)
            try:
                theirs = socket.socket()
            finally:
                os.seteuid(0)
            with theirs:
                assert os.fstat(theirs.fileno()).st_uid == 65534
                theirs.connect(listener.getsockname())
                send_batch(unix, b"\x01", [theirs.fileno()])
                assert unix.recv(1) == b"\x01"
                clear_repair([theirs])
        assert helper.count("refused") == 0


def test_allow_forced_reuse_serves_passts_target(public_dir: Path, victim: socket.socket) -> None:
    """passt compatibility: its target hands over unbound sockets and binds them, in repair
    mode, to the port of a listener it already has; --allow-forced-reuse allows exactly that."""
    path = public_dir / "helper.sock"
    port = victim.getsockname()[1]
    with (
        listening_helper(path, "--allow-forced-reuse") as helper,
        unix_client(path) as unix,
        socket.socket() as restored,
    ):
        assert "--allow-forced-reuse" in helper.wait_for_line("any port")
        send_batch(unix, b"\x01", [restored.fileno()])
        assert unix.recv(1) == b"\x01"
        restored.bind(("127.0.0.1", port))  # next to the listener: forced reuse
        clear_repair([restored])


def test_a_socket_rebound_while_switched_is_undone() -> None:
    """The race the helper checks for: between TCP_REPAIR=1 and SO_REUSEADDR=1 a caller
    rebinds its socket over a listener and listens. Staged here by doing the caller's part
    directly (as root) before the helper's check runs on the old address."""
    with socket.socket() as victim_listener, socket.socket() as stolen:
        victim_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        victim_listener.bind(("0.0.0.0", 0))
        victim_listener.listen()
        victim_listener.settimeout(WAIT_SECONDS)
        port = victim_listener.getsockname()[1]
        before = stolen.getsockname()  # unbound: what the helper saw
        stolen.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)  # SK_FORCE_REUSE
        stolen.bind(("127.0.0.1", port))
        stolen.listen()
        with pytest.raises(RequestRefused, match="rebound by the caller"):
            _drop_forced_reuse_untrusted(stolen, 0, before)
        assert repair_states([stolen]) == [False]
        with pytest.raises(OSError):
            stolen.listen()  # as an ordinary socket it conflicts with the listener
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS):
            conn, _ = victim_listener.accept()  # root's client reaches root's service
            conn.close()
