"""Per-line quality report: inspection volume, defect rate, FNR/FPR against labels, latency."""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from qcstream.settings import Settings
from qcstream.storage.drift import open_alerts
from qcstream.storage.objects import anomaly_map_prefix, s3_uri
from qcstream.storage.queries import (
    LineDefectRate,
    LineLatency,
    LineRates,
    defect_rates,
    latency_percentiles,
    rolling_rates,
    window_start,
)
from qcstream.storage.statistics import wilson_interval

logger = logging.getLogger(__name__)

NOT_AVAILABLE = "n/a"


@dataclasses.dataclass(frozen=True)
class LineReport:
    """Figures of one production line, with None where there is nothing to compute from."""

    line_id: str
    frames_inspected: int
    predicted_defects: int
    defect_rate: float | None
    n_labelled: int
    n_defects: int
    n_good: int
    false_negatives: int
    false_positives: int
    fnr: float | None
    fpr: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    detector_p50_ms: float | None
    detector_p95_ms: float | None
    #: ``s3://<bucket>/<line_id>/``, under which the line's anomaly maps lie.
    maps_uri: str


@dataclasses.dataclass(frozen=True)
class QualityReport:
    """Report over one window: ``window_seconds`` applies to every figure, ``last_n`` to FNR/FPR only."""

    generated_at: float
    window_seconds: float | None
    last_n: int | None
    maps_bucket: str
    lines: list[LineReport]
    #: Addresses for fetching maps: the MinIO API and its web console (bound to 127.0.0.1 by
    #: ``qcstream services up``). Then the login name and the file containing the local secret key.
    minio_url: str
    console_url: str
    minio_access_key: str
    secret_file: Path
    #: ``(line_id, raised_at, message)`` of each FNR drift alert that has not cleared.
    open_alerts: list[tuple[str, float, str]] = dataclasses.field(default_factory=list)

    @property
    def frames_inspected(self) -> int:
        return sum(line.frames_inspected for line in self.lines)

    @property
    def predicted_defects(self) -> int:
        return sum(line.predicted_defects for line in self.lines)

    @property
    def n_labelled(self) -> int:
        return sum(line.n_labelled for line in self.lines)

    @property
    def totals(self) -> LineRates:
        """All lines' label counts summed, under the line id ``"all"``."""
        return LineRates(
            line_id="all",
            n_labelled=self.n_labelled,
            n_defects=sum(line.n_defects for line in self.lines),
            n_good=sum(line.n_good for line in self.lines),
            false_negatives=sum(line.false_negatives for line in self.lines),
            false_positives=sum(line.false_positives for line in self.lines),
        )


def quality_report(
    root: Path,
    settings: Settings,
    window_seconds: float | None = None,
    last_n: int | None = None,
    now: float | None = None,
) -> QualityReport:
    """Compute the report for every line found in the results or labels under ``root``."""
    now = time.time() if now is None else now
    rates = {row.line_id: row for row in rolling_rates(root, window_seconds=window_seconds, last_n=last_n, now=now)}
    volumes = {row.line_id: row for row in defect_rates(root, window_seconds=window_seconds, now=now)}
    latencies = {row.line_id: row for row in latency_percentiles(root, window_seconds=window_seconds, now=now)}

    lines = [
        _line_report(line_id, volumes.get(line_id), rates.get(line_id), latencies.get(line_id), settings)
        for line_id in sorted(set(rates) | set(volumes) | set(latencies))
    ]
    logger.info("quality report over %d lines from %s", len(lines), root)
    return QualityReport(
        generated_at=now,
        window_seconds=window_seconds,
        last_n=last_n,
        maps_bucket=settings.bucket_maps,
        lines=lines,
        minio_url=f"{'https' if settings.minio_secure else 'http'}://{settings.minio_endpoint}",
        console_url=f"http://127.0.0.1:{settings.minio_console_port}",
        minio_access_key=settings.minio_access_key,
        secret_file=settings.minio_secret_file,
        open_alerts=[(row["line_id"], row["raised_at"], row["message"]) for row in open_alerts(root)],
    )


def _line_report(
    line_id: str,
    volume: LineDefectRate | None,
    rates: LineRates | None,
    latency: LineLatency | None,
    settings: Settings,
) -> LineReport:
    rates = rates or LineRates(line_id, 0, 0, 0, 0, 0)
    prefix = anomaly_map_prefix(line_id)
    return LineReport(
        line_id=line_id,
        frames_inspected=volume.frames_inspected if volume else 0,
        predicted_defects=volume.predicted_defects if volume else 0,
        defect_rate=volume.defect_rate if volume else None,
        n_labelled=rates.n_labelled,
        n_defects=rates.n_defects,
        n_good=rates.n_good,
        false_negatives=rates.false_negatives,
        false_positives=rates.false_positives,
        fnr=rates.fnr,
        fpr=rates.fpr,
        latency_p50_ms=latency.latency_p50_ms if latency else None,
        latency_p95_ms=latency.latency_p95_ms if latency else None,
        detector_p50_ms=latency.detector_p50_ms if latency else None,
        detector_p95_ms=latency.detector_p95_ms if latency else None,
        maps_uri=s3_uri(settings.bucket_maps, prefix),
    )


#: Column meanings, printed under the table.
LEGEND = [
    ("defect rate", "share of inspected frames the detector flagged as defective (not the true defect rate)"),
    ("FNR", "false-negative rate: labelled defects passed as good / labelled defects (FN/defects)"),
    ("FPR", "false-positive rate: labelled good parts flagged / labelled good parts (FP/good)"),
    ("FNR CI, FPR CI", "95% Wilson score interval of the rate: wide when few frames are labelled"),
    ("p50/p95 ms", "latency from capture to result, including queueing in Kafka: median / 95th percentile"),
    ("detector p50/p95 ms", "model time per frame: median / 95th percentile"),
]


