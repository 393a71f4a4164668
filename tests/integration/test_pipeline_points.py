"""End to end with point clouds: frames and their organized clouds through Kafka, MinIO and the worker.

A fused RGB + FPFH model fitted on generated scans serves the worker. Frames sent
with their cloud must be scored in the fused mode, a frame without one RGB-only,
and a frame whose cloud is corrupt must land on the dead-letter topic.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from qcstream.models import data as data_io
from qcstream.models.detector import load_detector
from qcstream.settings import Settings
from qcstream.storage.objects import ObjectStore, point_cloud_key
from qcstream.streams.producer import new_kafka_producer, replay_folder
from qcstream.streams.records import DeadLetter, FrameRef, InspectionResult
from qcstream.streams.topics import ensure_topics

pytestmark = pytest.mark.integration


def send_corrupt_cloud(settings: Settings, image_ref: FrameRef) -> FrameRef:
    """Send a reference to a good image whose point cloud payload is not an ``.npz`` archive."""
    captured_at = time.time()
    key = point_cloud_key("line-3d", "cam-3d", captured_at, "bad-cloud-1")
    ObjectStore(settings).put_bytes(settings.bucket_frames, key, b"PK\x03\x04 not really a zip archive")
    ref = FrameRef(
        frame_id="bad-cloud-1",
        line_id="line-3d",
        camera_id="cam-3d",
        captured_at=captured_at,
        payload_bucket=image_ref.payload_bucket,
        payload_key=image_ref.payload_key,
        payload_format=image_ref.payload_format,
        width=image_ref.width,
        height=image_ref.height,
        point_cloud_key=key,
    )
    producer = new_kafka_producer(settings, client_id="qcstream-test")
    try:
        producer.send(settings.topic_frames, key=b"line-3d", value=ref.dumps())
        producer.flush(timeout=30)
    finally:
        producer.close()
    return ref


def test_worker_scores_frames_with_their_point_clouds(
    pipeline_settings, start_worker, collect_messages, multimodal_model_dir: Path, scan_root: Path
):
    settings = pipeline_settings(multimodal_model_dir)
    ensure_topics(settings)
    worker = start_worker(settings)
    samples = [s for s in data_io.discover(scan_root, "test") if s.defect_type in ("good", "dent", "stain")][::2]

    with_clouds = replay_folder(
        settings, [s.image_path for s in samples], "line-3d", "cam-3d", point_clouds=[s.xyz_path for s in samples]
    )
    without_cloud = replay_folder(settings, [samples[0].image_path], "line-3d", "cam-rgb")
    corrupt = send_corrupt_cloud(settings, with_clouds[0])

    expected = len(with_clouds) + len(without_cloud)
    messages = collect_messages(settings, worker, expected_results=expected, expected_letters=1)

    results = {r.frame_id: r for r in (InspectionResult.loads(m.value) for m in messages[settings.topic_results])}
    assert sorted(results) == sorted(ref.frame_id for ref in with_clouds + without_cloud), worker.log_tail()
    thresholds = load_detector(multimodal_model_dir).thresholds_
    for ref in with_clouds:
        assert ref.point_cloud_key is not None
        assert results[ref.frame_id].mode == "rgb+xyz"
        assert results[ref.frame_id].threshold == pytest.approx(thresholds["rgb+xyz"])
    assert results[without_cloud[0].frame_id].mode == "rgb"
    assert results[without_cloud[0].frame_id].threshold == pytest.approx(thresholds["rgb"])

    letters = [DeadLetter.loads(m.value) for m in messages[settings.topic_dead_letter]]
    assert [letter.frame_id for letter in letters] == [corrupt.frame_id]
    assert "point cloud" in letters[0].reason
    assert worker.poll() is None, worker.log_tail()
