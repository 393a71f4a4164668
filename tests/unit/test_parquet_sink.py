"""ParquetSink: schemas, Hive partition paths and crash-safe writes."""

from __future__ import annotations

import dataclasses
import logging

import duckdb
import pyarrow.parquet as pq
import pytest

from qcstream.storage import parquet_sink
from qcstream.storage.parquet_sink import LABELS_SCHEMA, RESULTS_SCHEMA, ParquetSink
from qcstream.streams.records import InspectionResult, Label

# 1700000000 is 2023-11-14 22:13:20 UTC, so 1700006400 is the next midnight.
NOV_14 = 1700000000.0
NOV_15 = 1700006400.0


def result(frame_id: str, line_id: str = "A", captured_at: float = NOV_14, is_defect: bool = False) -> InspectionResult:
    return InspectionResult(
        frame_id=frame_id,
        line_id=line_id,
        camera_id="cam1",
        captured_at=captured_at,
        inspected_at=captured_at + 0.25,
        image_score=0.8 if is_defect else 0.1,
        threshold=0.5,
        is_defect=is_defect,
        mode="rgb",
        model_version="m1",
        maps_bucket="anomaly-maps",
        anomaly_map_png_key=f"{line_id}/2023-11-14/{frame_id}.png",
        anomaly_map_raw_key=f"{line_id}/2023-11-14/{frame_id}.npz",
        detector_ms=40.0,
        latency_ms=120.0,
    )


def label(frame_id: str, line_id: str = "A", labelled_at: float = NOV_14, is_defect: bool = True) -> Label:
    return Label(frame_id=frame_id, line_id=line_id, is_defect=is_defect, labelled_at=labelled_at, defect_type=None)


def all_files(root):
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


def test_schemas_match_record_fields():
    assert RESULTS_SCHEMA.names == [f.name for f in dataclasses.fields(InspectionResult)] + ["date"]
    assert LABELS_SCHEMA.names == [f.name for f in dataclasses.fields(Label)] + ["date"]


def test_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="'frames'"):
        ParquetSink(tmp_path, "frames")


def test_rejects_record_of_other_kind(tmp_path):
    sink = ParquetSink(tmp_path, "results")

    with pytest.raises(TypeError, match="expected InspectionResult, got Label"):
        sink.write_batch([label("f1")])
    assert all_files(tmp_path) == []


def test_empty_batch_writes_nothing(tmp_path):
    assert ParquetSink(tmp_path, "results").write_batch([]) == []
    assert all_files(tmp_path) == []


def test_groups_by_utc_date_and_line(tmp_path):
    sink = ParquetSink(tmp_path, "results")
    records = [result("f1", "A", NOV_14), result("f2", "A", NOV_14), result("f3", "A", NOV_15), result("f4", "B", NOV_14)]

    paths = sink.write_batch(records)

    folders = sorted(path.parent.relative_to(tmp_path).as_posix() for path in paths)
    assert folders == [
        "results/date=2023-11-14/line=A",
        "results/date=2023-11-14/line=B",
        "results/date=2023-11-15/line=A",
    ]
    for path in paths:
        assert path.name.startswith("part-")
        assert path.suffix == ".parquet"
    assert len(all_files(tmp_path)) == 3


def test_written_files_readable_with_schema(tmp_path):
    sink = ParquetSink(tmp_path, "results")
    records = [result("f1", "A", NOV_14, is_defect=True), result("f2", "A", NOV_14)]

    [path] = sink.write_batch(records)

    table = pq.read_table(path)
    assert table.schema.equals(RESULTS_SCHEMA, check_metadata=False)
    rows = table.to_pylist()
    assert [row["frame_id"] for row in rows] == ["f1", "f2"]
    assert rows[0]["is_defect"] is True
    assert rows[0]["date"] == "2023-11-14"
    assert rows[0]["captured_at"] == NOV_14
    assert rows[0]["anomaly_map_png_key"] == "A/2023-11-14/f1.png"


def test_labels_partitioned_by_labelled_at(tmp_path):
    sink = ParquetSink(tmp_path, "labels")
    records = [label("f1", labelled_at=NOV_15), Label("f2", "A", False, NOV_14, defect_type=None, inspector="ana")]

    paths = sink.write_batch(records)

    assert sorted(path.parent.name for path in paths) == ["line=A", "line=A"]
    assert sorted(path.parent.parent.name for path in paths) == ["date=2023-11-14", "date=2023-11-15"]
    rows = sorted((row for path in paths for row in pq.read_table(path).to_pylist()), key=lambda row: row["frame_id"])
    assert rows[1]["inspector"] == "ana"
    assert rows[0]["defect_type"] is None
    assert rows[0]["date"] == "2023-11-15"


def test_each_batch_gets_new_file(tmp_path):
    sink = ParquetSink(tmp_path, "results")

    first = sink.write_batch([result("f1")])
    second = sink.write_batch([result("f1")])

    assert first != second
    assert len(all_files(tmp_path)) == 2


def test_no_temporary_file_left(tmp_path):
    ParquetSink(tmp_path, "results").write_batch([result("f1"), result("f2", "B")])

    names = [path.name for path in tmp_path.rglob("*")]
    assert not [name for name in names if name.startswith(".") or name.endswith(".tmp")]


def test_logs_count_and_path(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="qcstream.storage.parquet_sink"):
        [path] = ParquetSink(tmp_path, "results").write_batch([result("f1"), result("f2")])

    messages = [record.getMessage() for record in caplog.records]
    assert any("2 results" in message and str(path) in message for message in messages)


def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    seen_temp_paths = []
    real_write_table = pq.write_table

    def write_half_then_fail(table, handle, **options):
        seen_temp_paths.append(handle.name)
        real_write_table(table, handle, **options)
        handle.truncate(10)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(parquet_sink.pq, "write_table", write_half_then_fail)

    with pytest.raises(OSError, match="simulated"):
        ParquetSink(tmp_path, "results").write_batch([result("f1")])

    assert len(seen_temp_paths) == 1
    assert seen_temp_paths[0].endswith(".parquet.tmp")
    assert seen_temp_paths[0].split("/")[-1].startswith(".part-")
    assert list(tmp_path.rglob("*.parquet")) == []
    assert list(tmp_path.rglob("*.tmp")) == []


def test_failed_rename_leaves_no_file(tmp_path, monkeypatch):
    def fail_replace(source, target):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(parquet_sink.os, "replace", fail_replace)

    with pytest.raises(OSError, match="simulated"):
        ParquetSink(tmp_path, "labels").write_batch([label("f1")])

    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


def test_duckdb_glob_skips_leftover_temporary_file(tmp_path):
    [path] = ParquetSink(tmp_path, "results").write_batch([result("f1")])
    # What a crash between the first byte and the rename leaves behind.
    (path.parent / f".{path.stem}-crashed{parquet_sink.TEMP_SUFFIX}").write_bytes(b"PAR1 truncated")

    glob = f"{tmp_path}/results/**/*.parquet"
    with duckdb.connect() as connection:
        rows = connection.execute(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning = true)").fetchall()

    assert rows == [(1,)]
