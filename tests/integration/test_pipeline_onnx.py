"""End to end with a deployable model: the worker serves an ONNX Runtime int8 backbone.

The session's fitted tire model (EfficientNet-Lite0) is compressed by
``qcstream compress --export onnx-int8``; the worker loads the result, logs which
form it serves, and scores real tire frames through Kafka and MinIO.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcstream.cli import main as cli_main
from qcstream.models.detector import load_detector
from qcstream.streams.producer import replay_folder
from qcstream.streams.records import InspectionResult
from qcstream.streams.topics import ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def int8_model_dir(fitted_model_dir: Path, tire_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fitted tire model compressed to ONNX Runtime int8, refitted on a few tire frames."""
    train = tmp_path_factory.mktemp("train-good")
    for source in sorted((tire_root / "train" / "good" / "rgb").glob("*.png"))[:12]:
        (train / source.name).symlink_to(source)
    output = tmp_path_factory.mktemp("int8")
    validation = tire_root / "validation" / "good"

    code = cli_main([
        "compress", str(train), "--model-dir", str(fitted_model_dir), "--validation", str(validation),
        "--export", "onnx-int8", "--calibration-frames", "4", "--output", str(output),
    ])

    assert code == 0
    return output


def test_compressed_model_directory_says_its_form(int8_model_dir: Path):
    meta = json.loads((int8_model_dir / "config.json").read_text())

    assert meta["backbone_form"] == "onnx-int8"
    assert (int8_model_dir / "backbone.onnx").is_file()
    assert not (int8_model_dir / "backbone.pt").exists()


def test_worker_serves_the_onnx_runtime_model(pipeline_settings, start_worker, collect_messages, int8_model_dir: Path, tire_root: Path):
    settings = pipeline_settings(int8_model_dir)
    ensure_topics(settings)
    worker = start_worker(settings)
    frames = [tire_root / "test" / kind / "rgb" / "000.png" for kind in ("good", "cut", "hole")]

    refs = replay_folder(settings, frames, "line-onnx", "cam-1")
    messages = collect_messages(settings, worker, expected_results=len(refs), expected_letters=0)

    results = [InspectionResult.loads(m.value) for m in messages[settings.topic_results]]
    detector = load_detector(int8_model_dir)
    assert sorted(r.frame_id for r in results) == sorted(ref.frame_id for ref in refs), worker.log_tail()
    assert {r.model_version for r in results} == {detector.version}
    for result in results:
        assert result.threshold == pytest.approx(detector.threshold_)
    assert "backbone onnx-int8" in worker.log_tail(lines=100000)
    assert worker.poll() is None, worker.log_tail()
