"""Unsupervised feature fusion: the InfoNCE loss by hand, training, retrieval and persistence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qcstream.models.fusion import FeatureFusion, patch_info_nce, train_fusion

RGB_DIM, POINT_DIM = 32, 24
TRAIN_SETTINGS = dict(epochs=15, batch_size=256, lr=3e-3, hidden_dim=64, out_dim=16, temperature=0.1, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread: these matrices are small, and two threads on a shared machine run slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def paired_views(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two noisy nonlinear views ``(n, 32)`` and ``(n, 24)`` of the same 4-D latent, on different scales."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 4))
    mixing = np.random.default_rng(100)  # The same views for every seed.
    rgb_in, rgb_out = mixing.normal(size=(4, 16)), mixing.normal(size=(16, RGB_DIM))
    point_in, point_out = mixing.normal(size=(4, 16)), mixing.normal(size=(16, POINT_DIM))

    rgb = np.tanh(latent @ rgb_in) @ rgb_out + 0.3 * rng.normal(size=(n, RGB_DIM))
    point = 5.0 * np.sin(latent @ point_in) @ point_out + rng.normal(size=(n, POINT_DIM))
    return rgb.astype(np.float32), point.astype(np.float32)


def retrieval_accuracy(model: FeatureFusion, rgb: np.ndarray, point: np.ndarray) -> float:
    """Fraction of RGB patches whose most similar point patch is their own pair."""
    with torch.no_grad():
        rgb_embedding, point_embedding = model.project(torch.from_numpy(rgb), torch.from_numpy(point))
    nearest = (rgb_embedding @ point_embedding.T).argmax(dim=1)
    return float((nearest == torch.arange(len(rgb))).float().mean())


# --- InfoNCE ---------------------------------------------------------------------------


def test_info_nce_two_pairs_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]])

    loss = patch_info_nce(a, b, temperature=0.5)

    # Cosine similarities [[1, 1/sqrt2], [0, 1/sqrt2]], divided by 0.5.
    r = math.sqrt(2.0)
    a_to_b = (-math.log(math.exp(2) / (math.exp(2) + math.exp(r))) - math.log(math.exp(r) / (1 + math.exp(r)))) / 2
    b_to_a = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(0.5)) / 2
    assert loss.item() == pytest.approx((a_to_b + b_to_a) / 2, rel=1e-6)


def test_info_nce_three_pairs_by_loop():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    b = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    temperature = 0.2

    loss = patch_info_nce(a, b, temperature)

    def cosine(u, v):
        return float(u @ v) / (float(u.norm()) * float(v.norm()))

    logits = [[cosine(a[i], b[j]) / temperature for j in range(3)] for i in range(3)]
    a_to_b = [-logits[i][i] + math.log(sum(math.exp(logits[i][j]) for j in range(3))) for i in range(3)]
    b_to_a = [-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(3))) for j in range(3)]
    assert loss.item() == pytest.approx((sum(a_to_b) / 3 + sum(b_to_a) / 3) / 2, rel=1e-12)


def test_info_nce_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(3, 3\)"):
        patch_info_nce(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        patch_info_nce(torch.ones(2, 3), torch.ones(2, 3), temperature=0)


# --- model -----------------------------------------------------------------------------


def test_fused_features_join_unit_projections():
    torch.manual_seed(0)
    model = FeatureFusion(RGB_DIM, POINT_DIM, hidden_dim=8, out_dim=5)
    rgb, point = paired_views(7, seed=0)

    with torch.no_grad():
        fused = model(torch.from_numpy(rgb), torch.from_numpy(point))
        rgb_embedding, point_embedding = model.project(torch.from_numpy(rgb), torch.from_numpy(point))

    assert tuple(fused.shape) == (7, 10)
    torch.testing.assert_close(fused[:, :5], rgb_embedding)
    torch.testing.assert_close(fused[:, 5:], point_embedding)
    torch.testing.assert_close(fused[:, :5].norm(dim=1), torch.ones(7))
    torch.testing.assert_close(fused[:, 5:].norm(dim=1), torch.ones(7))


def test_model_rejects_mismatched_patches():
    model = FeatureFusion(RGB_DIM, POINT_DIM, hidden_dim=8, out_dim=4)
    with pytest.raises(ValueError, match=rf"point patches must be \(N, {POINT_DIM}\), got shape \(3, 5\)"):
        model(torch.ones(3, RGB_DIM), torch.ones(3, 5))
    with pytest.raises(ValueError, match="got 3 and 2 rows"):
        model(torch.ones(3, RGB_DIM), torch.ones(2, POINT_DIM))


# --- training --------------------------------------------------------------------------


def test_training_improves_held_out_retrieval():
    train_rgb, train_point = paired_views(2048, seed=0)
    test_rgb, test_point = paired_views(256, seed=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = FeatureFusion(RGB_DIM, POINT_DIM, TRAIN_SETTINGS["hidden_dim"], TRAIN_SETTINGS["out_dim"])

    trained = train_fusion(train_rgb, train_point, seed=0, **TRAIN_SETTINGS)

    chance = 1 / len(test_rgb)
    trained_accuracy = retrieval_accuracy(trained, test_rgb, test_point)
    untrained_accuracy = retrieval_accuracy(untrained, test_rgb, test_point)
    assert trained_accuracy > 50 * chance
    assert trained_accuracy > untrained_accuracy + 0.2


def test_training_is_deterministic_by_seed():
    rgb, point = paired_views(300, seed=2)
    settings = {**TRAIN_SETTINGS, "epochs": 2}
    global_state = torch.get_rng_state()

    first = train_fusion(rgb, point, seed=5, **settings).state_dict()
    second = train_fusion(rgb, point, seed=5, **settings).state_dict()
    other = train_fusion(rgb, point, seed=6, **settings).state_dict()

    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    assert not torch.equal(first["rgb_head.0.weight"], other["rgb_head.0.weight"])
    assert torch.equal(torch.get_rng_state(), global_state), "training must not move the global RNG"


def test_training_rejects_bad_input():
    rgb, point = paired_views(10, seed=3)
    with pytest.raises(ValueError, match="10 rows but point_patches has 9"):
        train_fusion(rgb, point[:9], progress=False)
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        train_fusion(rgb, point, batch_size=1, progress=False)
    rgb[0, 0] = np.nan
    with pytest.raises(ValueError, match="rgb_patches contains NaN"):
        train_fusion(rgb, point, progress=False)


# --- persistence -----------------------------------------------------------------------


def test_saved_model_reloads_with_same_outputs(tmp_path):
    rgb, point = paired_views(200, seed=4)
    model = train_fusion(rgb, point, seed=1, **{**TRAIN_SETTINGS, "epochs": 1})
    path = tmp_path / "fusion.pt"

    torch.save({"config": model.to_dict(), "state_dict": model.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    loaded = FeatureFusion.from_dict(saved["config"])
    loaded.load_state_dict(saved["state_dict"])
    loaded.eval()

    assert json.loads(json.dumps(model.to_dict())) == loaded.to_dict()
    with torch.no_grad():
        expected = model(torch.from_numpy(rgb), torch.from_numpy(point))
        actual = loaded(torch.from_numpy(rgb), torch.from_numpy(point))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    torch.testing.assert_close(loaded.rgb_std, torch.from_numpy(rgb).std(dim=0))


def test_from_dict_rejects_other_format_version():
    config = FeatureFusion(4, 3, 8, 2).to_dict()
    config["format_version"] = 99

    with pytest.raises(ValueError, match="format_version 99"):
        FeatureFusion.from_dict(config)
