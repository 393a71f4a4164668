"""Time the rolling FNR queries of ``qcstream query`` over 10 million result rows.

    .venv/bin/python benchmarks/bench_queries.py [--rows 10000000] [--data /tmp/qcstream-bench-queries]
        [--processes 3] [--warm 3] [--output docs/benchmarks.md]

1. Generates the data once, into ``--data``, and reuses it while ``--rows``,
   ``--rows-per-file`` and ``--seed`` stay the same. It has 4 lines with 3 cameras
   each over 7 days, frames in capture order. The files follow the layout of
   :class:`~qcstream.storage.parquet_sink.ParquetSink`
   (``results/date=.../line=.../part-*.parquet``), one file per partition and sink
   batch of ``--rows-per-file`` rows. About 1% of the results are replayed
   deliveries, about 10% of the frames are labelled, about 3% of the parts are
   defective, and 2% of the labels are first wrong and corrected by a later label.
2. Times each query in ``--processes`` fresh processes. In each one, the first run on
   a new connection is "cold", with DuckDB's caches empty. The operating system's file
   cache is warm after the first process, though. The ``--warm`` more runs on the same
   connection are "warm". Reports medians, and the peak RSS of the processes.
   With ``--source s3://BUCKET[/PREFIX]`` the queries read a copy of the data in MinIO
   (made with ``qcstream parquet-upload``) through pyarrow's S3 file system, with the
   ``QCSTREAM_MINIO_*`` settings.
3. Every query is timed twice: as written before this benchmark ("before": filter
   and join the deduplicated views) and as in :mod:`qcstream.storage.query_library`
   ("now"), and both must give the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qcstream.storage.parquet_sink import LABELS_SCHEMA, RESULTS_SCHEMA

#: Capture times end here (2026-12-01 00:00 UTC), and the queries use it as "now".
END = 1796083200.0
DAYS = 7
LINES = ("L1", "L2", "L3", "L4")
CAMERAS = ("cam-1", "cam-2", "cam-3")
DEFECT_TYPES = ("scratch", "dent", "crack", "stain")
HOUR = 3600.0
LAST_N = 200

#: The queries as they were before this benchmark: the time filter and the join act on
#: the deduplicated views, so DuckDB deduplicates every result row on every run.
BEFORE_WINDOW_SQL = """
WITH labelled AS (
    SELECT r.line_id, r.is_defect AS predicted, l.is_defect AS actual
    FROM results AS r JOIN labels AS l USING (frame_id)
    WHERE CAST($since AS DOUBLE) IS NULL OR r.captured_at >= CAST($since AS DOUBLE)
)
"""
BEFORE_LAST_SQL = """
WITH ranked AS (
    SELECT r.line_id, r.is_defect AS predicted, l.is_defect AS actual,
           row_number() OVER (PARTITION BY r.line_id ORDER BY r.captured_at DESC, r.frame_id DESC) AS recency
    FROM results AS r JOIN labels AS l USING (frame_id)
), labelled AS (
    SELECT line_id, predicted, actual FROM ranked WHERE recency <= CAST($last_n AS BIGINT)
)
"""

#: The drift check's counts as first written: the join acts on both deduplicated views.
BEFORE_DRIFT_SQL = """
WITH defects AS (
    SELECT r.line_id, r.captured_at, NOT r.is_defect AS missed,
           row_number() OVER (PARTITION BY r.line_id ORDER BY r.captured_at DESC, r.frame_id DESC) AS recency
    FROM results AS r JOIN labels AS l USING (frame_id)
    WHERE l.is_defect
)
SELECT line_id,
       count(*) FILTER (WHERE recency <= $recent) AS recent_defects,
       count(*) FILTER (WHERE recency <= $recent AND missed) AS recent_misses,
       count(*) FILTER (WHERE recency > $recent) AS baseline_defects,
       count(*) FILTER (WHERE recency > $recent AND missed) AS baseline_misses,
       min(captured_at) FILTER (WHERE recency <= $recent) AS window_start,
       max(captured_at) FILTER (WHERE recency <= $recent) AS window_end
FROM defects
WHERE recency <= $recent + $baseline
GROUP BY line_id
ORDER BY line_id
"""
#: Window sizes of the drift check: the worker's defaults.
DRIFT_WINDOWS = {"$recent": "20", "$baseline": "200"}


def drift_sql(sql: str) -> str:
    """Return ``sql`` with the drift check's window sizes written in, since they are not query options."""
    for name, value in DRIFT_WINDOWS.items():
        sql = sql.replace(name, value)
    return sql


