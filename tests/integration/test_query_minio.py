"""The named queries over Parquet in a real MinIO bucket, read with pyarrow's S3 file system.

Data set, NOW = 1700100000 (2023-11-16 02:00 UTC), ages in seconds before NOW:

line A  age   predicted  final label               latency_ms
  a1    100   defect     defect, scratch           100   caught
  a2    200   good       defect, dent              200   missed (a replayed delivery predicted defect: dropped)
  a3    300   defect     good                      300   false positive
  a4    400   good       good (first label crack)  400   the correction, written first, wins by labelled_at
  a5   7200   good       defect, dent              500   missed, outside a one-hour window
line B
  b1    100   good       good                      100

One hour, line A: defects a1, a2 (1 missed) and good a3, a4 (1 flagged): FNR 1/2 and FPR 1/2,
Wilson bounds for 1 of 2: 0.094531206 and 0.905468794.
All time, line A: 3 defects, 2 missed: FNR 2/3, Wilson bounds 0.207659601 and 0.938508055.
Last 2 labelled frames of line A: a1 and a2, FNR 1/2 and no good parts.
Latency of line A, 100..500 ms: p50 300, p95 480 (position 3.8), p99 496 (position 3.96).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path

import pytest
from minio.deleteobjects import DeleteObject

from qcstream.cli import main
from qcstream.settings import Settings
from qcstream.storage.objects import ObjectStore
from qcstream.storage.parquet_mirror import ParquetMirror, upload_folder
from qcstream.storage.parquet_sink import ParquetSink
from qcstream.storage.parquet_source import S3Location, parse_source
from qcstream.storage.query_library import NAMED_QUERIES, run_query
from qcstream.streams.records import InspectionResult, Label

pytestmark = pytest.mark.integration

NOW = 1700100000.0
HOUR = 3600.0


def frame(frame_id: str, line_id: str, age: float, is_defect: bool, latency_ms: float, inspected_after: float = 0.5) -> InspectionResult:
    captured_at = NOW - age
    return InspectionResult(
        frame_id=frame_id, line_id=line_id, camera_id="cam-1", captured_at=captured_at,
        inspected_at=captured_at + inspected_after, image_score=2.0 if is_defect else 1.0, threshold=1.5,
        is_defect=is_defect, mode="rgb", model_version="m1", maps_bucket="anomaly-maps",
        anomaly_map_png_key=f"{line_id}/x/{frame_id}.png", anomaly_map_raw_key=f"{line_id}/x/{frame_id}.npz",
        detector_ms=latency_ms / 10, latency_ms=latency_ms,
    )


def label(frame_id: str, line_id: str, is_defect: bool, defect_type: str | None = None, labelled_at: float = NOW - 60) -> Label:
    return Label(frame_id=frame_id, line_id=line_id, is_defect=is_defect, labelled_at=labelled_at, defect_type=defect_type)


def write_data(root: Path, mirror: ParquetMirror | None = None) -> None:
    results = ParquetSink(root, "results", mirror)
    labels = ParquetSink(root, "labels", mirror)
    results.write_batch([frame("a2", "A", 200, True, 9_000.0, inspected_after=0.1)])
    results.write_batch([
        frame("a1", "A", 100, True, 100.0), frame("a2", "A", 200, False, 200.0), frame("a3", "A", 300, True, 300.0),
        frame("a4", "A", 400, False, 400.0), frame("b1", "B", 100, False, 100.0),
    ])
    results.write_batch([frame("a5", "A", 2 * HOUR, False, 500.0)])
    labels.write_batch([label("a4", "A", False, labelled_at=NOW - 10)])
    labels.write_batch([
        label("a1", "A", True, "scratch"), label("a2", "A", True, "dent"), label("a3", "A", False),
        label("a4", "A", True, "crack", labelled_at=NOW - 50), label("a5", "A", True, "dent"), label("b1", "B", False),
    ])


#: (query name, options) pairs whose results must be the same from the folder and from the bucket.
QUERY_CASES = [
    ("rolling-rates", {"window_seconds": HOUR}),
    ("rolling-rates", {}),
    ("rolling-rates-last", {"last_n": 2}),
    ("rolling-rates-last", {}),
    ("defect-rates", {}),
    ("defect-types", {}),
    ("latency", {"window_seconds": HOUR}),
    ("frames-per-hour", {}),
]


def run_named(source, settings: Settings, name: str, **options) -> list[dict]:
    columns, rows = run_query(source, NAMED_QUERIES[name][1], now=NOW, settings=settings, **options)
    return [dict(zip(columns, row)) for row in rows]


def by_key(rows: list[dict], *keys: str) -> dict:
    return {tuple(row[key] for key in keys) if len(keys) > 1 else row[keys[0]]: row for row in rows}


@pytest.fixture()
def bucket_settings(minio_settings: Settings):
    """Settings whose ``parquet_bucket`` is a new bucket; the bucket and its objects are removed afterwards."""
    settings = dataclasses.replace(minio_settings, parquet_bucket=f"qc-parquet-{uuid.uuid4().hex[:12]}")
    yield settings
    client = ObjectStore(settings).client
    if client.bucket_exists(settings.parquet_bucket):
        objects = [DeleteObject(item.object_name) for item in client.list_objects(settings.parquet_bucket, recursive=True)]
        for error in client.remove_objects(settings.parquet_bucket, objects):
            print(f"could not delete {error.name}: {error}")
        client.remove_bucket(settings.parquet_bucket)


def bucket_keys(settings: Settings, bucket: str) -> list[str]:
    return sorted(item.object_name for item in ObjectStore(settings).client.list_objects(bucket, recursive=True))


def local_keys(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*.parquet"))


def test_sink_mirror_and_queries_over_the_bucket(bucket_settings, tmp_path):
    root = tmp_path / "data"
    write_data(root, ParquetMirror.from_settings(bucket_settings))
    source = S3Location(bucket_settings.parquet_bucket)

    assert bucket_keys(bucket_settings, source.bucket) == local_keys(root)
    assert len(local_keys(root)) == 7

    hour = by_key(run_named(source, bucket_settings, "rolling-rates", window_seconds=HOUR), "line_id")["A"]
    assert (hour["defects"], hour["false_negatives"], hour["good"], hour["false_positives"]) == (2, 1, 2, 1)
    assert hour["fnr"] == pytest.approx(0.5)
    assert (hour["fnr_low"], hour["fnr_high"]) == pytest.approx((0.094531206, 0.905468794), abs=1e-8)
    assert (hour["fpr_low"], hour["fpr_high"]) == pytest.approx((0.094531206, 0.905468794), abs=1e-8)

    all_time = by_key(run_named(source, bucket_settings, "rolling-rates-last"), "line_id")["A"]
    assert (all_time["labelled"], all_time["defects"], all_time["false_negatives"]) == (5, 3, 2)
    assert (all_time["fnr_low"], all_time["fnr_high"]) == pytest.approx((0.207659601, 0.938508055), abs=1e-8)

    last_two = by_key(run_named(source, bucket_settings, "rolling-rates-last", last_n=2), "line_id")
    assert (last_two["A"]["defects"], last_two["A"]["false_negatives"], last_two["A"]["good"]) == (2, 1, 0)
    assert last_two["A"]["fpr"] is None
    assert (last_two["B"]["good"], last_two["B"]["fpr"]) == (1, 0.0)

    types = by_key(run_named(source, bucket_settings, "defect-types"), "line_id", "defect_type")
    assert sorted(types) == [("A", "dent"), ("A", "scratch")]
    assert (types[("A", "dent")]["defects"], types[("A", "dent")]["missed"]) == (2, 2)
    assert types[("A", "dent")]["share"] == pytest.approx(2 / 3)
    assert (types[("A", "scratch")]["caught"], types[("A", "scratch")]["share"]) == (1, pytest.approx(1 / 3))

    latency = by_key(run_named(source, bucket_settings, "latency"), "line_id")["A"]
    assert latency["frames"] == 5
    assert (latency["latency_p50_ms"], latency["latency_p95_ms"], latency["latency_p99_ms"]) == pytest.approx((300, 480, 496))

    for name, options in QUERY_CASES:
        assert run_named(source, bucket_settings, name, **options) == run_named(root, bucket_settings, name, **options), name


def test_upload_command_and_query_cli_with_a_prefix(bucket_settings, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    write_data(root)
    for name, value in bucket_settings.to_env().items():
        monkeypatch.setenv(name, value)
    destination = f"s3://{bucket_settings.parquet_bucket}/plant-7"

    assert main(["parquet-upload", destination, "--source", str(root)]) == 0
    assert "uploaded 7 Parquet files" in capsys.readouterr().out
    assert main(["parquet-upload", destination, "--source", str(root)]) == 0
    second = capsys.readouterr().out
    assert "uploaded 0 Parquet files" in second
    assert "(7 were there already)" in second
    assert bucket_keys(bucket_settings, bucket_settings.parquet_bucket) == [f"plant-7/{key}" for key in local_keys(root)]

    outputs = []
    for source in (destination, str(root)):
        assert main(["query", "rolling-rates-last", "--last", "2", "--source", source]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    header, line_a, line_b = outputs[0].splitlines()
    assert header.startswith("line_id,labelled,false_negatives,defects,fnr,")
    assert line_a.startswith("A,2,1,2,0.5,")


def test_second_upload_skips_existing_keys(bucket_settings, tmp_path):
    root = tmp_path / "data"
    write_data(root)
    mirror = ParquetMirror(ObjectStore(bucket_settings), parse_source(f"s3://{bucket_settings.parquet_bucket}"))

    first = upload_folder(mirror, root)
    second = upload_folder(mirror, root)

    assert (first.uploaded, first.already_there) == (7, 0)
    assert (second.uploaded, second.already_there) == (0, 7)


def test_missing_bucket_is_named(minio_settings):
    missing = f"qc-absent-{uuid.uuid4().hex[:12]}"

    with pytest.raises(LookupError, match=f"bucket '{missing}' not found on MinIO") as caught:
        run_query(parse_source(f"s3://{missing}"), NAMED_QUERIES["latency"][1], settings=minio_settings)

    assert f"qcstream parquet-upload s3://{missing}" in str(caught.value)


def test_empty_prefix_warns(bucket_settings, tmp_path, caplog):
    write_data(tmp_path / "data", ParquetMirror.from_settings(bucket_settings))

    with caplog.at_level(logging.WARNING, logger="qcstream.storage.queries"):
        columns, rows = run_query(
            parse_source(f"s3://{bucket_settings.parquet_bucket}/no-such-prefix"), NAMED_QUERIES["latency"][1],
            settings=bucket_settings,
        )

    assert rows == []
    assert "latency_p99_ms" in columns
    assert any("no Parquet files under s3://" in record.getMessage() for record in caplog.records)


def test_wrong_secret_fails_without_showing_it(bucket_settings, tmp_path, caplog):
    wrong = dataclasses.replace(bucket_settings, minio_secret_key="wrong-" + bucket_settings.minio_secret_key)
    root = tmp_path / "data"

    with caplog.at_level(logging.ERROR, logger="qcstream.storage.parquet_sink"):
        write_data(root, ParquetMirror(ObjectStore(wrong, attempts=1), S3Location(bucket_settings.parquet_bucket)))
    with pytest.raises(ConnectionError) as caught:
        run_query(S3Location(bucket_settings.parquet_bucket), NAMED_QUERIES["latency"][1], settings=wrong)

    # Every local file is written although no copy could be made, and each failed copy is logged.
    assert len(local_keys(root)) == 7
    failures = [record.getMessage() for record in caplog.records if "could not copy" in record.getMessage()]
    assert len(failures) == 7
    assert all(wrong.minio_secret_key not in message for message in failures)
    assert wrong.minio_secret_key not in str(caught.value)
    assert "QCSTREAM_MINIO_SECRET_KEY" in str(caught.value)
