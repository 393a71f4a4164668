"""Quality metrics per production line, computed by in-process DuckDB over the Parquet files.

The views deduplicate because Kafka delivers at least once: a frame inspected
twice keeps its latest result (max ``inspected_at``), and a frame labelled twice
keeps its latest label (max ``labelled_at``), so an inspector's correction wins.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import duckdb
import pyarrow as pa

from qcstream.settings import Settings
from qcstream.storage.parquet_sink import SCHEMAS
from qcstream.storage.parquet_source import S3Location, Source, s3_dataset, s3_filesystem

logger = logging.getLogger(__name__)

#: Characters that DuckDB reads as glob patterns, so a root folder must not contain them.
_GLOB_CHARACTERS = frozenset("*?[]{}")

#: Every row as written, duplicates included: ``{kind}_rows``. ``{source}`` is a
#: ``read_parquet`` call, a registered dataset or an empty table, and ``{columns}``
#: lists the schema's columns.
ROWS_VIEW_SQL = """
CREATE OR REPLACE TEMP VIEW {kind}_rows AS
SELECT {columns}
FROM {source}
"""

RESULTS_VIEW_SQL = """
CREATE OR REPLACE TEMP VIEW results AS
SELECT * FROM results_rows
QUALIFY row_number() OVER (PARTITION BY frame_id ORDER BY inspected_at DESC) = 1
"""

LABELS_VIEW_SQL = """
CREATE OR REPLACE TEMP VIEW labels AS
SELECT * FROM labels_rows
QUALIFY row_number() OVER (PARTITION BY frame_id ORDER BY labelled_at DESC) = 1
"""

#: Alerts are events, one row per ``firing`` or ``cleared`` record; a record written
#: twice (a replayed batch) is kept once.
ALERTS_VIEW_SQL = """
CREATE OR REPLACE TEMP VIEW alerts AS
SELECT * FROM alerts_rows
QUALIFY row_number() OVER (PARTITION BY alert_id, state ORDER BY raised_at) = 1
"""

#: ``results_since(since)``: the deduplicated results captured at or after ``since``
#: (Unix seconds; NULL keeps all). Every delivery of a frame has the same
#: ``captured_at``, so filtering before the deduplication gives the same rows as
#: filtering the ``results`` view. It is faster, because the ``date`` test lets the
#: reader skip whole day folders and the deduplication processes only the window's rows.
#: ``utc_day(seconds)`` is the UTC day ``YYYY-MM-DD``, as in the ``date=`` folder names.
WINDOW_MACROS_SQL = """
CREATE OR REPLACE TEMP MACRO utc_day(seconds) AS
    strftime(make_timestamp(CAST(floor(seconds * 1000000) AS BIGINT)), '%Y-%m-%d');
CREATE OR REPLACE TEMP MACRO results_since(since) AS TABLE
    SELECT * FROM results_rows
    WHERE since IS NULL OR (date >= utc_day(since) AND captured_at >= since)
    QUALIFY row_number() OVER (PARTITION BY frame_id ORDER BY inspected_at DESC) = 1;
"""

#: ``date`` and ``line`` come from the folder names. They are read as text so that
#: line ``007`` stays ``007`` and ``date`` keeps the file's string type.
READ_PARQUET_SQL = (
    "read_parquet({glob}, hive_partitioning = true, union_by_name = true, "
    "hive_types = {{'date': VARCHAR, 'line': VARCHAR}})"
)

ROLLING_RATES_SQL = """
WITH labelled AS (
    SELECT
        r.line_id,
        r.is_defect AS predicted_defect,
        l.is_defect AS labelled_defect,
        row_number() OVER (
            PARTITION BY r.line_id ORDER BY r.captured_at DESC, r.frame_id DESC
        ) AS recency
    FROM results_since(CAST($since AS DOUBLE)) AS r
    JOIN labels AS l USING (frame_id)
)
SELECT
    line_id,
    count(*) AS n_labelled,
    count(*) FILTER (WHERE labelled_defect) AS n_defects,
    count(*) FILTER (WHERE NOT labelled_defect) AS n_good,
    count(*) FILTER (WHERE labelled_defect AND NOT predicted_defect) AS false_negatives,
    count(*) FILTER (WHERE NOT labelled_defect AND predicted_defect) AS false_positives
