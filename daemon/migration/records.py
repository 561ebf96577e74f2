"""What the migration stream carries, as plain Python values, and the mapping to protobuf.

The stream's schema is ``proto/migration.proto``; its generated classes are
``ferryd.migration.migration_pb2``. The rest of ferryd never touches those:
it builds and reads the frozen dataclasses here, and this module maps them
to and from the protobuf messages. Two reasons: the protobuf messages are
mutable and accept any value of their wire type (a port of 70000, a
5-byte address), and the wire form is compacted in ways a caller should not
have to know (sequence numbers written as differences against an anchor,
addresses left out when they equal the guest's, TCP_ESTABLISHED written as
0, window scales packed in pairs, times in milliseconds).

Invariants:

* A record is valid once it exists: every dataclass checks its fields in
  ``__post_init__`` and raises :class:`ValueError` naming the field. A
  record ferryd builds wrongly is ferryd's bug and fails loudly at the
  source, before a byte of it is written.
* ``*_untrusted`` functions let exactly one exception escape:
  :class:`StreamError` (the peer's fault, or the channel's). They never
  trust a length, a range or a family.
* Round trip: for every valid record ``r`` and header ``h``,
  ``flow_from_proto_untrusted(flow_to_proto(r, h), h) == r`` (tested with
  hypothesis for every record type). Sequence numbers survive exactly in
  any relation to each other, since the differences are taken modulo 2^32.
* Addresses are :mod:`ipaddress` objects, ports and sequence numbers
  ``int``. A TCP flow's host socket is a
  :class:`~ferryd.migration.kernel_state.TcpKernelState`, the very value
  that sockstate dumps and restores; it validates itself the same way.

The compaction rules, with the protobuf field each one concerns, are
documented in the .proto; this module is their one implementation.
"""

from __future__ import annotations

import functools
import math
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ferryd.link import Ip4Config, Ip6Config
from ferryd.migration import migration_pb2 as pb
from ferryd.migration.kernel_state import TcpKernelState, TcpState, wscale_problem
from ferryd.migration.value import value_class
from ferryd.wire.ip import IpAddress
from ferryd.wire.tcp import MAX_WSCALE

__all__ = [
    "FlowRecord",
    "IcmpFlowRecord",
    "ListenerRecord",
    "StreamError",
    "StreamHeader",
    "TcpFlowRecord",
    "UdpFlowRecord",
    "flow_from_proto_untrusted",
    "flow_to_proto",
    "header_from_proto_untrusted",
    "header_to_proto",
    "kernel_state_from_proto_untrusted",
]

_U32 = 1 << 32
_MAX_IDLE_MS = _U32 - 1


class StreamError(Exception):
    """The migration stream is not valid: the source's fault, or the channel's.

    The one exception that decoding a stream lets escape; its message says
    what is wrong and where.
    """


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value < _U32:
        raise ValueError(f"{name} {value} is not a 32-bit unsigned value")


def _check_port(name: str, value: int, *, zero_ok: bool = False) -> None:
    low = 0 if zero_ok else 1
    if not low <= value <= 0xFFFF:
        raise ValueError(f"{name} {value} is not a port ({low}-65535)")


def _check_version_match(what: str, a: IpAddress, b: IpAddress) -> None:
    if a.version != b.version:
        raise ValueError(f"{what}: IPv{a.version} and IPv{b.version} addresses mixed")


def _check_wscale(name: str, value: int) -> None:
    if (problem := wscale_problem(name, value)) is not None:
        raise ValueError(problem)


