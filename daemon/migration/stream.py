"""The migration stream codec: records in, bytes out, and back (sans-IO).

Theory of operation
-------------------

A source ferryd writes one stream to one target ferryd (through a pipe that
QEMU or ferryctl carries); the two may run different versions. The schema is
``proto/migration.proto``; the Python values are those of
:mod:`ferryd.migration.records`. This module owns no file descriptor and no
clock: :class:`StreamEncoder` turns records into bytes for the caller to
write, :class:`StreamDecoder` turns whatever bytes the caller read into
events (:mod:`ferryd.migration.stream_events`) as soon as each record is
complete, so the target restores flow *n* while the source still dumps flow
*n + 1*, and neither side stages the whole stream.

Framing. The stream is the wire encoding of the .proto's ``Stream``
message, written record by record. A record is::

    tag      one varint: field_number << 3 | 2 (in practice one byte:
             0x0a header, 0x12 TCP, 0x1a UDP, 0x22 ICMP, 0x2a listener,
             0x7a trailer)
    length   one varint
    body     that many bytes: the serialized Header, TcpFlow, ... message

i.e. protobuf's standard length-delimited form with the record's kind in
front, one byte cheaper per flow than an envelope message, and decodable as
a whole by ``protoc --decode=ferry.migration.v1.Stream``. The order is
fixed: one header, any number of flow records, one trailer, then the end of
the stream. With pre-copy (``StreamHeader.precopy``, format version 2) the
flows come in two parts: TCP flows dumped while the guest ran, a
``PrecopyEnd`` record, then what was dumped after the freeze, where a TCP
flow may replace a pre-copied one of the same 4-tuple and one ``TcpGone``
record may retire pre-copied ones (the target's job, ferryd.migration.
restore; this codec checks the order and the indexes). A record kind
this reader does not know (a newer writer's) is skipped and reported as
:class:`RecordSkipped`; a record whose wire type is not length-delimited is
an error.

Checks, in the order the decoder makes them (each failure is a
:class:`StreamError` saying what is wrong; the decoder is then dead and
says so on any later call):

1. The first byte must be the header's tag, and the header is at most
   :data:`MAX_HEADER_SIZE` bytes: garbage is refused after a byte, not
   after buffering whatever length it happens to announce.
2. The header's magic, then its versions: a stream whose
   ``min_compatible_version`` is above :data:`READER_VERSION` is refused
   ("stream version 7 needs a reader ≥ 5; this ferryd reads 1") before any
   flow is looked at, so the target touches nothing. Unknown fields of
   any message (a newer writer's additions) are ignored.
3. Every record is at most ``max_record_size`` bytes (default
   :data:`MAX_RECORD_SIZE`, 64 MiB: a TCP flow carries its socket's send
   and receive queues), refused as soon as its length is read.
4. Every message must parse, and its values must make sense (ports,
   address lengths and families, window scales, a socket state that can
   be restored, ...: see :mod:`ferryd.migration.records` and
   :mod:`ferryd.migration.kernel_state`).
5. The trailer must count the records between header and trailer, and
   carry the CRC-32 (``zlib.crc32``) of every stream byte before its own
   tag. Nothing may follow it; :meth:`StreamDecoder.eof` raises if the
   stream stopped anywhere before its end.

CRC-32 rather than a cryptographic hash: it detects the corruption and
truncation a channel can cause, at 3 GB/s here against SHA-256's 1.8 (the
checksum is computed inside the migration downtime); a peer that lies
could compute either.

The encoder trusts its records (they validate themselves when built) and
keeps the count and checksum; calling it out of order is a bug in ferryd
and raises :class:`RuntimeError`; a record larger than the stream's limit,
or a TcpGone index outside the pre-copy, raises :class:`ValueError`.
"""

from __future__ import annotations

import enum
import zlib
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ferryd.migration import migration_pb2 as pb
from ferryd.migration.records import (
    FlowMessage,
    FlowRecord,
    IcmpFlowRecord,
    ListenerRecord,
    StreamError,
    StreamHeader,
    TcpFlowRecord,
    UdpFlowRecord,
    flow_from_proto_untrusted,
    flow_to_proto,
    header_from_proto_untrusted,
    header_to_proto,
)
from ferryd.migration.stream_events import (
    FlowReceived,
    HeaderReceived,
    PrecopyEnded,
    RecordSkipped,
    StreamEnded,
    StreamEvent,
    TcpFlowsGone,
)

