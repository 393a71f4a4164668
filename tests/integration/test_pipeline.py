"""End to end: camera frames through Kafka, the worker and MinIO into Parquet.

Runs the real worker process (fitted model, Faust, Kafka, MinIO, Parquet) on real
tire photos, plus one corrupt payload and one reference of an unknown schema
version that must land on the dead-letter topic without stopping the worker.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import time
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from PIL import Image

from qcstream.models.overlay import caption_band_height
from qcstream.settings import Settings
from qcstream.storage.queries import defect_rates, rolling_rates
from qcstream.storage.objects import ObjectStore, frame_payload_key
from qcstream.streams.inspect import overlay_caption
from qcstream.streams.labels import LabelPublisher, label_from_mask
from qcstream.streams.producer import FrameProducer, new_kafka_producer, replay_folder
from qcstream.streams.records import DeadLetter, FrameRef, InspectionResult, Label
from qcstream.streams.topics import ensure_topics, topic_names

pytestmark = pytest.mark.integration

TIRE_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "mvtec3d_tire"
if not TIRE_ROOT.is_dir():
    pytest.skip(f"real tire frames not found at {TIRE_ROOT}", allow_module_level=True)

TIRE_TEST = TIRE_ROOT / "test"
#: (defect type, file) of the real frames sent; the painted frame is added to these.
REAL_FRAMES = [
    ("good", "002.png"),
    ("cut", "000.png"),
    ("hole", "000.png"),
    ("good", "004.png"),
    ("contamination", "000.png"),
    ("combined", "000.png"),
    ("good", "006.png"),
]


@pytest.fixture
def settings(pipeline_settings, fitted_model_dir: Path) -> Settings:
    """Settings with this test's own consumer group, topics, buckets, data folder and web port."""
    return pipeline_settings(fitted_model_dir)


@pytest.fixture
def worker(settings: Settings, start_worker):
    return start_worker(settings)


def painted_frame() -> np.ndarray:
    """Return a good tire photo with a saturated red square on it, far from any normal patch.

    A model fitted on only 16 tire photos scored it 2.6 times its threshold.
    """
    rgb = np.asarray(Image.open(TIRE_TEST / "good" / "rgb" / "000.png").convert("RGB")).copy()
    rgb[150:250, 100:200] = (255, 0, 0)
    return rgb


def send_good_frames(settings: Settings) -> dict[str, FrameRef]:
    """Send 8 frames over two lines and two cameras; return the references by frame id."""
    images = [TIRE_TEST / kind / "rgb" / name for kind, name in REAL_FRAMES] + [painted_frame()]
    refs = {}
    with FrameProducer(settings) as producer:
        for index, image in enumerate(images):
            line_id = "line-a" if index < 4 else "line-b"
            ref = producer.send_frame(image, line_id=line_id, camera_id=f"cam-{index % 2 + 1}")
            refs[ref.frame_id] = ref
    return refs


def send_bad_frames(settings: Settings) -> tuple[FrameRef, bytes]:
    """Send a reference to a corrupt payload and a reference of schema version 2.0."""
    store = ObjectStore(settings)
    captured_at = time.time()
    corrupt_key = frame_payload_key("line-a", "cam-1", captured_at, "corrupt-1", "png")
    store.put_bytes(settings.bucket_frames, corrupt_key, b"\x89PNG\r\n\x1a\n" + os.urandom(2048), "image/png")
    corrupt = FrameRef(
        frame_id="corrupt-1",
        line_id="line-a",
        camera_id="cam-1",
        captured_at=captured_at,
        payload_bucket=settings.bucket_frames,
        payload_key=corrupt_key,
        payload_format="png",
        width=300,
        height=400,
    )
    future_body = json.loads(dataclasses.replace(corrupt, frame_id="future-1").dumps())
    future_body["schema_version"] = "2.0"
    future_value = json.dumps(future_body).encode()

    producer = new_kafka_producer(settings, client_id="qcstream-test")
    try:
        producer.send(settings.topic_frames, key=b"line-a", value=corrupt.dumps())
        producer.send(settings.topic_frames, key=b"line-b", value=future_value)
        producer.flush(timeout=30)
    finally:
        producer.close()
    return corrupt, future_value