def _check_idle(idle: float) -> None:
    if not (math.isfinite(idle) and idle >= 0):
        raise ValueError(f"idle time {idle} is not a non-negative number of seconds")


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """Who the guest is: what the target's services must go on telling it."""

    ferry_mac: bytes
    """ferryd's own MAC address on the guest link."""
    mtu: int
    ipv4: Ip4Config | None
    ipv6: Ip6Config | None
    guest_mac: bytes | None = None
    """None: the guest has not sent a frame yet."""
    flow_count_hint: int = 0
    software_version: str = ""
    frozen_at_ns: int | None = None
    """The source's wall clock at freeze, ns since the Unix epoch (logs only)."""
    precopy: bool = False
    """The stream starts with TCP flows pre-copied while the guest ran (stream.py)."""
    handover: bool = False
    """Source and target share a network namespace: TCP sockets travel beside the
    stream, not as kernel state (TcpFlowRecord.handed_over; stream.py)."""

    def __post_init__(self) -> None:
        if len(self.ferry_mac) != 6:
            raise ValueError(f"ferryd MAC of {len(self.ferry_mac)} bytes (needs 6)")
        if self.guest_mac is not None and len(self.guest_mac) != 6:
            raise ValueError(f"guest MAC of {len(self.guest_mac)} bytes (needs 6)")
        if not 68 <= self.mtu <= 65535:  # RFC 791: every IPv4 link carries 68 bytes
            raise ValueError(f"MTU {self.mtu} is not in 68-65535")
        if self.ipv4 is not None:
            _check_ip_config(self.ipv4, IPv4Address, 32)
        if self.ipv6 is not None:
            _check_ip_config(self.ipv6, IPv6Address, 128)
        _check_u32("flow count hint", self.flow_count_hint)
        if self.handover and self.precopy:
            raise ValueError("a handover stream has no pre-copy (nothing to copy ahead)")
        if self.frozen_at_ns is not None and not 0 < self.frozen_at_ns < 1 << 64:
            raise ValueError(f"freeze time {self.frozen_at_ns} ns is out of range")


def _check_ip_config(
    config: Ip4Config | Ip6Config, kind: type[IPv4Address] | type[IPv6Address], bits: int
) -> None:
    name = f"guest IPv{4 if kind is IPv4Address else 6}"
    for what, addr in [("address", config.address), ("gateway", config.gateway)] + [
        ("DNS server", dns) for dns in config.dns
    ]:
        if not isinstance(addr, kind):
            raise ValueError(f"{name} {what} {addr} is of the wrong family")
    if not 0 <= config.prefixlen <= bits:
        raise ValueError(f"{name} prefix length {config.prefixlen} is not in 0-{bits}")


@value_class  # (frozen to mypy; a plain dataclass at run time: value.py)
class TcpFlowRecord:
    """A TCP connection: the guest's side of it and the host socket's kernel state."""

    guest_addr: IpAddress
    guest_port: int
    remote_addr: IpAddress
    """The remote address as the guest sees it."""
    remote_port: int
    kernel: TcpKernelState | None
    """The host socket's state; None for a flow still in its handshake or handed over."""
    seq_to_guest: int
    seq_ack_from_guest: int
    seq_from_guest: int
    seq_ack_to_guest: int
    guest_window: int
    """The guest's advertised window, raw from its TCP header (unscaled)."""
    guest_wscale: int
    our_wscale: int
    guest_mss: int
    flags: int
    """Opaque here: closing progress and agreed options, ferryd's TCP flow code's Flags."""
    state: int
    """Opaque here: ferryd's TCP flow state, numbered by its TCP flow code (STATE_NUMBERS)."""
    handshake: bool = False
    """Still in the handshake: the target resets the flow instead of restoring it."""
    handed_over: bool = False
    """The host socket itself goes to the target beside the stream (a handover
    stream, same network namespace): no kernel state, nothing to restore."""

    def __post_init__(self) -> None:
        # One expression for the usual, valid record (a migration builds one
        # per connection in its downtime); the checks below name what is wrong.
        kind = type(self.guest_addr)
        if (
            (kind is IPv4Address or kind is IPv6Address)
            and type(self.remote_addr) is kind
            and 0 < self.guest_port <= 0xFFFF
            and 0 < self.remote_port <= 0xFFFF
            and (self.kernel is not None or self.handshake) != self.handed_over
            and 0 <= self.seq_to_guest < _U32
            and 0 <= self.seq_ack_from_guest < _U32
            and 0 <= self.seq_from_guest < _U32
            and 0 <= self.seq_ack_to_guest < _U32
            and 0 <= self.flags < _U32
            and 0 <= self.state < _U32
            and 0 <= self.guest_window <= 0xFFFF
            and 0 <= self.guest_wscale <= MAX_WSCALE
            and 0 <= self.our_wscale <= MAX_WSCALE
            and 0 <= self.guest_mss <= 0xFFFF
        ):
            return
        _check_version_match("TCP flow, guest side", self.guest_addr, self.remote_addr)
        _check_port("guest port", self.guest_port)
        _check_port("remote port", self.remote_port)
        if self.handshake and self.handed_over:
            raise ValueError("a TCP flow in its handshake is reset, not handed over")
        if self.kernel is None and not (self.handshake or self.handed_over):
            raise ValueError("a TCP flow past its handshake needs its socket's state")
        if self.kernel is not None and self.handed_over:
            raise ValueError("a handed-over TCP flow carries no socket state")
        for name in (
            "seq_to_guest",
            "seq_ack_from_guest",
            "seq_from_guest",
            "seq_ack_to_guest",
            "flags",
            "state",
        ):
            _check_u32(name, getattr(self, name))
        if not 0 <= self.guest_window <= 0xFFFF:
            raise ValueError(f"guest window {self.guest_window} is not a raw 16-bit window")
        _check_wscale("guest_wscale", self.guest_wscale)
        _check_wscale("our_wscale", self.our_wscale)
        _check_port("guest MSS", self.guest_mss, zero_ok=True)


