"""DuckDB quality queries and the report, checked against rates counted by hand.

The data set, with NOW = 1700100000 and a one-hour window (seconds before NOW):

line A, labelled, inside the window:
    a7  -10  label good    predicted defect  -> FP
    a3  -20  label defect  predicted good    -> FN (re-delivered: an older result predicted defect)
    a1  -30  label defect  predicted defect  -> TP
    a2  -40  label defect  predicted defect  -> TP
    a4  -50  label good    predicted good    -> TN
    a5  -60  label good    predicted good    -> TN (first labelled defect, later corrected)
    a6  -70  label good    predicted good    -> TN
line A, unlabelled: a8 at -5 predicted defect.
line A, outside the window: old1 at -7200, label defect, predicted good -> FN.
line B: b1 at -100 label good, predicted good; b2 at -200 label good, predicted defect -> FP.

Window, line A: 7 labelled, 3 defects with 1 missed (FNR 1/3), 4 good with 1 flagged (FPR 1/4).
All time, line A: old1 adds a missed defect, so FNR 2/4 and FPR 1/4.
Line B: no labelled defect, so FNR is None, and FPR is 1/2.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qcstream.settings import Settings
from qcstream.storage.parquet_sink import RESULTS_SCHEMA, ParquetSink
from qcstream.storage.queries import connect, defect_rates, latency_percentiles, rolling_rates
from qcstream.storage.report import format_report, quality_report
from qcstream.streams.records import InspectionResult, Label

NOW = 1700100000.0
HOUR = 3600.0


def result(
    frame_id: str,
    line_id: str,
    age: float,
    is_defect: bool,
    inspected_after: float = 0.5,
    latency_ms: float = 100.0,
    detector_ms: float = 40.0,
) -> InspectionResult:
    captured_at = NOW - age
    return InspectionResult(
        frame_id=frame_id,
        line_id=line_id,
        camera_id="cam1",
        captured_at=captured_at,
        inspected_at=captured_at + inspected_after,
        image_score=0.9 if is_defect else 0.1,
        threshold=0.5,
        is_defect=is_defect,
        mode="rgb",
        model_version="m1",
        maps_bucket="anomaly-maps",
        anomaly_map_png_key=f"{line_id}/x/{frame_id}.png",
        anomaly_map_raw_key=f"{line_id}/x/{frame_id}.npz",
        detector_ms=detector_ms,
        latency_ms=latency_ms,
    )


def label(frame_id: str, line_id: str, is_defect: bool, labelled_at: float = NOW) -> Label:
    return Label(frame_id=frame_id, line_id=line_id, is_defect=is_defect, labelled_at=labelled_at, inspector="ana")


def make_settings() -> Settings:
    return Settings(
        home=Path("/nonexistent/home"),
        data_dir=Path("/nonexistent/data"),
        model_dir=Path("/nonexistent/model"),
        kafka_bootstrap="127.0.0.1:9092",
        kafka_port=9092,
        kafka_controller_port=9093,
        minio_endpoint="127.0.0.1:9000",
        minio_access_key="qcstream",
        minio_secret_key="not-a-real-secret",
    )


def write_data_set(root: Path) -> None:
    results = ParquetSink(root, "results")
    labels = ParquetSink(root, "labels")

    # The first delivery of a3, inspected earlier and slower, with the opposite verdict.
    results.write_batch([result("a3", "A", 20, is_defect=True, inspected_after=0.1, latency_ms=10_000.0)])
    results.write_batch(
        [
            result("a7", "A", 10, True),
            result("a3", "A", 20, False),
            result("a1", "A", 30, True),
            result("a2", "A", 40, True),
            result("a4", "A", 50, False),
            result("a5", "A", 60, False),
            result("a6", "A", 70, False),
            result("a8", "A", 5, True),
            result("old1", "A", 2 * HOUR, False),
            result("b1", "B", 100, False, latency_ms=100.0, detector_ms=10.0),
            result("b2", "B", 200, True, latency_ms=200.0, detector_ms=30.0),
        ]
    )

    # The correction of a5 lands in an earlier file than the label it replaces,
    # so only labelled_at, not file order, can make it win.
    labels.write_batch([label("a5", "A", False, labelled_at=NOW)])
    labels.write_batch(
        [
            label("a7", "A", False),
            label("a3", "A", True),
            label("a1", "A", True),
            label("a2", "A", True),
            label("a4", "A", False),
            label("a5", "A", True, labelled_at=NOW - 30),
            label("a6", "A", False),
            label("old1", "A", True),
            label("b1", "B", False),
            label("b2", "B", False),
        ]
    )


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    write_data_set(tmp_path)
    return tmp_path


def by_line(rows):
    return {row.line_id: row for row in rows}


def test_views_deduplicate(data_root):
    with connect(data_root) as connection:
        results = connection.execute("SELECT frame_id, is_defect FROM results WHERE frame_id = 'a3'").fetchall()
        labels = connection.execute("SELECT frame_id, is_defect FROM labels WHERE frame_id = 'a5'").fetchall()
        counts = connection.execute("SELECT (SELECT count(*) FROM results), (SELECT count(*) FROM labels)").fetchall()

    assert results == [("a3", False)]
    assert labels == [("a5", False)]
    assert counts == [(11, 10)]


def test_rolling_rates_in_window(data_root):
    rates = by_line(rolling_rates(data_root, window_seconds=HOUR, now=NOW))

    line_a = rates["A"]
    assert line_a.n_labelled == 7
    assert line_a.n_defects == 3
    assert line_a.n_good == 4
    assert line_a.false_negatives == 1
    assert line_a.false_positives == 1
    assert line_a.fnr == pytest.approx(1 / 3)
    assert line_a.fpr == pytest.approx(1 / 4)


def test_rolling_rates_line_without_defects(data_root):
    line_b = by_line(rolling_rates(data_root, window_seconds=HOUR, now=NOW))["B"]

    assert line_b.n_labelled == 2
    assert line_b.n_defects == 0
    assert line_b.fnr is None
    assert line_b.fpr == pytest.approx(1 / 2)


def test_rolling_rates_all_time_includes_old_rows(data_root):
    line_a = by_line(rolling_rates(data_root))["A"]

    assert line_a.n_labelled == 8
    assert line_a.n_defects == 4
    assert line_a.false_negatives == 2
    assert line_a.fnr == pytest.approx(2 / 4)
    assert line_a.fpr == pytest.approx(1 / 4)


def test_rolling_rates_narrow_window(data_root):
    # 25 s back from NOW keeps a7 (FP) and a3 (FN) on line A and nothing on line B.
    rates = by_line(rolling_rates(data_root, window_seconds=25, now=NOW))

    assert sorted(rates) == ["A"]
    assert rates["A"].n_labelled == 2
    assert rates["A"].fnr == pytest.approx(1.0)
    assert rates["A"].fpr == pytest.approx(1.0)


def test_rolling_rates_last_n_per_line(data_root):
    # The 3 latest labelled frames of line A are a7 (FP), a3 (FN) and a1 (TP). The later a8 has no label.
    rates = by_line(rolling_rates(data_root, last_n=3))

    assert rates["A"].n_labelled == 3
    assert rates["A"].n_defects == 2
    assert rates["A"].false_negatives == 1
    assert rates["A"].fnr == pytest.approx(1 / 2)
    assert rates["A"].fpr == pytest.approx(1.0)
    assert rates["B"].n_labelled == 2


@pytest.mark.parametrize(
    "options",
    [
        {"window_seconds": HOUR, "last_n": 5},
        {"window_seconds": 0},
        {"window_seconds": -1.0},
        {"window_seconds": float("nan")},
        {"last_n": 0},
        {"last_n": 2.5},
    ],
)
def test_rolling_rates_rejects_bad_window(data_root, options):
    with pytest.raises(ValueError):
        rolling_rates(data_root, now=NOW, **options)


def test_defect_rates_all_time(data_root):
    rates = by_line(defect_rates(data_root))

    # Line A counts a1..a8 and old1 once each. Of these, a1, a2, a7 and a8 are predicted defects.
    assert rates["A"].frames_inspected == 9
    assert rates["A"].predicted_defects == 4
    assert rates["A"].defect_rate == pytest.approx(4 / 9)
    assert rates["B"].frames_inspected == 2
    assert rates["B"].defect_rate == pytest.approx(1 / 2)


def test_defect_rates_in_window(data_root):
    rates = by_line(defect_rates(data_root, window_seconds=HOUR, now=NOW))

    assert rates["A"].frames_inspected == 8
    assert rates["A"].defect_rate == pytest.approx(4 / 8)


def test_latency_percentiles(data_root):
    latencies = by_line(latency_percentiles(data_root))

    # Linear interpolation between B's two values: p50 halfway, p95 at 95 % of the way.
    line_b = latencies["B"]
    assert line_b.frames == 2
    assert line_b.latency_p50_ms == pytest.approx(150.0)
    assert line_b.latency_p95_ms == pytest.approx(195.0)
    assert line_b.detector_p50_ms == pytest.approx(20.0)
    assert line_b.detector_p95_ms == pytest.approx(29.0)
    # The slow first delivery of a3 is deduplicated away, so every line A latency is 100 ms.
    assert latencies["A"].latency_p95_ms == pytest.approx(100.0)


def test_queries_without_files_return_empty(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="qcstream.storage.queries"):
        assert rolling_rates(tmp_path, window_seconds=HOUR, now=NOW) == []
        assert defect_rates(tmp_path) == []
        assert latency_percentiles(tmp_path) == []
    assert any("no results Parquet files" in record.getMessage() for record in caplog.records)


def test_results_without_labels(tmp_path):
    ParquetSink(tmp_path, "results").write_batch([result("f1", "A", 10, True)])

    assert rolling_rates(tmp_path) == []
    assert by_line(defect_rates(tmp_path))["A"].predicted_defects == 1


def test_numeric_line_id_stays_text(tmp_path):
    ParquetSink(tmp_path, "results").write_batch([result("f1", "007", 10, True)])

    assert [row.line_id for row in defect_rates(tmp_path)] == ["007"]


def test_reads_file_missing_a_newer_column(tmp_path):
    ParquetSink(tmp_path, "results").write_batch([result("f1", "A", 10, True)])
    older_schema = RESULTS_SCHEMA.remove(RESULTS_SCHEMA.get_field_index("mode"))
    row = {name: value for name, value in result("f2", "A", 20, False).__dict__.items() if name != "mode"}
    row["date"] = "2023-11-16"
    folder = tmp_path / "results" / "date=2023-11-16" / "line=A"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([row], schema=older_schema), folder / "part-old.parquet")

    assert by_line(defect_rates(tmp_path))["A"].frames_inspected == 2


def test_root_with_quote_in_name(tmp_path):
    root = tmp_path / "it's data"
    ParquetSink(root, "results").write_batch([result("f1", "A", 10, True)])

    assert by_line(defect_rates(root))["A"].frames_inspected == 1


def test_root_with_glob_characters_rejected(tmp_path):
    root = tmp_path / "data[1]"
    ParquetSink(root, "results").write_batch([result("f1", "A", 10, True)])

    with pytest.raises(ValueError, match="glob characters"):
        defect_rates(root)


def test_quality_report_per_line(data_root):
    report = quality_report(data_root, make_settings(), window_seconds=HOUR, now=NOW)

    lines = by_line(report.lines)
    assert sorted(lines) == ["A", "B"]
    assert lines["A"].frames_inspected == 8
    assert lines["A"].defect_rate == pytest.approx(0.5)
    assert lines["A"].fnr == pytest.approx(1 / 3)
    assert lines["A"].fpr == pytest.approx(1 / 4)
    assert lines["A"].latency_p50_ms == pytest.approx(100.0)
    assert lines["B"].fnr is None
    assert lines["A"].maps_uri == "s3://anomaly-maps/A/"
    assert report.minio_url == "http://127.0.0.1:9000"
    assert report.console_url == "http://127.0.0.1:9001"
    assert report.frames_inspected == 10
    assert report.totals.fpr == pytest.approx(2 / 6)


def test_quality_report_line_with_results_only(tmp_path):
    ParquetSink(tmp_path, "results").write_batch([result("f1", "C", 10, True)])

    [line] = quality_report(tmp_path, make_settings(), now=NOW).lines

    assert line.line_id == "C"
    assert line.frames_inspected == 1
    assert line.n_labelled == 0
    assert line.fnr is None
    assert line.fpr is None


def test_format_report_table(data_root):
    report = quality_report(data_root, make_settings(), window_seconds=HOUR, now=NOW)

    text = format_report(report)
    lines = text.splitlines()

    window, totals = lines[0], lines[1]
    assert "window: last 1 h" in window
    assert "2023-11-16 01:00:00 UTC" in window
    assert "10 frames inspected" in totals
    assert "FNR 33.3% (1/3, 95% CI 6.1-79.2%)" in totals
    assert "FPR 33.3% (2/6, 95% CI 9.7-70.0%)" in totals
    table = lines[3:7]
    assert table[0].split()[:3] == ["line", "frames", "defect"]
    assert len({len(row) for row in table}) == 1
    row_a = table[2].split()
    # Wilson 95%: 1/3 -> 0.0615 to 0.7923, 1/4 -> 0.0456 to 0.6993 (worked out by hand).
    assert row_a[:10] == ["A", "8", "50.0%", "7", "1/3", "33.3%", "6.1-79.2%", "1/4", "25.0%", "4.6-69.9%"]
    row_b = table[3].split()
    assert row_b[4:7] == ["0/0", "n/a", "n/a"]
    assert "  A  s3://anomaly-maps/A/" in lines
    assert "  B  s3://anomaly-maps/B/" in lines
    assert "http://127.0.0.1:9000/anomaly-maps" not in text  # the private bucket returns AccessDenied
    assert "bucket anomaly-maps is private" in text
    assert "MinIO console http://127.0.0.1:9001" in text
    assert "mc alias set qcstream http://127.0.0.1:9000 qcstream <secret key>" in text
    assert "mc cp qcstream/anomaly-maps/<line>/<YYYY-MM-DD>/<frame id>.png ." in text
    assert "/nonexistent/home/minio/secret-key" in text
    assert "not-a-real-secret" not in text


def test_format_report_legend(data_root):
    text = format_report(quality_report(data_root, make_settings(), window_seconds=HOUR, now=NOW))

    legend = {line.split("  ")[1]: line for line in text.splitlines() if line.startswith("  ") and "  " in line[2:]}
    assert "share of inspected frames the detector flagged" in legend["defect rate"]
    assert "labelled defects passed as good / labelled defects" in legend["FNR"]
    assert "labelled good parts flagged / labelled good parts" in legend["FPR"]
    assert "capture to result, including queueing in Kafka" in legend["p50/p95 ms"]
    assert "model time per frame" in legend["detector p50/p95 ms"]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(80.2681, "last 80 s"), (HOUR, "last 1 h"), (1.5 * HOUR, "last 90 min"), (3725.0, "last 1.0 h"), (2 * 86400.0, "last 2 d")],
)
def test_format_report_rounds_the_window(tmp_path, seconds, shown):
    text = format_report(quality_report(tmp_path, make_settings(), window_seconds=seconds, now=NOW))

    assert f"window: {shown} (frames captured since " in text


def test_format_report_without_data(tmp_path):
    text = format_report(quality_report(tmp_path, make_settings(), last_n=20, now=NOW))

    assert "last 20 labelled frames" in text
    assert "0 frames inspected" in text
    assert "FNR n/a (0/0, 95% CI n/a)" in text
    assert "(no results or labels in this window)" in text
