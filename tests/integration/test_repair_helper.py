"""ferry-repair --listen: what it does, what it refuses, and what it runs with.

Each test gets its own helper (refusals are logged one per interval, and
each test looks for its own refusal's line), and every refusal is also
checked to leave it serving other clients (and holding no descriptor it was
handed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ferry_repair.protocol import SCM_MAX_FD
from ferryd.migration.sockstate import segment_counts
from testbed.repair import HELPER, HelperProcess, listening_helper
from tests.integration.test_repair_support import (
    TcpConnections,
    assert_serves,
    clear_repair,
    public_tmp_dir,
    recv_exactly,
    recv_reply_or_eof,
    repair_states,
    requires_root,
    send_batch,
    unix_client,
    wait_until,
)

pytestmark = [pytest.mark.integration, requires_root]


@pytest.fixture
def socket_path() -> Iterator[Path]:
    with public_tmp_dir() as directory:  # the unprivileged caller must reach it
        yield directory / "ferry-repair.sock"


@pytest.fixture
def public_dir() -> Iterator[Path]:
    with public_tmp_dir() as directory:
        yield directory


@pytest.fixture
def helper(socket_path: Path) -> Iterator[HelperProcess]:
    with listening_helper(socket_path) as proc:
        yield proc


@pytest.fixture
def baseline_fds(helper: HelperProcess) -> Iterator[int]:
    """The helper's descriptor count before a test; checked unchanged after it."""
    before = helper.open_fds()
    yield before
    assert_no_leak(helper, before)


def assert_no_leak(helper: HelperProcess, before: int) -> None:
    # The helper closes a connection when it reads its end-of-file, which
    # it logs nothing for: poll its descriptor table until it settles.
    after = wait_until(lambda: helper.open_fds(), before)
    assert after == before, f"helper holds {after} descriptors, had {before}"


@contextlib.contextmanager
def expect_refusal(helper: HelperProcess, socket_path: Path, reason: str) -> Iterator[None]:
    """The block makes the helper log one refusal saying ``reason``; it serves others after."""
    before = helper.count("refused client")
    yield
    line = helper.wait_for_line("refused client", count=before + 1)
    assert reason in line
    assert_serves(socket_path)


def test_capabilities_only_net_admin(helper: HelperProcess) -> None:
    status = helper.status()
    assert int(status["CapEff"], 16) == 1 << 12
    assert int(status["CapPrm"], 16) == 1 << 12
    assert int(status["CapBnd"], 16) == 1 << 12
    assert int(status["CapInh"], 16) == 0
    assert int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # filter mode
    # Every thread, the closer (closer.py) included, is confined the same way.
    tasks = os.listdir(f"/proc/{helper.pid}/task")
    assert len(tasks) == 2
    for task in tasks:
        with open(f"/proc/{helper.pid}/task/{task}/status") as f:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        assert fields["Seccomp"] == "2"
        assert int(fields["CapEff"], 16) == 1 << 12
    assert_serves_with(helper)


def test_descriptor_table_grown_before_the_closer_starts(helper: HelperProcess) -> None:
    # A table shared by two threads grows only after an RCU grace period
    # (fs/file.c, expand_fdtable): ~10 ms per doubling in a freeze's first
    # batches unless it was grown at start (main.py, _presize_fd_table).
    from ferry_repair.main import FD_TABLE

    assert int(helper.status()["FDSize"]) >= FD_TABLE
    assert_serves_with(helper)


def assert_serves_with(helper: HelperProcess) -> None:
    path = Path(helper.argv[helper.argv.index("--listen") + 1])
    assert_serves(path)


def test_one_line_per_connection(helper: HelperProcess, socket_path: Path) -> None:
    before = helper.count("connected")
    with TcpConnections(600) as conns, unix_client(socket_path) as unix:
        fds = [s.fileno() for s in conns.clients]
        for start in range(0, len(fds), SCM_MAX_FD):
            send_batch(unix, b"\x01", fds[start : start + SCM_MAX_FD])
        assert recv_exactly(unix, 3) == b"\x01\x01\x01"
        assert all(repair_states(conns.clients))
        clear_repair(conns.clients)
    # The line is written before the first reply, but read by another thread.
    helper.wait_for_line("connected", count=before + 1)
    assert helper.count("connected") == before + 1


