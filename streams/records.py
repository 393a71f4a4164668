"""Typed, versioned message records exchanged on the Kafka topics.

Every record is JSON with a ``schema_version`` field ``"MAJOR.MINOR"``. A reader
accepts any minor version of the major version it reads (new optional fields are
ignored) and rejects another major version with :class:`RecordError`, which the
worker turns into a dead-letter record instead of guessing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, ClassVar, TypeVar

SCHEMA_MAJOR = 1
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.0"

#: Line, camera and frame ids: letters, digits, ``.``, ``_`` and ``-``; 1 to 128
#: characters; no leading dot. They become Kafka keys and object-store key parts.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$")

T = TypeVar("T", bound="Record")


class RecordError(ValueError):
    """A message that cannot be decoded into a valid record."""


def validate_id(kind: str, value: Any) -> str:
    """Return ``value`` if it is a valid id, else raise :class:`RecordError`."""
    if not isinstance(value, str) or not ID_PATTERN.match(value) or ".." in value:
        raise RecordError(
            f"invalid {kind} {value!r}: use 1 to 128 letters, digits, '.', '_' or '-', "
            "not starting with '.' and without '..'"
        )
    return value


@dataclasses.dataclass(frozen=True)
class Record:
    """Base of all records: JSON encoding with a schema version check."""

    kind: ClassVar[str] = "record"
    _id_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name in self._id_fields:
            value = getattr(self, name)
            if value is not None:
                validate_id(name, value)

    def to_dict(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        body["schema_version"] = SCHEMA_VERSION
        body["kind"] = self.kind
        return body

    def dumps(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_dict(cls: type[T], body: dict[str, Any]) -> T:
        if not isinstance(body, dict):
            raise RecordError(f"expected a JSON object for a {cls.kind} record, got {type(body).__name__}")
        version = body.get("schema_version")
        if not isinstance(version, str) or not re.match(r"^\d+\.\d+$", version):
            raise RecordError(f"missing or invalid schema_version {version!r} in {cls.kind} record")
        major = int(version.split(".")[0])
        if major != SCHEMA_MAJOR:
            raise RecordError(
                f"unsupported schema_version {version!r} for {cls.kind} record: "
                f"this reader understands {SCHEMA_MAJOR}.x; upgrade qcstream"
            )
        kind = body.get("kind", cls.kind)
        if kind != cls.kind:
            raise RecordError(f"expected a {cls.kind} record, got kind {kind!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in body and _required(f)]
        if missing:
            raise RecordError(f"{cls.kind} record is missing required fields {missing}")
        try:
            return cls(**{k: v for k, v in body.items() if k in known})
        except TypeError as error:
            raise RecordError(f"invalid {cls.kind} record: {error}") from error

    @classmethod
    def loads(cls: type[T], raw: bytes | str) -> T:
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecordError(f"{cls.kind} message is not valid JSON: {error}") from error
        except RecursionError as error:
            raise RecordError(f"{cls.kind} message is nested too deeply to be a record") from error
        return cls.from_dict(body)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"invalid {name} {value!r}: expected a finite number")


@dataclasses.dataclass(frozen=True)
class FrameRef(Record):
    """Claim check for one camera frame whose payload lies in the object store.

    ``payload_format`` is ``"png"`` (8-bit RGB or grayscale image) or ``"npy"``
    (a ``(H, W, 3)`` uint8 or float array). ``point_cloud_key``, when set, names an
    organized ``(H, W, 3)`` float32 point cloud stored as compressed ``.npz``.
    Times are seconds since the Unix epoch.
    """

    kind: ClassVar[str] = "frame"
    _id_fields: ClassVar[tuple[str, ...]] = ("frame_id", "line_id", "camera_id")

    frame_id: str
    line_id: str
    camera_id: str
    captured_at: float
    payload_bucket: str
    payload_key: str
    payload_format: str
    width: int
    height: int
    point_cloud_key: str | None = None
    sent_at: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("captured_at", self.captured_at)
        if self.payload_format not in {"png", "npy"}:
            raise RecordError(f"invalid payload_format {self.payload_format!r}: expected 'png' or 'npy'")
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise RecordError(f"invalid {name} {value!r}: expected a positive integer")


@dataclasses.dataclass(frozen=True)
class InspectionResult(Record):
    """The detector's verdict on one frame; published for every frame.

    ``image_score`` is the anomaly score (higher is more anomalous) and
    ``is_defect`` is ``image_score >= threshold``. ``mode`` names the modalities that
    scored the frame (``"rgb"``, ``"xyz"`` or ``"rgb+xyz"``).
    """

    kind: ClassVar[str] = "result"
    _id_fields: ClassVar[tuple[str, ...]] = ("frame_id", "line_id", "camera_id")

    frame_id: str
    line_id: str
    camera_id: str
    captured_at: float
    inspected_at: float
    image_score: float
    threshold: float
    is_defect: bool
    mode: str
    model_version: str
    maps_bucket: str
    anomaly_map_png_key: str
    anomaly_map_raw_key: str
    detector_ms: float
    latency_ms: float

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("captured_at", "inspected_at", "image_score", "threshold", "detector_ms", "latency_ms"):
            _check_number(name, getattr(self, name))
        if not isinstance(self.is_defect, bool):
            raise RecordError(f"invalid is_defect {self.is_defect!r}: expected true or false")


@dataclasses.dataclass(frozen=True)
class Label(Record):
    """An inspector's ground truth for one frame; the latest label of a frame wins."""

    kind: ClassVar[str] = "label"
    _id_fields: ClassVar[tuple[str, ...]] = ("frame_id", "line_id")

    frame_id: str
    line_id: str
    is_defect: bool
    labelled_at: float
    defect_type: str | None = None
    inspector: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.is_defect, bool):
            raise RecordError(f"invalid is_defect {self.is_defect!r}: expected true or false")
        _check_number("labelled_at", self.labelled_at)
        for name in ("defect_type", "inspector"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > 128):
                raise RecordError(f"invalid {name} {value!r}: expected text of at most 128 characters, or null")


