"""The frame producer's encoding and claim-check order, with in-memory stand-ins for
MinIO and Kafka (the integration test runs it against the real services)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcstream.settings import Settings
from qcstream.storage.objects import frame_payload_key, point_cloud_key
from qcstream.streams.payload import decode_frame, decode_point_cloud
from qcstream.streams.producer import FrameProducer, ProducerError, encode_image
from qcstream.streams.records import FrameRef

TIRE_IMAGE = Path(__file__).resolve().parents[3].joinpath("shared/data/mvtec3d_tire/test/good/rgb/000.png")
TILE_IMAGE = Path(__file__).resolve().parents[3].joinpath("shared/data/magnetic_tile/train/good/exp1_num_10334.jpg")


class RecordingStore:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.calls: list[str] = []

    def ensure_buckets(self, *names: str) -> None:
        self.calls.append("ensure_buckets")

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "") -> None:
        self.calls.append(f"put {bucket}/{key}")
        self.objects[(bucket, key)] = data


class FakeFuture:
    def __init__(self, exception: Exception | None = None) -> None:
        self.is_done = True
        self.exception = exception

    def failed(self) -> bool:
        return self.exception is not None

    def succeeded(self) -> bool:
        return self.exception is None


class FakeKafka:
    def __init__(self, store: RecordingStore, fail: bool = False) -> None:
        self.store = store
        self.fail = fail
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.closed = False

    def send(self, topic: str, key: bytes, value: bytes) -> FakeFuture:
        self.store.calls.append(f"send {topic}")
        self.sent.append((topic, key, value))
        return FakeFuture(RuntimeError("broker gone") if self.fail else None)

    def flush(self, timeout=None) -> None:
        pass

    def close(self) -> None:
        self.closed = True


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


@pytest.fixture
def store():
    return RecordingStore()


def make_producer(settings, store, fail=False):
    kafka = FakeKafka(store, fail=fail)
    return FrameProducer(settings, store=store, kafka_producer=kafka), kafka


def test_array_frame_stored_before_reference(settings, store):
    producer, kafka = make_producer(settings, store)
    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)

    ref = producer.send_frame(rgb, "line-1", "cam-1", frame_id="f-1", captured_at=1_700_000_000.0)

    key = frame_payload_key("line-1", "cam-1", 1_700_000_000.0, "f-1", "png")
    assert store.calls == ["ensure_buckets", f"put frames/{key}", "send frames"]
    assert (ref.payload_bucket, ref.payload_key, ref.width, ref.height) == ("frames", key, 8, 6)
    np.testing.assert_array_equal(decode_frame(ref, store.objects[("frames", key)]), rgb)

    topic, kafka_key, value = kafka.sent[0]
    assert (topic, kafka_key) == ("frames", b"line-1")
    assert FrameRef.loads(value) == ref


def test_png_file_is_uploaded_unchanged(settings, store):
    producer, _ = make_producer(settings, store)

    ref = producer.send_frame(TIRE_IMAGE, "line-1", "cam-1")

    assert store.objects[("frames", ref.payload_key)] == TIRE_IMAGE.read_bytes()
    assert (ref.width, ref.height) == (300, 400)


def test_grayscale_jpeg_is_sent_as_grayscale_png(settings, store):
    producer, _ = make_producer(settings, store)

    ref = producer.send_frame(TILE_IMAGE, "line-2", "cam-9")

    with Image.open(io.BytesIO(store.objects[("frames", ref.payload_key)])) as sent, Image.open(TILE_IMAGE) as original:
        assert (sent.format, sent.mode, sent.size) == ("PNG", "L", original.size)
        np.testing.assert_array_equal(np.asarray(sent), np.asarray(original))


def test_default_frame_id_format(settings, store):
    producer, _ = make_producer(settings, store)

    first = producer.send_frame(TIRE_IMAGE, "line-1", "cam-1")
    second = producer.send_frame(TIRE_IMAGE, "line-1", "cam-1")

    assert re.fullmatch(r"cam-1-[0-9a-f]{12}", first.frame_id)
    assert first.frame_id != second.frame_id


@pytest.mark.parametrize(
    ("line_id", "camera_id", "frame_id", "message"),
    [
        ("line/1", "cam-1", None, "invalid line_id"),
        ("line-1", "../cam", None, "invalid camera_id"),
        ("line-1", "cam-1", "a..b", "invalid frame_id"),
    ],
)
def test_bad_ids_upload_and_send_nothing(settings, store, line_id, camera_id, frame_id, message):
    producer, kafka = make_producer(settings, store)

    with pytest.raises(ValueError, match=message):
        producer.send_frame(TIRE_IMAGE, line_id, camera_id, frame_id=frame_id)

    assert store.objects == {}
    assert kafka.sent == []


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"not an image", "failed to decode image"),
        (np.zeros((4, 4, 3), dtype=np.float32), "invalid image array"),
        (np.zeros((4, 4, 4), dtype=np.uint8), "invalid image array"),
        (Path("/nonexistent/frame.png"), "does not exist"),
    ],
)
def test_bad_images_upload_and_send_nothing(settings, store, image, message):
    producer, kafka = make_producer(settings, store)

    with pytest.raises(ValueError, match=message):
        producer.send_frame(image, "line-1", "cam-1")

    assert store.objects == {}
    assert kafka.sent == []


def test_non_png_or_jpeg_file_is_refused(tmp_path):
    path = tmp_path / "frame.bmp"
    Image.new("RGB", (4, 4)).save(path)

    with pytest.raises(ValueError, match="unsupported image format 'BMP'"):
        encode_image(path)


def test_rgba_png_bytes_are_converted_to_rgb():
    buffer = io.BytesIO()
    Image.new("RGBA", (3, 2), (10, 20, 30, 40)).save(buffer, format="PNG")

    data, width, height = encode_image(buffer.getvalue())

    with Image.open(io.BytesIO(data)) as image:
        assert (image.mode, width, height) == ("RGB", 3, 2)
        assert image.getpixel((0, 0)) == (10, 20, 30)


def test_point_cloud_is_stored_beside_the_frame(settings, store):
    producer, kafka = make_producer(settings, store)
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    xyz = np.random.default_rng(2).normal(size=(4, 5, 3)).astype(np.float32)

    ref = producer.send_frame(rgb, "line-1", "cam-1", frame_id="f-2", captured_at=10.0, point_cloud=xyz)

    assert ref.point_cloud_key == point_cloud_key("line-1", "cam-1", 10.0, "f-2")
    np.testing.assert_array_equal(decode_point_cloud(store.objects[("frames", ref.point_cloud_key)], 5, 4), xyz)


def test_point_cloud_of_another_size_is_refused(settings, store):
    producer, kafka = make_producer(settings, store)

    with pytest.raises(ValueError, match="invalid point cloud"):
        producer.send_frame(np.zeros((4, 5, 3), dtype=np.uint8), "line-1", "cam-1", point_cloud=np.zeros((5, 4, 3)))

    assert store.objects == {}
    assert kafka.sent == []


def test_flush_reports_undelivered_frames(settings, store):
    producer, _ = make_producer(settings, store, fail=True)
    ref = producer.send_frame(TIRE_IMAGE, "line-1", "cam-1")

    with pytest.raises(ProducerError, match=ref.frame_id):
        producer.flush()
