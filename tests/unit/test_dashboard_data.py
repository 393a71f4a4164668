"""Dashboard queries on small hand-built Parquet data, checked against counts made by hand.

The clock is fixed at ``NOW`` (a multiple of 10 s), the window is 300 s, so the
buckets are 10 s wide and start at ``NOW - 300``, ``NOW - 290`` and so on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import pytest
from kafka import TopicPartition

from qcstream.dashboards import data
from qcstream.dashboards.lag import partition_lag
from qcstream.storage.parquet_sink import ParquetSink
from qcstream.storage.queries import connect
from qcstream.streams.records import Alert, InspectionResult, Label

NOW = 1_700_000_000.0
WINDOW = 300.0
SINCE = NOW - WINDOW

#: 95% Wilson intervals computed by hand from the score-interval formula with z = 1.959964.
WILSON_2_OF_3 = (0.207660, 0.938508)
WILSON_1_OF_2 = (0.094531, 0.905469)
WILSON_1_OF_1 = (0.206549, 1.0)


def result(frame_id: str, line_id: str, age: float, is_defect: bool, inspected_age: float | None = None) -> InspectionResult:
    """Return a result captured ``age`` seconds before ``NOW`` and inspected 0.5 s later (or ``inspected_age`` before ``NOW``)."""
    captured_at = NOW - age
    inspected_at = captured_at + 0.5 if inspected_age is None else NOW - inspected_age
    return InspectionResult(
        frame_id=frame_id, line_id=line_id, camera_id="cam-1", captured_at=captured_at, inspected_at=inspected_at,
        image_score=0.9 if is_defect else 0.2, threshold=0.5, is_defect=is_defect, mode="rgb", model_version="test",
        maps_bucket="anomaly-maps", anomaly_map_png_key=f"{line_id}/2023-11-14/{frame_id}.png",
        anomaly_map_raw_key=f"{line_id}/2023-11-14/{frame_id}.npz", detector_ms=100.0, latency_ms=500.0,
    )


def label(frame_id: str, line_id: str, is_defect: bool, defect_type: str | None = None) -> Label:
    return Label(frame_id=frame_id, line_id=line_id, is_defect=is_defect, labelled_at=NOW - 5, defect_type=defect_type)


def alert(alert_id: str, line_id: str, state: str, age: float) -> Alert:
    return Alert(
        alert_id=alert_id, line_id=line_id, condition="fnr-drift", state=state, raised_at=NOW - age,
        recent_defects=20, recent_misses=9, baseline_defects=100, baseline_misses=10,
        recent_fnr=0.45, baseline_fnr=0.1, p_value=0.001, message=f"{line_id} FNR rose",
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Two lines with known outcomes; see the comments for each frame's bucket and outcome."""
    results = [
        result("a1", "line-a", 295, True),    # bucket NOW-300, labelled defect: caught
        result("a2", "line-a", 292, False),   # bucket NOW-300, labelled defect: missed
        result("a3", "line-a", 291, False),   # bucket NOW-300, labelled defect: missed
        result("a4", "line-a", 288, True),    # bucket NOW-290, labelled good: false alarm
        result("a5", "line-a", 285, False),   # bucket NOW-290, labelled good: correct
        result("a6", "line-a", 100, True),    # bucket NOW-100, no label
        result("a-old", "line-a", 400, True),  # before the window
        result("b1", "line-b", 50, False),    # bucket NOW-50, labelled defect: missed
        result("b2", "line-b", 45, False),    # bucket NOW-50, labelled good, re-inspected below
        result("b3", "line-b", 20, False),    # bucket NOW-20, no label
    ]
    # A second inspection of b2 (a redelivered frame) flags it. The view keeps this latest result.
    reinspected = [result("b2", "line-b", 45, True, inspected_age=10)]
    labels = [
        label("a1", "line-a", True, "cut"), label("a2", "line-a", True), label("a3", "line-a", True),
        label("a4", "line-a", False), label("a5", "line-a", False), label("a-old", "line-a", True),
        label("b1", "line-b", True), label("b2", "line-b", False),
    ]
    alerts = [alert("drift-a", "line-a", "firing", 200), alert("drift-a", "line-a", "cleared", 60), alert("drift-b", "line-b", "firing", 1000)]

    ParquetSink(tmp_path, "results").write_batch(results)
    ParquetSink(tmp_path, "results").write_batch(reinspected)
    ParquetSink(tmp_path, "labels").write_batch(labels)
    ParquetSink(tmp_path, "alerts").write_batch(alerts)
    ParquetSink(tmp_path, "alerts").write_batch(alerts[:1])  # a replayed batch counts once
    return tmp_path


@pytest.mark.parametrize(
    ("window", "expected"),
    [(10, 1), (60, 2), (300, 10), (3600, 120), (86400, 3600), (10_000_000, 333_334)],
)
def test_bucket_seconds_fits_window(window: float, expected: int):
    assert data.bucket_seconds(window) == expected


