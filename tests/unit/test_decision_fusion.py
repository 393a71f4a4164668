"""Decision-layer fusion: one-class SVM over bank scores, per pixel and saved to plain arrays."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.svm import OneClassSVM

from qcstream.models import decision_fusion
from qcstream.models.decision_fusion import ScoreFusion, pixel_vectors
from qcstream.models.metrics import image_auroc


def normal_scores(n: int, seed: int) -> np.ndarray:
    """Score vectors ``(n, 3)`` of normal frames: three banks that rise and fall together."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, 1))
    offsets = np.array([2.0, 3.0, 1.0])
    slopes = np.array([0.5, 0.4, 0.3])
    return offsets + slopes * shared + 0.1 * rng.normal(size=(n, 3))


def mixed_test_set(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normal vectors, then anomalies raised in column 0 only and in column 1 only."""
    normals = normal_scores(200, seed)
    in_column_0 = normal_scores(50, seed + 1)
    in_column_0[:, 0] += 1.0
    in_column_1 = normal_scores(50, seed + 2)
    in_column_1[:, 1] += 1.0
    scores = np.concatenate([normals, in_column_0, in_column_1])
    labels = np.concatenate([np.zeros(200), np.ones(100)])
    return scores, labels


@pytest.mark.parametrize("kernel, at_least", [("linear", 0.78), ("rbf", 0.9)])
def test_fused_auroc_beats_every_single_bank(kernel, at_least):
    fusion = ScoreFusion(kernel=kernel).fit(normal_scores(400, seed=0))
    scores, labels = mixed_test_set(seed=10)

    fused_auroc = image_auroc(labels, fusion.score(scores))

    single_aurocs = [image_auroc(labels, scores[:, column]) for column in range(3)]
    assert fused_auroc >= max(single_aurocs)
    # The RBF boundary also catches the broken correlation between banks, so it gains more.
    assert fused_auroc > at_least, f"fused AUROC {fused_auroc:.3f}, single banks {single_aurocs}"


def test_score_is_negated_sklearn_decision_function():
    train = normal_scores(300, seed=1)
    queries, _ = mixed_test_set(seed=11)
    fusion = ScoreFusion(kernel="rbf", nu=0.3, max_samples=None).fit(train)

    # Standardised by the normal statistics, with values below the normal mean raised to it.
    standardize = lambda values: np.maximum((values - train.mean(axis=0)) / train.std(axis=0), 0.0)  # noqa: E731
    reference = OneClassSVM(kernel="rbf", nu=0.3, gamma="scale").fit(standardize(train))

    np.testing.assert_allclose(fusion.score(queries), -reference.decision_function(standardize(queries)), atol=1e-9)
    assert fusion.gamma_ == pytest.approx(1.0 / (3 * standardize(train).var()))


def test_pixel_maps_match_per_vector_scoring(monkeypatch):
    monkeypatch.setattr(decision_fusion, "SCORE_BLOCK_ROWS", 7)
    fusion = ScoreFusion().fit(normal_scores(300, seed=2))
    maps = np.moveaxis(normal_scores(2 * 5 * 4, seed=12).reshape(2, 5, 4, 3), -1, 1)
    maps[1, 0, 2:4, 1:3] += 10.0

    fused_batch = fusion.score_maps(maps)
    fused_single = fusion.score_maps(maps[1])

    assert fused_batch.shape == (2, 5, 4)
    for b in range(2):
        for row in range(5):
            for col in range(4):
                expected = fusion.score(maps[b, :, row, col].reshape(1, -1))[0]
                assert fused_batch[b, row, col] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(fused_single, fused_batch[1], atol=1e-12)
    assert fused_single[2:4, 1:3].min() > np.delete(fused_single.ravel(), [9, 10, 13, 14]).max()


def test_pixel_vectors_order():
    maps = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)

    vectors = pixel_vectors(maps)

    assert vectors.shape == (8, 3)
    np.testing.assert_array_equal(vectors[5], maps[1, :, 0, 1])


def test_subsample_is_bounded_and_seeded():
    train = normal_scores(3000, seed=3)

    first = ScoreFusion(max_samples=200, seed=4).fit(train)
    again = ScoreFusion(max_samples=200, seed=4).fit(train)
    other = ScoreFusion(max_samples=200, seed=5).fit(train)

    assert first.support_vectors_.shape[0] <= 200
    np.testing.assert_array_equal(first.support_vectors_, again.support_vectors_)
    assert not np.array_equal(first.support_vectors_, other.support_vectors_)
    # Standardisation uses every normal vector, not only the subsample.
    np.testing.assert_allclose(first.mean_, train.mean(axis=0))


def test_fit_maps_uses_every_pixel_vector():
    maps = np.moveaxis(normal_scores(3 * 4 * 4, seed=6).reshape(3, 4, 4, 3), -1, 1)

    fusion = ScoreFusion(max_samples=None).fit_maps(maps)

    np.testing.assert_allclose(fusion.mean_, maps.mean(axis=(0, 2, 3)))


def test_saved_fusion_scores_the_same(tmp_path):
    fusion = ScoreFusion(nu=0.2, max_samples=150, seed=7).fit(normal_scores(400, seed=7))
    queries, _ = mixed_test_set(seed=13)

    loaded = ScoreFusion.load(fusion.save(tmp_path / "image_fusion.npz"))

    np.testing.assert_array_equal(loaded.score(queries), fusion.score(queries))
    assert (loaded.nu, loaded.max_samples, loaded.seed) == (0.2, 150, 7)


def test_arrays_round_trip_through_savez(tmp_path):
    fusion = ScoreFusion(max_samples=None).fit(normal_scores(120, seed=8))
    queries, _ = mixed_test_set(seed=14)
    path = tmp_path / "score_fusion.npz"

    np.savez(path, **{f"image_{name}": value for name, value in fusion.to_arrays().items()})
    with np.load(path, allow_pickle=False) as arrays:
        loaded = ScoreFusion.from_arrays({name[6:]: arrays[name] for name in arrays.files})

    np.testing.assert_array_equal(loaded.score(queries), fusion.score(queries))


def test_from_arrays_rejects_missing_arrays():
    arrays = ScoreFusion().fit(normal_scores(30, seed=9)).to_arrays()
    del arrays["dual_coef"]

    with pytest.raises(ValueError, match=r"missing \['dual_coef'\]"):
        ScoreFusion.from_arrays(arrays)


def test_load_rejects_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no score fusion file"):
        ScoreFusion.load(tmp_path / "absent.npz")


def test_constant_column_keeps_unit_scale(caplog):
    train = normal_scores(100, seed=8)
    train[:, 2] = 4.0

    with caplog.at_level(logging.WARNING, logger="qcstream.models.decision_fusion"):
        fusion = ScoreFusion().fit(train)

    assert fusion.scale_[2] == 1.0
    assert "constant" in caplog.text
    assert np.isfinite(fusion.score(normal_scores(5, seed=9))).all()


def test_rejects_bad_input():
    fusion = ScoreFusion()
    with pytest.raises(RuntimeError, match="not fitted"):
        fusion.score(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="nu must be in"):
        ScoreFusion(nu=0).fit(normal_scores(10, seed=0))
    with pytest.raises(ValueError, match=r"reshape\(1, -1\)"):
        fusion.fit(np.zeros(3))

    fusion.fit(normal_scores(50, seed=0))
    with pytest.raises(ValueError, match="2 columns but the fusion was fitted on 3"):
        fusion.score(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        fusion.score(np.full((1, 3), np.nan))
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        fusion.score_maps(np.zeros((3, 4)))


def test_rbf_scores_below_normal_do_not_look_anomalous():
    train = normal_scores(300, seed=3)
    fusion = ScoreFusion(kernel="rbf").fit(train)
    mean = train.mean(axis=0, keepdims=True)

    far_below = mean - 10.0 * train.std(axis=0)
    far_above = mean + 10.0 * train.std(axis=0)

    assert fusion.score(far_below)[0] == pytest.approx(fusion.score(mean)[0])
    assert fusion.score(far_above)[0] > fusion.score(mean)[0]


def test_linear_score_matches_sklearn():
    train = normal_scores(300, seed=4)
    queries, _ = mixed_test_set(seed=14)
    fusion = ScoreFusion(nu=0.3, max_samples=None).fit(train)

    # Divided by the normal spread, not centred: the origin is a perfect match in every bank.
    reference = OneClassSVM(kernel="linear", nu=0.3).fit(train / train.std(axis=0))

    np.testing.assert_allclose(fusion.score(queries), reference.score_samples(queries / train.std(axis=0)), rtol=1e-9)


def test_linear_score_rises_without_saturating():
    fusion = ScoreFusion().fit(normal_scores(300, seed=5))
    base = normal_scores(1, seed=15)

    for column in range(3):
        bumped = base.copy()
        scores = []
        for step in range(6):
            bumped[0, column] = base[0, column] + 10.0**step
            scores.append(fusion.score(bumped)[0])
        assert np.all(np.diff(scores) > 0), f"bank {column}: {scores}"


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="poly"):
        ScoreFusion(kernel="poly").fit(normal_scores(10, seed=6))