def test_repair_on_freezes_intake_and_off_thaws_it(
    helper: HelperProcess, socket_path: Path
) -> None:
    """With repair ON nothing the peer sends reaches TCP (no segment counted, nothing
    queued, nothing ACKed); with OFF the peer's retransmission gets in."""
    with TcpConnections(300) as conns, unix_client(socket_path) as unix:
        fds = [s.fileno() for s in conns.clients]
        send_batch(unix, b"\x01", fds[:150])
        send_batch(unix, b"\x01", fds[150:])
        assert recv_exactly(unix, 2) == b"\x01\x01"
        before = [segment_counts(s)[1] for s in conns.clients]
        for server in conns.servers:
            server.send(b"x" * 1000)

        # Each segment reached its socket and the filter dropped it (sk_drops).
        def hit() -> int:
            return sum(1 for c in conns.clients if dropped(c))

        assert wait_until(hit, len(conns.clients)) == len(conns.clients)
        assert [segment_counts(s)[1] for s in conns.clients] == before
        assert {peer_unacked(server) for server in conns.servers} == {1000}
        send_batch(unix, b"\x00", fds[:150])
        send_batch(unix, b"\x00", fds[150:])
        assert recv_exactly(unix, 2) == b"\x00\x00"
        assert not any(repair_states(conns.clients))
        for client in conns.clients:
            client.settimeout(10)
            assert recv_exactly(client, 1000) == b"x" * 1000  # retransmitted, now taken


def dropped(sock: socket.socket) -> int:
    """The socket's sk_drops: SO_MEMINFO's SK_MEMINFO_DROPS (include/uapi/linux/sock_diag.h)."""
    return int(struct.unpack("9I", sock.getsockopt(socket.SOL_SOCKET, 55, 36))[8])


def peer_unacked(sock: socket.socket) -> int:
    """Bytes ``sock`` sent that its peer has not acknowledged (SIOCOUTQ less unsent)."""
    outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), 0x5411, b"\0" * 4))[0]  # SIOCOUTQ
    unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), 0x894B, b"\0" * 4))[0]  # SIOCOUTQNSD
    return int(outq - unsent)


def bound_udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))  # bound, so the kernel is asked (an unbound one is refused first)
    return sock


@pytest.mark.parametrize(
    ("make", "reason", "switched_before"),
    [
        # Not IPv4/IPv6: refused before anything is touched.
        pytest.param(
            lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
            "descriptor 5 of the batch is not a TCP socket",
            False,
            id="unix",
        ),
        # IPv4 but not TCP: the kernel refuses TCP_REPAIR on it; the sockets
        # before it in the batch were switched (the client rolls back).
        pytest.param(
            bound_udp_socket,
            "descriptor 5 of the batch is not a TCP socket; descriptors 0..4 were switched",
            True,
            id="udp",
        ),
        pytest.param(
            lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP),
            "descriptor 5 of the batch is not a TCP socket; descriptors 0..4 were switched",
            True,
            id="raw-tcp",
        ),
    ],
)
def test_refuses_non_tcp_socket(
    helper: HelperProcess,
    socket_path: Path,
    baseline_fds: int,
    make: Callable[[], socket.socket],
    reason: str,
    switched_before: bool,
) -> None:
    with TcpConnections(10) as conns, make() as odd, unix_client(socket_path) as unix:
        fds = [s.fileno() for s in conns.clients]
        with expect_refusal(helper, socket_path, reason):
            send_batch(unix, b"\x01", [*fds[:5], odd.fileno(), *fds[5:]])
            assert recv_reply_or_eof(unix) == b""
        # Nothing after the refused descriptor is ever touched.
        assert repair_states(conns.clients) == [switched_before] * 5 + [False] * 5
        clear_repair(conns.clients)


