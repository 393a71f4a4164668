"""The sink step: parsing results and labels and writing them to real Parquet files."""

from __future__ import annotations

import asyncio
import json

import pyarrow.dataset as ds
import pytest

from qcstream.settings import Settings
from qcstream.streams import sink as sink_module
from qcstream.streams.records import InspectionResult, Label
from qcstream.streams.sink import RecordSink


@pytest.fixture
def settings(tmp_path):
    return Settings(
        home=tmp_path,
        data_dir=tmp_path / "data",
        model_dir=tmp_path / "model",
        kafka_bootstrap="127.0.0.1:1",
        kafka_port=1,
        kafka_controller_port=2,
        minio_endpoint="127.0.0.1:3",
        minio_access_key="test",
        minio_secret_key="test-secret",
    )


def result(frame_id: str, line_id: str = "line-1", is_defect: bool = False) -> InspectionResult:
    return InspectionResult(
        frame_id=frame_id,
        line_id=line_id,
        camera_id="cam-1",
        captured_at=1_700_000_000.0,
        inspected_at=1_700_000_000.5,
        image_score=0.7 if is_defect else 0.1,
        threshold=0.5,
        is_defect=is_defect,
        mode="rgb",
        model_version="m-1",
        maps_bucket="anomaly-maps",
        anomaly_map_png_key=f"{line_id}/2023-11-14/{frame_id}.png",
        anomaly_map_raw_key=f"{line_id}/2023-11-14/{frame_id}.npz",
        detector_ms=10.0,
        latency_ms=500.0,
    )


def label(frame_id: str) -> Label:
    return Label(frame_id=frame_id, line_id="line-1", is_defect=True, labelled_at=1_700_000_100.0, defect_type="cut")


def rows(settings, kind: str) -> list[dict]:
    folder = settings.data_dir / kind
    if not folder.exists():
        return []
    return ds.dataset(folder, format="parquet", partitioning="hive").to_table().to_pylist()


def test_results_and_labels_land_in_their_own_tables(settings):
    sink = RecordSink(settings)
    messages = [
        ("results", b"line-1", result("f-1").dumps()),
        ("results", b"line-2", result("f-2", line_id="line-2", is_defect=True).dumps()),
        ("labels", b"line-1", label("f-1").dumps()),
    ]

    batch = sink.parse(messages)
    written = sink.write(batch)

    assert written == 3
    assert batch.dead_letters == []
    results = sorted(rows(settings, "results"), key=lambda row: row["frame_id"])
    assert [(r["frame_id"], r["line_id"], r["is_defect"]) for r in results] == [
        ("f-1", "line-1", False),
        ("f-2", "line-2", True),
    ]
    assert [(r["frame_id"], r["defect_type"]) for r in rows(settings, "labels")] == [("f-1", "cut")]


def test_invalid_records_dead_lettered(settings):
    sink = RecordSink(settings)
    wrong_kind = label("f-9").dumps()
    future = json.dumps({**json.loads(label("f-8").dumps()), "schema_version": "3.1"}).encode()
    messages = [
        ("results", b"line-1", b"{not json"),
        ("results", b"line-1", wrong_kind),
        ("labels", None, future),
        ("labels", b"line-1", b"[" * 100_000),
        ("results", b"line-1", result("f-1").dumps()),
    ]

    batch = sink.parse(messages)
    sink.write(batch)

    reasons = [letter.reason for letter in batch.dead_letters]
    assert len(reasons) == 4
    assert "not valid JSON" in reasons[0]
    assert "expected a result record, got kind 'label'" in reasons[1]
    assert "unsupported schema_version '3.1'" in reasons[2]
    assert "nested too deeply" in reasons[3]
    assert [letter.source_topic for letter in batch.dead_letters] == ["results", "results", "labels", "labels"]
    assert [r["frame_id"] for r in rows(settings, "results")] == ["f-1"]


def test_failed_writes_are_retried_then_dead_lettered(settings, monkeypatch):
    monkeypatch.setattr(sink_module, "WRITE_RETRY_DELAYS", (0.0, 0.0))
    sink = RecordSink(settings)
    attempts = []

    def failing_write(batch):
        attempts.append(len(batch.results))
        raise OSError("disk full")

    monkeypatch.setattr(sink, "write", failing_write)
    batch = sink.parse([("results", b"line-1", result("f-1").dumps()), ("labels", b"line-1", label("f-1").dumps())])

    letters = asyncio.run(sink.write_with_retries(batch))

    assert attempts == [1, 1, 1]
    assert [letter.source_topic for letter in letters] == ["results", "labels"]
    assert letters[0].reason == "Parquet write failed: OSError: disk full"
    assert letters[0].frame_id == "f-1"


def test_write_recovering_after_retry(settings, monkeypatch):
    monkeypatch.setattr(sink_module, "WRITE_RETRY_DELAYS", (0.0,))
    sink = RecordSink(settings)
    real_write = sink.write
    attempts = []

    def flaky_write(batch):
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("temporarily unavailable")
        return real_write(batch)

    monkeypatch.setattr(sink, "write", flaky_write)
    batch = sink.parse([("results", b"line-1", result("f-1").dumps())])

    assert asyncio.run(sink.write_with_retries(batch)) == []
    assert len(attempts) == 2
    assert [r["frame_id"] for r in rows(settings, "results")] == ["f-1"]
