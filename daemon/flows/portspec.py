"""passt's port-forwarding syntax for ``-t SPEC`` / ``-u SPEC``.

Grammar (passt(1), "-t, --tcp-ports"), one option value::

    spec    := "none" | [ADDR "/"] item ("," item)*
    item    := range [":" range] | "~" range
    range   := PORT | PORT "-" PORT

- ``PORT`` forwards host port PORT to the same guest port; ``H:G`` forwards
  host port H to guest port G.
- ``A-B`` forwards every port of the range to itself; ``A-B:C-D`` forwards
  A to C, A+1 to C+1, ... and needs both ranges to be of equal length.
- ``ADDR/`` (an IPv4 or IPv6 literal, e.g. ``127.0.0.1/8080`` or
  ``::1/22:2222``; ``[::1]/22`` is accepted too) binds every listener of the
  spec to that address instead of to all addresses of both families.
- ``~A`` or ``~A-B`` excludes host ports from what the other items of the
  same spec forward, wherever it appears in the list.
- ``none`` forwards nothing.

Not supported (refused with a clear message): ``all`` and ``auto`` (which
forward whatever is free on the host), an exclusion-only spec (passt's "all
but these"), and an interface after the address (``ADDR%IF/``).

This is configuration input, so every error is a ``ValueError`` whose
message says what is wrong: it is used as an argparse ``type=``. The result
is a list of :class:`PortForward`, one per host port, in the order given.
"""

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

__all__ = ["ForwardError", "PortForward", "parse_port_spec"]


@dataclass(frozen=True, slots=True)
class PortForward:
    bind: IPv4Address | IPv6Address | None
    """Address to listen on; None: every address of both families."""
    host_port: int
    guest_port: int


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"port spec {spec!r}: {text!r} is not a port number")
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(f"port spec {spec!r}: port {value} is not in 1-65535")
    return value


def _range(text: str, spec: str) -> range:
    first, sep, last = text.partition("-")
    start = _port(first, spec)
    end = _port(last, spec) if sep else start
    if end < start:
        raise ValueError(f"port spec {spec!r}: range {text!r} runs backwards")
    return range(start, end + 1)


def _address(text: str, spec: str) -> IPv4Address | IPv6Address:
    if "%" in text:
        raise ValueError(f"port spec {spec!r}: binding to an interface ({text!r}) is not supported")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ip_address(text)
    except ValueError:
        raise ValueError(f"port spec {spec!r}: {text!r} is not an IPv4 or IPv6 address") from None


def parse_port_spec(spec: str) -> list[PortForward]:
    """Parse one ``-t``/``-u`` value into the forwards it asks for."""
    text = spec.strip()
    if not text:
        raise ValueError("port spec is empty (use 'none' to forward nothing)")
    if text == "none":
        return []
    if text in ("all", "auto"):
        raise ValueError(f"port spec {text!r} is not supported: list the ports to forward")

    bind: IPv4Address | IPv6Address | None = None
    addr, slash, ports = text.rpartition("/")
    if slash:
        if not addr:
            raise ValueError(f"port spec {spec!r}: empty address before '/'")
        bind = _address(addr, spec)
    if not ports:
        raise ValueError(f"port spec {spec!r}: no ports given")

    mapping: dict[int, int] = {}
    excluded: set[int] = set()
    for item in ports.split(","):
        if not item:
            raise ValueError(f"port spec {spec!r}: empty item in the list")
        if item.startswith("~"):
            excluded.update(_range(item[1:], spec))
            continue
        host_text, colon, guest_text = item.partition(":")
        hosts = _range(host_text, spec)
        guests = _range(guest_text, spec) if colon else hosts
        if len(guests) != len(hosts):
            raise ValueError(
                f"port spec {spec!r}: {item!r} maps {len(hosts)} host ports "
                f"to {len(guests)} guest ports"
            )
        for host, guest in zip(hosts, guests, strict=True):
            if host in mapping:
                raise ValueError(f"port spec {spec!r}: host port {host} is given twice")
            mapping[host] = guest
    if not mapping:
        raise ValueError(
            f"port spec {spec!r} only excludes ports; forwarding all others is not supported"
        )
    return [
        PortForward(bind, host, guest) for host, guest in mapping.items() if host not in excluded
    ]


class ForwardError(Exception):
    """A configured forward cannot be set up (bad config: port in use,
    address not on this host, family not available). The message names the
    protocol, address and port."""