@pytest.mark.parametrize("window", [0, -5, math.nan, math.inf, True, "60"])
def test_bucket_seconds_rejects_invalid_window(window):
    with pytest.raises(ValueError, match="invalid window_seconds"):
        data.bucket_seconds(window)


def test_summary_of_empty_folder(tmp_path: Path):
    summary = data.summary(tmp_path / "missing", WINDOW, now=NOW)

    assert summary["lines"] == []
    assert summary["defect_rates"] == []
    assert summary["rate_series"] == {}
    assert summary["alerts"] == []
    assert summary["latest_defects"] == []
    assert summary["throughput"] == {"frames_per_minute": 0.0, "frames_in_window": 0, "last_inspected_at": None}
    assert summary["bucket_seconds"] == 10
    assert summary["window_start"] == SINCE


def test_summary_lines_and_window(root: Path):
    summary = data.summary(root, WINDOW, now=NOW)

    assert summary["lines"] == ["line-a", "line-b"]
    assert summary["generated_at"] == NOW
    assert summary["window_start"] == SINCE
    assert summary["bucket_seconds"] == 10


def test_defect_rates_per_line(root: Path):
    rows = {row["line_id"]: row for row in data.summary(root, WINDOW, now=NOW)["defect_rates"]}

    # line-a: a1..a6 in the window, flagged a1, a4, a6; line-b: b1..b3, flagged b2 (latest inspection).
    assert rows["line-a"] == {"line_id": "line-a", "frames": 6, "predicted_defects": 3, "defect_rate": 0.5}
    assert rows["line-b"]["frames"] == 3
    assert rows["line-b"]["predicted_defects"] == 1
    assert rows["line-b"]["defect_rate"] == pytest.approx(1 / 3)


def test_window_error_rates_per_line(root: Path):
    rows = {row["line_id"]: row for row in data.summary(root, WINDOW, now=NOW)["error_rates"]}

    # line-a: 3 labelled defects in the window, 2 missed; 2 labelled good, 1 flagged.
    assert (rows["line-a"]["false_negatives"], rows["line-a"]["defects"]) == (2, 3)
    assert (rows["line-a"]["false_positives"], rows["line-a"]["good"]) == (1, 2)
    assert rows["line-a"]["fnr"] == pytest.approx(2 / 3)
    assert (rows["line-a"]["fnr_low"], rows["line-a"]["fnr_high"]) == pytest.approx(WILSON_2_OF_3, abs=1e-6)
    assert rows["line-b"]["fnr"] == 1.0
    assert rows["line-b"]["fpr"] == 1.0


def test_rate_series_buckets_line_a(root: Path):
    series = data.summary(root, WINDOW, now=NOW)["rate_series"]["line-a"]

    # a6 is in the window but unlabelled, so bucket NOW-100 has no point.
    assert [point["bucket_start"] for point in series] == [NOW - 300, NOW - 290]
    first, second = series
    assert (first["defects"], first["false_negatives"], first["good"], first["false_positives"]) == (3, 2, 0, 0)
    assert first["fnr"] == pytest.approx(2 / 3)
    assert (first["fnr_low"], first["fnr_high"]) == pytest.approx(WILSON_2_OF_3, abs=1e-6)
    assert first["fpr"] is None
    assert first["fpr_low"] is None
    assert first["fpr_high"] is None
    assert (second["defects"], second["good"], second["false_positives"]) == (0, 2, 1)
    assert second["fnr"] is None
    assert second["fpr"] == 0.5
    assert (second["fpr_low"], second["fpr_high"]) == pytest.approx(WILSON_1_OF_2, abs=1e-6)


def test_rate_series_buckets_line_b(root: Path):
    series = data.summary(root, WINDOW, now=NOW)["rate_series"]["line-b"]

    assert len(series) == 1
    point = series[0]
    assert point["bucket_start"] == NOW - 50
    assert (point["defects"], point["false_negatives"], point["good"], point["false_positives"]) == (1, 1, 1, 1)
    assert point["fnr"] == 1.0
    assert (point["fnr_low"], point["fnr_high"]) == pytest.approx(WILSON_1_OF_1, abs=1e-6)
    # b2's latest inspection flagged it, so its good label makes a false positive.
    assert point["fpr"] == 1.0


def test_alerts_in_window_and_firing(root: Path):
    summary = data.summary(root, WINDOW, now=NOW)

    in_window = [(a["alert_id"], a["line_id"], a["state"], a["raised_at"]) for a in summary["alerts"]]
    assert in_window == [("drift-a", "line-a", "firing", NOW - 200), ("drift-a", "line-a", "cleared", NOW - 60)]
    # drift-b fired before the window and never cleared, so it is still firing; drift-a cleared.
    assert [(a["alert_id"], a["line_id"]) for a in summary["firing_alerts"]] == [("drift-b", "line-b")]