def test_refuses_non_socket(helper: HelperProcess, socket_path: Path, baseline_fds: int) -> None:
    read_end, write_end = os.pipe()
    try:
        with TcpConnections(2) as conns, unix_client(socket_path) as unix:
            with expect_refusal(helper, socket_path, "descriptor 1 of the batch is not a socket"):
                send_batch(unix, b"\x01", [conns.clients[0].fileno(), read_end])
                assert recv_reply_or_eof(unix) == b""
            assert repair_states(conns.clients) == [False, False]
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("command", [b"\x05", b"\x7f", b"\x80", b"\xfe"])
def test_refuses_unknown_command(
    helper: HelperProcess, socket_path: Path, baseline_fds: int, command: bytes
) -> None:
    with TcpConnections(3) as conns, unix_client(socket_path) as unix:
        reason = f"unknown command {int.from_bytes(command, signed=True)}"
        with expect_refusal(helper, socket_path, reason):
            send_batch(unix, command, [s.fileno() for s in conns.clients])
            assert recv_reply_or_eof(unix) == b""
        assert repair_states(conns.clients) == [False] * 3


@pytest.mark.parametrize("data", [b"\x01\x01", b"\x01" * 40])
def test_refuses_wrong_length(
    helper: HelperProcess, socket_path: Path, baseline_fds: int, data: bytes
) -> None:
    with TcpConnections(3) as conns, unix_client(socket_path) as unix:
        fds = [s.fileno() for s in conns.clients]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", *fds))]
        with expect_refusal(helper, socket_path, f"message of {len(data)} bytes"):
            unix.sendmsg([data], rights)
            assert recv_reply_or_eof(unix) == b""
        assert repair_states(conns.clients) == [False] * 3


def test_refuses_command_without_descriptors(
    helper: HelperProcess, socket_path: Path, baseline_fds: int
) -> None:
    with unix_client(socket_path) as unix, expect_refusal(helper, socket_path, "no descriptors"):
        send_batch(unix, b"\x01", [])
        assert recv_reply_or_eof(unix) == b""


def test_more_than_253_descriptors_never_reach_it(
    helper: HelperProcess, socket_path: Path, baseline_fds: int
) -> None:
    # The sending kernel refuses a 254th descriptor in one message (EINVAL,
    # net/core/scm.c): the helper's own limit check is defence in depth,
    # covered by the parser's unit tests. The connection stays usable.
    with TcpConnections(SCM_MAX_FD + 1) as conns, unix_client(socket_path) as unix:
        fds = [s.fileno() for s in conns.clients]
        with pytest.raises(OSError) as excinfo:
            send_batch(unix, b"\x01", fds)
        assert excinfo.value.errno == 22
        send_batch(unix, b"\x01", fds[:SCM_MAX_FD])
        assert unix.recv(1) == b"\x01"
        clear_repair(conns.clients)
    assert_serves(socket_path)


def test_refuses_truncated_control_data(tmp_path: Path) -> None:
    # With a descriptor limit of 64 the kernel cannot install a 200-descriptor
    # batch in the helper's table: it installs what fits, drops the rest and
    # sets MSG_CTRUNC (net/core/scm.c, scm_detach_fds).
    path = tmp_path / "small.sock"

    def low_fd_limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    argv = [*HELPER, "--listen", str(path)]
    with HelperProcess(argv, preexec_fn=low_fd_limit) as helper:
        helper.wait_for_line("serving")
        before = helper.open_fds()
        with TcpConnections(200) as conns, unix_client(path) as unix:
            with expect_refusal(helper, path, "MSG_CTRUNC"):
                send_batch(unix, b"\x01", [s.fileno() for s in conns.clients])
                assert recv_reply_or_eof(unix) == b""
            assert repair_states(conns.clients) == [False] * 200
        assert_no_leak(helper, before)


