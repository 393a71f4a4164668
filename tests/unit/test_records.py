"""Message records: JSON round trips, schema versions and validation."""

from __future__ import annotations

import json

import pytest

from qcstream.streams.records import (
    SCHEMA_VERSION,
    DeadLetter,
    FrameRef,
    InspectionResult,
    Label,
    RecordError,
    validate_id,
)

FRAME = dict(
    frame_id="cam-1-0a1b2c3d4e5f",
    line_id="line-1",
    camera_id="cam-1",
    captured_at=1_700_000_000.25,
    payload_bucket="frames",
    payload_key="line-1/cam-1/2023-11-14/cam-1-0a1b2c3d4e5f.png",
    payload_format="png",
    width=300,
    height=400,
)

RESULT = dict(
    frame_id="cam-1-0a1b2c3d4e5f",
    line_id="line-1",
    camera_id="cam-1",
    captured_at=1_700_000_000.25,
    inspected_at=1_700_000_000.75,
    image_score=0.8,
    threshold=0.5,
    is_defect=True,
    mode="rgb",
    model_version="m-1",
    maps_bucket="anomaly-maps",
    anomaly_map_png_key="line-1/2023-11-14/cam-1-0a1b2c3d4e5f.png",
    anomaly_map_raw_key="line-1/2023-11-14/cam-1-0a1b2c3d4e5f.npz",
    detector_ms=12.5,
    latency_ms=500.0,
)


def body_of(record) -> dict:
    return json.loads(record.dumps())


@pytest.mark.parametrize(
    "record",
    [
        FrameRef(**FRAME),
        FrameRef(**FRAME, point_cloud_key="line-1/cam-1/2023-11-14/x.xyz.npz", sent_at=1_700_000_001.0),
        InspectionResult(**RESULT),
        Label(frame_id="f-1", line_id="line-1", is_defect=False, labelled_at=1.5),
        Label(frame_id="f-1", line_id="line-1", is_defect=True, labelled_at=1.5, defect_type="cut", inspector="ana"),
        DeadLetter(source_topic="frames", reason="bad", failed_at=2.0, original_value="{}", original_key="line-1"),
    ],
)
def test_records_round_trip_through_json(record):
    assert type(record).loads(record.dumps()) == record


def test_json_carries_schema_version_and_kind():
    body = body_of(FrameRef(**FRAME))

    assert body["schema_version"] == SCHEMA_VERSION
    assert body["kind"] == "frame"
    assert body["width"] == 300


def test_newer_minor_version_accepted():
    body = body_of(FrameRef(**FRAME))
    body["schema_version"] = "1.7"
    body["exposure_ms"] = 3.0

    assert FrameRef.from_dict(body) == FrameRef(**FRAME)


@pytest.mark.parametrize("version", ["2.0", "0.9"])
def test_other_major_version_is_rejected(version):
    body = body_of(FrameRef(**FRAME))
    body["schema_version"] = version

    with pytest.raises(RecordError, match=f"unsupported schema_version '{version}'"):
        FrameRef.from_dict(body)


@pytest.mark.parametrize("version", [None, 1, "1", "v1.0", "1.0.0"])
def test_missing_or_malformed_version_is_rejected(version):
    body = body_of(FrameRef(**FRAME))
    body["schema_version"] = version

    with pytest.raises(RecordError, match="schema_version"):
        FrameRef.from_dict(body)


def test_record_of_another_kind_is_rejected():
    label = Label(frame_id="f-1", line_id="line-1", is_defect=False, labelled_at=1.0)

    with pytest.raises(RecordError, match="expected a frame record, got kind 'label'"):
        FrameRef.loads(label.dumps())


def test_missing_required_field_is_named():
    body = body_of(FrameRef(**FRAME))
    del body["payload_key"]

    with pytest.raises(RecordError, match=r"missing required fields \['payload_key'\]"):
        FrameRef.from_dict(body)


@pytest.mark.parametrize("raw", [b"not json", b"\xff\xfe", b""])
def test_non_json_is_rejected(raw):
    with pytest.raises(RecordError, match="not valid JSON"):
        FrameRef.loads(raw)


def test_non_object_json_is_rejected():
    with pytest.raises(RecordError, match="expected a JSON object"):
        FrameRef.loads(b"[1, 2]")


@pytest.mark.parametrize(
    "value",
    ["line/1", "..", "a..b", ".hidden", "", "x" * 129, "line\n1", "line 1", "línea", None, 7],
)
def test_invalid_ids_are_rejected(value):
    with pytest.raises(RecordError, match="invalid line_id"):
        validate_id("line_id", value)


@pytest.mark.parametrize("value", ["line-1", "L_2.b", "0", "x" * 128])
def test_valid_ids_pass(value):
    assert validate_id("line_id", value) == value


def test_frame_with_path_in_id_is_rejected():
    with pytest.raises(RecordError, match="invalid frame_id"):
        FrameRef(**{**FRAME, "frame_id": "../etc"})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("captured_at", float("nan"), "captured_at"),
        ("captured_at", "yesterday", "captured_at"),
        ("payload_format", "jpeg", "payload_format"),
        ("width", 0, "width"),
        ("height", True, "height"),
        ("height", 4.0, "height"),
    ],
)
def test_invalid_frame_fields_are_rejected(field, value, message):
    with pytest.raises(RecordError, match=f"invalid {message}"):
        FrameRef(**{**FRAME, field: value})


def test_label_needs_a_boolean_verdict():
    with pytest.raises(RecordError, match="invalid is_defect"):
        Label(frame_id="f-1", line_id="line-1", is_defect=1, labelled_at=1.0)


def test_label_needs_a_finite_time():
    with pytest.raises(RecordError, match="invalid labelled_at"):
        Label(frame_id="f-1", line_id="line-1", is_defect=False, labelled_at=float("inf"))


@pytest.mark.parametrize(("field", "value"), [("defect_type", 3), ("inspector", ["ana"]), ("defect_type", "x" * 129)])
def test_label_text_fields_must_be_short_text(field, value):
    with pytest.raises(RecordError, match=f"invalid {field}"):
        Label(frame_id="f-1", line_id="line-1", is_defect=True, labelled_at=1.5, **{field: value})


def test_result_with_nan_score_rejected():
    with pytest.raises(RecordError, match="invalid image_score nan"):
        InspectionResult(**{**RESULT, "image_score": float("nan")})


def test_dead_letter_ids_are_optional_and_kept():
    letter = DeadLetter(
        source_topic="frames", reason="r", failed_at=1.0, original_value="x", frame_id="f", line_id="l"
    )

    body = body_of(letter)

    assert (body["frame_id"], body["line_id"], body["camera_id"], body["original_key"]) == ("f", "l", None, None)
