"""FNR drift: the DuckDB counts, the statistical tests and the alert episodes, against hand-computed values."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from qcstream.settings import Settings
from qcstream.storage.drift import DefectCounts, fnr_drift_test, line_defect_counts
from qcstream.storage.parquet_sink import ALERTS, LABELS, RESULTS, ParquetSink
from qcstream.storage.report import format_report, quality_report
from qcstream.streams.alerts import DriftMonitor, check_alert_settings, load_open_episodes
from qcstream.streams.records import Alert, InspectionResult, Label, RecordError


def result(frame_id: str, line_id: str, captured_at: float, is_defect: bool, inspected_at: float | None = None) -> InspectionResult:
    return InspectionResult(
        frame_id=frame_id, line_id=line_id, camera_id="cam-1", captured_at=captured_at,
        inspected_at=captured_at + 1 if inspected_at is None else inspected_at,
        image_score=2.0 if is_defect else 0.5, threshold=1.0, is_defect=is_defect, mode="rgb",
        model_version="v1", maps_bucket="maps", anomaly_map_png_key=f"{frame_id}.png",
        anomaly_map_raw_key=f"{frame_id}.npy", detector_ms=10.0, latency_ms=20.0,
    )


def label(frame_id: str, line_id: str, is_defect: bool, labelled_at: float) -> Label:
    return Label(frame_id=frame_id, line_id=line_id, is_defect=is_defect, labelled_at=labelled_at)


def settings_for(tmp_path: Path, **changes) -> Settings:
    base = Settings(
        home=tmp_path / "home", data_dir=tmp_path / "data", model_dir=tmp_path / "model",
        kafka_bootstrap="127.0.0.1:1", kafka_port=1, kafka_controller_port=2,
        minio_endpoint="127.0.0.1:3", minio_access_key="a", minio_secret_key="s",
        alert_recent_defects=5, alert_baseline_defects=50, alert_min_baseline_defects=10,
    )
    return dataclasses.replace(base, **changes)


def fisher_greater(recent_misses: int, recent_n: int, baseline_misses: int, baseline_n: int) -> float:
    """P(X >= recent_misses) for X hypergeometric with the table's margins."""
    misses = recent_misses + baseline_misses
    total = recent_n + baseline_n
    return sum(
        math.comb(misses, k) * math.comb(total - misses, recent_n - k) for k in range(recent_misses, min(misses, recent_n) + 1)
    ) / math.comb(total, recent_n)


# --- counts -----------------------------------------------------------------------

def test_line_defect_counts_windows_and_corrections(tmp_path: Path):
    results = [
        # Line A: labelled defects captured at t = 1..6; misses at t = 2, 5 and 6.
        result("a1", "A", 1, True), result("a2", "A", 2, False), result("a3", "A", 3, True),
        result("a4", "A", 4, True), result("a5", "A", 5, False), result("a6", "A", 6, False),
        # a6 was inspected again and caught: the latest result wins.
        result("a6", "A", 6, True, inspected_at=100),
        # Labelled good, unlabelled, and a label corrected from defect to good: no defects.
        result("a7", "A", 7, False), result("a8", "A", 8, False), result("a9", "A", 9, False),
        # Line B: one labelled defect, missed.
        result("b1", "B", 1, False),
    ]
    labels = [
        *(label(f"a{i}", "A", True, 50) for i in range(1, 7)),
        label("a7", "A", False, 50),
        label("a9", "A", True, 50), label("a9", "A", False, 60),
        label("b1", "B", True, 50),
    ]
    ParquetSink(tmp_path, RESULTS).write_batch(results)
    ParquetSink(tmp_path, LABELS).write_batch(labels)

    counts = {c.line_id: c for c in line_defect_counts(tmp_path, recent=2, baseline=3)}

    # Recent: a6 (caught on re-inspection), a5 (missed). Baseline: a4, a3, a2 (a2 missed). a1 is outside both.
    assert counts["A"] == DefectCounts("A", 2, 1, 3, 1, 5.0, 6.0)
    assert counts["B"] == DefectCounts("B", 1, 1, 0, 0, 1.0, 1.0)


def test_line_defect_counts_rejects_an_empty_window(tmp_path: Path):
    with pytest.raises(ValueError, match="invalid recent window 0"):
        line_defect_counts(tmp_path, recent=0, baseline=10)


def test_counts_are_empty_without_data(tmp_path: Path):
    assert line_defect_counts(tmp_path, recent=5, baseline=10) == []


# --- tests ------------------------------------------------------------------------

