"""The qcstream command-line tool, called as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from qcstream.cli import build_parser, main
from qcstream.storage.parquet_sink import ParquetSink
from qcstream.streams.records import InspectionResult, Label


def make_result(frame_id: str, line_id: str, is_defect: bool, captured_at: float) -> InspectionResult:
    return InspectionResult(
        frame_id=frame_id, line_id=line_id, camera_id="cam-1", captured_at=captured_at,
        inspected_at=captured_at + 0.5, image_score=2.0 if is_defect else 1.0, threshold=1.5,
        is_defect=is_defect, mode="rgb", model_version="m1", maps_bucket="anomaly-maps",
        anomaly_map_png_key=f"{line_id}/x/{frame_id}.png", anomaly_map_raw_key=f"{line_id}/x/{frame_id}.npz",
        detector_ms=100.0, latency_ms=500.0,
    )


def test_help_lists_every_subcommand():
    completed = subprocess.run([sys.executable, "-m", "qcstream.cli", "--help"], capture_output=True, text=True, check=True)

    for name in ("services", "fit", "evaluate", "calibrate", "produce", "worker", "label", "report", "demo"):
        assert name in completed.stdout


def test_parser_rejects_invalid_image_size():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "folder", "--image-size", "big"])


def test_report_prints_hand_computed_rates(tmp_path, monkeypatch, capsys):
    # line-a: defects f1 (caught), f2 (missed); good f3 (flagged), f4, f5 -> FNR 1/2, FPR 1/3.
    now = time.time()
    predicted = {"f1": True, "f2": False, "f3": True, "f4": False, "f5": False}
    truth = {"f1": True, "f2": True, "f3": False, "f4": False, "f5": False}
    ParquetSink(tmp_path, "results").write_batch([make_result(f, "line-a", p, now - 10) for f, p in predicted.items()])
    ParquetSink(tmp_path, "labels").write_batch(
        [Label(frame_id=f, line_id="line-a", is_defect=d, labelled_at=now - 5) for f, d in truth.items()]
    )
    monkeypatch.setenv("QCSTREAM_DATA_DIR", str(tmp_path))

    assert main(["report"]) == 0

    output = capsys.readouterr().out
    row = next(line for line in output.splitlines() if line.startswith("line-a"))
    assert "1/2" in row
    assert "50.0%" in row
    assert "1/3" in row
    assert "33.3%" in row
    assert "40.0%" in row  # defect rate: 2 of 5 frames flagged


def test_fit_then_evaluate_json(tire_root, tmp_path, capsys):
    # A folder of 12 good images, linked from the training split, keeps the fit short.
    train = tmp_path / "good"
    train.mkdir()
    for image in sorted((tire_root / "train" / "good" / "rgb").glob("*.png"))[:12]:
        (train / image.name).symlink_to(image)
    model_dir = tmp_path / "model"

    assert main(["fit", str(train), "--model-dir", str(model_dir), "--image-size", "224"]) == 0
    assert (model_dir / "config.json").is_file()
    assert "saved to" in capsys.readouterr().out

    metrics_file = tmp_path / "metrics.json"
    assert main(["evaluate", str(tire_root), "--model-dir", str(model_dir), "--json", str(metrics_file)]) == 0

    metrics = json.loads(metrics_file.read_text())
    assert metrics["n_images"] == 58
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert 0.5 < metrics["pixel_auroc"] <= 1.0
    assert "image AUROC" in capsys.readouterr().out


def test_missing_model_reports_fix(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--model-dir", str(tmp_path / "none")]) == 1

    assert "qcstream fit" in capsys.readouterr().err


def test_fit_options_reach_the_saved_config(tire_root, tmp_path):
    train = tmp_path / "good"
    train.mkdir()
    for image in sorted((tire_root / "train" / "good" / "rgb").glob("*.png"))[:4]:
        (train / image.name).symlink_to(image)
    model_dir = tmp_path / "model"

    assert main([
        "fit", str(train), "--model-dir", str(model_dir), "--image-size", "224", "--feature-grid", "12",
        "--coreset-chunk-rows", "100", "--memory-budget-mb", "64",
    ]) == 0

    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("config", config)
    assert config["feature_grid"] == [12, 12]
    assert config["coreset_chunk_rows"] == 100
    assert config["memory_budget_mb"] == 64


def test_fit_over_memory_budget_says_what_to_change(tire_root, tmp_path, capsys):
    train = tmp_path / "good"
    train.mkdir()
    for image in sorted((tire_root / "train" / "good" / "rgb").glob("*.png"))[:4]:
        (train / image.name).symlink_to(image)

    # 4 images x 16x16 patches x 384 dims: a 0.5 coreset is 512 rows = 0.375 MiB in fp16,
    # plus a 100-row chunk buffer of 0.12 MiB; a 0.3 MiB budget cannot hold both.
    code = main([
        "fit", str(train), "--model-dir", str(tmp_path / "model"), "--backbone", "dinov2_vits14", "--image-size", "224",
        "--coreset-ratio", "0.5", "--coreset-chunk-rows", "100", "--memory-budget-mb", "0.3",
    ])

    assert code == 1
    error = capsys.readouterr().err
    assert "memory budget" in error
    assert "lower coreset_ratio to" in error
    assert not (tmp_path / "model").exists()
