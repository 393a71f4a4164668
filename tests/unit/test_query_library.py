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


# --- the named queries on a second data set, every number counted by hand -------------------
#
# NOW = 1700100000 is 2023-11-16 02:00:00 UTC. Ages in seconds before NOW.
#
# line L1   age   camera  predicted  final label           latency_ms  detector_ms
#   p1      100   c1      defect     defect, scratch       100         10   caught
#   p2      200   c1      good       defect, scratch       200         20   missed (a replayed delivery
#                                                                            predicted defect, 10000 ms: dropped)
#   p3      300   c1      good       defect, dent          300         30   missed
#   p4      400   c1      defect     good                  400         40   false positive
#   p5      500   c2      good       good                  500         50
#   p7      600   c2      good       (none)                600         60   unlabelled
#   p8      700   c2      good       good (was crack)      700         70   label corrected later
#   p6     9000   c2      defect     defect, dent          800         80   caught; on 2023-11-15 UTC
# line L2
#   q1      100   c1      good       defect, no type       100         10   missed
#   q2      200   c1      defect     good                  200         20   false positive
#
# Wilson 95% bounds, z = 1.959963984540054, p = e/n:
#   (p + z^2/2n -+ z * sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
#   e=2, n=3: 0.207659601, 0.938508055      e=1, n=2: 0.094531206, 0.905468794
#   e=1, n=1: 0.206549314, 1 (capped)       e=2, n=4: 0.150038989, 0.849961011
#   e=1, n=3: 0.061491945, 0.792340399

NOW2 = 1700100000.0
HOUR = 3600.0


def make_frame(
    frame_id: str, line_id: str, camera_id: str, age: float, is_defect: bool, latency_ms: float,
    detector_ms: float, inspected_after: float = 0.5,
) -> InspectionResult:
    captured_at = NOW2 - age
    return InspectionResult(
        frame_id=frame_id, line_id=line_id, camera_id=camera_id, captured_at=captured_at,
        inspected_at=captured_at + inspected_after, image_score=2.0 if is_defect else 1.0, threshold=1.5,
        is_defect=is_defect, mode="rgb", model_version="m1", maps_bucket="anomaly-maps",
        anomaly_map_png_key=f"{line_id}/x/{frame_id}.png", anomaly_map_raw_key=f"{line_id}/x/{frame_id}.npz",
        detector_ms=detector_ms, latency_ms=latency_ms,
    )


def write_quality_data(root: Path) -> None:
    """Write the data set of the table above as the sink would, in several files."""
    results = ParquetSink(root, "results")
    labels = ParquetSink(root, "labels")
    results.write_batch([make_frame("p2", "L1", "c1", 200, True, 10_000.0, 9_000.0, inspected_after=0.1)])
    results.write_batch([
        make_frame("p1", "L1", "c1", 100, True, 100.0, 10.0),
        make_frame("p2", "L1", "c1", 200, False, 200.0, 20.0),
        make_frame("p3", "L1", "c1", 300, False, 300.0, 30.0),
        make_frame("p4", "L1", "c1", 400, True, 400.0, 40.0),
        make_frame("p5", "L1", "c2", 500, False, 500.0, 50.0),
        make_frame("p7", "L1", "c2", 600, False, 600.0, 60.0),
        make_frame("p8", "L1", "c2", 700, False, 700.0, 70.0),
        make_frame("q1", "L2", "c1", 100, False, 100.0, 10.0),
        make_frame("q2", "L2", "c1", 200, True, 200.0, 20.0),
    ])
    results.write_batch([make_frame("p6", "L1", "c2", 9000, True, 800.0, 80.0)])
    # The correction of p8 is written first; only its later labelled_at makes it win.
    labels.write_batch([Label(frame_id="p8", line_id="L1", is_defect=False, labelled_at=NOW2 - 10)])
    labels.write_batch([
        Label(frame_id="p1", line_id="L1", is_defect=True, labelled_at=NOW2 - 60, defect_type="scratch"),
        Label(frame_id="p2", line_id="L1", is_defect=True, labelled_at=NOW2 - 60, defect_type="scratch"),
        Label(frame_id="p3", line_id="L1", is_defect=True, labelled_at=NOW2 - 60, defect_type="dent"),
        Label(frame_id="p4", line_id="L1", is_defect=False, labelled_at=NOW2 - 60),
        Label(frame_id="p5", line_id="L1", is_defect=False, labelled_at=NOW2 - 60),
        Label(frame_id="p8", line_id="L1", is_defect=True, labelled_at=NOW2 - 50, defect_type="crack"),
        Label(frame_id="p6", line_id="L1", is_defect=True, labelled_at=NOW2 - 60, defect_type="dent"),
        Label(frame_id="q1", line_id="L2", is_defect=True, labelled_at=NOW2 - 60),
        Label(frame_id="q2", line_id="L2", is_defect=False, labelled_at=NOW2 - 60),
    ])


@pytest.fixture
def quality_root(tmp_path: Path) -> Path:
    write_quality_data(tmp_path)
    return tmp_path


