"""``ferryd --pcap`` (ferryd.pcap): the file format, the tee on the frontend, and its limits.

The end-to-end test with a real guest is tests/integration/test_operations.py;
here the file's bytes, a frontend double (a pure stand-in: the capture only
passes calls on), and the capture's refusal to stall: a slow or failing
write ends the capture, never the traffic.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ferryd.frontends.base import FrontendCounters, OnBurstEnd, OnFrame
from ferryd.pcap import SNAPLEN, CapturingFrontend, PcapFile, file_header, record

# An ARP request from the guest (who has 10.0.0.1? tell 10.0.0.2).
ARP = bytes.fromhex(
    "ffffffffffff020000000002080600010800060400010200000000020a0000020000000000000a000001"
)


def test_file_header_is_classic_libpcap() -> None:
    magic, major, minor, zone, sigfigs, snaplen, linktype = struct.unpack("=IHHiIII", file_header())
    assert (magic, major, minor, zone, sigfigs) == (0xA1B2C3D4, 2, 4, 0, 0)
    assert snaplen == SNAPLEN >= 65535 + 14
    assert linktype == 1  # LINKTYPE_ETHERNET


def test_record_has_microseconds_and_both_lengths() -> None:
    data = record(ARP, 1_700_000_000_123_456_789)
    assert struct.unpack("=IIII", data[:16]) == (1_700_000_000, 123_456, len(ARP), len(ARP))
    assert data[16:] == ARP
    cut = record(b"x" * 100, 0, snaplen=60)
    assert struct.unpack("=IIII", cut[:16]) == (0, 0, 60, 100) and len(cut) == 16 + 60


class _Frontend:
    """Records what reaches it; hands ``frames`` to ``run``'s and ``drain``'s callbacks."""

    csum_offload = True

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.sent: list[Any] = []
        self.counters = FrontendCounters()
        self.calls: list[str] = []

    def describe(self) -> dict[str, Any]:
        return {"kind": "double"}

    async def run(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        self.drain(on_frame, on_burst_end)

    def drain(self, on_frame: OnFrame, on_burst_end: OnBurstEnd) -> None:
        for frame in self.frames:
            on_frame(memoryview(frame), False)
        on_burst_end()

    def send(self, frame: bytes) -> bool:
        self.sent.append(frame)
        return True

    def send_partial(
        self, parts: list[bytes | memoryview], csum_start: int, csum_offset: int
    ) -> bool:
        self.sent.append((parts, csum_start, csum_offset))
        return True

    def hand_over(self) -> None:
        self.calls.append("hand_over")

    def take_over(self) -> None:
        self.calls.append("take_over")

    def close(self) -> None:
        self.calls.append("close")


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:24] == file_header()
    out, offset = [], 24
    while offset < len(data):
        _, _, captured, _ = struct.unpack_from("=IIII", data, offset)
        out.append(data[offset + 16 : offset + 16 + captured])
        offset += 16 + captured
    return out


async def test_both_directions_are_written_and_passed_on(tmp_path: Path) -> None:
    path = tmp_path / "guest.pcap"
    inner = _Frontend([ARP])
    capture = CapturingFrontend(inner, PcapFile.create(str(path)))
    received: list[bytes] = []
    await capture.run(lambda frame, trusted: received.append(bytes(frame)), lambda: None)
    capture.send(b"reply-frame")
    capture.send_partial([b"head", memoryview(b"payload")], 34, 16)
    capture.hand_over()
    capture.take_over()
    assert received == [ARP]
    assert inner.sent[0] == b"reply-frame" and inner.sent[1][1:] == (34, 16)
    assert capture.describe() == {"kind": "double", "pcap": str(path)}
    assert capture.counters is inner.counters and capture.csum_offload is True
    capture.close()
    assert inner.calls == ["hand_over", "take_over", "close"]
    assert _records(path) == [ARP, b"reply-frame", b"headpayload"]
    assert capture.pcap.counters.frames == 3
    assert (path.stat().st_mode & 0o777) == 0o600


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "arp.pcap"
    pcap = PcapFile.create(str(path))
    pcap.write_frame(ARP)
    pcap.close()
    out = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "arp.dst.proto_ipv4", "-e", "frame.len"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["10.0.0.1", str(len(ARP))]


def test_a_slow_write_ends_the_capture_not_the_traffic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "slow.pcap"
    ticks = iter([0.0, 0.001, 1.0, 1.5])  # header: 1 ms; first frame: 500 ms
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    pcap = PcapFile(fd, str(path), clock_ns=lambda: 0, timer=lambda: next(ticks))
    pcap.write_frame(ARP)
    assert pcap.fd is None and pcap.counters.capture_stopped == 1
    assert "capture stopped: a write took 500 ms" in caplog.text
    pcap.write_frame(ARP)  # nothing more, no error
    assert pcap.counters.frames == 1 and pcap.counters.slow_writes == 1
    assert len(_records(path)) == 1


def test_a_failing_write_ends_the_capture(caplog: pytest.LogCaptureFixture) -> None:
    reader, writer = os.pipe()
    os.close(reader)  # EPIPE from now on (Python ignores SIGPIPE)
    pcap = PcapFile(writer, "pipe")
    assert pcap.fd is None and pcap.counters.capture_stopped == 1
    assert "--pcap pipe: capture stopped: cannot write" in caplog.text
    pcap.write_frame(ARP)
    assert pcap.counters.frames == 0