__all__ = [
    "MAGIC",
    "MAX_HEADER_SIZE",
    "MAX_RECORD_SIZE",
    "MIN_COMPATIBLE_VERSION",
    "READER_VERSION",
    "STREAM_VERSION",
    "FlowReceived",
    "HeaderReceived",
    "PrecopyEnded",
    "RecordSkipped",
    "StreamDecoder",
    "StreamEncoder",
    "StreamEnded",
    "StreamError",
    "StreamEvent",
    "TcpFlowsGone",
]

MAGIC = int.from_bytes(b"FRRY", "little")
"""Header.magic: a little-endian fixed32 that reads "FRRY" on the wire."""
STREAM_VERSION = 4
"""The format version this ferryd writes (2: pre-copy; 3: handover; 4: datagram
sockets handed over too)."""
MIN_COMPATIBLE_VERSION = 1
"""The oldest reader version that can read what this ferryd writes without pre-copy."""
PRECOPY_VERSION = 2
"""The oldest reader version that understands pre-copy (its streams say so)."""
HANDOVER_VERSION = 3
"""The oldest reader version that takes sockets handed over beside the stream."""
DATAGRAM_HANDOVER_VERSION = 4
"""The oldest that takes UDP and ping sockets so too: what this ferryd's handover
streams say (a version 3 reader would bind their ports and find descriptors left)."""
READER_VERSION = 4
"""This ferryd reads every stream whose min_compatible_version is at most this."""
MAX_RECORD_SIZE = 64 << 20
MAX_HEADER_SIZE = 64 << 10

_M = TypeVar("_M", bound=Message)
_WIRETYPE_LEN = 2
_MAX_TAG_BYTES = 5  # field numbers are < 2**29
_MAX_LENGTH_BYTES = 10


class _Field(enum.IntEnum):
    """Record kinds: the field numbers of the .proto's ``Stream`` message."""

    HEADER = 1
    TCP = 2
    UDP = 3
    ICMP = 4
    LISTENER = 5
    PRECOPY_END = 6
    TCP_GONE = 7
    TRAILER = 15


_FLOW_MESSAGES: dict[int, type[FlowMessage]] = {
    _Field.TCP: pb.TcpFlow,
    _Field.UDP: pb.UdpFlow,
    _Field.ICMP: pb.IcmpFlow,
    _Field.LISTENER: pb.Listener,
}
_FLOW_FIELDS: dict[type[FlowRecord], _Field] = {
    TcpFlowRecord: _Field.TCP,
    UdpFlowRecord: _Field.UDP,
    IcmpFlowRecord: _Field.ICMP,
    ListenerRecord: _Field.LISTENER,
}
_RECORD_NAMES: dict[int, str] = {
    _Field.HEADER: "header",
    _Field.TCP: "TCP flow",
    _Field.UDP: "UDP flow",
    _Field.ICMP: "ICMP flow",
    _Field.LISTENER: "listener",
    _Field.PRECOPY_END: "pre-copy end",
    _Field.TCP_GONE: "TCP gone",
    _Field.TRAILER: "trailer",
}


def _record_name(field_number: int) -> str:
    return _RECORD_NAMES.get(field_number, f"field-{field_number}")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _frame(field_number: int, body: bytes) -> bytes:
    """One record: tag, length, body."""
    return _varint(field_number << 3 | _WIRETYPE_LEN) + _varint(len(body)) + body


# ---------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------


class _EncoderState(enum.Enum):
    NEW = enum.auto()
    PRECOPY = enum.auto()
    FLOWS = enum.auto()
    DONE = enum.auto()


