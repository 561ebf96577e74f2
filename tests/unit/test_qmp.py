"""testbed/qmp.py against a scripted QMP server: answers, events, refusals, garbage.

The real QEMU is in tests/integration/vm; this covers what QEMU rarely
does on its own: events between a command and its answer, an error answer,
and lines that are not QMP, which must fail the test with QmpError naming
QEMU rather than hang or pass.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.qmp import Qmp, QmpCommandError, QmpError, QmpEventTimeout

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\r\n'


class ScriptedQemu:
    """A Unix socket that greets, then answers each command line with the next scripted lines.

    A script entry is a list of byte lines; ``ID`` in them is replaced by
    the request's id. Every request received is kept in ``requests``.
    """

    def __init__(self, path: Path, script: list[list[bytes]]) -> None:
        self.requests: list[dict[str, object]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._script = script
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(GREETING)
            for answer in self._script:
                line = lines.readline()
                if not line:
                    return
                request = json.loads(line)
                self.requests.append(request)
                for out in answer:
                    conn.sendall(out.replace(b"ID", str(request["id"]).encode()) + b"\r\n")
            lines.readline()  # hold the connection until the client closes it

    def close(self) -> None:
        self._listener.close()
        self._thread.join(timeout=5)


@pytest.fixture
def qmp_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ft-qmp-") as d:
        yield Path(d) / "qmp.sock"


CAPABILITIES = [b'{"return": {}, "id": ID}']


def test_commands_return_their_value_and_events_are_kept(qmp_path: Path) -> None:
    qemu = ScriptedQemu(
        qmp_path,
        [
            CAPABILITIES,
            [
                b'{"event": "MIGRATION", "data": {"status": "setup"}}',
                b'{"return": {"status": "completed", "downtime": 7}, "id": ID}',
            ],
        ],
    )
    with Qmp(str(qmp_path), timeout=5) as qmp:
        assert qmp.query_migrate() == {"status": "completed", "downtime": 7}
        assert [e["event"] for e in qmp.events] == ["MIGRATION"]
    qemu.close()
    assert [r["execute"] for r in qemu.requests] == ["qmp_capabilities", "query-migrate"]


def test_an_event_is_waited_for_in_order_and_its_absence_is_a_timeout(qmp_path: Path) -> None:
    def migration(status: str) -> bytes:
        return b'{"event": "MIGRATION", "data": {"status": "%s"}}' % status.encode()

    qemu = ScriptedQemu(
        qmp_path,
        [
            CAPABILITIES,
            # Events that came with a command's answer are waited on too, in order.
            [migration("setup"), b'{"return": {}, "id": ID}', migration("active")],
            [b'{"return": {}, "id": ID}', migration("pre-switchover"), migration("device")],
            [b'{"return": {"status": "paused"}, "id": ID}'],
        ],
    )
    with Qmp(str(qmp_path), timeout=5) as qmp:
        qmp.migrate("unix:/nowhere")
        assert qmp.wait_event("MIGRATION", lambda d: d["status"] != "x", 5) == {"status": "setup"}
        continued = qmp.send("migrate-continue", state="pre-switchover")
        assert qmp.answer(continued) == {}  # (sent, then its answer read: the bench's way)
        data = qmp.wait_event("MIGRATION", lambda d: d["status"] == "device", 5)
        assert data == {"status": "device"}  # active and pre-switchover passed over
        with pytest.raises(QmpEventTimeout):
            qmp.wait_event("MIGRATION", lambda d: True, 0.2)  # nothing more comes
        assert [e["data"]["status"] for e in qmp.events] == [
            "setup", "active", "pre-switchover", "device"
        ]  # fmt: skip
        assert qmp.query_status() == "paused"  # still usable after a wait that timed out
    qemu.close()


def test_an_answer_while_waiting_for_an_event_breaks_the_connection(qmp_path: Path) -> None:
    qemu = ScriptedQemu(
        qmp_path,
        [CAPABILITIES, [b'{"return": {}, "id": ID}', b'{"return": {}, "id": 99}']],
    )
    with Qmp(str(qmp_path), timeout=5) as qmp:
        qmp.execute("migrate-continue", state="pre-switchover")
        with pytest.raises(QmpError, match="no command was sent"):
            qmp.wait_event("MIGRATION", lambda d: True, 5)
        with pytest.raises(QmpError, match="broke earlier"):
            qmp.wait_event("MIGRATION", lambda d: True, 5)
    qemu.close()


def test_a_refusal_names_the_command_and_qemus_reason(qmp_path: Path) -> None:
    qemu = ScriptedQemu(
        qmp_path,
        [CAPABILITIES, [b'{"error": {"class": "GenericError", "desc": "no"}, "id": ID}']],
    )
    with Qmp(str(qmp_path), timeout=5) as qmp, pytest.raises(QmpCommandError) as refused:
        qmp.set_downtime_limit(10)
    qemu.close()
    assert (refused.value.command, refused.value.error_class) == (
        "migrate-set-parameters",
        "GenericError",
    )
    assert qemu.requests[1]["arguments"] == {"downtime-limit": 10}


@pytest.mark.parametrize(
    "garbage",
    [b"not json", b"[1, 2]", b'{"return": {}, "id": 999}', b'{"id": ID}'],
    ids=["not-json", "not-an-object", "another-id", "no-return"],
)
def test_what_is_not_qmp_fails_and_breaks_the_connection(qmp_path: Path, garbage: bytes) -> None:
    qemu = ScriptedQemu(qmp_path, [CAPABILITIES, [garbage]])
    with Qmp(str(qmp_path), timeout=5) as qmp:
        with pytest.raises(QmpError):
            qmp.query_status()
        with pytest.raises(QmpError, match="broke earlier"):
            qmp.query_status()
    qemu.close()


def test_silence_is_an_error_not_a_hang(qmp_path: Path) -> None:
    qemu = ScriptedQemu(qmp_path, [CAPABILITIES, []])
    with Qmp(str(qmp_path), timeout=0.5) as qmp, pytest.raises(QmpError, match="nothing"):
        qmp.query_status()
    qemu.close()


def test_no_qemu_listening_is_a_qmp_error(qmp_path: Path) -> None:
    with pytest.raises(QmpError, match="cannot connect"):
        Qmp(str(qmp_path), timeout=1)