@dataclass(frozen=True, slots=True)
class UdpFlowRecord:
    guest_addr: IpAddress
    guest_port: int
    remote_addr: IpAddress
    """The remote address as the guest sees it."""
    remote_port: int
    idle: float
    """Seconds since the last datagram either way (carried in milliseconds)."""
    listener_port: int | None = None
    """Inbound flows: the host port of the forwarding listener that opened it."""
    listener_addr: IpAddress | None = None
    """Inbound flows: that listener's bind address; None: all addresses."""
    host_port: int | None = None
    """Outbound flows: the host socket's port, for the target to try to keep."""
    host_addr: IpAddress | None = None
    """Outbound flows: the host socket's address; None: any."""
    handed_over: bool = False
    """Outbound flows in a handover stream: the flow's socket comes beside the
    stream (ferryd.migration.handover), datagrams waiting in it included."""

    @property
    def inbound(self) -> bool:
        return self.listener_port is not None

    def __post_init__(self) -> None:
        _check_version_match("UDP flow", self.guest_addr, self.remote_addr)
        _check_port("guest port", self.guest_port)
        _check_port("remote port", self.remote_port)
        _check_idle(self.idle)
        if self.listener_port is not None:
            _check_port("listener port", self.listener_port)
        elif self.listener_addr is not None:
            raise ValueError("a listener address without a listener port")
        if self.host_port is not None:
            _check_port("host port", self.host_port)
        if self.handed_over and self.listener_port is not None:
            # (An inbound flow answers through its listener's socket: it has none.)
            raise ValueError("an inbound flow's socket handed over")


@dataclass(frozen=True, slots=True)
class IcmpFlowRecord:
    guest_addr: IpAddress
    echo_id: int
    remote_addr: IpAddress
    """The remote address as the guest sees it (ICMPv6 if IPv6)."""
    idle: float
    """Seconds since the last echo either way (carried in milliseconds)."""
    handed_over: bool = False
    """In a handover stream: the flow's ping socket comes beside the stream."""

    def __post_init__(self) -> None:
        _check_version_match("ICMP flow", self.guest_addr, self.remote_addr)
        _check_port("echo id", self.echo_id, zero_ok=True)
        _check_idle(self.idle)


@dataclass(frozen=True, slots=True)
class ListenerRecord:
    """An inbound forwarding listener (``-t``/``-u``)."""

    proto: int
    """socket.IPPROTO_TCP (6) or socket.IPPROTO_UDP (17)."""
    bind_addr: IpAddress | None
    """None: every address of both families."""
    host_port: int
    guest_port: int
    handed_over: int = 0
    """In a handover stream: how many listening sockets come beside the stream
    (one per family listened on); 0: the target binds the port itself."""

    def __post_init__(self) -> None:
        if self.proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            raise ValueError(f"listener protocol {self.proto} is neither TCP (6) nor UDP (17)")
        _check_port("listener host port", self.host_port)
        _check_port("listener guest port", self.guest_port)
        if not 0 <= self.handed_over <= 2:
            raise ValueError(f"{self.handed_over} listening sockets handed over: 0, 1 or 2")


FlowRecord = TcpFlowRecord | UdpFlowRecord | IcmpFlowRecord | ListenerRecord
FlowMessage = pb.TcpFlow | pb.UdpFlow | pb.IcmpFlow | pb.Listener


# ---------------------------------------------------------------------------
# To protobuf (trusted: records are valid by construction)
# ---------------------------------------------------------------------------


def _packed(addr: IpAddress | None) -> bytes:
    return b"" if addr is None else addr.packed


def _guest_address(header: StreamHeader, version: int) -> IpAddress | None:
    config = header.ipv4 if version == 4 else header.ipv6
    return None if config is None else config.address


