"""A guest behind ``ferryd --socket``, without a VM: a namespace's stack, a relay for QEMU.

``ferryd --socket PATH`` serves QEMU's stream netdev. The tests want a real
Linux TCP stack as its guest, and the tap tests' namespaces have one: a
guest namespace whose tap is carried to ferryd's socket by
``stream_relay.py`` (testbed/stream_relay.py), which plays QEMU: frames
behind their lengths, reconnects, a switch to another ferryd's socket at a
migration, and a hostile length on request. The guest takes its address by
DHCP from ferryd, as a VM would.

:func:`launch_stream_ferryd` starts a ferryd in that mode (in a host
namespace, joining a list its owner stops); :class:`StreamRelay` drives a
relay; :func:`dhcp` configures the guest's tap from ferryd's answers.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from testbed.ferryd_process import FerrydProcess, launch
from testbed.netns import Netns
from testbed.paths import FERRYD, STREAM_RELAY
from testbed.streams import Tool
from testbed.wait import wait_for

__all__ = ["StreamRelay", "dhcp", "launch_stream_ferryd"]

#: A udhcpc script that applies the lease to the tap (address, route, MTU)
#: and touches nothing else: the stock one would rewrite the host's resolv.conf.
_UDHCPC_SCRIPT = """#!/bin/sh
env > "{out}.$1"
case "$1" in
  bound|renew)
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done ;;
esac
exit 0
"""


def launch_stream_ferryd(
    host: Netns,
    tmp: Path,
    name: str,
    *args: str,
    started: list[FerrydProcess],
) -> tuple[FerrydProcess, str]:
    """``ferryd --socket TMP/NAME.qemu --control TMP/NAME.ctl ARGS`` in *host*, ready.

    Returns the ferryd and its QEMU socket's path. It joins *started*, whose
    owner stops it.
    """
    socket_path = str(tmp / f"{name}.qemu")
    control = str(tmp / f"{name}.ctl")
    argv = [str(FERRYD), "--socket", socket_path, "--control", control, *args]
    return launch(host, argv, control, tmp / f"ferryd-{name}.log", started), socket_path


class StreamRelay:
    """A stream_relay.py in *guest*, connected (or connecting) to *socket_path*."""

    def __init__(self, guest: Netns, socket_path: str, *, mtu: int = 65520) -> None:
        self.tool = Tool(guest, "--socket", socket_path, "--mtu", str(mtu), script=STREAM_RELAY)
        self.tool.wait_line(lambda line: "ready" in line, "the relay's tap")

    def _ask(self, command: str, key: str) -> dict[str, Any]:
        before = len(self.events(key))
        self.tool.command(command)
        lines = self.tool.wait_lines(lambda line: key in line, before + 1, f"{command!r} done")
        return lines[before]

    def events(self, key: str) -> list[dict[str, Any]]:
        """The relay's lines so far that carry *key* (``connected``, ``disconnected``...)."""
        return [line for line in list(self.tool.lines) if key in line]

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self._ask("status", "status")["status"]
        return status

    def switch(self, path: str) -> None:
        """Hang up and serve *path* from now on (a migration's switch of QEMU)."""
        self._ask(f"switch {path}", "switched")

    def reconnect(self) -> None:
        """Hang up and connect again, as a restarted QEMU would."""
        self._ask("reconnect", "reconnected")

    def hostile(self, length: int) -> None:
        """Write a frame length of *length* after what is queued."""
        self._ask(f"hostile {length}", "hostile")

    def wait_connections(self, count: int) -> dict[str, Any]:
        """Until the relay has connected *count* times in all and is connected now."""

        def done() -> dict[str, Any] | None:
            status = self.status()
            return status if status["connected"] and status["connections"] >= count else None

        return wait_for(done, timeout=30, what=f"the relay's connection number {count}")

    def stop(self) -> None:
        self.tool.stop()


def dhcp(guest: Netns, tmp: Path, ifname: str = "tap0") -> dict[str, str]:
    """Configure *ifname* by DHCP (busybox udhcpc) from ferryd; the lease's variables."""
    script = tmp / "udhcpc.sh"
    out = tmp / "lease"
    script.write_text(_UDHCPC_SCRIPT.format(out=out))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    udhcpc = ["busybox", "udhcpc", "-i", ifname, "-f", "-q", "-n", "-t", "5", "-T", "1"]
    guest.run([*udhcpc, "-s", str(script)], timeout=30)
    text = Path(f"{out}.bound").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
