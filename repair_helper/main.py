"""ferry-repair's command line: set things up, confine ourselves, serve.

Order matters. First, descriptors inherited by mistake are closed (all but
stdio and, when socket-activated, descriptor 3): the helper holds nothing it
does not use. Then the endpoint: the socket systemd passed (socket
activation), a socket we bind (``--listen``), or a connection to a daemon's
socket (``--connect``; connect() needs write access to the daemon's socket
file, which root has only while it still holds CAP_DAC_OVERRIDE). Then,
before the first byte from any client is read, every capability but
CAP_NET_ADMIN goes, then the seccomp filter is installed, then the loop
runs. The closer thread (closer.py) starts after the capabilities are
dropped (capset() changes only the calling thread's) and before the filter
(no clone() then). In
``--connect`` mode the helper serves that one
connection and exits, as passt-repair does: 0 when the daemon closes it,
1 if it had to refuse something.
"""

from __future__ import annotations

import argparse
import fcntl
import grp
import logging
import os
import resource
import sys
from collections.abc import Sequence

from ferry_repair.activation import SD_LISTEN_FDS_START, ActivationError, activation_listener
from ferry_repair.armed import ArmedFilter
from ferry_repair.dropall import load_drop_all
from ferry_repair.endpoints import EndpointError, bind_listener, connect_to_daemon
from ferry_repair.peer import CallerPolicy
from ferry_repair.repair import use_drop_all_program
from ferry_repair.sandbox import SandboxError, drop_capabilities, install_seccomp
from ferry_repair.server import Server

log = logging.getLogger("ferry-repair")


def _gid(spec: str) -> int:
    """A gid, or a group's name (``--allow-gid ferry``: /etc/default/ferry-repair
    need not know the gid groupadd chose)."""
    if spec.isdigit():
        return int(spec)
    try:
        return grp.getgrnam(spec).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {spec!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ferry-repair",
        description="Set or clear TCP_REPAIR on sockets handed over a Unix socket"
        " (passt-repair's protocol), and arm sockets so that one request stops the"
        " intake of all a caller armed (ferryd's migration freeze; needs CAP_BPF at"
        " start-up, else refused and ferryd freezes one by one). Without --listen or"
        " --connect, expects a socket from systemd (socket activation).",
        epilog="Exit status: 0 served and ended cleanly; 1 a request had to be refused"
        " (--connect mode) or an internal error; 2 cannot start as configured (options,"
        " endpoint, missing CAP_NET_ADMIN). Start-up failures are one line; -v adds"
        " their traceback.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="tracebacks with start-up errors"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--listen", metavar="PATH", help="listen on this Unix socket")
    where.add_argument(
        "--connect",
        metavar="PATH",
        help="connect to a daemon's socket; if PATH is a directory, wait for a *.repair"
        " socket to appear in it",
    )
    parser.add_argument(
        "--allow-uid", metavar="UID", type=int, action="append", default=[],
        help="also serve callers with this uid (root and our own uid always are)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-gid", metavar="GROUP", type=_gid, action="append", default=[],
        help="also serve callers with this primary gid (a number or a group's name)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-forced-reuse",
        action="store_true",
        help="passt compatibility: accept unbound sockets for repair ON and leave the"
        " kernel's forced address reuse on them, which passt's migration target needs"
        " (it binds restored connections under its own listeners, in repair mode)."
        " WARNING: any allowed caller can then bind a socket to any port, another"
        " user's listening port included, and take that service's clients. Use it only"
        " if every allowed caller is a passt you trust",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ferry-repair; returns the exit status."""
    _close_inherited_fds()
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="ferry-repair: %(message)s")
    policy = CallerPolicy.build(args.allow_uid, args.allow_gid)
    server = Server(policy, forced_reuse=args.allow_forced_reuse)
    try:
        _raise_open_file_limit()
        _presize_fd_table()
        if args.connect is not None:
            server.add_connection(connect_to_daemon(args.connect))
        else:
            listener = (
                bind_listener(args.listen)
                if args.listen is not None
                else activation_listener(os.environ)
            )
            if listener is None:
                raise EndpointError("no --listen or --connect, and not socket-activated")
            server.add_listener(listener)
        # Loaded while we may still hold CAP_BPF/CAP_SYS_ADMIN (dropall.py).
        drop_all = load_drop_all()
        use_drop_all_program(drop_all)
        server.armed = ArmedFilter.load()
        drop_capabilities()
        # Between the two: the thread inherits the reduced capabilities, and the
        # filter (applied to every thread) forbids clone() afterwards.
        server.start_closer()
        install_seccomp()
    except (SandboxError, EndpointError, ActivationError) as exc:
        log.error("%s", exc, exc_info=args.verbose)
        return 2
    except Exception:
        log.exception("internal error at start-up (a bug in ferry-repair; please report it)")
        return 1
    if args.allow_forced_reuse:
        log.warning(
            "--allow-forced-reuse: every allowed caller can bind sockets in repair mode to"
            " any port, other users' included"
        )
    log.info(
        "serving (%s); intake freeze: %s; armed filter: %s",
        policy,
        "eBPF program" if drop_all is not None else "classic BPF filter (no CAP_BPF to load eBPF)",
        "yes" if server.armed is not None else "no (no CAP_BPF to load it)",
    )
    server.run()
    # Leave without finalizing the interpreter: the closer thread (closer.py)
    # may be in the middle of a close(), and a thread that wakes up during
    # finalization leaves through pthread_exit(), which loads libgcc_s with
    # open() (denied by the filter) and crashes. The kernel closes whatever the
    # closer had left, as for any exiting process.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(1 if server.refusals else 0)


def _close_inherited_fds() -> None:
    activated = os.environ.get("LISTEN_PID") == str(os.getpid())
    first = SD_LISTEN_FDS_START + 1 if activated else SD_LISTEN_FDS_START
    os.closerange(first, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def _raise_open_file_limit() -> None:
    # Each batch briefly holds up to 253 descriptors, each client one more.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: Descriptors the helper may hold at once: the closer's backlog, the batch
#: being carried out, and the clients' connections.
FD_TABLE = 2048


def _presize_fd_table() -> None:
    """Grow the descriptor table now, while this is the only thread.

    The kernel doubles a full table, and a table shared between threads
    (the closer's) only after an RCU grace period (fs/file.c,
    expand_fdtable: synchronize_rcu()), 8-16 ms each here: the first batches
    of 253 descriptors that a migration's freeze sends waited that long,
    twice, in the guest's downtime. The table never shrinks.
    """
    size = min(FD_TABLE, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    if spare < size - 1:
        # The lowest free number from there on: never closes the activated listener.
        os.close(fcntl.fcntl(spare, fcntl.F_DUPFD_CLOEXEC, size - 1))
    os.close(spare)


if __name__ == "__main__":
    sys.exit(main())