FROM labelled
WHERE CAST($last_n AS BIGINT) IS NULL OR recency <= CAST($last_n AS BIGINT)
GROUP BY line_id
ORDER BY line_id
"""

DEFECT_RATES_SQL = """
SELECT
    line_id,
    count(*) AS frames_inspected,
    count(*) FILTER (WHERE is_defect) AS predicted_defects
FROM results_since(CAST($since AS DOUBLE))
GROUP BY line_id
ORDER BY line_id
"""

LATENCY_PERCENTILES_SQL = """
SELECT
    line_id,
    count(*) AS frames,
    quantile_cont(latency_ms, 0.5) AS latency_p50_ms,
    quantile_cont(latency_ms, 0.95) AS latency_p95_ms,
    quantile_cont(detector_ms, 0.5) AS detector_p50_ms,
    quantile_cont(detector_ms, 0.95) AS detector_p95_ms
FROM results_since(CAST($since AS DOUBLE))
GROUP BY line_id
ORDER BY line_id
"""


@dataclasses.dataclass(frozen=True)
class LineRates:
    """Detector errors against inspector labels on one line.

    A false negative is a labelled defect that the detector passed as good, a
    false positive a labelled good part that it flagged.
    """

    line_id: str
    n_labelled: int
    n_defects: int
    n_good: int
    false_negatives: int
    false_positives: int

    @property
    def fnr(self) -> float | None:
        """False-negative rate FN / labelled defects, or None without labelled defects."""
        return self.false_negatives / self.n_defects if self.n_defects else None

    @property
    def fpr(self) -> float | None:
        """False-positive rate FP / labelled good parts, or None without labelled good parts."""
        return self.false_positives / self.n_good if self.n_good else None


@dataclasses.dataclass(frozen=True)
class LineDefectRate:
    line_id: str
    frames_inspected: int
    predicted_defects: int

    @property
    def defect_rate(self) -> float:
        return self.predicted_defects / self.frames_inspected


@dataclasses.dataclass(frozen=True)
class LineLatency:
    """Percentiles in milliseconds: ``latency`` from capture to verdict, ``detector`` the model alone."""

    line_id: str
    frames: int
    latency_p50_ms: float
    latency_p95_ms: float
    detector_p50_ms: float
    detector_p95_ms: float


def connect(source: Source, settings: Settings | None = None) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB connection with the ``results``, ``labels`` and ``alerts`` views over ``source``.

    ``source`` is a local folder or an :class:`~qcstream.storage.parquet_source.S3Location`;
    a bucket is read with the MinIO address and keys of ``settings`` (default:
    :meth:`Settings.from_env`). Besides the deduplicated views, the connection has
    ``results_rows``, ``labels_rows`` and ``alerts_rows`` (every row as written) and
    the macros ``utc_day`` and ``results_since`` (see :data:`WINDOW_MACROS_SQL`).
    A kind with no Parquet file yet gets empty views with the same columns.
    """
    connection = duckdb.connect()
    try:
        if isinstance(source, S3Location):
            settings = settings or Settings.from_env()
            filesystem = s3_filesystem(settings)
            found = 0
            for kind, schema in SCHEMAS.items():
                dataset = s3_dataset(filesystem, source, kind, schema, settings.minio_endpoint)
                if dataset is None:
                    _create_rows_view(connection, kind, schema, None)
                else:
                    found += 1
                    connection.register(f"{kind}_dataset", dataset)
                    _create_rows_view(connection, kind, schema, f"{kind}_dataset")
            if not found:
                logger.warning("no Parquet files under %s: every view is empty; check the bucket and prefix", source)
        else:
            for kind, schema in SCHEMAS.items():
                _create_rows_view(connection, kind, schema, _local_source(Path(source), kind))
        for view_sql in (RESULTS_VIEW_SQL, LABELS_VIEW_SQL, ALERTS_VIEW_SQL, WINDOW_MACROS_SQL):
            connection.execute(view_sql)
    except BaseException:
        connection.close()
        raise
    return connection


