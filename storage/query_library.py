"""Named DuckDB queries over the results and labels, and ad-hoc SQL, for ``qcstream query``.

Every query runs on a :func:`~qcstream.storage.queries.connect` connection, so it can
read the deduplicated ``results``, ``labels`` and ``alerts`` views, the table macro
``results_since(since)`` and two more macros: ``wilson_low(errors, trials)`` and
``wilson_high(errors, trials)``, the bounds of the 95% Wilson score interval (NULL
when ``trials`` is 0).

Two parameters can appear in the SQL: ``$since``, the start of the time window in
Unix seconds (NULL without a window), and ``$last_n``, how many of each line's most
recent labelled frames count.
"""

from __future__ import annotations

import logging
import re

import duckdb

from qcstream.settings import Settings
from qcstream.storage.parquet_source import Source
from qcstream.storage.queries import connect, window_start
from qcstream.storage.statistics import Z_95

logger = logging.getLogger(__name__)

#: Each line's most recent labelled frames that ``rolling-rates-last`` counts when no N is given.
DEFAULT_LAST_N = 200

WILSON_MACROS_SQL = f"""
CREATE OR REPLACE TEMP MACRO wilson_low(errors, trials) AS CASE WHEN trials = 0 THEN NULL WHEN errors = 0 THEN 0.0 ELSE greatest(0.0,
    (errors / trials + {Z_95}^2 / (2 * trials)
     - {Z_95} * sqrt(errors / trials * (1 - errors / trials) / trials + {Z_95}^2 / (4 * trials * trials)))
    / (1 + {Z_95}^2 / trials)) END;
CREATE OR REPLACE TEMP MACRO wilson_high(errors, trials) AS CASE WHEN trials = 0 THEN NULL WHEN errors = trials THEN 1.0 ELSE least(1.0,
    (errors / trials + {Z_95}^2 / (2 * trials)
     + {Z_95} * sqrt(errors / trials * (1 - errors / trials) / trials + {Z_95}^2 / (4 * trials * trials)))
    / (1 + {Z_95}^2 / trials)) END;
"""

#: FNR and FPR per line from a CTE ``labelled(line_id, predicted, actual)``, one row per labelled frame.
_RATES_FROM_LABELLED = """
, counts AS (
    SELECT line_id,
           count(*) AS labelled,
           count(*) FILTER (WHERE actual) AS defects,
           count(*) FILTER (WHERE actual AND NOT predicted) AS false_negatives,
           count(*) FILTER (WHERE NOT actual) AS good,
           count(*) FILTER (WHERE NOT actual AND predicted) AS false_positives
    FROM labelled GROUP BY line_id
)
SELECT line_id, labelled, false_negatives, defects,
       CASE WHEN defects = 0 THEN NULL ELSE false_negatives / defects END AS fnr,
       wilson_low(false_negatives, defects) AS fnr_low, wilson_high(false_negatives, defects) AS fnr_high,
       false_positives, good,
       CASE WHEN good = 0 THEN NULL ELSE false_positives / good END AS fpr,
       wilson_low(false_positives, good) AS fpr_low, wilson_high(false_positives, good) AS fpr_high
FROM counts ORDER BY line_id
"""

#: The window's results are joined with every label row of their frames, and only then
#: is the latest label per frame kept. That gives the same rows as a join with the
#: ``labels`` view, but the labels of frames outside the window are never deduplicated.
ROLLING_RATES_SQL = """
WITH labelled AS (
    SELECT r.line_id, r.is_defect AS predicted, l.is_defect AS actual
    FROM results_since(CAST($since AS DOUBLE)) AS r JOIN labels_rows AS l USING (frame_id)
    QUALIFY row_number() OVER (PARTITION BY r.frame_id ORDER BY l.labelled_at DESC) = 1
)
""" + _RATES_FROM_LABELLED

#: The join comes before the deduplication of the results: deduplication is per frame,
#: so dropping the unlabelled frames first changes no row, and it skips ~90% of the work.
ROLLING_RATES_LAST_SQL = """
WITH joined AS (
    SELECT r.frame_id, r.line_id, r.captured_at, r.is_defect AS predicted, l.is_defect AS actual
    FROM results_rows AS r JOIN labels AS l USING (frame_id)
    QUALIFY row_number() OVER (PARTITION BY r.frame_id ORDER BY r.inspected_at DESC) = 1
), ranked AS (
    SELECT line_id, predicted, actual,
           row_number() OVER (PARTITION BY line_id ORDER BY captured_at DESC, frame_id DESC) AS recency
    FROM joined
), labelled AS (
    SELECT line_id, predicted, actual FROM ranked WHERE recency <= CAST($last_n AS BIGINT)
)
""" + _RATES_FROM_LABELLED

DEFECT_RATES_SQL = """
SELECT line_id, camera_id, count(*) AS frames, count(*) FILTER (WHERE is_defect) AS predicted_defects,
       count(*) FILTER (WHERE is_defect) / count(*) AS defect_rate
FROM results_since(CAST($since AS DOUBLE))
GROUP BY line_id, camera_id ORDER BY line_id, camera_id
"""