def test_a_listener_out_of_descriptors_tries_again_by_itself(
    helper: HelperProcess, socket_path: Path
) -> None:
    # The helper's descriptor table full (its soft limit lowered, from outside,
    # to its lowest free descriptor) with no connection open: accept() fails
    # with EMFILE and the listener pauses. The closer has nothing to free, so
    # only the timed retry can resume it once the limit is raised again.
    soft, hard = resource.prlimit(helper.pid, resource.RLIMIT_NOFILE)
    used = {int(fd) for fd in os.listdir(f"/proc/{helper.pid}/fd")}
    lowest_free = min(set(range(len(used) + 1)) - used)
    resource.prlimit(helper.pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
    with unix_client(socket_path) as unix:  # waits in the backlog
        helper.wait_for_line("cannot accept clients for now: Too many open files")
        resource.prlimit(helper.pid, resource.RLIMIT_NOFILE, (soft, hard))
        with TcpConnections(3) as conns:
            send_batch(unix, b"\x01", [s.fileno() for s in conns.clients])
            assert unix.recv(1) == b"\x01", "the paused listener never accepted again"
            assert repair_states(conns.clients) == [True] * 3
            clear_repair(conns.clients)
    helper.wait_for_line("accepting clients again")
    assert helper.count("cannot accept clients for now") == 1
    assert_serves(socket_path)


def test_refuses_listening_socket_kernel_says_no(
    helper: HelperProcess, socket_path: Path, baseline_fds: int
) -> None:
    # TCP_REPAIR is refused on a listening socket (EPERM, tcp_can_repair_sock).
    with socket.socket() as listener, unix_client(socket_path) as unix:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with expect_refusal(helper, socket_path, "the kernel refused TCP_REPAIR=1 on descriptor 0"):
            send_batch(unix, b"\x01", [listener.fileno()])
            assert recv_reply_or_eof(unix) == b""


UNPRIVILEGED_CLIENT = """
import os, socket, sys, array
uid, gid, *groups = [int(a) for a in sys.argv[2:]] or [65534, 65534]
os.setgroups(groups); os.setgid(gid); os.setuid(uid)
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen()
conn = socket.socket(); conn.connect(listener.getsockname())
unix = socket.socket(socket.AF_UNIX)
unix.settimeout(30)
unix.connect(sys.argv[1])
try:
    rights = array.array("i", [conn.fileno()])
    unix.sendmsg([b"\\x01"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    reply = unix.recv(1)
except (BrokenPipeError, ConnectionResetError):
    reply = b""
print(reply.hex() or "closed")
"""


def run_unprivileged_client(path: Path, *ids: int) -> str:
    """The client as nobody, or as ``uid, gid, *supplementary groups``."""
    out = subprocess.run(
        [sys.executable, "-c", UNPRIVILEGED_CLIENT, str(path), *map(str, ids)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def test_refuses_unprivileged_caller(
    helper: HelperProcess, socket_path: Path, baseline_fds: int
) -> None:
    with expect_refusal(helper, socket_path, "uid=65534 gid=65534: uid and gid not allowed"):
        assert run_unprivileged_client(socket_path) == "closed"


@pytest.mark.parametrize(
    ("option", "who"),
    [("--allow-uid", "65534"), ("--allow-gid", "65534"), ("--allow-gid", "nogroup")],
)
def test_allowed_unprivileged_caller(public_dir: Path, option: str, who: str) -> None:
    with listening_helper(public_dir / "s", option, who) as helper:
        assert run_unprivileged_client(public_dir / "s") == "01"
        helper.wait_for_line("uid=65534 gid=65534 connected")


def test_allowed_group_as_a_supplementary_one_is_refused(public_dir: Path) -> None:
    """--allow-gid looks at the caller's primary gid only (SO_PEERCRED's).

    ferryd@.service makes QEMU a supplementary member of ferryd's group, so
    that it reaches ferryd's socket; QEMU must not reach ferry-repair that way.
    """
    with listening_helper(public_dir / "s", "--allow-gid", "65534") as helper:
        assert run_unprivileged_client(public_dir / "s", 64999, 64999, 65534) == "closed"
        helper.wait_for_line("uid=64999 gid=64999: uid and gid not allowed")


def test_works_with_only_net_admin_as_nobody(public_dir: Path) -> None:
    # Not root, and CAP_NET_ADMIN only as an ambient capability: the helper
    # cannot touch its bounding set (no CAP_SETPCAP) and needs not.
    setpriv = [
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        "--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin",
        "--bounding-set=-all,+net_admin",
    ]  # fmt: skip
    path = public_dir / "nobody.sock"
    with listening_helper(path, prefix=setpriv) as helper:
        status = helper.status()
        assert status["Uid"].split()[0] == "65534"
        assert int(status["CapEff"], 16) == 1 << 12
        assert int(status["CapBnd"], 16) == 1 << 12
        assert int(status["CapAmb"], 16) == 0
        assert_serves(path, n=300)


def test_works_from_another_network_namespace(tmp_path: Path) -> None:
    # TCP_REPAIR needs CAP_NET_ADMIN over the *socket's* namespace, which the
    # helper keeps in a private network namespace of the same user namespace:
    # hence ferry-repair.service may use PrivateNetwork=yes.
    path = tmp_path / "netns.sock"
    with listening_helper(path, prefix=["unshare", "--net"]) as helper:
        assert os.readlink(f"/proc/{helper.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert_serves(path, n=300)


def test_refuses_to_start_without_net_admin(public_dir: Path) -> None:
    setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    with HelperProcess([*setpriv, *HELPER, "--listen", str(public_dir / "s")]) as helper:
        assert helper.wait_exit() == 2
        assert any("CAP_NET_ADMIN is not in our permitted set" in line for line in helper.lines)


def test_many_clients_at_once(helper: HelperProcess, socket_path: Path) -> None:
    clients = [unix_client(socket_path) for _ in range(20)]
    try:
        with TcpConnections(20 * 5) as conns:
            for i, unix in enumerate(clients):
                send_batch(unix, b"\x01", [s.fileno() for s in conns.clients[i * 5 : i * 5 + 5]])
            assert [unix.recv(1) for unix in clients] == [b"\x01"] * 20
            assert all(repair_states(conns.clients))
            clear_repair(conns.clients)
    finally:
        for unix in clients:
            unix.close()


#: Stop/continue cycles the helper goes through while it serves (two were
#: enough to kill it when restart_syscall was denied).
STOPS = 50


def test_survives_being_stopped_while_it_serves(helper: HelperProcess, socket_path: Path) -> None:
    """SIGSTOP and SIGCONT (job control, a debugger, the cgroup freezer) while batches flow.

    A stop that interrupts a timed wait (the GIL's, with the closer thread
    busy) resumes it through restart_syscall; the seccomp filter must allow
    it (sandbox.py), or glibc aborts the helper and every caller's batch is
    lost.
    """
    stopped = threading.Event()

    def stop_and_continue() -> None:
        for _ in range(STOPS):
            helper.proc.send_signal(signal.SIGSTOP)
            time.sleep(0.002)
            helper.proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        stopped.set()

    n = 2 * SCM_MAX_FD
    with TcpConnections(n) as conns, unix_client(socket_path) as unix:
        fds = [s.fileno() for s in conns.clients]
        batches = [fds[:SCM_MAX_FD], fds[SCM_MAX_FD:]]
        stopper = threading.Thread(target=stop_and_continue)
        stopper.start()
        passes = 0
        try:
            while not stopped.is_set():
                for command, state in ((b"\x01", True), (b"\x00", False)):
                    for batch in batches:
                        send_batch(unix, command, batch)
                    replies = recv_exactly(unix, len(batches))
                    assert replies == command * len(batches), (
                        f"pass {passes}: replies {replies!r}; helper exit {helper.proc.poll()}"
                    )
                    assert repair_states(conns.clients) == [state] * n
                passes += 1
        finally:
            stopper.join()
            clear_repair(conns.clients)
    assert passes > 0
    assert helper.proc.poll() is None
    assert_serves(socket_path)