def test_fisher_test_matches_the_hypergeometric_tail():
    counts = DefectCounts("A", 5, 3, 10, 1, None, None)

    test = fnr_drift_test(counts, min_baseline=10)

    assert not test.against_reference
    assert test.recent_fnr == pytest.approx(0.6)
    assert test.baseline_fnr == pytest.approx(0.1)
    # Margins: 4 misses in 15 defects, 5 of them recent. P(X >= 3) = (C(4,3) C(11,2) + C(4,4) C(11,1)) / C(15,5).
    assert test.p_value == pytest.approx((4 * 55 + 1 * 11) / 3003)
    assert test.p_value == pytest.approx(fisher_greater(3, 5, 1, 10))


def test_short_baseline_uses_the_reference_fnr():
    counts = DefectCounts("A", 10, 4, 3, 0, None, None)

    test = fnr_drift_test(counts, min_baseline=10, reference_fnr=0.1)

    assert test.against_reference
    assert test.baseline_fnr == 0.1
    expected = sum(math.comb(10, k) * 0.1**k * 0.9 ** (10 - k) for k in range(4, 11))
    assert test.p_value == pytest.approx(expected)


def test_short_baseline_without_reference_is_not_tested():
    assert fnr_drift_test(DefectCounts("A", 10, 9, 3, 0, None, None), min_baseline=10) is None


# --- episodes ---------------------------------------------------------------------

class Script:
    """Counts that the test sets before each check."""

    def __init__(self) -> None:
        self.rows: list[DefectCounts] = []

    def __call__(self) -> list[DefectCounts]:
        return self.rows


def check_and_record(monitor: DriftMonitor, now: float) -> list[Alert]:
    alerts = monitor.check(now=now)
    for alert in alerts:
        monitor.record(alert)
    return alerts


def test_monitor_fires_once_and_clears(tmp_path: Path):
    script = Script()
    monitor = DriftMonitor(settings_for(tmp_path), counts=script, open_episodes={})

    # Four misses in four defects: too few labelled defects to test (the check needs 5).
    script.rows = [DefectCounts("A", 4, 4, 40, 2, 1.0, 4.0)]
    assert check_and_record(monitor, 10) == []

    # Same miss rate as the baseline: no alert.
    script.rows = [DefectCounts("A", 5, 0, 40, 2, 1.0, 5.0)]
    assert check_and_record(monitor, 20) == []

    # Drift: 4 of the last 5 missed against 2 of 40.
    script.rows = [DefectCounts("A", 5, 4, 40, 2, 1.0, 5.0)]
    [fired] = check_and_record(monitor, 30)
    assert (fired.state, fired.line_id, fired.raised_at) == ("firing", "A", 30)
    assert (fired.recent_misses, fired.recent_defects, fired.baseline_misses, fired.baseline_defects) == (4, 5, 2, 40)
    assert fired.recent_fnr == pytest.approx(0.8)
    assert fired.baseline_fnr == pytest.approx(0.05)
    assert fired.p_value == pytest.approx(fisher_greater(4, 5, 2, 40))
    assert fired.p_value < 0.01
    assert "missed 4 of the last 5" in fired.message

    # Still drifting, and the baseline now contains drifted frames too: suppressed, no second alert.
    script.rows = [DefectCounts("A", 5, 5, 40, 6, 2.0, 6.0)]
    assert check_and_record(monitor, 40) == []

    # Better but not yet clear against the frozen baseline (2 of 40): p = P(X >= 2) is below 0.1.
    script.rows = [DefectCounts("A", 5, 2, 40, 9, 3.0, 7.0)]
    assert fisher_greater(2, 5, 2, 40) <= 0.1
    assert check_and_record(monitor, 50) == []

    # Recovered: the same episode clears.
    script.rows = [DefectCounts("A", 5, 0, 40, 9, 4.0, 8.0)]
    [cleared] = check_and_record(monitor, 60)
    assert (cleared.state, cleared.alert_id, cleared.raised_at) == ("cleared", fired.alert_id, 60)
    assert (cleared.baseline_misses, cleared.baseline_defects) == (2, 40)
    assert cleared.p_value == pytest.approx(1.0)
    assert monitor.firing == {}

    # A new drift is a new episode.
    script.rows = [DefectCounts("A", 5, 5, 40, 2, 5.0, 9.0)]
    [again] = check_and_record(monitor, 70)
    assert again.state == "firing"
    assert again.alert_id != fired.alert_id


def test_monitor_repeats_undelivered_alert(tmp_path: Path):
    script = Script()
    script.rows = [DefectCounts("A", 5, 5, 40, 0, 1.0, 5.0)]
    monitor = DriftMonitor(settings_for(tmp_path), counts=script, open_episodes={})

    first = monitor.check(now=1)
    second = monitor.check(now=2)

    assert [a.state for a in first] == ["firing"] and [a.state for a in second] == ["firing"]


