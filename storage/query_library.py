"""Named DuckDB queries over the results and labels, and ad-hoc SQL, for ``qcstream query``.

Every query runs on a :func:`~qcstream.storage.queries.connect` connection, so it can
read the deduplicated ``results`` and ``labels`` views and call two macros:
``wilson_low(errors, trials)`` and ``wilson_high(errors, trials)``, the bounds of
the 95% Wilson score interval (NULL when ``trials`` is 0).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from qcstream.storage.queries import connect, window_start
from qcstream.storage.statistics import Z_95

WILSON_MACROS_SQL = f"""
CREATE OR REPLACE TEMP MACRO wilson_low(errors, trials) AS CASE WHEN trials = 0 THEN NULL ELSE greatest(0.0,
    (errors / trials + {Z_95}^2 / (2 * trials)
     - {Z_95} * sqrt(errors / trials * (1 - errors / trials) / trials + {Z_95}^2 / (4 * trials * trials)))
    / (1 + {Z_95}^2 / trials)) END;
CREATE OR REPLACE TEMP MACRO wilson_high(errors, trials) AS CASE WHEN trials = 0 THEN NULL ELSE least(1.0,
    (errors / trials + {Z_95}^2 / (2 * trials)
     + {Z_95} * sqrt(errors / trials * (1 - errors / trials) / trials + {Z_95}^2 / (4 * trials * trials)))
    / (1 + {Z_95}^2 / trials)) END;
"""

#: ``$since`` is the window start in Unix seconds, or NULL for all frames.
NAMED_QUERIES = {
    "rolling-rates": (
        "FNR and FPR per line over labelled frames, with 95% Wilson intervals",
        """
        WITH labelled AS (
            SELECT r.line_id, r.is_defect AS predicted, l.is_defect AS actual
            FROM results AS r JOIN labels AS l USING (frame_id)
            WHERE CAST($since AS DOUBLE) IS NULL OR r.captured_at >= CAST($since AS DOUBLE)
        ), counts AS (
            SELECT line_id,
                   count(*) FILTER (WHERE actual) AS defects,
                   count(*) FILTER (WHERE actual AND NOT predicted) AS false_negatives,
                   count(*) FILTER (WHERE NOT actual) AS good,
                   count(*) FILTER (WHERE NOT actual AND predicted) AS false_positives
            FROM labelled GROUP BY line_id
        )
        SELECT line_id, false_negatives, defects,
               CASE WHEN defects = 0 THEN NULL ELSE false_negatives / defects END AS fnr,
               wilson_low(false_negatives, defects) AS fnr_low, wilson_high(false_negatives, defects) AS fnr_high,
               false_positives, good,
               CASE WHEN good = 0 THEN NULL ELSE false_positives / good END AS fpr,
               wilson_low(false_positives, good) AS fpr_low, wilson_high(false_positives, good) AS fpr_high
        FROM counts ORDER BY line_id
        """,
    ),
    "defect-rates": (
        "inspected frames and predicted defects per line and camera",
        """
        SELECT line_id, camera_id, count(*) AS frames, count(*) FILTER (WHERE is_defect) AS predicted_defects,
               count(*) FILTER (WHERE is_defect) / count(*) AS defect_rate
        FROM results
        WHERE CAST($since AS DOUBLE) IS NULL OR captured_at >= CAST($since AS DOUBLE)
        GROUP BY line_id, camera_id ORDER BY line_id, camera_id
        """,
    ),
    "frames-per-hour": (
        "inspected frames per line and UTC hour of capture",
        """
        SELECT line_id, date_trunc('hour', to_timestamp(captured_at)) AS hour, count(*) AS frames
        FROM results
        WHERE CAST($since AS DOUBLE) IS NULL OR captured_at >= CAST($since AS DOUBLE)
        GROUP BY ALL ORDER BY line_id, hour
        """,
    ),
}


def run_query(root: Path, sql: str, window_seconds: float | None = None, now: float | None = None) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` over the data under ``root``; return the column names and the rows.

    ``sql`` may use ``$since`` (start of the time window, NULL without one).
    """
    with connect(root) as connection:
        connection.execute(WILSON_MACROS_SQL)
        parameters = {"since": window_start(window_seconds, now)} if "$since" in sql else None
        try:
            cursor = connection.execute(sql, parameters) if parameters else connection.execute(sql)
        except duckdb.Error as error:
            raise ValueError(f"the query failed: {error}") from error
        columns = [column[0] for column in cursor.description or []]
        return columns, cursor.fetchall()
