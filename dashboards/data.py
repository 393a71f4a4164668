"""DuckDB queries behind the dashboard, returned as plain dicts ready for JSON.

Every query reads the deduplicated ``results``, ``labels`` and ``alerts`` views of
:func:`qcstream.storage.queries.connect`. Frames are placed in time by their
``captured_at``, like the quality report. Throughput uses ``inspected_at``, since it
measures the worker.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import duckdb

from qcstream.storage.queries import connect, window_start
from qcstream.storage.query_library import NAMED_QUERIES, WILSON_MACROS_SQL
from qcstream.streams.records import validate_id

logger = logging.getLogger(__name__)

#: The FNR and FPR charts aim at about this many time buckets per window.
TARGET_BUCKETS = 30
#: Bucket sizes in seconds that the charts use, so bucket edges fall on round clock times.
BUCKET_SIZES = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
#: Throughput counts the frames inspected in this many trailing seconds, so it is a per-minute rate.
THROUGHPUT_SECONDS = 60.0
#: Length of the "latest defects" list.
LATEST_DEFECTS = 20

DEFECT_RATES_SQL = """
SELECT line_id,
       count(*) AS frames,
       count(*) FILTER (WHERE is_defect) AS predicted_defects
FROM results_since($since)
GROUP BY line_id
ORDER BY line_id
"""

#: Tumbling time buckets of ``$bucket`` seconds, aligned on multiples of it since the epoch.
RATE_SERIES_SQL = """
WITH labelled AS (
    SELECT r.line_id,
           floor(r.captured_at / $bucket) * $bucket AS bucket_start,
           r.is_defect AS predicted,
           l.is_defect AS actual
    FROM results_since($since) AS r JOIN labels AS l USING (frame_id)
), counts AS (
    SELECT line_id, bucket_start,
           count(*) FILTER (WHERE actual) AS defects,
           count(*) FILTER (WHERE actual AND NOT predicted) AS false_negatives,
           count(*) FILTER (WHERE NOT actual) AS good,
           count(*) FILTER (WHERE NOT actual AND predicted) AS false_positives
    FROM labelled
    GROUP BY line_id, bucket_start
)
SELECT line_id, bucket_start,
       defects, false_negatives,
       CASE WHEN defects = 0 THEN NULL ELSE false_negatives / defects END AS fnr,
       wilson_low(false_negatives, defects) AS fnr_low,
       wilson_high(false_negatives, defects) AS fnr_high,
       good, false_positives,
       CASE WHEN good = 0 THEN NULL ELSE false_positives / good END AS fpr,
       wilson_low(false_positives, good) AS fpr_low,
       wilson_high(false_positives, good) AS fpr_high
FROM counts
ORDER BY line_id, bucket_start
"""

ALERTS_SQL = """
SELECT alert_id, line_id, condition, state, raised_at, recent_fnr, baseline_fnr, p_value, message
FROM alerts
WHERE raised_at >= $since
ORDER BY raised_at, alert_id, state
"""

#: Episodes whose latest record is ``firing``, whenever they started.
FIRING_ALERTS_SQL = """
SELECT alert_id, line_id, condition, raised_at, recent_fnr, baseline_fnr, p_value, message
FROM alerts
QUALIFY row_number() OVER (
    PARTITION BY alert_id ORDER BY raised_at DESC, state = 'cleared' DESC
) = 1 AND state = 'firing'
ORDER BY raised_at, alert_id
"""

LATEST_DEFECTS_SQL = """
SELECT r.frame_id, r.line_id, r.camera_id, r.captured_at, r.inspected_at, r.image_score, r.threshold,
       l.is_defect AS labelled_defect, l.defect_type
FROM results AS r LEFT JOIN labels AS l USING (frame_id)
WHERE r.is_defect
ORDER BY r.inspected_at DESC, r.frame_id
LIMIT $limit
"""

# NOTE: the latest defects and the throughput read every result, not only the window's,
# so that a line that went quiet still shows its last defect. With millions of results
# each refresh costs seconds: deduplicating 10 million results took about 2.5 s in the
# "before" rows of the query benchmark in docs/benchmarks.md.
THROUGHPUT_SQL = """
SELECT count(*) FILTER (WHERE inspected_at > $now - $recent AND inspected_at <= $now) AS recent_frames,
       count(*) FILTER (WHERE captured_at >= $since) AS frames_in_window,
       max(inspected_at) AS last_inspected_at
