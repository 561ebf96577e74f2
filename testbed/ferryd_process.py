"""A real ferryd run by the bed: started in a namespace, ready, asked, stopped.

:func:`launch` starts the venv's ferryd (or a stand-in command) in a host
namespace with its output in a log file, and returns only once ``ferryctl
status --wait`` says it is ready; if ferryd dies or never gets ready it
raises :class:`FerrydFailed` carrying ferryd's log. :meth:`FerrydProcess.stop`
ends it with SIGTERM (then SIGKILL), by PID.
"""

from __future__ import annotations

import pwd
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferryd.control import request
from testbed.netns import Netns
from testbed.paths import FERRYCTL
from testbed.wait import wait_for

__all__ = [
    "READY_TIMEOUT",
    "RUNAS_UID",
    "STOP_TIMEOUT",
    "FerrydFailed",
    "FerrydProcess",
    "describe_status",
    "launch",
    "wait_ready",
]

#: Who ferryd becomes after setup when started as root (its --runas default).
RUNAS_UID = pwd.getpwnam("nobody").pw_uid

#: How long ferryd may take to become ready, and to stop after SIGTERM.
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class FerrydFailed(AssertionError):
    """ferryd (or ferryctl run against it) failed; the message carries ferryd's log.

    An AssertionError, so that pytest reports a failed test, not an error in it.
    """


@dataclass
class FerrydProcess:
    """A running ferryd: its process, control socket and log."""

    proc: subprocess.Popen[bytes]
    control: str
    log_path: Path
    argv: list[str]
    #: Exit statuses that teardown accepts (0, or death by the SIGTERM we sent).
    ok_exit: frozenset[int] = field(
        default_factory=lambda: frozenset({0, -signal.SIGTERM, 128 + signal.SIGTERM})
    )
    #: Set once a failure of this ferryd has been reported, so teardown does not repeat it.
    reported: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """ferryd's stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """One control request (ferryd.control.request) to this ferryd."""
        return request(self.control, cmd, **args)

    def role(self) -> str:
        """Its migration role now (``running``, ``frozen``, ``migrated``...)."""
        return str(self.request("status")["role"])

    def migration_counters(self) -> dict[str, Any]:
        """Its migration counters now (ferryd.migration.session.MigrationCounters)."""
        counters: dict[str, Any] = self.request("status")["counters"]["migration"]
        return counters

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ferryctl --control SOCK ARGS`` (the real CLI) and return its output."""
        result = subprocess.run(
            [str(FERRYCTL), "--control", self.control, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise FerrydFailed(
                f"ferryctl {' '.join(args)} failed (exit {result.returncode}): "
                f"{result.stderr.strip()}\n--- ferryd log ---\n{self.log()}"
            )
        return result

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM by pid, wait up to *timeout*, then SIGKILL; returns the exit status.

        Safe to call again (returns the status it already has).
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                with self.log_path.open("a") as log_file:
                    log_file.write(
                        f"\n[testbed] ferryd ignored SIGTERM for {timeout:g} s; sent SIGKILL\n"
                    )
        return self.proc.returncode


def launch(
    host: Netns,
    argv: Sequence[str],
    control: str,
    log_path: Path,
    started: list[FerrydProcess],
) -> FerrydProcess:
    """Run *argv* (ferryd and its arguments, ``--control CONTROL`` among them) in *host*.

    Its output goes to *log_path*. The process joins *started* before the
    wait, so that its owner stops it also when it never got ready. Returns
    once ferryd is ready; raises FerrydFailed if it is not.
    """
    with log_path.open("wb") as log_file:
        proc = host.popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    ferryd = FerrydProcess(proc, control, log_path, list(argv))
    started.append(ferryd)
    wait_ready(ferryd)
    return ferryd


def wait_ready(ferryd: FerrydProcess) -> None:
    """Block until ``ferryctl status --wait`` succeeds; fail with the log if ferryd dies first."""
    ctl = subprocess.Popen(
        [str(FERRYCTL), "--control", ferryd.control, "status", "--wait", f"{READY_TIMEOUT:g}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # ferryctl enforces the deadline; the margin only covers its start-up.
        wait_for(
            lambda: ctl.poll() is not None or ferryd.proc.poll() is not None,
            timeout=READY_TIMEOUT + 30,
            what="ferryctl status --wait or ferryd to exit",
        )
    finally:
        if ctl.poll() is None:
            ctl.kill()
        _, ctl_err = ctl.communicate()
    if ctl.returncode == 0:
        return
    exited = ferryd.proc.poll()
    why = (
        f"ferryd exited with status {exited} before it was ready"
        if exited is not None
        else f"ferryd not ready: {ctl_err.strip() or 'ferryctl was stopped'}"
    )
    ferryd.reported = True
    raise FerrydFailed(
        f"{why}\ncommand: {' '.join(ferryd.argv)}\n--- ferryd log ---\n{ferryd.log()}"
    )


def describe_status(status: int) -> str:
    """An exit status as words: ``exit status 3``, ``signal SIGSEGV``."""
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"exit status {status}"
