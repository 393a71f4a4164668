"""The inspect step on one message, with a stand-in detector and an in-memory store.

The integration test runs the same code with the fitted model, MinIO and Kafka.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from qcstream.settings import Settings
from qcstream.storage.objects import ObjectNotFoundError, anomaly_map_keys, validate_key
from qcstream.streams.inspect import FrameInspector, ModelNotFoundError, load_model
from qcstream.streams.records import FrameRef, InspectionResult

CAPTURED_AT = 1_700_000_000.0


class MemoryStore:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "") -> None:
        self.objects[(bucket, validate_key(key))] = data

    def get_bytes(self, bucket: str, key: str) -> bytes:
        validate_key(key)
        if (bucket, key) not in self.objects:
            raise ObjectNotFoundError(bucket, key)
        return self.objects[(bucket, key)]


@dataclasses.dataclass
class Prediction:
    image_score: float
    anomaly_map: np.ndarray
    is_defect: bool
    threshold: float
    mode: str


class BrightnessDetector:
    """Scores each pixel by its brightness in [0, 1]; defective when the brightest is >= 0.5."""

    version = "stand-in-1"
    score_range = (0.0, 1.0)

    def __init__(self, score: float | None = None, error: Exception | None = None) -> None:
        self.score = score
        self.error = error
        self.calls = 0

    def predict(self, rgb, xyz=None):
        self.calls += 1
        if self.error is not None:
            raise self.error
        scores = rgb.astype(np.float32).mean(axis=2) / 255.0
        image_score = float(scores.max()) if self.score is None else self.score
        return Prediction(image_score, scores, image_score >= 0.5, 0.5, "rgb")


@pytest.fixture
def settings(tmp_path):
    return Settings(
        home=tmp_path,
        data_dir=tmp_path / "data",
        model_dir=tmp_path / "model",
        kafka_bootstrap="127.0.0.1:1",
        kafka_port=1,
        kafka_controller_port=2,
        minio_endpoint="127.0.0.1:3",
        minio_access_key="test",
        minio_secret_key="test-secret",
    )


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def stored_frame(store: MemoryStore, rgb: np.ndarray, frame_id: str = "f-1", **changes) -> FrameRef:
    key = f"line-1/cam-1/2023-11-14/{frame_id}.png"
    store.objects[("frames", key)] = png(rgb)
    fields = dict(
        frame_id=frame_id,
        line_id="line-1",
        camera_id="cam-1",
        captured_at=CAPTURED_AT,
        payload_bucket="frames",
        payload_key=key,
        payload_format="png",
        width=rgb.shape[1],
        height=rgb.shape[0],
    )
    fields.update(changes)
    return FrameRef(**fields)


def handle(inspector: FrameInspector, value: bytes, key: bytes = b"line-1"):
    return asyncio.run(inspector.handle(key, value))


def test_good_frame_result_and_maps(settings):
    store, detector = MemoryStore(), BrightnessDetector()
    inspector = FrameInspector(settings, detector, store)
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[1, 2] = 204  # brightness 0.8
    ref = stored_frame(store, rgb)

    outcome = handle(inspector, ref.dumps())

    result = outcome.result
    assert outcome.dead_letter is None
    png_key, raw_key = anomaly_map_keys("line-1", CAPTURED_AT, "f-1")
    assert (result.anomaly_map_png_key, result.anomaly_map_raw_key, result.maps_bucket) == (png_key, raw_key, "anomaly-maps")
    assert result.image_score == pytest.approx(0.8)
    assert (result.is_defect, result.threshold, result.mode, result.model_version) == (True, 0.5, "rgb", "stand-in-1")
    assert result.latency_ms == pytest.approx((result.inspected_at - CAPTURED_AT) * 1000.0)
    assert result.detector_ms >= 0.0
    assert InspectionResult.loads(result.dumps()) == result

    with Image.open(io.BytesIO(store.objects[("anomaly-maps", png_key)])) as overlay:
        assert overlay.size == (6, 4)
    with np.load(io.BytesIO(store.objects[("anomaly-maps", raw_key)])) as archive:
        raw = archive["anomaly_map"]
    assert raw.dtype == np.float32
    assert raw.shape == (4, 6)
    assert raw[1, 2] == pytest.approx(0.8)
    assert raw[0, 0] == 0.0


def test_normal_frame_is_not_a_defect(settings):
    store = MemoryStore()
    inspector = FrameInspector(settings, BrightnessDetector(), store)
    ref = stored_frame(store, np.full((4, 4, 3), 51, dtype=np.uint8))  # brightness 0.2

    result = handle(inspector, ref.dumps()).result

    assert result.image_score == pytest.approx(0.2)
    assert result.is_defect is False


def dead_letter_of(inspector, value, key=b"line-1"):
    outcome = handle(inspector, value, key)
    assert outcome.result is None
    return outcome.dead_letter


def test_bad_schema_major_version_is_dead_lettered(settings):
    store = MemoryStore()
    inspector = FrameInspector(settings, BrightnessDetector(), store)
    body = json.loads(stored_frame(store, np.zeros((4, 4, 3), dtype=np.uint8)).dumps())
    body["schema_version"] = "2.0"
    value = json.dumps(body).encode()

    letter = dead_letter_of(inspector, value)

    assert letter.source_topic == "frames"
    assert "unsupported schema_version '2.0'" in letter.reason
    assert (letter.frame_id, letter.line_id, letter.camera_id, letter.original_key) == ("f-1", "line-1", "cam-1", "line-1")
    assert letter.original_value == value.decode()


def test_garbage_message_dead_lettered(settings):
    inspector = FrameInspector(settings, BrightnessDetector(), MemoryStore())

    letter = dead_letter_of(inspector, b"\xff\x00garbage", key=None)

    assert letter.reason.startswith("invalid frame reference: ")
    assert letter.original_key is None
    assert letter.frame_id is None
    assert letter.original_value.endswith("garbage")


def test_deeply_nested_json_dead_lettered(settings):
    inspector = FrameInspector(settings, BrightnessDetector(), MemoryStore())

    letter = dead_letter_of(inspector, b"[" * 100_000)

    assert "nested too deeply" in letter.reason


def test_missing_payload_is_dead_lettered(settings):
    store = MemoryStore()
    inspector = FrameInspector(settings, BrightnessDetector(), store)
    ref = stored_frame(store, np.zeros((4, 4, 3), dtype=np.uint8))
    store.objects.clear()

    letter = dead_letter_of(inspector, ref.dumps())

    assert letter.reason == f"payload not found: frames/{ref.payload_key}"


def test_corrupt_payload_skips_detector(settings):
    store, detector = MemoryStore(), BrightnessDetector()
    inspector = FrameInspector(settings, detector, store)
    ref = stored_frame(store, np.zeros((4, 4, 3), dtype=np.uint8))
    store.objects[("frames", ref.payload_key)] = b"\x89PNG\r\n\x1a\nbroken"

    letter = dead_letter_of(inspector, ref.dumps())

    assert letter.reason.startswith(f"invalid payload frames/{ref.payload_key}: ")
    assert detector.calls == 0


def test_declared_size_mismatch_is_dead_lettered(settings):
    store = MemoryStore()
    inspector = FrameInspector(settings, BrightnessDetector(), store)
    ref = stored_frame(store, np.zeros((4, 4, 3), dtype=np.uint8), width=5)

    assert "declares 5x4" in dead_letter_of(inspector, ref.dumps()).reason


def test_payload_outside_frames_bucket_rejected(settings):
    store = MemoryStore()
    inspector = FrameInspector(settings, BrightnessDetector(), store)
    ref = stored_frame(store, np.zeros((4, 4, 3), dtype=np.uint8), payload_bucket="anomaly-maps")

    assert "is not the frames bucket" in dead_letter_of(inspector, ref.dumps()).reason


def test_unsafe_payload_key_is_refused(settings):
    store = MemoryStore()
    inspector = FrameInspector(settings, BrightnessDetector(), store)
    ref = stored_frame(store, np.zeros((4, 4, 3), dtype=np.uint8), payload_key="../secrets/key")

    assert "invalid payload key '../secrets/key'" in dead_letter_of(inspector, ref.dumps()).reason


def test_detector_crash_dead_lettered(settings):
    store, detector = MemoryStore(), BrightnessDetector(error=RuntimeError("CUDA out of memory"))
    inspector = FrameInspector(settings, detector, store)
    ref = stored_frame(store, np.zeros((4, 4, 3), dtype=np.uint8))

    letter = dead_letter_of(inspector, ref.dumps())
    detector.error = None
    outcome = handle(inspector, ref.dumps())

    assert letter.reason == "unexpected error: RuntimeError: CUDA out of memory"
    assert outcome.result is not None


def test_non_finite_score_is_dead_lettered(settings):
    store = MemoryStore()
    inspector = FrameInspector(settings, BrightnessDetector(score=float("nan")), store)
    ref = stored_frame(store, np.zeros((4, 4, 3), dtype=np.uint8))

    assert "non-finite score" in dead_letter_of(inspector, ref.dumps()).reason


def test_missing_model_directory_names_the_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no fitted model in .*empty: run `qcstream fit <folder>` first"):
        load_model(tmp_path / "empty")
