"""The control layer: how ferryctl (and tests, and later libvirt hooks) talk to ferryd.

protocol.py is the wire format (sans-IO, the ``*_untrusted`` parsers);
server.py serves it on ferryd's Unix socket; client.py asks one request at
a time. The migration coordinator that drives two daemons is
ferryd/coordinator.py. The names below are what the rest of ferry uses.
"""

from ferryd.control.client import (
    ControlClientError,
    ControlRequestFailed,
    DaemonNotRunning,
    request,
)
from ferryd.control.protocol import ControlError, ControlProtocolError
from ferryd.control.server import ControlAddressInUse, ControlBindError, ControlServer, Handler

__all__ = [
    "ControlAddressInUse",
    "ControlBindError",
    "ControlClientError",
    "ControlError",
    "ControlProtocolError",
    "ControlRequestFailed",
    "ControlServer",
    "DaemonNotRunning",
    "Handler",
    "request",
]
