"""Where the bed finds what it runs: the venv's programs and the bed's own tools.

The tools are stand-alone scripts run by path with the venv's Python inside
a namespace (``ip netns exec NS python TOOL ...``): by path, so that they do
not depend on the working directory or on ``testbed`` being importable
there; they import only the standard library and ``ferryd``. Run by path,
a tool has testbed/ first on its sys.path: no module here may be named like
one a tool imports (hence ferryd_process.py, not ferryd.py).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "FERRYCTL",
    "FERRYD",
    "FERRY_REPAIR",
    "RAWFRAMES",
    "REPO",
    "STREAMTOOL",
    "STREAM_RELAY",
    "TCPTOOL",
    "UDPTOOL",
    "VENV_BIN",
]

_HERE = Path(__file__).resolve().parent
#: The repository's root (the bed runs from a checkout, not an installed package).
REPO = _HERE.parent
#: scripts/bootstrap.sh's venv, holding the console scripts of this checkout.
VENV_BIN = REPO / ".venv" / "bin"
FERRYD = VENV_BIN / "ferryd"
FERRYCTL = VENV_BIN / "ferryctl"
FERRY_REPAIR = VENV_BIN / "ferry-repair"

#: Checked TCP streams by SHA-256, scenario servers and clients (testbed/tcptool.py).
TCPTOOL = str(_HERE / "tcptool.py")
#: Many checked TCP streams both ways, and a checked UDP echo (testbed/streamtool.py).
STREAMTOOL = str(_HERE / "streamtool.py")
#: A UDP echo that reports the source address, and its checking client (testbed/udptool.py).
UDPTOOL = str(_HERE / "udptool.py")
#: QEMU's stream netdev played by a relay: a tap to ferryd's socket (testbed/stream_relay.py).
STREAM_RELAY = str(_HERE / "stream_relay.py")
#: Hand-made frames on the guest's tap, through AF_PACKET (testbed/rawframes.py).
RAWFRAMES = str(_HERE / "rawframes.py")