def test_monitor_reference_fnr_for_new_lines(tmp_path: Path):
    script = Script()
    settings = settings_for(tmp_path, alert_reference_fnr=0.1)
    monitor = DriftMonitor(settings, counts=script, open_episodes={})

    # Line A has history and no drift; line B is new (3 baseline defects), 4 of 5 missed against 10%.
    script.rows = [DefectCounts("A", 5, 0, 40, 2, 1.0, 5.0), DefectCounts("B", 5, 4, 3, 0, 1.0, 5.0)]
    [fired] = check_and_record(monitor, 10)

    assert fired.line_id == "B"
    assert fired.baseline_fnr == 0.1
    assert (fired.baseline_defects, fired.baseline_misses) == (0, 0)
    expected = sum(math.comb(5, k) * 0.1**k * 0.9 ** (5 - k) for k in range(4, 6))
    assert fired.p_value == pytest.approx(expected)

    # It clears against the same reference.
    script.rows = [DefectCounts("B", 5, 0, 8, 4, 2.0, 6.0)]
    [cleared] = check_and_record(monitor, 20)
    assert cleared.state == "cleared"
    assert cleared.baseline_fnr == 0.1


def test_open_episodes_survive_restart(tmp_path: Path):
    settings = settings_for(tmp_path)
    script = Script()
    script.rows = [DefectCounts("A", 5, 5, 40, 0, 1.0, 5.0), DefectCounts("B", 5, 5, 40, 0, 1.0, 5.0)]
    monitor = DriftMonitor(settings, counts=script, open_episodes={})
    alerts = check_and_record(monitor, 10)
    script.rows = [DefectCounts("B", 5, 0, 40, 0, 2.0, 6.0)]
    alerts += check_and_record(monitor, 20)
    ParquetSink(settings.data_dir, ALERTS).write_batch(alerts)

    episodes = load_open_episodes(settings)

    # A is still firing; B fired and cleared.
    assert list(episodes) == ["A"]
    assert episodes["A"] == alerts[0]
    restarted = DriftMonitor(settings, counts=Script())
    assert restarted.firing == episodes


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"alert_check_seconds": -1.0}, "QCSTREAM_ALERT_CHECK_SECONDS -1.0"),
        ({"alert_recent_defects": 0}, "QCSTREAM_ALERT_RECENT_DEFECTS 0"),
        ({"alert_min_baseline_defects": 80}, "larger than QCSTREAM_ALERT_BASELINE_DEFECTS 50"),
        ({"alert_p_value": 0.2, "alert_clear_p_value": 0.1}, "0 < P_VALUE <= CLEAR_P_VALUE < 1"),
        ({"alert_reference_fnr": 1.5}, "QCSTREAM_ALERT_REFERENCE_FNR 1.5"),
        ({"alert_webhook_url": "ftp://example.invalid/secret-token"}, "scheme 'ftp'"),
    ],
)
def test_bad_alert_settings_are_named(tmp_path: Path, changes: dict, message: str):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as raised:
        check_alert_settings(settings_for(tmp_path, **changes))
    assert "secret-token" not in str(raised.value)


def test_alert_record_round_trip_and_validation():
    alert = Alert(
        alert_id="abc", line_id="A", condition="fnr-drift", state="firing", raised_at=1.0, recent_defects=5,
        recent_misses=4, baseline_defects=40, baseline_misses=2, recent_fnr=0.8, baseline_fnr=0.05,
        p_value=0.001, message="m",
    )
    assert Alert.loads(alert.dumps()) == alert
    with pytest.raises(RecordError, match="invalid alert state 'open'"):
        dataclasses.replace(alert, state="open")
    with pytest.raises(RecordError, match="invalid recent_misses -1"):
        dataclasses.replace(alert, recent_misses=-1)


def test_report_lists_open_alerts(tmp_path: Path):
    settings = settings_for(tmp_path)
    script = Script()
    script.rows = [DefectCounts("A", 5, 5, 40, 0, 1.0, 5.0), DefectCounts("B", 5, 5, 40, 0, 1.0, 5.0)]
    monitor = DriftMonitor(settings, counts=script, open_episodes={})
    alerts = check_and_record(monitor, 1_796_450_000.0)
    script.rows = [DefectCounts("B", 5, 0, 40, 0, 2.0, 6.0)]
    alerts += check_and_record(monitor, 1_796_450_060.0)
    ParquetSink(settings.data_dir, ALERTS).write_batch(alerts)

    report = quality_report(settings.data_dir, settings)
    text = format_report(report)

    assert report.open_alerts == [("A", 1_796_450_000.0, alerts[0].message)]
    assert f"Open FNR drift alerts:\n  2026-12-05 05:53:20 UTC  {alerts[0].message}" in text
    assert "line B" not in text


def test_report_without_alerts_says_none(tmp_path: Path):
    settings = settings_for(tmp_path)
    ParquetSink(settings.data_dir, RESULTS).write_batch([result("a1", "A", 1, True)])

    assert "Open FNR drift alerts: none" in format_report(quality_report(settings.data_dir, settings))
