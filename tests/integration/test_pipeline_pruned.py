"""End to end with a pruned and quantized ViT: the worker serves it through Kafka and MinIO.

One ``qcstream compress`` call prunes a small DINOv2 tire model to half its
FLOPs and exports it to ONNX Runtime int8. The worker loads the result, logs
how it was compressed, and scores real tire frames.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcstream.cli import main as cli_main
from qcstream.models import data as data_io
from qcstream.models.config import DetectorConfig
from qcstream.models.detector import PatchCoreDetector, load_detector
from qcstream.streams.producer import replay_folder
from qcstream.streams.records import InspectionResult
from qcstream.streams.topics import ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pruned_model_dir(tire_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 112 px DINOv2 model on 8 tire frames, pruned to 0.5 FLOPs and exported to int8."""
    train = tmp_path_factory.mktemp("train-good")
    for source in sorted((tire_root / "train" / "good" / "rgb").glob("*.png"))[:8]:
        (train / source.name).symlink_to(source)
    validation = tire_root / "validation" / "good"
    config = DetectorConfig(backbone="dinov2_vits14", image_size=(112, 112), layers=(3,), coreset_ratio=0.2)
    validation_images = [s.image_path for s in data_io.discover(tire_root, "validation")][:4]
    float_dir = PatchCoreDetector(config).fit(sorted(train.glob("*.png")), validation_images, progress=False).save(tmp_path_factory.mktemp("float"))
    output = tmp_path_factory.mktemp("pruned-int8")

    code = cli_main([
        "compress", str(train), "--model-dir", str(float_dir), "--validation", str(validation),
        "--prune", "0.5", "--export", "onnx-int8", "--calibration-frames", "8", "--output", str(output),
    ])

    assert code == 0
    return output


def test_worker_serves_pruned_int8_model(pipeline_settings, start_worker, collect_messages, pruned_model_dir: Path, tire_root: Path):
    meta = json.loads((pruned_model_dir / "config.json").read_text())
    assert meta["backbone_form"] == "onnx-int8"
    assert meta["pruning"]["flops"] <= 0.5
    settings = pipeline_settings(pruned_model_dir)
    ensure_topics(settings)
    worker = start_worker(settings)
    frames = [tire_root / "test" / kind / "rgb" / "000.png" for kind in ("good", "cut", "hole")]

    refs = replay_folder(settings, frames, "line-pruned", "cam-1")
    messages = collect_messages(settings, worker, expected_results=len(refs), expected_letters=0)

    results = [InspectionResult.loads(m.value) for m in messages[settings.topic_results]]
    detector = load_detector(pruned_model_dir)
    assert sorted(r.frame_id for r in results) == sorted(ref.frame_id for ref in refs), worker.log_tail()
    expected, _ = detector.score(frames)
    by_frame = {ref.frame_id: score for ref, score in zip(refs, expected)}
    for result in results:
        assert result.model_version == detector.version
        assert result.image_score == pytest.approx(by_frame[result.frame_id], rel=1e-4)
    assert f"backbone onnx-int8 pruned to {meta['pruning']['flops']:.2f} FLOPs" in worker.log_tail(lines=100000)
    assert worker.poll() is None, worker.log_tail()
