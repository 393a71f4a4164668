"""Masked point modelling pretrains a tiny Point-MAE encoder on simple shapes.

The Chamfer loss and the normalisation are checked against hand-written references.
Pretraining runs a tiny model for a few dozen steps on one thread: the tensors are
too small to gain from more threads, and on a shared machine extra threads mostly wait.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcstream.models.point_mae import load_point_mae, save_point_mae
from qcstream.models.point_pretrain import (
    PointMAEDecoder,
    chamfer_distance,
    cloud_centroid_and_scale,
    normalize_cloud,
    pretrain_point_mae,
    random_group_mask,
)

TINY_ENCODER = dict(num_groups=16, group_size=16, embed_dim=32, depth=2, num_heads=2, feature_blocks=(0, 1))
NUM_POINTS = 256


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def simple_shapes(num_points: int, seed: int) -> list[np.ndarray]:
    """A sphere, a cube surface, a cylinder and a plane with a bump, shifted and scaled."""
    rng = np.random.default_rng(seed)
    n = num_points

    sphere = rng.normal(size=(n, 3))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)

    cube = rng.uniform(-1, 1, size=(n, 3))
    cube[np.arange(n), rng.integers(0, 3, n)] = rng.choice([-1.0, 1.0], n)

    angle = rng.uniform(0, 2 * np.pi, n)
    cylinder = np.column_stack([np.cos(angle), np.sin(angle), rng.uniform(-1, 1, n)])

    xy = rng.uniform(-1, 1, size=(n, 2))
    bump = np.column_stack([xy, 0.5 * np.exp(-4 * (xy**2).sum(axis=1))])

    return [shape * rng.uniform(5, 50) + rng.uniform(-100, 100, size=3) for shape in (sphere, cube, cylinder, bump)]


def run_pretraining(clouds: list[np.ndarray], epochs: int, seed: int, losses: list[float] | None = None):
    return pretrain_point_mae(
        clouds,
        epochs=epochs,
        batch_size=4,
        lr=2e-3,
        num_points=NUM_POINTS,
        seed=seed,
        decoder_depth=1,
        on_epoch_end=None if losses is None else lambda epoch, loss: losses.append(loss),
        **TINY_ENCODER,
    )


@pytest.fixture(scope="module")
def clouds() -> list[np.ndarray]:
    return simple_shapes(400, seed=0) + simple_shapes(400, seed=1)


@pytest.fixture(scope="module")
def pretrained(clouds):
    losses: list[float] = []
    encoder = run_pretraining(clouds, epochs=30, seed=0, losses=losses)
    return encoder, losses


def reference_chamfer(predicted: np.ndarray, target: np.ndarray) -> float:
    """Mean nearest squared distance both ways, averaged over the batch, by loops."""
    total = 0.0
    for p_set, t_set in zip(predicted, target):
        forward = np.mean([min(((p - t) ** 2).sum() for t in t_set) for p in p_set])
        backward = np.mean([min(((t - p) ** 2).sum() for p in p_set) for t in t_set])
        total += forward + backward
    return total / len(predicted)


def test_chamfer_matches_reference():
    rng = np.random.default_rng(0)
    predicted = rng.normal(size=(3, 7, 3))
    target = rng.normal(size=(3, 5, 3))

    loss = chamfer_distance(torch.from_numpy(predicted), torch.from_numpy(target))

    assert loss.item() == pytest.approx(reference_chamfer(predicted, target), rel=1e-12)


def test_chamfer_zero_for_same_set_in_other_order():
    points = torch.randn(2, 9, 3, dtype=torch.float64)

    loss = chamfer_distance(points, points[:, torch.randperm(9)])

    assert loss.item() == 0.0


def test_chamfer_has_gradient():
    predicted = torch.randn(1, 4, 3, requires_grad=True)

    chamfer_distance(predicted, torch.randn(1, 6, 3)).backward()

    assert predicted.grad is not None
    assert predicted.grad.abs().sum() > 0


def test_normalize_cloud_centres_and_scales():
    rng = np.random.default_rng(2)
    cloud = rng.normal(size=(50, 3)) * 30 + np.array([100.0, -20.0, 400.0])

    normalized = normalize_cloud(cloud)
    centroid, scale = cloud_centroid_and_scale(cloud)

    assert normalized.dtype == np.float32
    np.testing.assert_allclose(centroid, cloud.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(normalized.mean(axis=0), 0.0, atol=1e-6)
    assert np.linalg.norm(normalized, axis=1).max() == pytest.approx(1.0, abs=1e-6)
    assert scale == pytest.approx(np.linalg.norm(cloud - cloud.mean(axis=0), axis=1).max())
    np.testing.assert_allclose(normalized * scale + centroid, cloud, atol=1e-3)


@pytest.mark.parametrize(
    ("cloud", "message"),
    [
        (np.zeros((5, 2)), "shape"),
        (np.zeros((0, 3)), "shape"),
        (np.array([[0.0, 0.0, np.nan]]), "NaN"),
        (np.ones((4, 3)), "coincide"),
    ],
)
def test_normalize_cloud_rejects_bad_clouds(cloud, message):
    with pytest.raises(ValueError, match=message):
        normalize_cloud(cloud)


def test_mask_hides_fixed_share_per_cloud():
    generator = torch.Generator().manual_seed(0)

    mask = random_group_mask(5, 20, 0.6, generator)

    assert mask.shape == (5, 20)
    assert mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [12] * 5
    assert len({tuple(row.tolist()) for row in mask}) > 1
    assert torch.equal(mask, random_group_mask(5, 20, 0.6, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("ratio", [0.0, 0.05, 1.0])
def test_mask_needs_masked_and_visible_groups(ratio):
    with pytest.raises(ValueError, match="at least one group"):
        random_group_mask(1, 10, ratio)


def test_decoder_predicts_masked_groups():
    decoder = PointMAEDecoder(encoder_dim=32, group_size=8, embed_dim=16, depth=1, num_heads=2)

    predicted = decoder(torch.randn(2, 5, 32), torch.randn(2, 5, 3), torch.randn(2, 7, 3))

    assert predicted.shape == (2, 7, 8, 3)


def test_pretraining_lowers_loss(pretrained):
    _, losses = pretrained

    assert len(losses) == 30
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert last < 0.8 * first, f"mean Chamfer loss went from {first:.5f} to {last:.5f}"


def test_pretrained_encoder_round_trip(pretrained, clouds, tmp_path):
    encoder, _ = pretrained
    points = torch.from_numpy(normalize_cloud(clouds[1]))[None]

    path = save_point_mae(tmp_path / "point_mae.pth", encoder)
    loaded = load_point_mae(path)

    assert not encoder.training
    with torch.inference_mode():
        centers, features = encoder(points)
        loaded_centers, loaded_features = loaded(points)
    assert features.shape == (1, 16, 64)
    assert torch.equal(loaded_centers, centers)
    assert torch.equal(loaded_features, features)


def test_pretraining_seed_reproducible(clouds):
    first = run_pretraining(clouds, epochs=2, seed=5).state_dict()
    second = run_pretraining(clouds, epochs=2, seed=5).state_dict()
    other = run_pretraining(clouds, epochs=2, seed=6).state_dict()

    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not torch.equal(first["blocks.0.mlp.fc1.weight"], other["blocks.0.mlp.fc1.weight"])


def test_pretraining_leaves_global_rng_alone(clouds):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    run_pretraining(clouds[:4], epochs=1, seed=0)

    assert torch.equal(torch.rand(3), expected)


def test_pretraining_rejects_small_clouds(clouds):
    with pytest.raises(ValueError, match=r"cloud 1 has 100 points, fewer than num_points=256"):
        run_pretraining([clouds[0], clouds[1][:100]], epochs=1, seed=0)
    with pytest.raises(ValueError, match="no clouds"):
        run_pretraining([], epochs=1, seed=0)
    with pytest.raises(ValueError, match=r"shape \(400,\)"):
        run_pretraining([clouds[0][:, 0]], epochs=1, seed=0)