def _guest_packed(addr: IpAddress, header: StreamHeader) -> bytes:
    """The guest address as written: empty when it is the header's."""
    return b"" if addr == _guest_address(header, addr.version) else addr.packed


def header_to_proto(
    header: StreamHeader, version: int, min_compatible: int, magic: int
) -> pb.Header:
    msg = pb.Header(
        magic=magic,
        version=version,
        min_compatible_version=min_compatible,
        guest_mac=header.guest_mac or b"",
        ferry_mac=header.ferry_mac,
        mtu=header.mtu,
        flow_count_hint=header.flow_count_hint,
        software_version=header.software_version,
        frozen_at_unix_ns=header.frozen_at_ns or 0,
        precopy=header.precopy,
        handover=header.handover,
    )
    for config, field in ((header.ipv4, msg.ipv4), (header.ipv6, msg.ipv6)):
        if config is not None:
            field.address = config.address.packed
            field.prefix_len = config.prefixlen
            field.gateway = config.gateway.packed
            field.dns.extend(dns.packed for dns in config.dns)
    return msg


def _tcp_to_proto(flow: TcpFlowRecord, header: StreamHeader) -> pb.TcpFlow:
    guest_addr = _guest_packed(flow.guest_addr, header)
    msg = pb.TcpFlow(
        guest_addr=guest_addr,
        guest_port=flow.guest_port,
        remote_addr=flow.remote_addr.packed,
        remote_port=flow.remote_port,
        seq_ack_from_guest=flow.seq_ack_from_guest,
        seq_to_guest_delta=(flow.seq_to_guest - flow.seq_ack_from_guest) % _U32,
        seq_from_guest=flow.seq_from_guest,
        seq_ack_to_guest_delta=(flow.seq_from_guest - flow.seq_ack_to_guest) % _U32,
        guest_window=flow.guest_window,
        guest_wscales=flow.guest_wscale | flow.our_wscale << 4,
        guest_mss=flow.guest_mss,
        flags=flow.flags,
        state=flow.state,
        handshake=flow.handshake,
        socket_handed_over=flow.handed_over,
    )
    k = flow.kernel
    if k is not None:
        sock = msg.socket
        sock.local_addr = b"" if k.local_addr == flow.guest_addr else k.local_addr.packed
        sock.local_port = k.local_port
        sock.remote_addr = b"" if k.remote_addr == flow.remote_addr else k.remote_addr.packed
        sock.remote_port = 0 if k.remote_port == flow.remote_port else k.remote_port
        sock.tcp_state = 0 if k.tcp_state == TcpState.ESTABLISHED else k.tcp_state
        sock.mss = k.mss
        sock.wscales = k.snd_wscale | k.rcv_wscale << 4
        sock.options = k.options
        sock.timestamp = k.timestamp
        sock.send_seq = k.send_seq
        sock.recv_seq = k.recv_seq
        sock.snd_wnd = k.snd_wnd
        sock.rcv_wnd = k.rcv_wnd
        sock.rcv_wup_delta = (k.recv_seq - k.rcv_wup) % _U32
        sock.snd_wl1_delta = (k.recv_seq - k.snd_wl1) % _U32
        sock.max_window_delta = (k.max_window - k.snd_wnd) % _U32
        sock.send_queue = k.send_queue
        sock.unsent = k.unsent
        sock.recv_queue = k.recv_queue
    return msg


def _idle_ms(idle: float) -> int:
    return min(round(idle * 1000), _MAX_IDLE_MS)


def flow_to_proto(flow: FlowRecord, header: StreamHeader) -> FlowMessage:
    """The protobuf message for ``flow``; guest addresses are left out when the header's."""
    if isinstance(flow, TcpFlowRecord):
        return _tcp_to_proto(flow, header)
    if isinstance(flow, UdpFlowRecord):
        return pb.UdpFlow(
            guest_addr=_guest_packed(flow.guest_addr, header),
            guest_port=flow.guest_port,
            remote_addr=flow.remote_addr.packed,
            remote_port=flow.remote_port,
            idle_ms=_idle_ms(flow.idle),
            listener_port=flow.listener_port or 0,
            listener_addr=_packed(flow.listener_addr),
            host_port=flow.host_port or 0,
            host_addr=_packed(flow.host_addr),
            socket_handed_over=flow.handed_over,
        )
    if isinstance(flow, IcmpFlowRecord):
        return pb.IcmpFlow(
            guest_addr=_guest_packed(flow.guest_addr, header),
            echo_id=flow.echo_id,
            remote_addr=flow.remote_addr.packed,
            idle_ms=_idle_ms(flow.idle),
            socket_handed_over=flow.handed_over,
        )
    return pb.Listener(
        ip_proto=flow.proto,
        bind_addr=_packed(flow.bind_addr),
        host_port=flow.host_port,
        guest_port=flow.guest_port,
        sockets_handed_over=flow.handed_over,
    )