def queries() -> dict[str, tuple[str, dict]]:
    """Return name -> (SQL, options) of every timed query."""
    from qcstream.storage.drift import LINE_DEFECT_COUNTS_SQL
    from qcstream.storage.query_library import _RATES_FROM_LABELLED, NAMED_QUERIES

    now_window = NAMED_QUERIES["rolling-rates"][1]
    now_last = NAMED_QUERIES["rolling-rates-last"][1]
    return {
        "window 1 h, before": (BEFORE_WINDOW_SQL + _RATES_FROM_LABELLED, {"window_seconds": HOUR}),
        "window 1 h, now": (now_window, {"window_seconds": HOUR}),
        "window 24 h, before": (BEFORE_WINDOW_SQL + _RATES_FROM_LABELLED, {"window_seconds": 24 * HOUR}),
        "window 24 h, now": (now_window, {"window_seconds": 24 * HOUR}),
        f"last {LAST_N}, before": (BEFORE_LAST_SQL + _RATES_FROM_LABELLED, {"last_n": LAST_N}),
        f"last {LAST_N}, now": (now_last, {"last_n": LAST_N}),
        "drift check, before": (drift_sql(BEFORE_DRIFT_SQL), {}),
        "drift check, now": (drift_sql(LINE_DEFECT_COUNTS_SQL), {}),
    }


# --- the data -------------------------------------------------------------


def generate(folder: Path, rows: int, rows_per_file: int, seed: int) -> dict:
    """Write the results and labels under ``folder``; return counts of what was written."""
    rng = np.random.default_rng(seed)
    replays = rows // 100
    frames = rows - replays
    captured = np.sort(rng.uniform(END - DAYS * 86400, END, frames))
    line = rng.integers(0, len(LINES), frames)
    camera = rng.integers(0, len(CAMERAS), frames)
    defective = rng.random(frames) < 0.03
    # The detector misses 8% of defects and flags 1% of good parts.
    predicted = np.where(defective, rng.random(frames) >= 0.08, rng.random(frames) < 0.01)
    detector_ms = rng.gamma(9.0, 15.0, frames)
    latency_ms = detector_ms + rng.gamma(2.0, 60.0, frames)

    # Replayed deliveries: the same frame again, inspected later, written in a later file.
    replayed = rng.choice(frames, replays, replace=False)
    order = np.concatenate([np.arange(frames), replayed])
    inspected = captured[order] + latency_ms[order] / 1000 + np.where(np.arange(rows) >= frames, 30.0, 0.0)
    # Results stream in inspection order, so a replay lands in a later batch.
    stream = np.argsort(inspected, kind="stable")
    order, inspected = order[stream], inspected[stream]

    frame_ids = frame_id_array(line, camera)
    results = results_table(order, frame_ids, line, camera, captured, inspected, predicted, detector_ms, latency_ms)
    result_files = write_partitioned(folder / "results", results, "captured_at", rows_per_file)
    del results

    labels = labels_table(rng, frame_ids, line, captured, defective)
    label_files = write_partitioned(folder / "labels", labels, "labelled_at", rows_per_file)
    return {
        "rows": rows, "frames": frames, "replays": replays, "labels": labels.num_rows,
        "result_files": result_files, "label_files": label_files, "seed": seed, "rows_per_file": rows_per_file,
    }


def frame_id_array(line: np.ndarray, camera: np.ndarray) -> pa.Array:
    """Frame ids like ``L2-cam-3-000004711``, built with Arrow kernels instead of Python strings."""
    sequence = pc.utf8_lpad(pa.array(np.arange(len(line))).cast(pa.string()), 9, "0")
    return pc.binary_join_element_wise(
        pa.array(np.array(LINES)[line]), pa.array(np.array(CAMERAS)[camera]), sequence, "-"
    )


def utc_days(seconds: np.ndarray) -> pa.Array:
    return pa.array(seconds.astype("datetime64[s]").astype("datetime64[D]").astype(str))


def results_table(order, frame_ids, line, camera, captured, inspected, predicted, detector_ms, latency_ms) -> pa.Table:
    take = pa.array(order)
    line_ids = pa.array(np.array(LINES)[line[order]])
    dates = utc_days(captured[order])
    ids = frame_ids.take(take)
    map_key = pc.binary_join_element_wise(line_ids, dates, ids, "/")
    return pa.table(
        {
            "frame_id": ids,
            "line_id": line_ids,
            "camera_id": pa.array(np.array(CAMERAS)[camera[order]]),
            "captured_at": captured[order],
            "inspected_at": inspected,
            "image_score": np.where(predicted[order], 1.6, 0.8),
            "threshold": np.full(len(order), 1.5),
            "is_defect": predicted[order],
            "mode": pa.array(["rgb"] * len(order), pa.string()),
            "model_version": pa.array(["bench-1"] * len(order), pa.string()),
            "maps_bucket": pa.array(["anomaly-maps"] * len(order), pa.string()),
            "anomaly_map_png_key": pc.binary_join_element_wise(map_key, ".png", ""),
            "anomaly_map_raw_key": pc.binary_join_element_wise(map_key, ".npz", ""),
            "detector_ms": detector_ms[order],
            "latency_ms": latency_ms[order],
            "date": dates,
        },
        schema=RESULTS_SCHEMA,
    )


