"""``python -m scripts.demo [--vm] [-n N] [--busy B]``: see scripts/demo/__init__.py."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from ferryd.control import ControlClientError
from scripts import demo
from scripts.demo import namespace, vm
from scripts.demo.report import DemoFailed, final_line, format_table, progress, step
from testbed.ferryd_process import FerrydFailed
from testbed.guest_image import GuestImageError
from testbed.migrationbed import MigrationBed, two_host_bed
from testbed.netns import NetnsError
from testbed.repair import raise_fd_limit

#: Connections and busy ones: namespace mode, VM mode (a TCG guest is slower).
DEFAULTS = {False: (200, 10), True: (100, 4)}


def _interrupted(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP end the demo as Ctrl-C does: every ``with`` cleans up."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.demo",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vm", action="store_true", help="the guest is a QEMU VM (vhost-user)")
    parser.add_argument("-n", "--connections", type=int, metavar="N",
                        help="TCP connections (default 200, with --vm 100)")  # fmt: skip
    parser.add_argument("--busy", type=int, metavar="B",
                        help="of which streaming both ways (default 10, with --vm 4)")  # fmt: skip
    args = parser.parse_args(argv)
    count, busy = DEFAULTS[args.vm]
    args.connections = count if args.connections is None else args.connections
    args.busy = min(busy, args.connections) if args.busy is None else args.busy
    if not 1 <= args.busy <= args.connections:
        parser.error("need 1 <= --busy <= --connections")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if os.geteuid() != 0:
        print("demo: needs root: it creates network namespaces and devices", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGHUP, _interrupted)
    raise_fd_limit()
    started = time.monotonic()
    mode = vm if args.vm else namespace
    try:
        # A short directory: the sockets' paths must fit in 108 bytes.
        with tempfile.TemporaryDirectory(prefix="fdemo-") as tmp, two_host_bed(Path(tmp)) as bed:
            step("two hosts with one address, a peer on the fabric, one ferry-repair")
            names = ", ".join(ns.name for ns in (bed.host_a, bed.host_b, bed.peer, bed.guest))
            progress(f"namespaces {names}; ferry-repair pid {bed.helper.proc.pid}")
            progress(f"sockets and logs in {tmp}")
            try:
                summary = mode.run(bed, args.connections, args.busy)
            except KeyboardInterrupt:
                raise
            except BaseException:
                _print_logs(bed)
                raise
    except KeyboardInterrupt as e:
        print(
            f"\ndemo interrupted ({str(e) or 'Ctrl-C'}); everything it made is removed",
            file=sys.stderr,
        )
        return 130
    except (DemoFailed, FerrydFailed, GuestImageError, NetnsError, ControlClientError,
            AssertionError, OSError, subprocess.SubprocessError) as e:  # fmt: skip
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1
    summary.seconds = time.monotonic() - started
    step("summary")
    sys.stdout.write(format_table(summary.rows()))
    print(f"\n{final_line(summary)}")
    print(f"(took {summary.seconds:.1f} s; namespaces, processes and sockets removed)")
    return 0


def _print_logs(bed: MigrationBed) -> None:
    """The ferryds' last lines, for a failure (the bed removes them with its directory)."""
    for n, ferryd in enumerate(bed.ferryds):
        print(
            f"\n--- ferryd {n} (pid {ferryd.pid}) log ---\n{ferryd.log()[-3000:]}", file=sys.stderr
        )


if __name__ == "__main__":
    sys.exit(main())
