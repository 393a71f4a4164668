"""False-negative-rate drift per line: the counts DuckDB takes from the Parquet data, and the test.

A line's labelled defects are ordered by capture time, newest first. The *recent
window* is its newest ``recent`` labelled defects, the *baseline* the up to
``baseline`` labelled defects captured before them. Counting defects instead of
hours makes the test's power the same on a busy line and on a quiet one. A line
is only tested once it has ``recent`` labelled defects, so one miss on a quiet
line raises no alert.

The test is one-sided: is the recent miss rate higher than the baseline's? With a
baseline of at least ``min_baseline`` defects it is Fisher's exact test on the
2 x 2 table of (misses, catches) x (recent, baseline). With a shorter history it
is an exact binomial test against a reference FNR, when one is configured.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from scipy import stats

from qcstream.storage.queries import connect

logger = logging.getLogger(__name__)

#: ``$recent`` and ``$baseline`` are window sizes in labelled defects.
#: The results are joined to the labelled defects before they are deduplicated, so the
#: window function sorts only the labelled defects' rows, not every result.
LINE_DEFECT_COUNTS_SQL = """
WITH labelled_results AS (
    SELECT r.*
    FROM results_rows AS r
    SEMI JOIN (SELECT frame_id FROM labels WHERE is_defect) AS l USING (frame_id)
    QUALIFY row_number() OVER (PARTITION BY r.frame_id ORDER BY r.inspected_at DESC) = 1
), defects AS (
    SELECT
        line_id,
        captured_at,
        NOT is_defect AS missed,
        row_number() OVER (PARTITION BY line_id ORDER BY captured_at DESC, frame_id DESC) AS recency
    FROM labelled_results
)
SELECT
    line_id,
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


#: The latest record of each line's latest episode of ``$condition``.
LATEST_ALERTS_SQL = """
SELECT * EXCLUDE (date) FROM alerts
WHERE condition = $condition
QUALIFY row_number() OVER (PARTITION BY line_id ORDER BY raised_at DESC, state = 'cleared' DESC) = 1
ORDER BY line_id
"""


@dataclasses.dataclass(frozen=True)
class DefectCounts:
    """Labelled defects and the detector's misses among them, recent and baseline, on one line."""

    line_id: str
    recent_defects: int
    recent_misses: int
    baseline_defects: int
    baseline_misses: int
    #: Capture times of the oldest and newest frame of the recent window.
    window_start: float | None
    window_end: float | None

    @property
    def recent_fnr(self) -> float | None:
        return self.recent_misses / self.recent_defects if self.recent_defects else None

    @property
    def baseline_fnr(self) -> float | None:
        return self.baseline_misses / self.baseline_defects if self.baseline_defects else None


@dataclasses.dataclass(frozen=True)
class DriftTest:
    """The outcome of one line's test; ``baseline_fnr`` is the reference FNR when ``against_reference``."""

    p_value: float
    recent_fnr: float
    baseline_fnr: float
    against_reference: bool


def line_defect_counts(root: Path, recent: int, baseline: int) -> list[DefectCounts]:
    """Count each line's recent and baseline labelled defects and misses in the Parquet data under ``root``."""
    for name, value in (("recent", recent), ("baseline", baseline)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"invalid {name} window {value!r}: expected a positive number of labelled defects")

    with connect(root) as connection:
        rows = connection.execute(LINE_DEFECT_COUNTS_SQL, {"recent": recent, "baseline": baseline}).fetchall()
    return [DefectCounts(*row) for row in rows]


def fnr_drift_test(
    counts: DefectCounts, min_baseline: int, reference_fnr: float | None = None
) -> DriftTest | None:
    """Test whether the recent FNR is higher than the baseline FNR; None when nothing can be tested.

    Uses Fisher's exact test when the baseline contains ``min_baseline`` defects or
    more, else an exact binomial test against ``reference_fnr`` if one is given.
    """
    if counts.recent_defects == 0:
        return None
    recent_fnr = counts.recent_misses / counts.recent_defects

    if counts.baseline_defects >= min_baseline:
        table = [
            [counts.recent_misses, counts.recent_defects - counts.recent_misses],
            [counts.baseline_misses, counts.baseline_defects - counts.baseline_misses],
        ]
        p_value = float(stats.fisher_exact(table, alternative="greater").pvalue)
        return DriftTest(p_value, recent_fnr, counts.baseline_misses / counts.baseline_defects, False)

    if reference_fnr is not None:
        result = stats.binomtest(counts.recent_misses, counts.recent_defects, reference_fnr, alternative="greater")
        return DriftTest(float(result.pvalue), recent_fnr, reference_fnr, True)

    return None


def open_alerts(root: Path, condition: str = "fnr-drift") -> list[dict]:
    """Return the ``firing`` record (as a column -> value dict) of each line whose latest episode has not cleared."""
    with connect(root) as connection:
        cursor = connection.execute(LATEST_ALERTS_SQL, {"condition": condition})
        columns = [column[0] for column in cursor.description]
        rows = [dict(zip(columns, row)) for row in cursor.fetchall()]
    return [row for row in rows if row["state"] == "firing"]


def check_reference_fnr(value: float | None) -> float | None:
    """Return ``value`` if it is None or a rate in [0, 1), else raise ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 1:
        raise ValueError(
            f"invalid QCSTREAM_ALERT_REFERENCE_FNR {value!r}: expected a false-negative rate in [0, 1), "
            "for example the FNR that `qcstream evaluate` measured"
        )
    return float(value)
