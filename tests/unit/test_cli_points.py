"""The point-cloud commands, called as a user would: generate scans, pretrain, fit, evaluate."""

from __future__ import annotations

import json

import pytest

from qcstream.cli import main
from qcstream.cli_points import feature_blocks_for
from qcstream.models.detector import load_detector


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    output = tmp_path_factory.mktemp("generated")
    assert main([
        "generate-scans", str(output), "--parts", "ring", "--size", "64", "--train", "4", "--validation", "3",
        "--test-good", "2", "--test-per-defect", "1",
    ]) == 0
    return output / "ring"


def test_generate_scans_writes_the_mvtec_3d_layout(scans):
    assert len(list((scans / "train" / "good" / "xyz").glob("*.tiff"))) == 4
    assert len(list((scans / "validation" / "good" / "rgb").glob("*.png"))) == 3
    defect_types = sorted(folder.name for folder in (scans / "test").iterdir())
    assert defect_types == ["bump", "contamination", "cut", "dent", "good", "hole", "stain"]
    assert (scans / "test" / "dent" / "gt" / "000.png").is_file()


def test_generate_scans_existing_folder(scans, capsys):
    assert main(["generate-scans", str(scans.parent), "--parts", "ring", "--size", "64", "--train", "1"]) == 1
    assert "ring" in capsys.readouterr().err


def test_fit_fused_then_evaluate(scans, tmp_path, capsys):
    model_dir = tmp_path / "model"

    assert main([
        "fit", str(scans / "train" / "good"), "--model-dir", str(model_dir), "--mode", "rgb+xyz",
        "--image-size", "56", "--feature-grid", "8", "--coreset-ratio", "0.5",
    ]) == 0
    assert "thresholds: rgb" in capsys.readouterr().out

    metrics_file = tmp_path / "metrics.json"
    report = tmp_path / "report"
    assert main(["evaluate", str(scans), "--model-dir", str(model_dir), "--json", str(metrics_file), "--report", str(report)]) == 0
    assert (report / "index.html").is_file()

    metrics = json.loads(metrics_file.read_text())
    assert metrics["n_images"] == 8
    assert metrics["n_defective"] == 6
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert load_detector(model_dir).config.mode == "rgb+xyz"


def test_pretrain_points_then_fit_with_point_mae(scans, tmp_path, capsys):
    checkpoint = tmp_path / "point_mae.pth"

    assert main([
        "pretrain-points", str(scans), "--output", str(checkpoint), "--epochs", "2", "--batch-size", "2",
        "--points", "256", "--groups", "8", "--group-size", "8", "--depth", "2", "--width", "64",
        "--cloud-size", "64",
    ]) == 0
    assert checkpoint.is_file()
    assert "--point-checkpoint" in capsys.readouterr().out

    model_dir = tmp_path / "model"
    assert main([
        "fit", str(scans / "train" / "good"), "--model-dir", str(model_dir), "--mode", "xyz",
        "--point-features", "point_mae", "--point-checkpoint", str(checkpoint), "--point-mae-points", "256",
        "--feature-grid", "8", "--coreset-ratio", "0.5",
    ]) == 0

    detector = load_detector(model_dir)
    assert set(detector.banks_) == {"points"}
    # A 2-block encoder joins the outputs of blocks 0 and 1, 64 channels each.
    assert detector.banks_["points"].shape[1] == 2 * 64


@pytest.mark.parametrize("depth, blocks", [(12, (3, 7, 11)), (6, (1, 3, 5)), (2, (0, 1)), (1, (0,))])
def test_feature_blocks_follow_m3dm_for_any_depth(depth, blocks):
    assert feature_blocks_for(depth) == blocks


def test_fit_point_mae_missing_checkpoint(scans, tmp_path, capsys):
    code = main([
        "fit", str(scans / "train" / "good"), "--model-dir", str(tmp_path / "model"), "--mode", "xyz",
        "--point-features", "point_mae",
    ])

    assert code == 1
    assert "pretrain-points" in capsys.readouterr().err


def test_pretrain_points_needs_clouds(tire_root, tmp_path, capsys):
    code = main(["pretrain-points", str(tire_root), "--output", str(tmp_path / "p.pth"), "--epochs", "1"])

    assert code == 1
    assert "xyz point clouds" in capsys.readouterr().err


def test_produce_sends_the_cloud_beside_each_image(scans, monkeypatch):
    # The sending itself runs against real Kafka and MinIO in the integration tests.
    sent = {}

    def record(settings, images, line_id, camera_id, interval_s, point_clouds):
        sent.update(images=list(images), clouds=list(point_clouds))
        return []

    monkeypatch.setattr("qcstream.streams.producer.replay_folder", record)
    image = scans / "test" / "dent" / "rgb" / "000.png"

    assert main(["produce", str(image), str(scans / "test"), "--line", "l1", "--camera", "c1"]) == 0

    assert sent["images"][0] == image
    assert sent["clouds"][0] == scans / "test" / "dent" / "xyz" / "000.tiff"
    assert len(sent["clouds"]) == len(sent["images"]) == 9
    assert all(cloud is not None and cloud.suffix == ".tiff" for cloud in sent["clouds"])

    assert main(["produce", str(image), "--line", "l1", "--camera", "c1", "--no-clouds"]) == 0
    assert sent["clouds"] == [None]