def rows_by(columns: list[str], rows: list[tuple], *keys: str) -> dict:
    records = [dict(zip(columns, row)) for row in rows]
    return {tuple(record[key] for key in keys) if len(keys) > 1 else record[keys[0]]: record for record in records}


def named(root: Path, name: str, **options) -> tuple[list[str], list[tuple]]:
    from qcstream.storage.query_library import NAMED_QUERIES

    return run_query(root, NAMED_QUERIES[name][1], now=NOW2, **options)


def test_rolling_rates_last_n(quality_root):
    # L1's 3 latest labelled frames are p1 (caught), p2 (missed), p3 (missed); p7 has no label.
    by_line = rows_by(*named(quality_root, "rolling-rates-last", last_n=3), "line_id")

    line_1 = by_line["L1"]
    assert (line_1["labelled"], line_1["defects"], line_1["false_negatives"]) == (3, 3, 2)
    assert line_1["fnr"] == pytest.approx(2 / 3)
    assert line_1["fnr_low"] == pytest.approx(0.207659601, abs=1e-8)
    assert line_1["fnr_high"] == pytest.approx(0.938508055, abs=1e-8)
    assert line_1["good"] == 0
    assert line_1["fpr"] is None
    assert line_1["fpr_low"] is None
    assert line_1["fpr_high"] is None
    line_2 = by_line["L2"]
    assert (line_2["labelled"], line_2["false_negatives"], line_2["defects"]) == (2, 1, 1)
    assert line_2["fnr_low"] == pytest.approx(0.206549314, abs=1e-8)
    assert line_2["fnr_high"] == pytest.approx(1.0)
    assert line_2["fpr"] == pytest.approx(1.0)


def test_rolling_rates_last_n_five(quality_root):
    # p1..p5: defects p1, p2, p3 (2 missed); good p4 (flagged) and p5.
    line_1 = rows_by(*named(quality_root, "rolling-rates-last", last_n=5), "line_id")["L1"]

    assert (line_1["false_positives"], line_1["good"]) == (1, 2)
    assert line_1["fpr"] == pytest.approx(1 / 2)
    assert line_1["fpr_low"] == pytest.approx(0.094531206, abs=1e-8)
    assert line_1["fpr_high"] == pytest.approx(0.905468794, abs=1e-8)


def test_rolling_rates_last_default_counts_all_here(quality_root):
    # 200 frames is more than L1 has: all 7 labelled frames; p8's corrected label makes it good.
    line_1 = rows_by(*named(quality_root, "rolling-rates-last"), "line_id")["L1"]

    assert (line_1["labelled"], line_1["defects"], line_1["false_negatives"]) == (7, 4, 2)
    assert (line_1["good"], line_1["false_positives"]) == (3, 1)
    assert line_1["fnr_low"] == pytest.approx(0.150038989, abs=1e-8)
    assert line_1["fpr_high"] == pytest.approx(0.792340399, abs=1e-8)


def test_rolling_rates_window_crossing_midnight(quality_root):
    # 3 h back from 02:00 UTC reaches into 2023-11-15, so p6 counts; 1 h leaves it out.
    three_hours = rows_by(*named(quality_root, "rolling-rates", window_seconds=3 * HOUR), "line_id")["L1"]
    one_hour = rows_by(*named(quality_root, "rolling-rates", window_seconds=HOUR), "line_id")["L1"]

    assert (three_hours["defects"], three_hours["false_negatives"], three_hours["good"]) == (4, 2, 3)
    assert three_hours["fnr"] == pytest.approx(0.5)
    assert (one_hour["defects"], one_hour["false_negatives"], one_hour["good"]) == (3, 2, 3)
    assert one_hour["fpr"] == pytest.approx(1 / 3)
    assert one_hour["fpr_low"] == pytest.approx(0.061491945, abs=1e-8)


def test_defect_types(quality_root):
    by_type = rows_by(*named(quality_root, "defect-types"), "line_id", "defect_type")

    # p8's first label was crack. The correction to good wins, so there is no crack row.
    assert sorted(by_type) == [("L1", "dent"), ("L1", "scratch"), ("L2", "unspecified")]
    dent = by_type[("L1", "dent")]
    assert (dent["defects"], dent["caught"], dent["missed"]) == (2, 1, 1)
    assert dent["share"] == pytest.approx(0.5)
    assert dent["miss_rate"] == pytest.approx(0.5)
    assert dent["miss_low"] == pytest.approx(0.094531206, abs=1e-8)
    scratch = by_type[("L1", "scratch")]
    assert (scratch["defects"], scratch["caught"], scratch["missed"]) == (2, 1, 1)
    unspecified = by_type[("L2", "unspecified")]
    assert (unspecified["defects"], unspecified["missed"], unspecified["share"]) == (1, 1, 1.0)


def test_defect_types_in_window(quality_root):
    # One hour drops p6 (dent, caught): L1 keeps 1 dent and 2 scratches.
    by_type = rows_by(*named(quality_root, "defect-types", window_seconds=HOUR), "line_id", "defect_type")

    assert by_type[("L1", "dent")]["defects"] == 1
    assert by_type[("L1", "dent")]["share"] == pytest.approx(1 / 3)
    assert by_type[("L1", "scratch")]["share"] == pytest.approx(2 / 3)


