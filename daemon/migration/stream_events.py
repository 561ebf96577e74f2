"""What :class:`ferryd.migration.stream.StreamDecoder` reports as records arrive."""

from __future__ import annotations

from dataclasses import dataclass

from ferryd.migration.records import FlowRecord, StreamHeader

__all__ = [
    "FlowReceived",
    "HeaderReceived",
    "PrecopyEnded",
    "RecordSkipped",
    "StreamEnded",
    "StreamEvent",
    "TcpFlowsGone",
]


@dataclass(frozen=True, slots=True)
class HeaderReceived:
    """The header arrived and was accepted (magic and versions checked first)."""

    header: StreamHeader
    version: int
    """The format version the source wrote."""
    min_compatible_version: int
    """The oldest reader version the source said can read it (at most ours)."""


@dataclass(frozen=True, slots=True)
class FlowReceived:
    flow: FlowRecord
    index: int
    """Position among the records between header and trailer, from 0."""


@dataclass(frozen=True, slots=True)
class RecordSkipped:
    """A record of a kind this ferryd does not know, from a newer source.

    A newer writer only sends a kind that older readers may skip (one they
    must not skip raises the stream's min_compatible_version instead); the
    target goes on, and may log it.
    """

    field_number: int
    size: int
    index: int


@dataclass(frozen=True, slots=True)
class PrecopyEnded:
    """The pre-copy part ended: what follows was dumped after the source froze.

    The TCP flows before it stand unless replaced (a later TCP flow with
    the same 4-tuple) or retired (:class:`TcpFlowsGone`).
    """

    tcp_count: int
    index: int


@dataclass(frozen=True, slots=True)
class TcpFlowsGone:
    """Pre-copied TCP flows that ended before the freeze: drop them."""

    indexes: tuple[int, ...]
    """Their :attr:`FlowReceived.index` values."""
    index: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The trailer arrived and its count and checksum match: the stream is complete."""

    flow_count: int


StreamEvent = (
    HeaderReceived | FlowReceived | PrecopyEnded | TcpFlowsGone | RecordSkipped | StreamEnded
)