def query(sql: str) -> list[tuple]:
    with duckdb.connect() as connection:
        return connection.execute(sql).fetchall()


def parquet_count(settings: Settings, kind: str) -> int:
    pattern = str(settings.data_dir / kind / "**" / "*.parquet")
    if not list((settings.data_dir / kind).glob("**/*.parquet")):
        return 0
    return query(f"SELECT count(*) FROM read_parquet('{pattern}', hive_partitioning = true)")[0][0]


def wait_for_parquet(settings: Settings, kind: str, expected: int) -> int:
    deadline = time.monotonic() + 60.0
    count = parquet_count(settings, kind)
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        count = parquet_count(settings, kind)
    return count


def partition_count(settings: Settings, topic: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap.split(","))
    try:
        return len(admin.describe_topics([topic])[0]["partitions"])
    finally:
        admin.close()


def test_ensure_topics_creates_missing_once(kafka_settings: Settings):
    run = uuid.uuid4().hex[:8]
    settings = dataclasses.replace(
        kafka_settings,
        topic_frames=f"frames-{run}",
        topic_results=f"results-{run}",
        topic_defects=f"defects-{run}",
        topic_labels=f"labels-{run}",
        topic_dead_letter=f"dead-letter-{run}",
    )

    assert ensure_topics(settings, partitions=3) == topic_names(settings)
    assert ensure_topics(settings, partitions=3) == []
    assert partition_count(settings, settings.topic_frames) == 3


