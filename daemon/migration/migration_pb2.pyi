from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stream(_message.Message):
    __slots__ = ("header", "tcp", "udp", "icmp", "listener", "precopy_end", "tcp_gone", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TCP_FIELD_NUMBER: _ClassVar[int]
    UDP_FIELD_NUMBER: _ClassVar[int]
    ICMP_FIELD_NUMBER: _ClassVar[int]
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    PRECOPY_END_FIELD_NUMBER: _ClassVar[int]
    TCP_GONE_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: Header
    tcp: _containers.RepeatedCompositeFieldContainer[TcpFlow]
    udp: _containers.RepeatedCompositeFieldContainer[UdpFlow]
    icmp: _containers.RepeatedCompositeFieldContainer[IcmpFlow]
    listener: _containers.RepeatedCompositeFieldContainer[Listener]
    precopy_end: _containers.RepeatedCompositeFieldContainer[PrecopyEnd]
    tcp_gone: _containers.RepeatedCompositeFieldContainer[TcpGone]
    trailer: Trailer
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., tcp: _Optional[_Iterable[_Union[TcpFlow, _Mapping]]] = ..., udp: _Optional[_Iterable[_Union[UdpFlow, _Mapping]]] = ..., icmp: _Optional[_Iterable[_Union[IcmpFlow, _Mapping]]] = ..., listener: _Optional[_Iterable[_Union[Listener, _Mapping]]] = ..., precopy_end: _Optional[_Iterable[_Union[PrecopyEnd, _Mapping]]] = ..., tcp_gone: _Optional[_Iterable[_Union[TcpGone, _Mapping]]] = ..., trailer: _Optional[_Union[Trailer, _Mapping]] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("magic", "version", "min_compatible_version", "guest_mac", "ferry_mac", "mtu", "ipv4", "ipv6", "flow_count_hint", "software_version", "frozen_at_unix_ns", "precopy", "handover")
    MAGIC_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_COMPATIBLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    GUEST_MAC_FIELD_NUMBER: _ClassVar[int]
    FERRY_MAC_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    IPV4_FIELD_NUMBER: _ClassVar[int]
    IPV6_FIELD_NUMBER: _ClassVar[int]
    FLOW_COUNT_HINT_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FROZEN_AT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    PRECOPY_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_FIELD_NUMBER: _ClassVar[int]
    magic: int
    version: int
    min_compatible_version: int
    guest_mac: bytes
    ferry_mac: bytes
    mtu: int
    ipv4: GuestIp
    ipv6: GuestIp
    flow_count_hint: int
    software_version: str
    frozen_at_unix_ns: int
    precopy: bool
    handover: bool
    def __init__(self, magic: _Optional[int] = ..., version: _Optional[int] = ..., min_compatible_version: _Optional[int] = ..., guest_mac: _Optional[bytes] = ..., ferry_mac: _Optional[bytes] = ..., mtu: _Optional[int] = ..., ipv4: _Optional[_Union[GuestIp, _Mapping]] = ..., ipv6: _Optional[_Union[GuestIp, _Mapping]] = ..., flow_count_hint: _Optional[int] = ..., software_version: _Optional[str] = ..., frozen_at_unix_ns: _Optional[int] = ..., precopy: _Optional[bool] = ..., handover: _Optional[bool] = ...) -> None: ...

class GuestIp(_message.Message):
    __slots__ = ("address", "prefix_len", "gateway", "dns")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DNS_FIELD_NUMBER: _ClassVar[int]
    address: bytes
    prefix_len: int
    gateway: bytes
    dns: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, address: _Optional[bytes] = ..., prefix_len: _Optional[int] = ..., gateway: _Optional[bytes] = ..., dns: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TcpFlow(_message.Message):
    __slots__ = ("guest_addr", "guest_port", "remote_addr", "remote_port", "socket", "seq_ack_from_guest", "seq_to_guest_delta", "seq_from_guest", "seq_ack_to_guest_delta", "guest_window", "guest_wscales", "guest_mss", "flags", "state", "handshake", "socket_handed_over")
    GUEST_ADDR_FIELD_NUMBER: _ClassVar[int]
    GUEST_PORT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDR_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PORT_FIELD_NUMBER: _ClassVar[int]
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    SEQ_ACK_FROM_GUEST_FIELD_NUMBER: _ClassVar[int]
    SEQ_TO_GUEST_DELTA_FIELD_NUMBER: _ClassVar[int]
    SEQ_FROM_GUEST_FIELD_NUMBER: _ClassVar[int]
    SEQ_ACK_TO_GUEST_DELTA_FIELD_NUMBER: _ClassVar[int]
    GUEST_WINDOW_FIELD_NUMBER: _ClassVar[int]
    GUEST_WSCALES_FIELD_NUMBER: _ClassVar[int]
    GUEST_MSS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    SOCKET_HANDED_OVER_FIELD_NUMBER: _ClassVar[int]
    guest_addr: bytes
    guest_port: int
    remote_addr: bytes
    remote_port: int
    socket: TcpSocket
    seq_ack_from_guest: int
    seq_to_guest_delta: int
    seq_from_guest: int
    seq_ack_to_guest_delta: int
    guest_window: int
    guest_wscales: int
    guest_mss: int
    flags: int
    state: int
    handshake: bool
    socket_handed_over: bool
    def __init__(self, guest_addr: _Optional[bytes] = ..., guest_port: _Optional[int] = ..., remote_addr: _Optional[bytes] = ..., remote_port: _Optional[int] = ..., socket: _Optional[_Union[TcpSocket, _Mapping]] = ..., seq_ack_from_guest: _Optional[int] = ..., seq_to_guest_delta: _Optional[int] = ..., seq_from_guest: _Optional[int] = ..., seq_ack_to_guest_delta: _Optional[int] = ..., guest_window: _Optional[int] = ..., guest_wscales: _Optional[int] = ..., guest_mss: _Optional[int] = ..., flags: _Optional[int] = ..., state: _Optional[int] = ..., handshake: _Optional[bool] = ..., socket_handed_over: _Optional[bool] = ...) -> None: ...

class TcpSocket(_message.Message):
    __slots__ = ("local_addr", "local_port", "remote_addr", "remote_port", "tcp_state", "mss", "wscales", "options", "timestamp", "send_seq", "recv_seq", "snd_wnd", "rcv_wnd", "rcv_wup_delta", "snd_wl1_delta", "max_window_delta", "send_queue", "unsent", "recv_queue")
    LOCAL_ADDR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PORT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDR_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PORT_FIELD_NUMBER: _ClassVar[int]
    TCP_STATE_FIELD_NUMBER: _ClassVar[int]
    MSS_FIELD_NUMBER: _ClassVar[int]
    WSCALES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SEND_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECV_SEQ_FIELD_NUMBER: _ClassVar[int]
    SND_WND_FIELD_NUMBER: _ClassVar[int]
    RCV_WND_FIELD_NUMBER: _ClassVar[int]
    RCV_WUP_DELTA_FIELD_NUMBER: _ClassVar[int]
    SND_WL1_DELTA_FIELD_NUMBER: _ClassVar[int]
    MAX_WINDOW_DELTA_FIELD_NUMBER: _ClassVar[int]
    SEND_QUEUE_FIELD_NUMBER: _ClassVar[int]
    UNSENT_FIELD_NUMBER: _ClassVar[int]
    RECV_QUEUE_FIELD_NUMBER: _ClassVar[int]
    local_addr: bytes
    local_port: int
    remote_addr: bytes
    remote_port: int
    tcp_state: int
    mss: int
    wscales: int
    options: int
    timestamp: int
    send_seq: int
    recv_seq: int
    snd_wnd: int
    rcv_wnd: int
    rcv_wup_delta: int
    snd_wl1_delta: int
    max_window_delta: int
    send_queue: bytes
    unsent: int
    recv_queue: bytes
    def __init__(self, local_addr: _Optional[bytes] = ..., local_port: _Optional[int] = ..., remote_addr: _Optional[bytes] = ..., remote_port: _Optional[int] = ..., tcp_state: _Optional[int] = ..., mss: _Optional[int] = ..., wscales: _Optional[int] = ..., options: _Optional[int] = ..., timestamp: _Optional[int] = ..., send_seq: _Optional[int] = ..., recv_seq: _Optional[int] = ..., snd_wnd: _Optional[int] = ..., rcv_wnd: _Optional[int] = ..., rcv_wup_delta: _Optional[int] = ..., snd_wl1_delta: _Optional[int] = ..., max_window_delta: _Optional[int] = ..., send_queue: _Optional[bytes] = ..., unsent: _Optional[int] = ..., recv_queue: _Optional[bytes] = ...) -> None: ...

class UdpFlow(_message.Message):
    __slots__ = ("guest_addr", "guest_port", "remote_addr", "remote_port", "idle_ms", "listener_port", "listener_addr", "host_port", "host_addr", "socket_handed_over")
    GUEST_ADDR_FIELD_NUMBER: _ClassVar[int]
    GUEST_PORT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDR_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PORT_FIELD_NUMBER: _ClassVar[int]
    IDLE_MS_FIELD_NUMBER: _ClassVar[int]
    LISTENER_PORT_FIELD_NUMBER: _ClassVar[int]
    LISTENER_ADDR_FIELD_NUMBER: _ClassVar[int]
    HOST_PORT_FIELD_NUMBER: _ClassVar[int]
    HOST_ADDR_FIELD_NUMBER: _ClassVar[int]
    SOCKET_HANDED_OVER_FIELD_NUMBER: _ClassVar[int]
    guest_addr: bytes
    guest_port: int
    remote_addr: bytes
    remote_port: int
    idle_ms: int
    listener_port: int
    listener_addr: bytes
    host_port: int
    host_addr: bytes
    socket_handed_over: bool
    def __init__(self, guest_addr: _Optional[bytes] = ..., guest_port: _Optional[int] = ..., remote_addr: _Optional[bytes] = ..., remote_port: _Optional[int] = ..., idle_ms: _Optional[int] = ..., listener_port: _Optional[int] = ..., listener_addr: _Optional[bytes] = ..., host_port: _Optional[int] = ..., host_addr: _Optional[bytes] = ..., socket_handed_over: _Optional[bool] = ...) -> None: ...

class IcmpFlow(_message.Message):
    __slots__ = ("guest_addr", "echo_id", "remote_addr", "idle_ms", "socket_handed_over")
    GUEST_ADDR_FIELD_NUMBER: _ClassVar[int]
    ECHO_ID_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDR_FIELD_NUMBER: _ClassVar[int]
    IDLE_MS_FIELD_NUMBER: _ClassVar[int]
    SOCKET_HANDED_OVER_FIELD_NUMBER: _ClassVar[int]
    guest_addr: bytes
    echo_id: int
    remote_addr: bytes
    idle_ms: int
    socket_handed_over: bool
    def __init__(self, guest_addr: _Optional[bytes] = ..., echo_id: _Optional[int] = ..., remote_addr: _Optional[bytes] = ..., idle_ms: _Optional[int] = ..., socket_handed_over: _Optional[bool] = ...) -> None: ...

class Listener(_message.Message):
    __slots__ = ("ip_proto", "bind_addr", "host_port", "guest_port", "sockets_handed_over")
    IP_PROTO_FIELD_NUMBER: _ClassVar[int]
    BIND_ADDR_FIELD_NUMBER: _ClassVar[int]
    HOST_PORT_FIELD_NUMBER: _ClassVar[int]
    GUEST_PORT_FIELD_NUMBER: _ClassVar[int]
    SOCKETS_HANDED_OVER_FIELD_NUMBER: _ClassVar[int]
    ip_proto: int
    bind_addr: bytes
    host_port: int
    guest_port: int
    sockets_handed_over: int
    def __init__(self, ip_proto: _Optional[int] = ..., bind_addr: _Optional[bytes] = ..., host_port: _Optional[int] = ..., guest_port: _Optional[int] = ..., sockets_handed_over: _Optional[int] = ...) -> None: ...

class PrecopyEnd(_message.Message):
    __slots__ = ("tcp_count",)
    TCP_COUNT_FIELD_NUMBER: _ClassVar[int]
    tcp_count: int
    def __init__(self, tcp_count: _Optional[int] = ...) -> None: ...

class TcpGone(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[_Iterable[int]] = ...) -> None: ...

class Trailer(_message.Message):
    __slots__ = ("flow_count", "crc32")
    FLOW_COUNT_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    flow_count: int
    crc32: int
    def __init__(self, flow_count: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...