def test_latency_percentiles(quality_root):
    # L1 latencies 100..800 ms (8 frames after the replay is dropped); linear interpolation at
    # position 7q: p50 at 3.5 -> 450, p95 at 6.65 -> 765, p99 at 6.93 -> 793.
    by_line = rows_by(*named(quality_root, "latency"), "line_id")

    line_1 = by_line["L1"]
    assert line_1["frames"] == 8
    assert (line_1["latency_p50_ms"], line_1["latency_p95_ms"], line_1["latency_p99_ms"]) == pytest.approx((450, 765, 793))
    assert (line_1["detector_p50_ms"], line_1["detector_p95_ms"], line_1["detector_p99_ms"]) == pytest.approx((45, 76.5, 79.3))
    assert (by_line["L2"]["latency_p50_ms"], by_line["L2"]["latency_p99_ms"]) == pytest.approx((150, 199))


def test_defect_rates_per_line_and_camera(quality_root):
    by_camera = rows_by(*named(quality_root, "defect-rates"), "line_id", "camera_id")

    assert (by_camera[("L1", "c1")]["frames"], by_camera[("L1", "c1")]["predicted_defects"]) == (4, 2)
    assert by_camera[("L1", "c2")]["defect_rate"] == pytest.approx(1 / 4)
    assert by_camera[("L2", "c1")]["defect_rate"] == pytest.approx(1 / 2)


def test_frames_per_hour(quality_root):
    columns, rows = named(quality_root, "frames-per-hour")

    counts = [(row[0], str(row[1]), row[2]) for row in rows]
    assert counts == [
        ("L1", "2023-11-15 23:00:00", 1),
        ("L1", "2023-11-16 01:00:00", 7),
        ("L2", "2023-11-16 01:00:00", 2),
    ]


def test_cli_last_option(quality_root, monkeypatch, capsys):
    monkeypatch.setenv("QCSTREAM_DATA_DIR", str(quality_root))

    assert main(["query", "rolling-rates-last", "--last", "3", "--format", "json"]) == 0

    rows = {row["line_id"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert (rows["L1"]["labelled"], rows["L1"]["false_negatives"]) == (3, 2)


def test_cli_list_names_every_query(capsys):
    assert main(["query", "list"]) == 0

    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["rolling-rates", "rolling-rates-last", "defect-rates", "defect-types", "latency", "frames-per-hour"]


@pytest.mark.parametrize("value", ["0", "-4", "three"])
def test_cli_rejects_last_not_positive(value, capsys):
    with pytest.raises(SystemExit):
        main(["query", "rolling-rates-last", "--last", value])

    assert f"invalid --last '{value}': expected a positive whole number" in capsys.readouterr().err


def test_last_on_a_window_query_is_an_error(quality_root):
    from qcstream.storage.query_library import NAMED_QUERIES

    with pytest.raises(ValueError, match="--last 5 does not apply"):
        run_query(quality_root, NAMED_QUERIES["rolling-rates"][1], last_n=5)
    with pytest.raises(ValueError, match="--window 60 does not apply"):
        run_query(quality_root, NAMED_QUERIES["rolling-rates-last"][1], window_seconds=60)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://127.0.0.1:9000/bucket", "only local folders and s3://BUCKET"),
        ("s3://", "bucket name ''"),
        ("s3://Upper_Case", "bucket name 'Upper_Case'"),
        ("s3://data/../etc", "'..' segment"),
    ],
)
def test_bad_source_is_named(text, message):
    from qcstream.storage.parquet_source import parse_source

    with pytest.raises(ValueError, match=message):
        parse_source(text)


def test_source_parsing():
    from qcstream.storage.parquet_source import S3Location, parse_source

    assert parse_source("s3://qc-data") == S3Location("qc-data", "")
    assert parse_source("s3://qc-data/plant/2/") == S3Location("qc-data", "plant/2")
    assert parse_source("s3://qc-data/plant").key("results/date=2023-11-16/line=A/part-1.parquet") == (
        "plant/results/date=2023-11-16/line=A/part-1.parquet"
    )
    assert parse_source("/tmp/qc data") == Path("/tmp/qc data")


def test_cli_help_names_default_last_n(capsys):
    from qcstream.storage.query_library import DEFAULT_LAST_N

    with pytest.raises(SystemExit):
        main(["query", "--help"])

    assert f"(default: {DEFAULT_LAST_N}," in " ".join(capsys.readouterr().out.split())


def test_wilson_macros_are_exact_at_the_ends():
    import duckdb

    from qcstream.storage.query_library import WILSON_MACROS_SQL

    with duckdb.connect() as connection:
        connection.execute(WILSON_MACROS_SQL)
        row = connection.execute("SELECT wilson_low(0, 7), wilson_high(7, 7), wilson_low(0, 0)").fetchone()

    assert row == (0.0, 1.0, None)