FROM results
"""

OVERLAY_SQL = """
SELECT maps_bucket, anomaly_map_png_key FROM results WHERE frame_id = $frame_id
"""


def bucket_seconds(window_seconds: float) -> int:
    """Return the chart bucket size for a window: the smallest of ``BUCKET_SIZES`` giving at most ``TARGET_BUCKETS`` buckets."""
    _check_window(window_seconds)
    for size in BUCKET_SIZES:
        if window_seconds / size <= TARGET_BUCKETS:
            return size
    return math.ceil(window_seconds / TARGET_BUCKETS)


def summary(root: Path, window_seconds: float, now: float | None = None) -> dict[str, Any]:
    """Collect everything the page shows from the Parquet data under ``root``, over the last ``window_seconds``.

    An empty or missing data folder gives empty lists and zero counts, not an error.
    """
    now = time.time() if now is None else float(now)
    since = window_start(window_seconds, now)
    bucket = bucket_seconds(window_seconds)

    with connect(root) as connection:
        connection.execute(WILSON_MACROS_SQL)
        defect_rates = line_defect_rates(connection, since)
        rates = line_error_rates(connection, since)
        series = rate_series(connection, since, bucket)
        alerts = alerts_in_window(connection, since)
        firing = firing_alerts(connection)
        defects = latest_defects(connection)
        throughput = throughput_summary(connection, since, now)

    lines = sorted({row["line_id"] for row in defect_rates} | set(series) | {alert["line_id"] for alert in alerts})
    return {
        "generated_at": now,
        "window_seconds": float(window_seconds),
        "window_start": since,
        "bucket_seconds": bucket,
        "lines": lines,
        "defect_rates": defect_rates,
        "error_rates": rates,
        "rate_series": series,
        "alerts": alerts,
        "firing_alerts": firing,
        "latest_defects": defects,
        "throughput": throughput,
    }


def line_defect_rates(connection: duckdb.DuckDBPyConnection, since: float) -> list[dict[str, Any]]:
    """Count frames and predicted defects per line captured since ``since``, with the predicted defect rate."""
    rows = _fetch_dicts(connection, DEFECT_RATES_SQL, {"since": since})
    for row in rows:
        row["defect_rate"] = row["predicted_defects"] / row["frames"]
    return rows


def line_error_rates(connection: duckdb.DuckDBPyConnection, since: float) -> list[dict[str, Any]]:
    """Compute FNR and FPR per line over the whole window, with 95% Wilson bounds (``qcstream query rolling-rates``)."""
    return _fetch_dicts(connection, NAMED_QUERIES["rolling-rates"][1], {"since": since})


def rate_series(connection: duckdb.DuckDBPyConnection, since: float, bucket: float) -> dict[str, list[dict[str, Any]]]:
    """Compute FNR and FPR per line and time bucket over labelled frames, with 95% Wilson bounds.

    Returns ``{line_id: [point, ...]}`` in time order. A bucket without labelled
    frames has no point, and a rate without trials (no labelled defects for FNR, no
    labelled good parts for FPR) is None.
    """
    series: dict[str, list[dict[str, Any]]] = {}
    for row in _fetch_dicts(connection, RATE_SERIES_SQL, {"since": since, "bucket": float(bucket)}):
        series.setdefault(row.pop("line_id"), []).append(row)
    return series


def alerts_in_window(connection: duckdb.DuckDBPyConnection, since: float) -> list[dict[str, Any]]:
    """Return the ``firing`` and ``cleared`` alert records raised since ``since``, oldest first."""
    return _fetch_dicts(connection, ALERTS_SQL, {"since": since})


def firing_alerts(connection: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Return the alert episodes that have fired and not cleared, whenever they fired."""
    return _fetch_dicts(connection, FIRING_ALERTS_SQL)


def latest_defects(connection: duckdb.DuckDBPyConnection, limit: int = LATEST_DEFECTS) -> list[dict[str, Any]]:
    """Return the most recently inspected frames that the detector flagged, newest first, with their label if any."""
    rows = _fetch_dicts(connection, LATEST_DEFECTS_SQL, {"limit": limit})
    for row in rows:
        row["overlay_url"] = f"/api/overlay/{row['frame_id']}"
    return rows


def throughput_summary(connection: duckdb.DuckDBPyConnection, since: float, now: float) -> dict[str, Any]:
    """Count the frames inspected in the last minute (frames per minute) and those captured in the window."""
    row = _fetch_dicts(connection, THROUGHPUT_SQL, {"since": since, "now": now, "recent": THROUGHPUT_SECONDS})[0]
    return {
        "frames_per_minute": row["recent_frames"] * 60.0 / THROUGHPUT_SECONDS,
        "frames_in_window": row["frames_in_window"],
        "last_inspected_at": row["last_inspected_at"],
    }


def overlay_location(root: Path, frame_id: str) -> tuple[str, str] | None:
    """Return the (bucket, key) of a frame's anomaly-map overlay PNG from its result, or None when it has no result.

    Raises :class:`~qcstream.streams.records.RecordError` (a ``ValueError``) for an invalid frame id.
    """
    validate_id("frame_id", frame_id)
    with connect(root) as connection:
        row = connection.execute(OVERLAY_SQL, {"frame_id": frame_id}).fetchone()
    return None if row is None else (row[0], row[1])


def _fetch_dicts(
    connection: duckdb.DuckDBPyConnection, sql: str, parameters: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    cursor = connection.execute(sql, parameters) if parameters else connection.execute(sql)
    columns = [column[0] for column in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


def _check_window(window_seconds: float) -> None:
    # window_start() raises the ValueError, so an invalid window is reported before any query runs.
    window_start(window_seconds, 0.0)
