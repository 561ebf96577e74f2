"""bench.qemu_migration's report and bench.passt_build's cache lookup: the pure parts.

The bench itself needs QEMU, root and minutes (bench/README.md); what it
prints from its rows, and which cached passt it picks, are checked here.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from bench.passt_build import cached
from bench.qemu_migration import (
    ANSWERS,
    LATE_FAILURE,
    MIGRATE,
    PHASES,
    MigrationRun,
    RowTimeout,
    ThroughputRun,
    _row_deadline,
    backend_answers,
    downtime_phases,
    format_answers,
    format_migrations,
    format_phases,
    format_ratios,
    format_waits,
    net_device_ms,
)


def _run(backend: str, n: int, downtime: float, ok: int, **kw: object) -> MigrationRun:
    return MigrationRun(backend, n, downtime_ms=downtime, total_ms=900, pause_ms=1.5, ok=ok,
                        echoed=n, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_ratios_are_ferryd_over_passt_medians_of_the_same_run() -> None:
    rows = [
        _run("passt", 100, 10, 100),
        _run("passt", 100, 12, 100),
        _run("passt", 100, 30, 100),
        _run("ferryd", 100, 6, 100),
        _run("ferryd", 100, 9, 100),
        _run("ferryd", 100, 60, 100),
        # A late-failure row never enters the downtime ratio.
        _run("ferryd", 100, 500, 100, scenario=LATE_FAILURE),
    ]
    tput = [
        ThroughputRun("passt", "guest→peer", gbps=2.0),
        ThroughputRun("ferryd", "guest→peer", gbps=1.0),
        ThroughputRun("passt", "peer→guest", gbps=2.0),
    ]
    report = format_ratios(rows, tput, [100, 1000])
    assert "QEMU downtime, N=100: 0.75 (target ≤ 1.0)" in report  # 9 / 12
    assert "checkpoints" not in report  # no run had QEMU's stamped phases
    assert "QEMU downtime, N=1000: not measured" in report
    assert "throughput guest→peer: 0.50 (target ≥ 0.8)" in report
    assert "throughput peer→guest: not measured" in report


def test_the_downtime_ratio_is_also_given_from_qemus_checkpoints() -> None:
    def stamped(backend: str, downtime: float, *phases: float) -> MigrationRun:
        return _run(backend, 100, downtime, 100, phases=dict(zip(PHASES, phases, strict=True)))

    rows = [
        stamped("passt", 7, 0.5, 1.5, 1.0, 1.5, 2.5, 0.0),  # 7.0 ms between the stamps
        stamped("passt", 8, 0.5, 2.0, 1.0, 2.0, 3.0, 0.5),  # 9.0
        stamped("ferryd", 9, 1.0, 2.0, 1.0, 2.0, 2.0, 0.0),  # 8.0
        stamped("ferryd", 8, 1.0, 2.5, 1.0, 2.0, 2.5, 0.0),  # 9.0
        _run("ferryd", 100, 14, 100),  # no stamps (QEMU's log lost): in neither median
    ]
    report = format_ratios(rows, [], [100])
    assert "QEMU downtime, N=100: 1.20 (target ≤ 1.0)" in report  # 9 / 7.5, whole ms
    assert "from its checkpoints: 1.06 (8.5 / 8.0 ms)" in report


def test_migration_table_shows_each_run_and_why_one_failed() -> None:
    rows = [
        _run("passt", 1000, 30, 1000),
        _run("passt", 1000, 40, 685, details=["connection 7: timeout: 2000 sent, 2000 echoed"]),
        MigrationRun("passt", 1000, error="AssertionError: QEMU's migration failed"),
        _run("passt", 100, 9, 0, scenario=LATE_FAILURE),
    ]
    table = format_migrations(rows, ["passt", "ferryd"], [1000], MIGRATE)
    line = next(row for row in table.splitlines() if row.split()[:2] == ["passt", "1000"])
    assert "2/3" in line and "35 (30–40)" in line and "1000/1000 685/1000" in line
    assert "connection 7: timeout" in table
    assert "failed: AssertionError: QEMU's migration failed" in table
    assert "ferryd" not in table  # no rows: no line
    late = format_migrations(rows, ["passt"], [100], LATE_FAILURE)
    assert "0/100" in late and "1000" not in late


def test_the_net_devices_save_and_load_come_from_qemus_trace_events() -> None:
    # Lines as QEMU 10.0's log backend writes them (captured with -msg timestamp=on).
    log = "\n".join([
        "18751@1796204292.248074:vmstate_downtime_checkpoint src-downtime-start",
        "18751@1796204292.252693:vmstate_downtime_save type=non-iterable"
        " idstr=0000:00:01.1/ide instance_id=0 downtime=61",
        "18751@1796204292.260574:vmstate_downtime_save type=non-iterable"
        " idstr=0000:00:02.0/virtio-net instance_id=0 downtime=6662",
        "vmstate_downtime_load type=non-iterable idstr=0000:00:02.0/virtio-net"
        " instance_id=0 downtime=43070",
    ])  # fmt: skip
    assert net_device_ms(log, "save") == 6.662
    assert net_device_ms(log, "load") == 43.07
    assert net_device_ms("qemu-system-x86_64: terminating on signal 15", "save") is None


#: A source QEMU's log around its downtime (QEMU 10.0.2, -msg timestamp=on, a ferryd
#: migration of 100 connections; most device lines left out). An earlier, cancelled
#: migration's start comes first: only the last downtime counts.
_SOURCE_LOG = """\
590@1796283440.100000:vmstate_downtime_checkpoint src-downtime-start
590@1796283445.000000:vmstate_downtime_checkpoint src-downtime-start
590@1796283445.000149:vhost_dev_stop 0x5586e9a49f10:virtio-net vrings:0
590@1796283445.000827:vmstate_downtime_checkpoint src-vm-stopped
590@1796283445.000901:migrate_set_state new state pre-switchover
590@1796283445.002555:migrate_set_state new state device
590@1796283445.004161:vmstate_downtime_save type=iterable idstr=ram instance_id=0 downtime=606
590@1796283445.004186:vmstate_downtime_checkpoint src-iterable-saved
590@1796283445.005239:vmstate_downtime_save type=non-iterable idstr=0000:00:01.3/piix4_pm \
instance_id=0 downtime=655
590@1796283445.008087:vmstate_downtime_save type=non-iterable idstr=0000:00:02.0/virtio-net \
instance_id=0 downtime=2602
590@1796283445.008147:vmstate_downtime_checkpoint src-non-iterable-saved
590@1796283445.008158:vmstate_downtime_checkpoint src-downtime-end
"""


def test_the_downtime_is_cut_at_qemus_checkpoints() -> None:
    phases = downtime_phases(_SOURCE_LOG)
    assert phases is not None
    expected = {
        "stop": 0.827, "pause": 1.728, "RAM": 1.631, "devices": 1.299, "net": 2.602, "end": 0.071
    }  # fmt: skip
    assert phases == pytest.approx(expected, abs=1e-3)
    assert sum(phases.values()) == pytest.approx(8.158, abs=1e-3)
    # No timestamps (QEMU without -msg timestamp=on), or a downtime that never ended: none.
    assert downtime_phases(_SOURCE_LOG.replace("590@1796283445.", "")) is None
    assert downtime_phases(_SOURCE_LOG.rsplit("590@", 1)[0]) is None
    # No state changes traced (QEMU without -trace enable=migrate_set_state): none.
    assert downtime_phases(_SOURCE_LOG.replace("migrate_set_state", "x")) is None


# A source QEMU's log with its vhost-user messages (-trace enable=vhost_user_write,
# enable=vhost_user_read): one exchange before the downtime (not counted), then
# GET_VRING_BASE (11) for each ring, SET_DEVICE_STATE_FD (42), CHECK_DEVICE_STATE (43).
_MESSAGES_LOG = """\
590@1796283444.000000:vhost_user_write req:11 flags:0x1
590@1796283444.009000:vhost_user_read req:11 flags:0x5
590@1796283445.000000:vmstate_downtime_checkpoint src-downtime-start
590@1796283445.000100:vhost_user_write req:11 flags:0x1
590@1796283445.000300:vhost_user_read req:11 flags:0x5
590@1796283445.000310:vhost_user_write req:11 flags:0x1
590@1796283445.000410:vhost_user_read req:11 flags:0x5
590@1796283445.000827:vmstate_downtime_checkpoint src-vm-stopped
590@1796283445.000901:migrate_set_state new state pre-switchover
590@1796283445.002555:migrate_set_state new state device
590@1796283445.005000:vhost_user_write req:42 flags:0x9
590@1796283445.005050:vhost_user_read req:42 flags:0x5
590@1796283445.006050:vhost_user_write req:43 flags:0x1
590@1796283445.006300:vhost_user_read req:43 flags:0x5
590@1796283445.008158:vmstate_downtime_checkpoint src-downtime-end
590@1796283446.000000:vhost_user_write req:43 flags:0x1
590@1796283446.005000:vhost_user_read req:43 flags:0x5
"""


def test_the_backends_answers_are_its_round_trips_in_the_last_downtime() -> None:
    answers = backend_answers(_MESSAGES_LOG)
    assert answers is not None
    # Both rings' round trips added (0.2 + 0.1), the exchanges outside the downtime left out.
    expected = {"vring base": 0.3, "state fd": 0.05, "stream": 1.0, "check": 0.25}
    assert answers == pytest.approx(expected, abs=1e-3)
    assert list(answers) == list(ANSWERS)
    # A downtime that never ended, or a back-end never asked for its state: none.
    assert backend_answers(_MESSAGES_LOG.split("590@1796283445.008158")[0]) is None
    no_check = "".join(line for line in _MESSAGES_LOG.splitlines(True) if "req:43" not in line)
    assert backend_answers(no_check) is None
    # Another migration's downtime starts the count again.
    again = _MESSAGES_LOG + _MESSAGES_LOG.replace("590@1796283445.000300", "590@1796283445.001100")
    assert backend_answers(again) == pytest.approx({**expected, "vring base": 1.1}, abs=1e-3)


def test_the_answer_table_has_a_median_per_back_end_and_size() -> None:
    rows = [
        _run("passt", 100, 7, 100, answers=dict.fromkeys(ANSWERS, 0.05)),
        _run("ferryd", 100, 9, 100, answers=dict.fromkeys(ANSWERS, 0.25)),
        _run("ferryd", 100, 9, 100, answers=None),
    ]
    table = format_answers(rows, ["passt", "ferryd"], [100]).splitlines()
    assert table[0].split()[3:] == ["vring", "base", "state", "fd", "stream", "check"]
    assert table[1].split() == ["passt", "100", "1", *["0.05"] * len(ANSWERS)]
    assert table[2].split() == ["ferryd", "100", "1", *["0.25"] * len(ANSWERS)]


def test_the_phase_table_has_a_median_per_back_end_and_size() -> None:
    rows = [
        _run("ferryd", 100, 9, 100, phases=dict.fromkeys(PHASES, 1.0)),
        _run("ferryd", 100, 10, 100, phases=dict.fromkeys(PHASES, 3.0)),
        _run("ferryd", 100, 10, 100, phases=dict.fromkeys(PHASES, 2.0)),
        _run("passt", 100, 7, 100, phases=None),
        _run("ferryd", 100, 9, 100, scenario=LATE_FAILURE, phases=dict.fromkeys(PHASES, 9.0)),
    ]
    table = format_phases(rows, ["passt", "ferryd"], [1, 100])
    assert table.splitlines()[1].split() == ["ferryd", "100", "3", *["2.0"] * len(PHASES)]
    assert len(table.splitlines()) == 2  # passt had no phases; N=1 no rows
    assert format_phases(rows[3:], ["passt", "ferryd"], [100]) == ""


def test_the_runs_whose_source_waited_for_the_target_are_named() -> None:
    """A median hides the one run in three whose source sat on a full migration socket
    while the target restored (`end` 59 ms instead of ~0.1): each such run is listed."""
    quick = dict.fromkeys(PHASES, 0.1)
    rows = [
        _run("ferryd", 1000, 12, 1000, phases=quick),
        _run("ferryd", 1000, 72, 1000, phases={**quick, "end": 59.1}),
        _run("ferryd", 1000, 12, 1000, phases=None),
        _run("passt", 1000, 94, 1000, phases={**quick, "end": 56.6}),
        _run("ferryd", 100, 9, 100, scenario=LATE_FAILURE, phases={**quick, "end": 70.0}),
    ]
    lines = format_waits(rows, ["passt", "ferryd"], [100, 1000]).splitlines()
    assert lines == [
        "  passt N=1000 run 1: 56.6 ms of its 94 ms downtime after its last device",
        "  ferryd N=1000 run 2: 59.1 ms of its 72 ms downtime after its last device",
    ]
    assert format_waits(rows[:1], ["ferryd"], [1000]) == ""


def test_the_cache_gives_the_newest_complete_build(tmp_path: Path) -> None:
    assert cached(tmp_path / "missing") is None
    for version, files in (
        ("0.0~git20250503.587980c", ("passt", "passt-repair")),
        ("0.0~git20260728.f8df3f1", ("passt", "passt-repair")),
        ("0.0~git20270101.0000000", ("passt",)),  # a build that did not finish
    ):
        (tmp_path / version).mkdir()
        for name in files:
            (tmp_path / version / name).write_bytes(b"")
    found = cached(tmp_path)
    assert found is not None
    assert found.version == "0.0~git20260728.f8df3f1"
    assert found.passt_repair == tmp_path / found.version / "passt-repair"


def test_a_row_past_its_deadline_fails_with_where_it_was_stuck() -> None:
    cleaned = []
    stuck = r"(?s)more than 0.05 s; stuck at.*time\.sleep"
    with pytest.raises(RowTimeout, match=stuck), _row_deadline(0.05):
        try:
            time.sleep(30)
        finally:
            cleaned.append(True)
    assert cleaned == [True]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
