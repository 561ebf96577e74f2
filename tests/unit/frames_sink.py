"""A frontend double for the Stack: it records every frame sent to the guest."""

from __future__ import annotations


class RecordingFrontend:
    """Keeps each frame in ``sent``; no checksum offload, so send_partial is never used."""

    csum_offload = False

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, frame: bytes) -> bool:
        self.sent.append(frame)
        return True

    def send_partial(self, parts: list[bytes | memoryview], start: int, offset: int) -> bool:
        raise AssertionError("not used without csum_offload")
