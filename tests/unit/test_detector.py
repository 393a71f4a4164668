"""The RGB detector fits, scores, calibrates and reloads to the same numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qcstream.models import data as data_io
from qcstream.models.coreset import greedy_coreset
from qcstream.models.detector import DetectorConfig, ModelError, PatchCoreDetector, load_detector
from qcstream.models.memory_bank import nearest_neighbor_distances


def test_nearest_neighbor_matches_cdist():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(50, 16, generator=generator)
    bank = torch.randn(300, 16, generator=generator)

    ours = nearest_neighbor_distances(queries, bank, chunk_size=64)

    expected = torch.cdist(queries, bank).min(dim=1).values
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_coreset_picks_spread_points():
    # Two tight clusters far apart: a 2-point k-center coreset takes one of each.
    cluster_a = torch.zeros(100, 4) + torch.randn(100, 4) * 0.01
    cluster_b = torch.full((100, 4), 10.0) + torch.randn(100, 4) * 0.01
    features = torch.cat([cluster_a, cluster_b])

    selected = greedy_coreset(features, 2, projection_dim=None, progress=False)

    assert sorted(int(i) >= 100 for i in selected) == [False, True]


def test_coreset_returns_all_rows_when_asked_for_more():
    assert torch.equal(greedy_coreset(torch.randn(5, 3), 10, progress=False), torch.arange(5))


@pytest.fixture(scope="module")
def tiny_fit(tire_root, tmp_path_factory):
    train = [s.image_path for s in data_io.discover(tire_root, "train")][:12]
    validation = [s.image_path for s in data_io.discover(tire_root, "validation")][:6]
    detector = PatchCoreDetector(DetectorConfig(coreset_ratio=0.2)).fit(train, validation, progress=False)
    model_dir = detector.save(tmp_path_factory.mktemp("model"))
    return detector, model_dir


def test_detector_reload_gives_same_scores(tiny_fit, tire_root):
    detector, model_dir = tiny_fit
    image = data_io.load_rgb(next(s.image_path for s in data_io.discover(tire_root, "test") if s.defect_type == "cut"))

    first = detector.predict(image)
    again = load_detector(model_dir).predict(image)

    assert again.image_score == pytest.approx(first.image_score, rel=1e-5)
    np.testing.assert_allclose(again.anomaly_map, first.anomaly_map, rtol=1e-5, atol=1e-5)
    assert load_detector(model_dir).version == detector.version


def test_prediction_map_has_image_size(tiny_fit, tire_root):
    detector, _ = tiny_fit
    image = data_io.load_rgb(data_io.discover(tire_root, "test")[0].image_path)

    prediction = detector.predict(image)

    assert prediction.anomaly_map.shape == image.shape[:2]
    assert prediction.anomaly_map.dtype == np.float32
    assert np.isfinite(prediction.anomaly_map).all()
    assert prediction.is_defect == (prediction.image_score >= prediction.threshold)


def test_threshold_flags_at_most_target_of_validation(tiny_fit, tire_root):
    detector, _ = tiny_fit
    validation = [s.image_path for s in data_io.discover(tire_root, "validation")][:6]

    scores, _ = detector.score(validation)

    assert np.mean(scores >= detector.threshold_) <= detector.config.target_fpr


def test_training_image_scores_lower_than_defect(tiny_fit, tire_root):
    detector, _ = tiny_fit
    train_image = data_io.load_rgb(data_io.discover(tire_root, "train")[0].image_path)

    train_score = detector.predict(train_image).image_score

    # A training image's patches are in the bank (up to coreset coverage), so its score is near zero.
    assert train_score < detector.threshold_


def test_saved_config_records_backbone_form(tiny_fit):
    _, model_dir = tiny_fit

    meta = json.loads((model_dir / "config.json").read_text())

    assert meta["backbone_form"] == "torch-fp32"
    assert meta["config"]["layers"] == list(DetectorConfig().layers)
    assert meta["threshold"] > 0


def test_load_missing_model_dir_explains_fix(tmp_path):
    with pytest.raises(ModelError, match="qcstream fit"):
        load_detector(tmp_path)


def test_invalid_image_size_rejected():
    with pytest.raises(ValueError, match="multiples of 14"):
        DetectorConfig(backbone="dinov2_vits14", image_size=(225, 224))
