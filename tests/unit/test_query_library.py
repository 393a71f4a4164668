"""``qcstream query``: named queries and ad-hoc SQL on Parquet written by the sink, checked by hand."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from qcstream.cli import main
from qcstream.storage.parquet_sink import ParquetSink
from qcstream.storage.query_library import run_query
from qcstream.storage.statistics import wilson_interval
from qcstream.streams.records import InspectionResult, Label


def make_result(frame_id: str, camera_id: str, is_defect: bool, captured_at: float) -> InspectionResult:
    return InspectionResult(
        frame_id=frame_id, line_id="line-a", camera_id=camera_id, captured_at=captured_at,
        inspected_at=captured_at + 0.5, image_score=2.0 if is_defect else 1.0, threshold=1.5,
        is_defect=is_defect, mode="rgb", model_version="m1", maps_bucket="anomaly-maps",
        anomaly_map_png_key=f"line-a/x/{frame_id}.png", anomaly_map_raw_key=f"line-a/x/{frame_id}.npz",
        detector_ms=100.0, latency_ms=500.0,
    )


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch) -> Path:
    # Defects f1 (caught), f2 (missed), f6 (missed); good f3 (flagged), f4, f5 -> FNR 2/3, FPR 1/3.
    # f7 is older than an hour and unlabelled.
    now = time.time()
    predicted = {"f1": True, "f2": False, "f3": True, "f4": False, "f5": False, "f6": False}
    truth = {"f1": True, "f2": True, "f3": False, "f4": False, "f5": False, "f6": True}
    results = [make_result(f, "cam-1" if f < "f4" else "cam-2", p, now - 10) for f, p in predicted.items()]
    results.append(make_result("f7", "cam-2", True, now - 7200))
    ParquetSink(tmp_path, "results").write_batch(results)
    ParquetSink(tmp_path, "labels").write_batch([Label(frame_id=f, line_id="line-a", is_defect=d, labelled_at=now - 5) for f, d in truth.items()])
    monkeypatch.setenv("QCSTREAM_DATA_DIR", str(tmp_path))
    return tmp_path


def test_rolling_rates_cli_json(data_root, capsys):
    assert main(["query", "rolling-rates", "--format", "json"]) == 0

    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["line_id"] == "line-a"
    assert row["false_positives"] == 1
    assert row["good"] == 3


def test_rolling_rates_values(data_root):
    from qcstream.storage.query_library import NAMED_QUERIES

    columns, rows = run_query(data_root, NAMED_QUERIES["rolling-rates"][1])

    row = dict(zip(columns, rows[0]))
    assert row["false_negatives"] == 2
    assert row["defects"] == 3
    assert row["fnr"] == pytest.approx(2 / 3)
    low, high = wilson_interval(2, 3)
    assert row["fnr_low"] == pytest.approx(low, abs=1e-9)
    assert row["fnr_high"] == pytest.approx(high, abs=1e-9)
    assert row["fpr"] == pytest.approx(1 / 3)


def test_defect_rates_per_camera(data_root, capsys):
    assert main(["query", "defect-rates", "--format", "json"]) == 0

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_camera = {row["camera_id"]: row for row in rows}
    assert by_camera["cam-1"]["frames"] == 3
    assert by_camera["cam-1"]["predicted_defects"] == 2  # f1 and f3
    assert by_camera["cam-2"]["frames"] == 4
    assert by_camera["cam-2"]["predicted_defects"] == 1


def test_window_drops_old_frames(data_root, capsys):
    assert main(["query", "defect-rates", "--window", "3600", "--format", "json"]) == 0

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {row["camera_id"]: row["frames"] for row in rows} == {"cam-1": 3, "cam-2": 3}


def test_ad_hoc_sql_as_csv(data_root, capsys):
    assert main(["query", "--sql", "SELECT count(*) AS n, wilson_high(0, 10) AS high FROM labels"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "n,high"
    count, high = lines[1].split(",")
    assert count == "6"
    assert float(high) == pytest.approx(0.2775, abs=1e-4)


def test_bad_sql_names_the_error(data_root, capsys):
    assert main(["query", "--sql", "SELECT nope FROM results"]) == 1

    assert "the query failed" in capsys.readouterr().err


def test_unknown_query_name(data_root, capsys):
    assert main(["query", "fnr-please"]) == 1

    assert "unknown query 'fnr-please'; choose one of rolling-rates" in capsys.readouterr().err