def rolling_rates(
    root: Source,
    window_seconds: float | None = None,
    last_n: int | None = None,
    now: float | None = None,
) -> list[LineRates]:
    """Count detector errors per line over labelled frames.

    With ``window_seconds``, only frames captured at or after ``now - window_seconds``
    count. With ``last_n``, only each line's ``last_n`` most recently captured
    labelled frames count. With neither, all labelled frames count.
    """
    if window_seconds is not None and last_n is not None:
        raise ValueError(
            f"got both window_seconds={window_seconds!r} and last_n={last_n!r}: choose one rolling window"
        )
    if last_n is not None and (isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < 1):
        raise ValueError(f"invalid last_n {last_n!r}: expected a positive integer")
    parameters = {"since": window_start(window_seconds, now), "last_n": last_n}

    with connect(root) as connection:
        rows = connection.execute(ROLLING_RATES_SQL, parameters).fetchall()
    return [LineRates(*row) for row in rows]


def defect_rates(root: Source, window_seconds: float | None = None, now: float | None = None) -> list[LineDefectRate]:
    """Count inspected frames and predicted defects per line, over all frames or a time window."""
    with connect(root) as connection:
        rows = connection.execute(DEFECT_RATES_SQL, {"since": window_start(window_seconds, now)}).fetchall()
    return [LineDefectRate(*row) for row in rows]


def latency_percentiles(
    root: Source, window_seconds: float | None = None, now: float | None = None
) -> list[LineLatency]:
    """Compute p50 and p95 of end-to-end and detector latency per line (interpolated quantiles)."""
    with connect(root) as connection:
        rows = connection.execute(LATENCY_PERCENTILES_SQL, {"since": window_start(window_seconds, now)}).fetchall()
    return [LineLatency(*row) for row in rows]


def window_start(window_seconds: float | None, now: float | None = None) -> float | None:
    """Return ``now - window_seconds`` (``now`` defaults to the current time), or None without a window."""
    if window_seconds is None:
        return None
    if (
        isinstance(window_seconds, bool)
        or not isinstance(window_seconds, (int, float))
        or not math.isfinite(window_seconds)
        or window_seconds <= 0
    ):
        raise ValueError(f"invalid window_seconds {window_seconds!r}: expected a positive number of seconds")
    return (time.time() if now is None else now) - window_seconds


def _local_source(root: Path, kind: str) -> str | None:
    """Return the ``read_parquet`` call over ``root/kind``, or None when it contains no Parquet file."""
    folder = root / kind
    if not any(folder.rglob("*.parquet")):
        logger.debug("no %s Parquet files under %s yet; the %s view is empty", kind, folder, kind)
        return None
    # NOTE: a file deleted between this check and the query makes DuckDB raise
    # "No files found". The sink only adds files, so only manual clean-up can cause it.
    return READ_PARQUET_SQL.format(glob=_parquet_glob(folder))


def _create_rows_view(connection: duckdb.DuckDBPyConnection, kind: str, schema: pa.Schema, source: str | None) -> None:
    """Create the ``{kind}_rows`` view over ``source``, or over an empty table with ``schema`` when it is None."""
    columns = ", ".join(_quote_identifier(name) for name in schema.names)
    if source is None:
        source = f"empty_{kind}"
        connection.register(source, schema.empty_table())
    connection.execute(ROWS_VIEW_SQL.format(kind=kind, columns=columns, source=source))


def _parquet_glob(folder: Path) -> str:
    """Return ``'<folder>/**/*.parquet'`` as a quoted SQL string literal.

    DuckDB table functions in a view take no bound parameters, so the path is
    quoted here instead: single quotes are doubled, and glob characters are rejected.
    """
    text = str(folder.absolute())
    bad = sorted(set(text) & _GLOB_CHARACTERS)
    if bad:
        raise ValueError(
            f"invalid data folder {text!r}: it contains the glob characters {bad} "
            "that DuckDB would expand; move the data to a folder without them"
        )
    pattern = f"{text}/**/*.parquet"
    return "'" + pattern.replace("'", "''") + "'"


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