def test_replay_folder_sends_frames_in_order(kafka_settings: Settings):
    run = uuid.uuid4().hex[:8]
    settings = dataclasses.replace(kafka_settings, topic_frames=f"frames-{run}", bucket_frames=f"frames-{run}")
    ensure_topics(settings)
    images = [TIRE_TEST / "good" / "rgb" / name for name in ("002.png", "004.png", "006.png")]

    refs = replay_folder(settings, images, line_id="line-r", camera_id="cam-r")

    consumer = KafkaConsumer(
        settings.topic_frames,
        bootstrap_servers=settings.kafka_bootstrap.split(","),
        group_id=None,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    try:
        received = [(record.key, FrameRef.loads(record.value)) for record in consumer]
    finally:
        consumer.close()
    assert [ref for _, ref in received] == refs
    assert {key for key, _ in received} == {b"line-r"}
    store = ObjectStore(settings)
    for image, ref in zip(images, refs):
        assert store.get_bytes(settings.bucket_frames, ref.payload_key) == image.read_bytes()


def test_frames_flow_from_producer_to_parquet(settings: Settings, worker, collect_messages):
    ensure_topics(settings)
    refs = send_good_frames(settings)
    corrupt, future_value = send_bad_frames(settings)

    messages = collect_messages(settings, worker, expected_results=len(refs), expected_letters=2)

    # Every good frame gives exactly one result, keyed by its line.
    results = [InspectionResult.loads(record.value) for record in messages[settings.topic_results]]
    assert sorted(result.frame_id for result in results) == sorted(refs), worker.log_tail()
    for record, result in zip(messages[settings.topic_results], results):
        ref = refs[result.frame_id]
        assert record.key == ref.line_id.encode()
        assert (result.line_id, result.camera_id, result.captured_at) == (ref.line_id, ref.camera_id, ref.captured_at)
        assert result.latency_ms == pytest.approx((result.inspected_at - ref.captured_at) * 1000.0)

    # Both maps of every frame are in MinIO: the raw map at the frame's size, the overlay
    # as wide as the frame and taller by the band that contains the frame's caption.
    store = ObjectStore(settings)
    for result in results:
        png = store.get_bytes(result.maps_bucket, result.anomaly_map_png_key)
        caption = overlay_caption(result, result.image_score, result.threshold, result.is_defect)
        band = caption_band_height(300, 400, caption)
        assert band > 0
        with Image.open(io.BytesIO(png)) as overlay:
            assert (overlay.format, overlay.size) == ("PNG", (300, 400 + band))
        with np.load(io.BytesIO(store.get_bytes(result.maps_bucket, result.anomaly_map_raw_key))) as archive:
            raw = archive["anomaly_map"]
        assert raw.shape == (400, 300)
        assert raw.dtype == np.float32

    # The defects topic carries exactly the defective results; the painted frame is one.
    defects = [InspectionResult.loads(record.value) for record in messages[settings.topic_defects]]
    assert sorted(d.frame_id for d in defects) == sorted(r.frame_id for r in results if r.is_defect)
    painted = next(r for r in results if r.frame_id == list(refs)[-1])
    assert painted.is_defect, f"score {painted.image_score} below threshold {painted.threshold}"

    # The two bad messages are dead letters with their reasons; the worker lives on.
    letters = {letter.frame_id: letter for letter in map(DeadLetter.loads, (r.value for r in messages[settings.topic_dead_letter]))}
    assert sorted(letters) == ["corrupt-1", "future-1"]
    assert letters["corrupt-1"].reason.startswith(f"invalid payload {settings.bucket_frames}/{corrupt.payload_key}")
    assert "unsupported schema_version '2.0'" in letters["future-1"].reason
    assert letters["future-1"].original_value == future_value.decode()
    assert worker.poll() is None, worker.log_tail()

    # An audit station labels every frame: real ones from their masks, the painted one as a defect.
    frame_list = list(refs.values())
    labels = {}
    with LabelPublisher(settings) as publisher:
        for (kind, name), ref in zip(REAL_FRAMES, frame_list):
            label = label_from_mask(ref.frame_id, ref.line_id, TIRE_TEST / kind / "gt" / name, kind)
            publisher.send(label)
            labels[ref.frame_id] = label.is_defect
        painted_ref = frame_list[-1]
        publisher.send(Label(frame_id=painted_ref.frame_id, line_id=painted_ref.line_id, is_defect=True, labelled_at=time.time(), defect_type="paint"))
        labels[painted_ref.frame_id] = True
        publisher.flush()

    assert wait_for_parquet(settings, "results", len(refs)) == len(refs), worker.log_tail()
    assert wait_for_parquet(settings, "labels", len(labels)) == len(labels), worker.log_tail()
    pattern = str(settings.data_dir / "results" / "**" / "*.parquet")
    stored = dict(query(f"SELECT frame_id, image_score FROM read_parquet('{pattern}')"))
    assert stored == {result.frame_id: result.image_score for result in results}

    # DuckDB's per-line rates equal the rates counted here from the same results and labels.
    predicted = {result.frame_id: result.is_defect for result in results}
    rates = {row.line_id: row for row in rolling_rates(settings.data_dir)}
    volumes = {row.line_id: row for row in defect_rates(settings.data_dir)}
    assert sorted(rates) == ["line-a", "line-b"]
    for line_id in ("line-a", "line-b"):
        frames = [ref.frame_id for ref in frame_list if ref.line_id == line_id]
        defects = [f for f in frames if labels[f]]
        goods = [f for f in frames if not labels[f]]
        missed = sum(1 for f in defects if not predicted[f])
        false_alarms = sum(1 for f in goods if predicted[f])
        row = rates[line_id]
        assert (row.n_labelled, row.n_defects, row.n_good) == (len(frames), len(defects), len(goods))
        assert row.false_negatives == missed
        assert row.false_positives == false_alarms
        assert row.fnr == (missed / len(defects) if defects else None)
        assert row.fpr == (false_alarms / len(goods) if goods else None)
        assert volumes[line_id].frames_inspected == len(frames)
        assert volumes[line_id].predicted_defects == sum(predicted[f] for f in frames)

    # SIGTERM stops the worker cleanly.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, worker.log_tail()
