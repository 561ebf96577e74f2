"""passt, the reference back-end, run by the bed in its default (stream) mode.

passt (the system's, Debian 12's ``passt`` package) listens on a Unix socket
and speaks QEMU's stream netdev protocol there: the protocol ``ferryd
--socket`` speaks too, so a VM test can run against either, and the
benchmarks compare them. passt takes the host namespace's addresses and
gateway and hands them to the guest by DHCP (its ``--map-gw`` default
maps the gateway's address to the host itself: talk to a peer through one
of its other addresses).

passt started as root becomes nobody before it binds its socket (and says
"bound" even when the bind failed), so the socket lives in a directory of
its own that nobody may write to, made here and removed by
:meth:`PasstProcess.stop`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.netns import Netns
from testbed.wait import WaitTimeout, wait_for

__all__ = ["PASST", "PasstFailed", "PasstProcess", "start_passt"]

PASST = "passt"
STOP_TIMEOUT = 10.0


class PasstFailed(AssertionError):
    """passt did not start; the message carries its log."""


@dataclass
class PasstProcess:
    """A running passt: its process, its socket and its log."""

    proc: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int:
        """SIGTERM by PID, then SIGKILL; returns the exit status. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)
        return self.proc.returncode


def start_passt(host: Netns, log_path: Path, extra: Sequence[str] = ()) -> PasstProcess:
    """Run passt in *host* (foreground) on a socket of its own; return once it listens."""
    binary = shutil.which(PASST)
    if binary is None:
        raise PasstFailed("passt is not installed (scripts/bootstrap.sh installs it)")
    socket_dir = Path(tempfile.mkdtemp(prefix="ft-passt-"))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(socket_dir, nobody.pw_uid, nobody.pw_gid)
    socket_path = socket_dir / "passt.sock"
    argv = [binary, "--foreground", "--stderr", "--socket", str(socket_path), *extra]
    with log_path.open("wb") as log:
        proc = host.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    passt = PasstProcess(proc, socket_path, log_path)
    try:
        wait_for(
            lambda: socket_path.is_socket() or proc.poll() is not None,
            timeout=10,
            what="passt's socket",
        )
    except WaitTimeout as e:
        passt.stop()
        raise PasstFailed(
            f"{e}\ncommand: {' '.join(argv)}\n--- passt's log ---\n{passt.log()}"
        ) from None
    if proc.poll() is not None:
        raise PasstFailed(
            f"passt exited with status {proc.returncode}\ncommand: {' '.join(argv)}\n"
            f"--- passt's log ---\n{passt.log()}"
        )
    return passt