# ---------------------------------------------------------------------------
# From protobuf (untrusted)
# ---------------------------------------------------------------------------


def _address(what: str, data: bytes) -> IpAddress:
    addr = _packed_address(data)
    if addr is None:
        raise ValueError(f"{what} of {len(data)} bytes (needs 4 or 16)")
    return addr


@functools.lru_cache(maxsize=4096)
def _packed_address(data: bytes) -> IpAddress | None:
    """The address ``data`` packs, or None; cached: a stream names the same few peers
    and host addresses once per connection (bounded: a hostile stream only churns it)."""
    if len(data) == 4:
        return IPv4Address(data)
    if len(data) == 16:
        return IPv6Address(data)
    return None


def _optional_address(what: str, data: bytes) -> IpAddress | None:
    return _address(what, data) if data else None


def _guest_side(
    header: StreamHeader, guest_data: bytes, remote_data: bytes
) -> tuple[IpAddress, IpAddress]:
    remote = _address("remote address", remote_data)
    if guest_data:
        return _address("guest address", guest_data), remote
    guest = _guest_address(header, remote.version)
    if guest is None:
        raise ValueError(f"guest address left out, but the header has no IPv{remote.version}")
    return guest, remote


def header_from_proto_untrusted(msg: pb.Header) -> StreamHeader:
    """The header's contents (magic and versions are the caller's to check first)."""
    try:
        ipv4 = ipv6 = None
        if msg.HasField("ipv4"):
            c = msg.ipv4
            ipv4 = Ip4Config(
                address=IPv4Address(_exact("guest IPv4 address", c.address, 4)),
                prefixlen=c.prefix_len,
                gateway=IPv4Address(_exact("guest IPv4 gateway", c.gateway, 4)),
                dns=tuple(IPv4Address(_exact("guest IPv4 DNS", d, 4)) for d in c.dns),
            )
        if msg.HasField("ipv6"):
            c = msg.ipv6
            ipv6 = Ip6Config(
                address=IPv6Address(_exact("guest IPv6 address", c.address, 16)),
                prefixlen=c.prefix_len,
                gateway=IPv6Address(_exact("guest IPv6 gateway", c.gateway, 16)),
                dns=tuple(IPv6Address(_exact("guest IPv6 DNS", d, 16)) for d in c.dns),
            )
        return StreamHeader(
            ferry_mac=msg.ferry_mac,
            mtu=msg.mtu,
            ipv4=ipv4,
            ipv6=ipv6,
            guest_mac=msg.guest_mac or None,
            flow_count_hint=msg.flow_count_hint,
            software_version=msg.software_version,
            frozen_at_ns=msg.frozen_at_unix_ns or None,
            precopy=msg.precopy,
            handover=msg.handover,
        )
    except ValueError as exc:
        raise StreamError(f"invalid header: {exc}") from None


def _exact(what: str, data: bytes, size: int) -> bytes:
    if len(data) != size:
        raise ValueError(f"{what} of {len(data)} bytes (needs {size})")
    return data


