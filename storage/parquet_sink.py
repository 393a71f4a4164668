"""Append-only Parquet files of inspection results, labels and alerts, partitioned Hive style.

Layout: ``<root>/<kind>/date=<YYYY-MM-DD>/line=<line_id>/part-<UTC time>-<uuid>.parquet``,
where ``date`` is the UTC day of ``captured_at`` (results), ``labelled_at``
(labels) or ``raised_at`` (alerts). Files are never rewritten, so readers deduplicate (see
:mod:`qcstream.storage.queries`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from qcstream.storage.objects import utc_date
from qcstream.storage.parquet_mirror import ParquetMirror
from qcstream.streams.records import Alert, InspectionResult, Label

logger = logging.getLogger(__name__)

SinkRecord = Union[InspectionResult, Label, Alert]

RESULTS = "results"
LABELS = "labels"
ALERTS = "alerts"

#: One column per :class:`InspectionResult` field, plus ``date``.
RESULTS_SCHEMA = pa.schema(
    [
        pa.field("frame_id", pa.string(), nullable=False),
        pa.field("line_id", pa.string(), nullable=False),
        pa.field("camera_id", pa.string(), nullable=False),
        pa.field("captured_at", pa.float64(), nullable=False),
        pa.field("inspected_at", pa.float64(), nullable=False),
        pa.field("image_score", pa.float64(), nullable=False),
        pa.field("threshold", pa.float64(), nullable=False),
        pa.field("is_defect", pa.bool_(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("maps_bucket", pa.string(), nullable=False),
        pa.field("anomaly_map_png_key", pa.string(), nullable=False),
        pa.field("anomaly_map_raw_key", pa.string(), nullable=False),
        pa.field("detector_ms", pa.float64(), nullable=False),
        pa.field("latency_ms", pa.float64(), nullable=False),
        pa.field("date", pa.string(), nullable=False),
    ]
)

#: One column per :class:`Label` field, plus ``date``.
LABELS_SCHEMA = pa.schema(
    [
        pa.field("frame_id", pa.string(), nullable=False),
        pa.field("line_id", pa.string(), nullable=False),
        pa.field("is_defect", pa.bool_(), nullable=False),
        pa.field("labelled_at", pa.float64(), nullable=False),
        pa.field("defect_type", pa.string(), nullable=True),
        pa.field("inspector", pa.string(), nullable=True),
        pa.field("date", pa.string(), nullable=False),
    ]
)

#: One column per :class:`Alert` field, plus ``date``.
ALERTS_SCHEMA = pa.schema(
    [
        pa.field("alert_id", pa.string(), nullable=False),
        pa.field("line_id", pa.string(), nullable=False),
        pa.field("condition", pa.string(), nullable=False),
        pa.field("state", pa.string(), nullable=False),
        pa.field("raised_at", pa.float64(), nullable=False),
        pa.field("recent_defects", pa.int64(), nullable=False),
        pa.field("recent_misses", pa.int64(), nullable=False),
        pa.field("baseline_defects", pa.int64(), nullable=False),
        pa.field("baseline_misses", pa.int64(), nullable=False),
        pa.field("recent_fnr", pa.float64(), nullable=False),
        pa.field("baseline_fnr", pa.float64(), nullable=False),
        pa.field("p_value", pa.float64(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("window_start", pa.float64(), nullable=True),
        pa.field("window_end", pa.float64(), nullable=True),
        pa.field("date", pa.string(), nullable=False),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {RESULTS: RESULTS_SCHEMA, LABELS: LABELS_SCHEMA, ALERTS: ALERTS_SCHEMA}
RECORD_TYPES: dict[str, type] = {RESULTS: InspectionResult, LABELS: Label, ALERTS: Alert}
#: Record field whose UTC day names the ``date=`` partition.
DATE_FIELDS: dict[str, str] = {RESULTS: "captured_at", LABELS: "labelled_at", ALERTS: "raised_at"}

#: Suffix of files being written. Readers glob ``*.parquet``, which never matches it.
#: The leading dot alone would not hide a file: DuckDB 2.0's ``*`` matches dot files.
TEMP_SUFFIX = ".parquet.tmp"


class ParquetSink:
    """Writer of one kind of record (``"results"``, ``"labels"`` or ``"alerts"``) under ``root``."""

    def __init__(self, root: Path, kind: str, mirror: ParquetMirror | None = None) -> None:
        """``mirror``, when given, gets a copy of every file written (see :mod:`qcstream.storage.parquet_mirror`)."""
        if kind not in SCHEMAS:
            raise ValueError(f"invalid Parquet sink kind {kind!r}: expected one of {sorted(SCHEMAS)}")
        self.root = Path(root)
        self.kind = kind
        self.schema = SCHEMAS[kind]
        self.record_type = RECORD_TYPES[kind]
        self.mirror = mirror

    @property
    def folder(self) -> Path:
        return self.root / self.kind

    def write_batch(self, records: Sequence[SinkRecord]) -> list[Path]:
        """Write ``records`` as one file per (date, line_id) group and return the paths.

        Each file appears complete or not at all. If a group fails, the files of
        the groups written before it stay in place and the error is raised.
        """
        if not records:
            return []

        groups = self._group(records)
        paths = []
        for (date, line_id), group in sorted(groups.items()):
            table = self._to_table(group, date)
            path = self._partition_folder(date, line_id) / _part_name()
            _write_atomically(table, path)
            logger.info("wrote %d %s records to %s", len(group), self.kind, path)
            paths.append(path)
            self._copy_to_mirror(path)
        return paths

    def _copy_to_mirror(self, path: Path) -> None:
        """Upload ``path`` to the mirror bucket. A failure is logged, not raised: the local file is the record."""
        if self.mirror is None:
            return
        try:
            self.mirror.upload(self.root, path)
        except Exception as error:  # noqa: BLE001 - the local write succeeded; the copy can be made later
            logger.error(
                "could not copy %s to %s: %s. The local file is kept, and `qcstream parquet-upload` copies it later.",
                path, self.mirror.location, error,
            )

    def _group(self, records: Sequence[SinkRecord]) -> dict[tuple[str, str], list[SinkRecord]]:
        groups: dict[tuple[str, str], list[SinkRecord]] = defaultdict(list)
        date_field = DATE_FIELDS[self.kind]
        for record in records:
            if not isinstance(record, self.record_type):
                raise TypeError(
                    f"invalid record {record!r} for the {self.kind!r} sink: "
                    f"expected {self.record_type.__name__}, got {type(record).__name__}"
                )
            date = utc_date(getattr(record, date_field))
            groups[(date, record.line_id)].append(record)
        return groups

    def _to_table(self, records: list[SinkRecord], date: str) -> pa.Table:
        rows = []
        for record in records:
            row = dataclasses.asdict(record)
            row["date"] = date
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _partition_folder(self, date: str, line_id: str) -> Path:
        # line_id was checked by validate_id when the record was built, so it contains no '/' or '..'.
        return self.folder / f"date={date}" / f"line={line_id}"


def _part_name() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"part-{stamp}-{uuid.uuid4().hex}.parquet"


def _write_atomically(table: pa.Table, path: Path) -> None:
    """Write ``table`` to a hidden temporary file beside ``path``, fsync it, then rename it.

    ``os.replace`` within one folder is atomic on POSIX file systems, so a crash
    leaves either the complete file or only a ``.<name>.parquet.tmp`` file that
    ``*.parquet`` globs skip. The temporary file is removed when an exception is raised.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.parent / f".{path.stem}{TEMP_SUFFIX}"
    try:
        with open(temp_path, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself, which lives in the folder's entry table."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