class StreamEncoder:
    """Records to stream bytes: ``header()``, then ``flow()`` per flow, then ``trailer()``.

    With a pre-copy header: ``flow()`` of TCP flows only, ``precopy_end()``,
    then ``flow()`` per flow and at most one ``tcp_gone()``, then ``trailer()``.
    """

    def __init__(self, *, max_record_size: int = MAX_RECORD_SIZE) -> None:
        self._state = _EncoderState.NEW
        self._header: StreamHeader | None = None
        self._crc = 0
        self._count = 0
        self._written = 0
        self._max_record_size = max_record_size
        self._precopied = 0
        self._gone_written = False

    @property
    def flow_count(self) -> int:
        """Flow records written so far."""
        return self._count

    @property
    def bytes_written(self) -> int:
        """Stream bytes handed out so far, trailer included once written."""
        return self._written

    def _emit(self, field_number: int, body: bytes) -> bytes:
        limit = MAX_HEADER_SIZE if field_number == _Field.HEADER else self._max_record_size
        if len(body) > limit:
            raise ValueError(
                f"{_record_name(field_number)} record of {len(body)} bytes exceeds the "
                f"stream's limit of {limit}"
            )
        record = _frame(field_number, body)
        self._crc = zlib.crc32(record, self._crc)
        self._written += len(record)
        return record

    def header(self, header: StreamHeader) -> bytes:
        if self._state is not _EncoderState.NEW:
            raise RuntimeError("the stream's header was already written")
        if header.handover:
            oldest = DATAGRAM_HANDOVER_VERSION
        else:
            oldest = PRECOPY_VERSION if header.precopy else MIN_COMPATIBLE_VERSION
        msg = header_to_proto(header, STREAM_VERSION, oldest, MAGIC)
        record = self._emit(_Field.HEADER, msg.SerializeToString())
        self._header = header
        self._state = _EncoderState.PRECOPY if header.precopy else _EncoderState.FLOWS
        return record

    def flow(self, flow: FlowRecord) -> bytes:
        if self._state not in (_EncoderState.FLOWS, _EncoderState.PRECOPY) or self._header is None:
            raise RuntimeError(
                "a flow record before the header"
                if self._state is _EncoderState.NEW
                else "a flow record after the trailer"
            )
        field = _FLOW_FIELDS[type(flow)]
        if self._state is _EncoderState.PRECOPY:
            if field is not _Field.TCP:
                raise RuntimeError("only TCP flows are pre-copied")
            self._precopied += 1
        body = flow_to_proto(flow, self._header).SerializeToString()
        record = self._emit(field, body)
        self._count += 1
        return record

    def precopy_end(self) -> bytes:
        """The end of the pre-copy part: what follows was dumped after the freeze."""
        if self._state is not _EncoderState.PRECOPY:
            raise RuntimeError("no pre-copy part to end")
        msg = pb.PrecopyEnd(tcp_count=self._precopied)
        record = self._emit(_Field.PRECOPY_END, msg.SerializeToString())
        self._count += 1
        self._state = _EncoderState.FLOWS
        return record

    def tcp_gone(self, indexes: list[int]) -> bytes:
        """Retire pre-copied TCP flows (their record positions) that ended before the freeze."""
        if (
            self._state is not _EncoderState.FLOWS
            or self._header is None
            or not self._header.precopy
            or self._gone_written
        ):
            raise RuntimeError("TCP gone: only once, after the end of a pre-copy")
        if any(not 0 <= i < self._precopied for i in indexes):
            raise ValueError(f"TCP gone: an index outside the {self._precopied} pre-copied flows")
        record = self._emit(_Field.TCP_GONE, pb.TcpGone(index=indexes).SerializeToString())
        self._count += 1
        self._gone_written = True
        return record

    def trailer(self) -> bytes:
        if self._state is not _EncoderState.FLOWS:
            raise RuntimeError(
                "the trailer before the header"
                if self._state is _EncoderState.NEW
                else "the trailer before the end of the pre-copy"
                if self._state is _EncoderState.PRECOPY
                else "the trailer was already written"
            )
        msg = pb.Trailer(flow_count=self._count, crc32=self._crc)
        record = _frame(_Field.TRAILER, msg.SerializeToString())
        self._written += len(record)
        self._state = _EncoderState.DONE
        return record


# ---------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------


class _DecoderState(enum.Enum):
    EXPECT_HEADER = enum.auto()
    IN_PRECOPY = enum.auto()
    IN_FLOWS = enum.auto()
    ENDED = enum.auto()
    FAILED = enum.auto()


class _Kind(enum.Enum):
    HEADER = enum.auto()
    FLOW = enum.auto()
    PRECOPY_TCP = enum.auto()
    PRECOPY_END = enum.auto()
    TCP_GONE = enum.auto()
    UNKNOWN = enum.auto()
    TRAILER = enum.auto()