def labels_table(rng, frame_ids, line, captured, defective) -> pa.Table:
    """Label 10% of the frames, 1 to 60 minutes after capture; 2% get a wrong first label and a correction."""
    labelled = np.flatnonzero(rng.random(len(line)) < 0.10)
    corrected = labelled[rng.random(len(labelled)) < 0.02]
    labelled_at = captured[labelled] + rng.uniform(60, 3600, len(labelled))
    first_at = captured[corrected] + rng.uniform(30, 60, len(corrected))
    frames = np.concatenate([labelled, corrected])
    truth = np.concatenate([defective[labelled], ~defective[corrected]])  # the first label of a corrected frame is wrong
    at = np.concatenate([labelled_at, first_at])
    stream = np.argsort(at, kind="stable")
    frames, truth, at = frames[stream], truth[stream], at[stream]
    types = np.array(DEFECT_TYPES)[rng.choice(len(DEFECT_TYPES), len(frames), p=[0.4, 0.3, 0.2, 0.1])]
    return pa.table(
        {
            "frame_id": frame_ids.take(pa.array(frames)),
            "line_id": pa.array(np.array(LINES)[line[frames]]),
            "is_defect": truth,
            "labelled_at": at,
            "defect_type": pa.array(np.where(truth, types, None)),
            "inspector": pa.array(["bench"] * len(frames), pa.string()),
            "date": utc_days(at),
        },
        schema=LABELS_SCHEMA,
    )


def write_partitioned(folder: Path, table: pa.Table, time_column: str, rows_per_file: int) -> int:
    """Write ``table`` (in time order) like the sink: each batch of rows becomes one file per (date, line)."""
    files = 0
    for start in range(0, table.num_rows, rows_per_file * len(LINES)):
        batch = table.slice(start, rows_per_file * len(LINES))
        for date in pc.unique(batch["date"]).to_pylist():
            for line_id in LINES:
                part = batch.filter(pc.and_(pc.equal(batch["date"], date), pc.equal(batch["line_id"], line_id)))
                if part.num_rows == 0:
                    continue
                path = folder / f"date={date}" / f"line={line_id}" / f"part-{files:06d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(part, path)
                files += 1
    return files


def ensure_data(folder: Path, rows: int, rows_per_file: int, seed: int) -> dict:
    marker = folder / "bench.json"
    expected = {"rows": rows, "seed": seed, "rows_per_file": rows_per_file}
    if marker.exists():
        info = json.loads(marker.read_text())
        if all(info.get(key) == value for key, value in expected.items()):
            print(f"reusing the data in {folder}", flush=True)
            return info
    shutil.rmtree(folder / "results", ignore_errors=True)
    shutil.rmtree(folder / "labels", ignore_errors=True)
    started = time.perf_counter()
    info = generate(folder, rows, rows_per_file, seed)
    info["generate_seconds"] = round(time.perf_counter() - started, 1)
    marker.write_text(json.dumps(info))
    print(f"generated {info} in {info['generate_seconds']} s", flush=True)
    return info


# --- the timing -----------------------------------------------------------