def test_latest_defects_newest_first(root: Path):
    defects = data.summary(root, WINDOW, now=NOW)["latest_defects"]

    assert [d["frame_id"] for d in defects] == ["b2", "a6", "a4", "a1", "a-old"]
    by_id = {d["frame_id"]: d for d in defects}
    assert by_id["b2"]["labelled_defect"] is False
    assert by_id["a6"]["labelled_defect"] is None
    assert (by_id["a1"]["labelled_defect"], by_id["a1"]["defect_type"]) == (True, "cut")
    assert by_id["b2"]["inspected_at"] == NOW - 10
    assert by_id["a4"]["overlay_url"] == "/api/overlay/a4"
    assert "anomaly_map_png_key" not in by_id["a4"]


def test_latest_defects_limit(root: Path):
    with connect(root) as connection:
        defects = data.latest_defects(connection, limit=2)

    assert [d["frame_id"] for d in defects] == ["b2", "a6"]


def test_throughput_counts(root: Path):
    throughput = data.summary(root, WINDOW, now=NOW)["throughput"]

    # Inspected in the last 60 s: b1 (NOW-49.5), b2 (NOW-10), b3 (NOW-19.5).
    assert throughput["frames_per_minute"] == 3.0
    assert throughput["frames_in_window"] == 9
    assert throughput["last_inspected_at"] == NOW - 10


def test_overlay_location_by_frame_id(root: Path):
    assert data.overlay_location(root, "a4") == ("anomaly-maps", "line-a/2023-11-14/a4.png")
    assert data.overlay_location(root, "unknown-frame") is None


@pytest.mark.parametrize("frame_id", ["../secret", "a/b", ".hidden", ""])
def test_overlay_location_rejects_invalid_id(root: Path, frame_id: str):
    with pytest.raises(ValueError, match="invalid frame_id"):
        data.overlay_location(root, frame_id)


def test_partition_lag_sums_per_topic():
    end = {
        TopicPartition("frames", 0): 10,
        TopicPartition("frames", 1): 5,
        TopicPartition("labels", 0): 4,
        TopicPartition("labels", 1): 3,
    }
    committed = {TopicPartition("frames", 0): 7, TopicPartition("frames", 1): None, TopicPartition("labels", 0): -1, TopicPartition("labels", 1): 5}
    beginning = {TopicPartition("frames", 1): 2, TopicPartition("labels", 0): 0}

    # frames: 10-7 plus 5-2 (nothing committed: from the beginning); labels: 4-0 plus 0 (committed past the end).
    assert partition_lag(end, committed, beginning) == {"frames": 6, "labels": 4}


# --- the web server on the same data, without Kafka or MinIO -------------------------


def fetch(root: Path, path: str) -> tuple[int, dict[str, str], bytes]:
    """Return the status, headers and body of a GET on the dashboard app over ``root``."""
    from aiohttp.test_utils import TestClient, TestServer

    from qcstream.dashboards.server import create_app
    from qcstream.settings import Settings

    settings = dataclasses.replace(Settings.from_env(), data_dir=root)

    async def run() -> tuple[int, dict[str, str], bytes]:
        async with TestClient(TestServer(create_app(settings, WINDOW))) as client:
            response = await client.get(path)
            return response.status, dict(response.headers), await response.read()

    return asyncio.run(run())


def test_server_page_has_no_external_resources(root: Path):
    status, headers, body = fetch(root, "/")

    assert status == 200
    assert b'src="/static/app.js"' in body
    assert b"http://" not in body
    assert b"https://" not in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]


def test_server_summary_json(root: Path):
    status, _, body = fetch(root, "/api/summary")

    assert status == 200
    summary = json.loads(body)
    # The server uses the real clock, so the 2023 frames are outside its window, but the
    # latest defects list is not limited to the window.
    assert summary["lines"] == []
    assert summary["window_seconds"] == WINDOW
    assert [d["frame_id"] for d in summary["latest_defects"]] == ["b2", "a6", "a4", "a1", "a-old"]


def test_server_overlay_invalid_frame_id(root: Path):
    status, _, body = fetch(root, "/api/overlay/bad..id")

    assert status == 400
    assert b"invalid frame_id" in body


def test_server_overlay_unknown_frame(root: Path):
    status, _, body = fetch(root, "/api/overlay/unknown-frame")

    assert status == 404
    assert b"no result for frame 'unknown-frame'" in body


def test_server_static_only_known_files(root: Path):
    assert fetch(root, "/static/app.js")[0] == 200
    assert fetch(root, "/static/style.css")[0] == 200
    assert fetch(root, "/static/index.py")[0] == 404
