"""Forward compatibility: a stream from a newer ferryd, written with an extended schema.

The extended schema is this version's, grown the way proto/migration.proto
allows (new fields with new numbers, a new record kind), built in a
separate descriptor pool so it cannot clash with the generated module.
"""

from __future__ import annotations

import zlib

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from ferryd.migration import migration_pb2 as pb
from ferryd.migration.records import flow_to_proto, header_to_proto
from ferryd.migration.stream import (
    MAGIC,
    FlowReceived,
    HeaderReceived,
    RecordSkipped,
    StreamDecoder,
    StreamEnded,
    _frame,
)
from tests.unit.test_stream import HEADER, _listener, idle_tcp

_T = descriptor_pb2.FieldDescriptorProto


def _add_field(
    msg: descriptor_pb2.DescriptorProto, name: str, number: int, kind: int, type_name: str = ""
) -> None:
    field = msg.field.add(name=name, number=number, type=kind, label=_T.LABEL_OPTIONAL)
    if type_name:
        field.type_name = type_name


def _newer_schema() -> dict[str, type[Message]]:
    """A later version of the schema, as a future ferryd might have it."""
    fdp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "migration_v2.proto"
    messages = {m.name: m for m in fdp.message_type}
    _add_field(messages["Header"], "cluster_id", 14, _T.TYPE_STRING)
    _add_field(messages["TcpFlow"], "ecn_state", 18, _T.TYPE_UINT32)
    _add_field(messages["TcpFlow"], "congestion", 3000, _T.TYPE_BYTES)
    _add_field(messages["TcpSocket"], "tcp_notsent_lowat", 20, _T.TYPE_UINT32)
    _add_field(messages["Trailer"], "sha256", 3, _T.TYPE_BYTES)
    sctp = fdp.message_type.add(name="SctpFlow")
    _add_field(sctp, "association", 1, _T.TYPE_BYTES)
    stream = messages["Stream"]
    field = stream.field.add(name="sctp", number=8, type=_T.TYPE_MESSAGE, label=_T.LABEL_REPEATED)
    field.type_name = ".ferry.migration.v1.SctpFlow"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"ferry.migration.v1.{name}")
        )
        for name in ("Header", "TcpFlow", "Trailer", "SctpFlow")
    }


def _convert(msg: Message, cls: type[Message], **extra: object) -> bytes:
    """``msg`` re-read with the newer schema, with newer fields set."""
    newer = cls()
    newer.ParseFromString(msg.SerializeToString())
    for name, value in extra.items():
        setattr(newer, name, value)
    return newer.SerializeToString()


def test_newer_fields_and_record_kinds_are_ignored() -> None:
    v2 = _newer_schema()
    header = header_to_proto(HEADER, version=2, min_compatible=1, magic=MAGIC)
    tcp = flow_to_proto(idle_tcp(), HEADER)
    tcp_v2 = v2["TcpFlow"]()
    tcp_v2.ParseFromString(tcp.SerializeToString())
    tcp_v2.ecn_state = 3  # type: ignore[attr-defined]
    tcp_v2.congestion = b"bbr state"  # type: ignore[attr-defined]
    tcp_v2.socket.tcp_notsent_lowat = 16384  # type: ignore[attr-defined]
    body = (
        _frame(1, _convert(header, v2["Header"], cluster_id="eu-west"))
        + _frame(2, tcp_v2.SerializeToString())
        + _frame(8, _convert(v2["SctpFlow"](), v2["SctpFlow"], association=b"\x01" * 40))
        + _frame(5, flow_to_proto(_listener(), HEADER).SerializeToString())
        + _frame(99, b"a record kind with a two-byte tag")
    )
    trailer = _convert(
        pb.Trailer(flow_count=4, crc32=zlib.crc32(body)), v2["Trailer"], sha256=b"\x00" * 32
    )
    data = body + _frame(15, trailer)
    assert tcp_v2.SerializeToString() != tcp.SerializeToString()

    dec = StreamDecoder()
    events = [e for i in range(len(data)) for e in dec.feed_untrusted(data[i : i + 1])]
    dec.eof()
    assert events == [
        HeaderReceived(HEADER, 2, 1),
        FlowReceived(idle_tcp(), 0),
        RecordSkipped(8, 42, 1),
        FlowReceived(_listener(), 2),
        RecordSkipped(99, 33, 3),
        StreamEnded(4),
    ]
