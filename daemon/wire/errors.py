"""The one error that wire parsers let escape.

A guest (or a migration peer) can send anything. Every ``*_untrusted`` parser
turns every way its input can be wrong into :class:`MalformedPacket`, so the
caller has a single thing to catch, log and count, and nothing the guest sends
can raise an unexpected exception inside ferryd (STYLE.md rule 5).
"""


class MalformedPacket(ValueError):
    """The guest sent a frame that is not valid: its fault, never ours."""