@dataclasses.dataclass(frozen=True)
class DeadLetter(Record):
    """A message the worker could not process, with the reason, kept for replay."""

    kind: ClassVar[str] = "dead_letter"

    source_topic: str
    reason: str
    failed_at: float
    original_value: str
    original_key: str | None = None
    frame_id: str | None = None
    line_id: str | None = None
    camera_id: str | None = None


#: States of an :class:`Alert`: raised, then cleared once the condition is gone.
ALERT_STATES = ("firing", "cleared")


@dataclasses.dataclass(frozen=True)
class Alert(Record):
    """A drift alert on one line; the ``firing`` and ``cleared`` records of one episode share ``alert_id``.

    ``condition`` names the check (``"fnr-drift"``). The ``recent_*`` counts are the
    line's most recent labelled defects and the misses among them. The
    ``baseline_*`` counts are the labelled defects before those. ``p_value`` comes
    from the one-sided test that the recent false-negative rate is higher than the baseline's.
    """

    kind: ClassVar[str] = "alert"
    _id_fields: ClassVar[tuple[str, ...]] = ("alert_id", "line_id")

    alert_id: str
    line_id: str
    condition: str
    state: str
    raised_at: float
    recent_defects: int
    recent_misses: int
    baseline_defects: int
    baseline_misses: int
    recent_fnr: float
    baseline_fnr: float
    p_value: float
    message: str
    #: Capture times of the oldest and newest frame in the recent window.
    window_start: float | None = None
    window_end: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.state not in ALERT_STATES:
            raise RecordError(f"invalid alert state {self.state!r}: expected one of {list(ALERT_STATES)}")
        for name in ("raised_at", "recent_fnr", "baseline_fnr", "p_value"):
            _check_number(name, getattr(self, name))
        for name in ("recent_defects", "recent_misses", "baseline_defects", "baseline_misses"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RecordError(f"invalid {name} {value!r}: expected a count (integer >= 0)")
        for name in ("window_start", "window_end"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name))