#: Labels without a defect type count as ``unspecified``.
DEFECT_TYPES_SQL = """
WITH defects AS (
    SELECT r.line_id, coalesce(l.defect_type, 'unspecified') AS defect_type, r.is_defect AS caught
    FROM results_since(CAST($since AS DOUBLE)) AS r JOIN labels AS l USING (frame_id)
    WHERE l.is_defect
), counts AS (
    SELECT line_id, defect_type, count(*) AS defects,
           count(*) FILTER (WHERE caught) AS caught, count(*) FILTER (WHERE NOT caught) AS missed
    FROM defects GROUP BY line_id, defect_type
)
SELECT line_id, defect_type, defects, caught, missed,
       defects / sum(defects) OVER (PARTITION BY line_id) AS share,
       missed / defects AS miss_rate,
       wilson_low(missed, defects) AS miss_low, wilson_high(missed, defects) AS miss_high
FROM counts ORDER BY line_id, defects DESC, defect_type
"""

LATENCY_SQL = """
SELECT line_id, count(*) AS frames,
       quantile_cont(latency_ms, 0.5) AS latency_p50_ms,
       quantile_cont(latency_ms, 0.95) AS latency_p95_ms,
       quantile_cont(latency_ms, 0.99) AS latency_p99_ms,
       quantile_cont(detector_ms, 0.5) AS detector_p50_ms,
       quantile_cont(detector_ms, 0.95) AS detector_p95_ms,
       quantile_cont(detector_ms, 0.99) AS detector_p99_ms
FROM results_since(CAST($since AS DOUBLE))
GROUP BY line_id ORDER BY line_id
"""

FRAMES_PER_HOUR_SQL = """
SELECT line_id, date_trunc('hour', make_timestamp(CAST(floor(captured_at * 1000000) AS BIGINT))) AS hour,
       count(*) AS frames
FROM results_since(CAST($since AS DOUBLE))
GROUP BY ALL ORDER BY line_id, hour
"""

#: name -> (one-line description, SQL).
NAMED_QUERIES: dict[str, tuple[str, str]] = {
    "rolling-rates": ("FNR and FPR per line over labelled frames (--window), with 95% Wilson intervals", ROLLING_RATES_SQL),
    "rolling-rates-last": (
        f"FNR and FPR per line over its last N labelled frames (--last, default {DEFAULT_LAST_N}), with Wilson intervals",
        ROLLING_RATES_LAST_SQL,
    ),
    "defect-rates": ("inspected frames and predicted defect rate per line and camera", DEFECT_RATES_SQL),
    "defect-types": ("labelled defects per line and type: caught, missed, share of the line's defects", DEFECT_TYPES_SQL),
    "latency": ("p50, p95 and p99 of end-to-end and detector milliseconds per line", LATENCY_SQL),
    "frames-per-hour": ("inspected frames per line and UTC hour of capture", FRAMES_PER_HOUR_SQL),
}

_PARAMETER = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def query_parameters(
    sql: str, window_seconds: float | None = None, last_n: int | None = None, now: float | None = None
) -> dict[str, object]:
    """Return the values of the ``$since`` and ``$last_n`` parameters that ``sql`` uses.

    Raise :class:`ValueError` when an option is given that the query does not use,
    or when ``last_n`` is not a positive integer.
    """
    used = set(_PARAMETER.findall(sql))
    if window_seconds is not None and "since" not in used:
        raise ValueError(
            f"--window {window_seconds:g} does not apply to this query: it has no $since "
            "(use rolling-rates, defect-rates, defect-types, latency or frames-per-hour)"
        )
    if last_n is not None and "last_n" not in used:
        raise ValueError(f"--last {last_n} does not apply to this query: it has no $last_n (use rolling-rates-last)")
    if last_n is not None and (isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < 1):
        raise ValueError(f"invalid --last {last_n!r}: expected a positive whole number of labelled frames")
    parameters: dict[str, object] = {}
    if "since" in used:
        parameters["since"] = window_start(window_seconds, now)
    if "last_n" in used:
        parameters["last_n"] = DEFAULT_LAST_N if last_n is None else last_n
    return parameters


def run_query(
    source: Source,
    sql: str,
    window_seconds: float | None = None,
    now: float | None = None,
    last_n: int | None = None,
    settings: Settings | None = None,
) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` over the data in ``source`` (a folder or an S3 location) and return the column names and the rows."""
    parameters = query_parameters(sql, window_seconds, last_n, now)
    with connect(source, settings) as connection:
        connection.execute(WILSON_MACROS_SQL)
        try:
            cursor = connection.execute(sql, parameters) if parameters else connection.execute(sql)
        except duckdb.Error as error:
            raise ValueError(f"the query failed: {error}") from error
        columns = [column[0] for column in cursor.description or []]
        rows = cursor.fetchall()
    logger.debug("query returned %d rows from %s", len(rows), source)
    return columns, rows