def time_in_this_process(source: str, name: str, warm: int) -> dict:
    """Run one query cold (new connection) and ``warm`` times more on that connection, in the child process."""
    from qcstream.storage.parquet_source import parse_source
    from qcstream.storage.queries import connect
    from qcstream.storage.query_library import WILSON_MACROS_SQL, query_parameters

    sql, options = queries()[name]
    parameters = query_parameters(sql, now=END, **options)
    started = time.perf_counter()
    connection = connect(parse_source(source))
    connection.execute(WILSON_MACROS_SQL)
    rows = connection.execute(sql, parameters).fetchall()
    cold = time.perf_counter() - started
    warm_times = []
    for _ in range(warm):
        started = time.perf_counter()
        connection.execute(sql, parameters).fetchall()
        warm_times.append(time.perf_counter() - started)
    connection.close()
    return {
        "cold": cold, "warm": warm_times, "rows": [list(row) for row in rows],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def time_query(source: str, name: str, processes: int, warm: int) -> dict:
    colds, warms, peaks, answers = [], [], [], []
    for _ in range(processes):
        output = subprocess.run(
            [sys.executable, __file__, "--child", name, "--source", source, "--warm", str(warm)],
            check=True, capture_output=True, text=True,
        ).stdout
        result = json.loads(output.splitlines()[-1])
        colds.append(result["cold"])
        warms.extend(result["warm"])
        peaks.append(result["peak_rss_mb"])
        answers.append(result["rows"])
    return {
        "cold_s": statistics.median(colds), "warm_s": statistics.median(warms) if warms else None,
        "peak_rss_mb": max(peaks), "rows": answers[0],
    }


def explain(folder: Path, name: str) -> str:
    from qcstream.storage.queries import connect
    from qcstream.storage.query_library import WILSON_MACROS_SQL, query_parameters

    sql, options = queries()[name]
    with connect(folder) as connection:
        connection.execute(WILSON_MACROS_SQL)
        return connection.execute("EXPLAIN ANALYZE " + sql, query_parameters(sql, now=END, **options)).fetchall()[0][1]


# --- the report -----------------------------------------------------------


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    import duckdb

    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {memory_kb / 1024 ** 2:.0f} GiB, "
        f"Python {platform.python_version()}, DuckDB {duckdb.__version__}, pyarrow {pa.__version__}"
    )


def load_averages() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def folder_size_mb(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*.parquet")) / 1024 ** 2


def report(info: dict, timings: dict, command: str, load_before: str, load_after: str, size_mb: float, args) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## DuckDB rolling FNR queries over {info['rows']:,} result rows, {stamp}",
        "",
        f"Command: `{command}`. Machine: {machine()}. Load average (1, 5, 15 min) before: {load_before}; after: {load_after}.",
        "",
        f"Data: {info['rows']:,} result rows ({info['replays']:,} of them replayed deliveries) and {info['labels']:,} label "
        f"rows (2% of labelled frames corrected by a second label), {len(LINES)} lines x {len(CAMERAS)} cameras, {DAYS} days, "
        f"{info['result_files']:,} result files and {info['label_files']:,} label files (one per date, line and batch of "
        f"{info['rows_per_file']:,} rows), {size_mb:.0f} MB of Parquet, read from {args.source or 'local disk'}. Each query ran in {args.processes} "
        f"fresh processes: cold is the first run on a new connection (median of {args.processes}), warm the median of "
        f"{args.processes * args.warm} more runs on the same connections. Peak RSS is the largest `ru_maxrss` of those processes.",
        "",
        "| query | cold, s | warm, s | peak RSS, MB |",
        "|---|---|---|---|",
    ]
    for name, timing in timings.items():
        lines.append(f"| {name} | {timing['cold_s']:.2f} | {timing['warm_s']:.2f} | {timing['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--rows-per-file", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data", type=Path, default=Path("/tmp/qcstream-bench-queries"))
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--source", help="folder or s3://BUCKET[/PREFIX] to read the data from instead of --data (generation still uses --data)")
    parser.add_argument("--only", action="append", help="time only these queries (repeatable)")
    parser.add_argument("--explain", help="print EXPLAIN ANALYZE of one query and stop")
    parser.add_argument("--output", type=Path, help="append the report to this Markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(time_in_this_process(args.source or str(args.data), args.child, args.warm)))
        return 0
    load_before = load_averages()
    info = ensure_data(args.data, args.rows, args.rows_per_file, args.seed)
    if args.explain:
        print(explain(args.data, args.explain))
        return 0
    timings = {}
    for name in args.only or queries():
        timings[name] = time_query(args.source or str(args.data), name, args.processes, args.warm)
        print(f"{name}: cold {timings[name]['cold_s']:.2f} s, warm {timings[name]['warm_s']:.2f} s, "
              f"peak RSS {timings[name]['peak_rss_mb']:.0f} MB", flush=True)
    for name in timings:
        if name.endswith(", now"):
            before = timings.get(name.replace(", now", ", before"))
            if before is not None and before["rows"] != timings[name]["rows"]:
                raise SystemExit(f"{name} gives other rows than before: {timings[name]['rows']} != {before['rows']}")
    load_after = load_averages()
    command = shlex.join(["python", "benchmarks/bench_queries.py", *(sys.argv[1:] if argv is None else argv)])
    text = report(info, timings, command, load_before, load_after, folder_size_mb(args.data), args)
    print(text)
    if args.output:
        with open(args.output, "a") as handle:
            handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