def kernel_state_from_proto_untrusted(
    s: pb.TcpSocket, guest_addr: IpAddress, remote_addr: IpAddress, remote_port: int
) -> TcpKernelState:
    """The host socket of a TCP flow record; :class:`StreamError` if it is not restorable.

    ``guest_addr``, ``remote_addr`` and ``remote_port`` are the flow's (its
    guest side): what an empty address or a zero remote port stands for.
    """
    try:
        local = _address("socket local address", s.local_addr) if s.local_addr else guest_addr
        remote = _address("socket remote address", s.remote_addr) if s.remote_addr else remote_addr
        if s.wscales > 0xFF:
            raise ValueError(f"socket window scales {s.wscales:#x} do not fit a byte")
        return TcpKernelState(
            local_addr=local,
            local_port=s.local_port,
            remote_addr=remote,
            remote_port=s.remote_port or remote_port,
            tcp_state=s.tcp_state or TcpState.ESTABLISHED,
            mss=s.mss,
            snd_wscale=s.wscales & 0xF,
            rcv_wscale=s.wscales >> 4,
            options=s.options,
            timestamp=s.timestamp,
            snd_wl1=(s.recv_seq - s.snd_wl1_delta) % _U32,
            snd_wnd=s.snd_wnd,
            max_window=(s.snd_wnd + s.max_window_delta) % _U32,
            rcv_wnd=s.rcv_wnd,
            rcv_wup=(s.recv_seq - s.rcv_wup_delta) % _U32,
            send_seq=s.send_seq,
            recv_seq=s.recv_seq,
            send_queue=s.send_queue,
            unsent=s.unsent,
            recv_queue=s.recv_queue,
        )
    except ValueError as exc:  # KernelStateError included
        raise StreamError(f"invalid socket state: {exc}") from None


def _tcp_from_proto(msg: pb.TcpFlow, header: StreamHeader) -> TcpFlowRecord:
    guest_addr, remote_addr = _guest_side(header, msg.guest_addr, msg.remote_addr)
    kernel = None
    if msg.HasField("socket"):
        kernel = kernel_state_from_proto_untrusted(
            msg.socket, guest_addr, remote_addr, msg.remote_port
        )
    if msg.guest_wscales > 0xFF:
        raise ValueError(f"guest window scales {msg.guest_wscales:#x} do not fit a byte")
    if msg.socket_handed_over and not header.handover:
        raise ValueError("a handed-over socket in a stream that is not a handover")
    return TcpFlowRecord(
        guest_addr=guest_addr,
        guest_port=msg.guest_port,
        remote_addr=remote_addr,
        remote_port=msg.remote_port,
        kernel=kernel,
        seq_to_guest=(msg.seq_ack_from_guest + msg.seq_to_guest_delta) % _U32,
        seq_ack_from_guest=msg.seq_ack_from_guest,
        seq_from_guest=msg.seq_from_guest,
        seq_ack_to_guest=(msg.seq_from_guest - msg.seq_ack_to_guest_delta) % _U32,
        guest_window=msg.guest_window,
        guest_wscale=msg.guest_wscales & 0xF,
        our_wscale=msg.guest_wscales >> 4,
        guest_mss=msg.guest_mss,
        flags=msg.flags,
        state=msg.state,
        handshake=msg.handshake,
        handed_over=msg.socket_handed_over,
    )


def flow_from_proto_untrusted(msg: FlowMessage, header: StreamHeader) -> FlowRecord:
    """The record a flow message stands for; :class:`StreamError` if it is not valid."""
    kind = type(msg).__name__
    try:
        if isinstance(msg, pb.TcpFlow):
            return _tcp_from_proto(msg, header)
        if not isinstance(msg, pb.Listener) and msg.socket_handed_over and not header.handover:
            raise ValueError("a handed-over socket in a stream that is not a handover")
        if isinstance(msg, pb.UdpFlow):
            guest, remote = _guest_side(header, msg.guest_addr, msg.remote_addr)
            return UdpFlowRecord(
                guest_addr=guest,
                guest_port=msg.guest_port,
                remote_addr=remote,
                remote_port=msg.remote_port,
                idle=msg.idle_ms / 1000,
                listener_port=msg.listener_port or None,
                listener_addr=_optional_address("listener address", msg.listener_addr),
                host_port=msg.host_port or None,
                host_addr=_optional_address("host address", msg.host_addr),
                handed_over=msg.socket_handed_over,
            )
        if isinstance(msg, pb.IcmpFlow):
            guest, remote = _guest_side(header, msg.guest_addr, msg.remote_addr)
            return IcmpFlowRecord(
                guest_addr=guest,
                echo_id=msg.echo_id,
                remote_addr=remote,
                idle=msg.idle_ms / 1000,
                handed_over=msg.socket_handed_over,
            )
        if msg.sockets_handed_over and not header.handover:
            raise ValueError("handed-over sockets in a stream that is not a handover")
        return ListenerRecord(
            proto=msg.ip_proto,
            bind_addr=_optional_address("listener bind address", msg.bind_addr),
            host_port=msg.host_port,
            guest_port=msg.guest_port,
            handed_over=msg.sockets_handed_over,
        )
    except (ValueError, StreamError) as exc:
        raise StreamError(f"invalid {kind} record: {exc}") from None