# (state, record kind) -> next state; any other pair is refused by _REFUSALS.
# The header goes to IN_PRECOPY instead when it announces a pre-copy.
_TRANSITIONS: dict[tuple[_DecoderState, _Kind], _DecoderState] = {
    (_DecoderState.EXPECT_HEADER, _Kind.HEADER): _DecoderState.IN_FLOWS,
    (_DecoderState.IN_PRECOPY, _Kind.PRECOPY_TCP): _DecoderState.IN_PRECOPY,
    (_DecoderState.IN_PRECOPY, _Kind.PRECOPY_END): _DecoderState.IN_FLOWS,
    (_DecoderState.IN_FLOWS, _Kind.FLOW): _DecoderState.IN_FLOWS,
    (_DecoderState.IN_FLOWS, _Kind.PRECOPY_TCP): _DecoderState.IN_FLOWS,
    (_DecoderState.IN_FLOWS, _Kind.TCP_GONE): _DecoderState.IN_FLOWS,
    (_DecoderState.IN_FLOWS, _Kind.UNKNOWN): _DecoderState.IN_FLOWS,
    (_DecoderState.IN_FLOWS, _Kind.TRAILER): _DecoderState.ENDED,
}
_REFUSALS: dict[_DecoderState, str] = {
    _DecoderState.EXPECT_HEADER: "a {what} record before the header",
    _DecoderState.IN_PRECOPY: "a {what} record in the pre-copy part (after {index} records)",
    _DecoderState.IN_FLOWS: "a {what} record out of place after {index} records",
    _DecoderState.ENDED: "data after the trailer",
}


def _kind_of(field_number: int) -> _Kind:
    if field_number == _Field.HEADER:
        return _Kind.HEADER
    if field_number == _Field.TRAILER:
        return _Kind.TRAILER
    if field_number == _Field.TCP:
        return _Kind.PRECOPY_TCP  # a TCP flow is welcome in either part
    if field_number == _Field.PRECOPY_END:
        return _Kind.PRECOPY_END
    if field_number == _Field.TCP_GONE:
        return _Kind.TCP_GONE
    if field_number in _FLOW_MESSAGES:
        return _Kind.FLOW
    return _Kind.UNKNOWN


def _allowed_in(state: _DecoderState) -> dict[int, tuple[_Kind, _DecoderState]]:
    """The known record kinds ``state`` takes, by field number: (kind, next state)."""
    allowed = {}
    for field_number in _Field:
        kind = _kind_of(field_number)
        next_state = _TRANSITIONS.get((state, kind))
        if next_state is not None:
            allowed[int(field_number)] = (kind, next_state)
    return allowed


#: Each state's :func:`_allowed_in`: a record's check is one lookup by its
#: field number, an int (an enum's hash runs in Python: two a record, ~0.5 µs).
_ALLOWED: dict[_DecoderState, dict[int, tuple[_Kind, _DecoderState]]] = {
    state: _allowed_in(state) for state in _DecoderState
}


def _parse_untrusted(msg: _M, body: bytes, what: str, index: int | None = None) -> _M:
    """``msg`` filled from ``body``; StreamError naming ``what`` (with ``index``: "``what``
    record ``index``", built only then: a flow's name costs a format per record) if it
    does not parse."""
    try:
        msg.ParseFromString(body)
    except (DecodeError, ValueError) as exc:
        name = what if index is None else f"{what} record {index}"
        raise StreamError(f"{name} does not parse: {exc}") from None
    return msg


def _read_varint(buf: bytearray, pos: int, max_bytes: int, what: str) -> tuple[int, int] | None:
    """(value, position after it), or None if the buffer ends inside it."""
    value = 0
    for i in range(max_bytes):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise StreamError(f"{what} is a varint longer than {max_bytes} bytes")