def format_report(report: QualityReport) -> str:
    """Render the report as a header, a fixed-width table, a legend and where the anomaly maps are."""
    header = [
        "line", "frames", "defect rate", "labelled", "FN/defects", "FNR", "FNR CI", "FP/good", "FPR", "FPR CI",
        "p50 ms", "p95 ms", "detector p50 ms", "detector p95 ms",
    ]
    rows = [
        [
            line.line_id,
            str(line.frames_inspected),
            _percent(line.defect_rate),
            str(line.n_labelled),
            f"{line.false_negatives}/{line.n_defects}",
            _percent(line.fnr),
            _interval(line.false_negatives, line.n_defects),
            f"{line.false_positives}/{line.n_good}",
            _percent(line.fpr),
            _interval(line.false_positives, line.n_good),
            _milliseconds(line.latency_p50_ms),
            _milliseconds(line.latency_p95_ms),
            _milliseconds(line.detector_p50_ms),
            _milliseconds(line.detector_p95_ms),
        ]
        for line in report.lines
    ]
    widths = [max(len(cells[column]) for cells in [header, *rows]) for column in range(len(header))]

    output = [_header(report), ""]
    output.append(_table_row(header, widths))
    output.append(_table_row(["-" * width for width in widths], widths))
    output.extend(_table_row(cells, widths) for cells in rows)
    if not rows:
        output.append("(no results or labels in this window)")

    output.append("")
    if report.open_alerts:
        output.append("Open FNR drift alerts:")
        output.extend(f"  {_utc(raised_at)}  {message}" for _, raised_at, message in report.open_alerts)
    else:
        output.append("Open FNR drift alerts: none")

    output.append("")
    output.append("Columns:")
    term_width = max(len(term) for term, _ in LEGEND)
    output.extend(f"  {term:<{term_width}}  {meaning}" for term, meaning in LEGEND)

    output.append("")
    output.extend(_maps_section(report))
    return "\n".join(output)


def _maps_section(report: QualityReport) -> list[str]:
    """Return the lines naming each line's anomaly map prefix and how to open a map in the private bucket."""
    bucket = report.maps_bucket
    lines = [f"Anomaly maps (bucket {bucket} is private: plain HTTP links return AccessDenied):"]
    line_width = max((len(line.line_id) for line in report.lines), default=0)
    lines.extend(f"  {line.line_id:<{line_width}}  {line.maps_uri}" for line in report.lines)
    lines.extend(
        [
            f"  Browse: MinIO console {report.console_url} (local services only), sign in as "
            f"{report.minio_access_key!r} with the secret key from $QCSTREAM_MINIO_SECRET_KEY or {report.secret_file}",
            f"  Fetch one map with the MinIO client: mc alias set qcstream {report.minio_url} "
            f"{report.minio_access_key} <secret key>",
            f"    then: mc cp qcstream/{bucket}/<line>/<YYYY-MM-DD>/<frame id>.png .",
            "  The worker logs each frame's overlay key; <frame id>.npz next to it holds the raw scores.",
        ]
    )
    return lines


def _header(report: QualityReport) -> str:
    """Return two lines: the time and window, then the totals over all lines."""
    totals = report.totals
    if report.window_seconds is not None:
        start = window_start(report.window_seconds, report.generated_at)
        window = f"window: last {_duration(report.window_seconds)} (frames captured since {_utc(start)})"
    elif report.last_n is not None:
        window = f"window: last {report.last_n} labelled frames per line for FN/FP, all frames otherwise"
    else:
        window = "window: all frames"
    return (
        f"Quality report at {_utc(report.generated_at)} | {window}\n"
        f"Totals: {len(report.lines)} lines, {report.frames_inspected} frames inspected, "
        f"{report.predicted_defects} predicted defects, {totals.n_labelled} labelled, "
        f"FNR {_percent(totals.fnr)} ({totals.false_negatives}/{totals.n_defects}, 95% CI {_interval(totals.false_negatives, totals.n_defects)}), "
        f"FPR {_percent(totals.fpr)} ({totals.false_positives}/{totals.n_good}, 95% CI {_interval(totals.false_positives, totals.n_good)})"
    )


_UNITS = [(86400, "d"), (3600, "h"), (60, "min")]


def _duration(seconds: float) -> str:
    """Return a window length for people: ``80 s``, ``90 min``, ``1 h``, ``16.7 min``, ``2 d``."""
    rounded = round(seconds)
    if rounded < 1:
        return f"{seconds:.2g} s"
    for size, name in _UNITS:
        if rounded >= size and rounded % size == 0:
            return f"{rounded // size} {name}"
    if rounded < 600:
        return f"{rounded} s"
    size, name = next((size, name) for size, name in _UNITS if rounded >= size)
    return f"{rounded / size:.1f} {name}"


def _table_row(cells: list[str], widths: list[int]) -> str:
    # The line id is text, so it is left-aligned. Every other column is a number, right-aligned.
    first = cells[0].ljust(widths[0])
    rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
    return "  ".join([first, *rest]).rstrip()


def _interval(errors: int, trials: int) -> str:
    bounds = wilson_interval(errors, trials)
    return NOT_AVAILABLE if bounds is None else f"{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f}%"


def _percent(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{100 * value:.1f}%"


def _milliseconds(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.1f}"


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