class StreamDecoder:
    """Stream bytes, in chunks of any size, to events as complete records arrive.

    Call :meth:`feed_untrusted` with whatever was read, then :meth:`eof`
    when the channel is closed. Both raise only :class:`StreamError`; after
    one, the decoder refuses every further call.
    """

    def __init__(self, *, max_record_size: int = MAX_RECORD_SIZE) -> None:
        self._enter(_DecoderState.EXPECT_HEADER)
        self._buf = bytearray()
        self._header: StreamHeader | None = None
        self._crc = 0
        self._count = 0
        self._consumed = 0
        self._failure = ""
        self._max_record_size = max_record_size
        self._precopied: int | None = None
        """Pre-copied TCP records, once the pre-copy part ended."""
        self._precopy_tcp = 0
        self._gone_seen = False

    @property
    def ended(self) -> bool:
        """The trailer arrived and checked out."""
        return self._state is _DecoderState.ENDED

    @property
    def bytes_consumed(self) -> int:
        """Stream bytes taken as complete records so far."""
        return self._consumed

    def feed_untrusted(self, data: bytes | bytearray | memoryview) -> list[StreamEvent]:
        """Take the next bytes of the stream; return the events of the records they complete."""
        self._check_alive()
        if not data:
            return []
        if self._state is _DecoderState.ENDED:
            self._fail(f"data after the trailer ({len(data)} bytes)")
        self._buf += data
        events: list[StreamEvent] = []
        try:
            pos = 0
            while pos < len(self._buf) and self._state is not _DecoderState.ENDED:
                step = self._next_record(pos, events)
                if step is None:
                    break
                pos = step
            del self._buf[:pos]
            if self._buf and self._state is _DecoderState.ENDED:
                raise StreamError(f"data after the trailer ({len(self._buf)} bytes)")
        except StreamError as exc:
            self._fail(str(exc))
        return events

    def eof(self) -> None:
        """The channel closed: raise :class:`StreamError` unless the stream was complete."""
        self._check_alive()
        if self._state is _DecoderState.ENDED:
            return
        if self._state is _DecoderState.EXPECT_HEADER:
            where = "before its header was complete"
        elif self._state is _DecoderState.IN_PRECOPY:
            where = f"in its pre-copy part, after {self._count} flow records"
        else:
            where = f"after {self._count} flow records, without a trailer"
        partial = f" ({len(self._buf)} bytes of an incomplete record)" if self._buf else ""
        self._fail(f"stream ended early: {where}{partial}")

    def _check_alive(self) -> None:
        if self._state is _DecoderState.FAILED:
            raise StreamError(f"the stream already failed: {self._failure}")

    def _enter(self, state: _DecoderState) -> None:
        """The state, and the record kinds it takes (kept with it: _next_record's lookup)."""
        self._state = state
        self._allowed = _ALLOWED[state]

    def _fail(self, message: str) -> None:
        self._enter(_DecoderState.FAILED)
        self._failure = message
        self._buf.clear()
        raise StreamError(message)

    def _next_record(self, pos: int, events: list[StreamEvent]) -> int | None:
        """Decode the record at ``pos``; its end, or None if it is not all there yet."""
        buf = self._buf
        if self._state is _DecoderState.EXPECT_HEADER and buf[pos] != _Field.HEADER << 3 | 2:
            raise StreamError(
                f"not a ferry migration stream: it starts with byte {buf[pos]:#04x}, "
                f"not a header record"
            )
        # The varints' common case inline (a tag and a length under 128: every
        # record of an idle connection), the general one in _read_varint.
        tag_value = buf[pos]
        length_pos = pos + 1
        if tag_value & 0x80:
            tag = _read_varint(buf, pos, _MAX_TAG_BYTES, "a record tag")
            if tag is None:
                return None
            tag_value, length_pos = tag
        field_number, wire_type = tag_value >> 3, tag_value & 7
        if wire_type != _WIRETYPE_LEN or field_number == 0:
            raise StreamError(
                f"record tag {tag_value:#x} (field {field_number}, wire type {wire_type}) "
                f"is not a length-delimited record after {self._count} flow records"
            )
        allowed = self._allowed.get(field_number)
        if allowed is not None:
            kind, next_state = allowed
        else:  # a field this version does not know, or a record out of place
            kind = _kind_of(field_number)
            maybe_next = _TRANSITIONS.get((self._state, kind))
            if maybe_next is None:
                template = _REFUSALS[self._state]
                raise StreamError(
                    template.format(what=_record_name(field_number), index=self._count)
                )
            next_state = maybe_next
        if length_pos < len(buf) and not buf[length_pos] & 0x80:
            size, body_pos = buf[length_pos], length_pos + 1
        else:
            length = _read_varint(buf, length_pos, _MAX_LENGTH_BYTES, "a record length")
            if length is None:
                return None
            size, body_pos = length
        limit = MAX_HEADER_SIZE if kind is _Kind.HEADER else self._max_record_size
        if size > limit:
            raise StreamError(
                f"{_record_name(field_number)} record of {size} bytes exceeds the limit of {limit}"
            )
        end = body_pos + size
        if end > len(buf):
            return None
        body = bytes(buf[body_pos:end])
        if kind is _Kind.TRAILER:
            events.append(self._trailer(body))
        else:
            # The tag and length, then the body already copied: one copy less.
            self._crc = zlib.crc32(body, zlib.crc32(buf[pos:body_pos], self._crc))
            if kind is _Kind.HEADER:
                header_event = self._accept_header(body)
                events.append(header_event)
                if header_event.header.precopy:
                    next_state = _DecoderState.IN_PRECOPY
            elif kind in (_Kind.FLOW, _Kind.PRECOPY_TCP):
                if self._state is _DecoderState.IN_PRECOPY:
                    self._precopy_tcp += 1
                events.append(self._accept_flow(field_number, body))
            elif kind is _Kind.PRECOPY_END:
                events.append(self._accept_precopy_end(body))
            elif kind is _Kind.TCP_GONE:
                events.append(self._accept_gone(body))
            else:
                events.append(RecordSkipped(field_number, size, self._count))
                self._count += 1
        if next_state is not self._state:
            self._enter(next_state)
        self._consumed += end - pos
        return end

    def _accept_header(self, body: bytes) -> HeaderReceived:
        msg = _parse_untrusted(pb.Header(), body, "header")
        if msg.magic != MAGIC:
            raise StreamError(
                f"not a ferry migration stream: bad magic {msg.magic:#010x} "
                f"(expected {MAGIC:#010x}, 'FRRY')"
            )
        version, oldest = msg.version, msg.min_compatible_version
        if not 1 <= oldest <= version:
            raise StreamError(
                f"header has invalid versions: version {version}, min compatible version {oldest}"
            )
        if oldest > READER_VERSION:
            raise StreamError(
                f"stream version {version} needs a reader ≥ {oldest}; "
                f"this ferryd reads {READER_VERSION}"
            )
        header = header_from_proto_untrusted(msg)
        if header.precopy and oldest < PRECOPY_VERSION:
            raise StreamError(
                f"header announces a pre-copy but says version {oldest} readers can read it"
            )
        if header.handover and oldest < HANDOVER_VERSION:
            raise StreamError(
                f"header announces a handover but says version {oldest} readers can read it"
            )
        self._header = header
        return HeaderReceived(header, version, oldest)

    def _accept_precopy_end(self, body: bytes) -> PrecopyEnded:
        msg = _parse_untrusted(pb.PrecopyEnd(), body, "pre-copy end")
        if msg.tcp_count != self._precopy_tcp:
            raise StreamError(
                f"pre-copy end counts {msg.tcp_count} TCP flows, but {self._precopy_tcp} came"
            )
        self._precopied = self._precopy_tcp
        event = PrecopyEnded(self._precopy_tcp, self._count)
        self._count += 1
        return event

    def _accept_gone(self, body: bytes) -> TcpFlowsGone:
        if self._precopied is None or self._gone_seen:
            raise StreamError(
                f"a TCP gone record {'twice' if self._gone_seen else 'without a pre-copy'}"
            )
        msg = _parse_untrusted(pb.TcpGone(), body, "TCP gone record")
        indexes = list(msg.index)
        if len(set(indexes)) != len(indexes) or any(i >= self._precopied for i in indexes):
            raise StreamError(
                f"TCP gone record names indexes outside the {self._precopied} pre-copied flows "
                "or names one twice"
            )
        self._gone_seen = True
        event = TcpFlowsGone(tuple(indexes), self._count)
        self._count += 1
        return event

    def _accept_flow(self, field_number: int, body: bytes) -> FlowReceived:
        assert self._header is not None  # the transition table admits flows only after it
        msg = _parse_untrusted(
            _FLOW_MESSAGES[field_number](), body, _RECORD_NAMES[field_number], self._count
        )
        try:
            flow = flow_from_proto_untrusted(msg, self._header)
        except StreamError as exc:
            raise StreamError(f"flow record {self._count}: {exc}") from None
        event = FlowReceived(flow, self._count)
        self._count += 1
        return event

    def _trailer(self, body: bytes) -> StreamEnded:
        msg = _parse_untrusted(pb.Trailer(), body, "trailer")
        if msg.flow_count != self._count:
            raise StreamError(
                f"trailer counts {msg.flow_count} flow records, but {self._count} arrived"
            )
        if msg.crc32 != self._crc:
            raise StreamError(
                f"checksum mismatch: the trailer says {msg.crc32:#010x}, "
                f"the stream's bytes give {self._crc:#010x}"
            )
        return StreamEnded(self._count)
