"""Point feature alignment against hand-computed weights and brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcstream.models import alignment
from qcstream.models.alignment import (
    align_point_features,
    interpolate_to_points,
    nearest_center_weights,
    organized_points,
    pool_to_grid,
    scatter_to_pixels,
    smooth_valid_cells,
)

# --- references written as plain loops ---------------------------------------------


def brute_interpolation(centers: np.ndarray, features: np.ndarray, points: np.ndarray, k: int) -> np.ndarray:
    result = np.zeros((len(points), features.shape[1]))
    for p, point in enumerate(points):
        distances = [math.dist(point, center) for center in centers]
        nearest = sorted(range(len(centers)), key=lambda c: distances[c])[:k]
        if distances[nearest[0]] == 0.0:
            result[p] = features[nearest[0]]
            continue
        total = sum(1.0 / distances[c] for c in nearest)
        for c in nearest:
            result[p] += (1.0 / distances[c]) / total * features[c]
    return result


def adaptive_cell(index: int, size: int, cells: int) -> range:
    return range(math.floor(index * size / cells), math.ceil((index + 1) * size / cells))


def brute_pool(pixel_features: np.ndarray, valid: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    channels, height, width = pixel_features.shape
    pooled = np.zeros((channels, *grid))
    cell_valid = np.zeros(grid, dtype=bool)
    for i in range(grid[0]):
        for j in range(grid[1]):
            members = [
                (r, c) for r in adaptive_cell(i, height, grid[0]) for c in adaptive_cell(j, width, grid[1]) if valid[r, c]
            ]
            if members:
                cell_valid[i, j] = True
                pooled[:, i, j] = np.mean([pixel_features[:, r, c] for r, c in members], axis=0)
    return pooled, cell_valid


def brute_smooth(features: np.ndarray, cell_valid: np.ndarray) -> np.ndarray:
    _, rows, cols = features.shape
    smoothed = np.zeros_like(features)
    for i in range(rows):
        for j in range(cols):
            if not cell_valid[i, j]:
                continue
            neighbours = [
                features[:, r, c]
                for r in range(max(0, i - 1), min(rows, i + 2))
                for c in range(max(0, j - 1), min(cols, j + 2))
                if cell_valid[r, c]
            ]
            smoothed[:, i, j] = np.mean(neighbours, axis=0)
    return smoothed


def random_cloud(seed: int, height: int = 9, width: int = 7, n_centers: int = 6, channels: int = 5):
    """An organized cloud with a hole, centers drawn among its points, and center features."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(0.5, 2.0, size=(height, width, 3)).astype(np.float32)
    xyz[: height // 2, : width // 2] = 0.0
    points, pixel_index = organized_points(xyz)
    centers = points[rng.choice(len(points), n_centers, replace=False)].numpy() + 0.01
    center_features = rng.normal(size=(n_centers, channels))
    return xyz, points, pixel_index, centers, center_features


# --- interpolation ---------------------------------------------------------------------


def test_weights_hand_computed_three_centers():
    centers = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    point = np.array([[1.0, 0.0, 0.0]])

    _, weights_two = nearest_center_weights(centers, point, k=2)
    indices, weights_three = nearest_center_weights(centers, point, k=3)

    # Distances 1, 1 and sqrt(17): weights 1/d normalised to sum 1.
    total = 2.0 + 1.0 / math.sqrt(17.0)
    assert sorted(indices[0].tolist()[:2]) == [0, 1]
    assert indices[0, 2] == 2
    torch.testing.assert_close(weights_two[0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(
        weights_three[0], torch.tensor([1.0 / total, 1.0 / total, 1.0 / math.sqrt(17.0) / total], dtype=torch.float64)
    )


def test_interpolation_hand_computed_two_centers():
    centers = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    features = np.array([[1.0, 0.0], [0.0, 6.0]])
    points = np.array([[1.0, 0.0, 0.0]])

    interpolated = interpolate_to_points(centers, features, points, k=2)

    # d = 1 and 2, so weights 2/3 and 1/3.
    torch.testing.assert_close(interpolated, torch.tensor([[2.0 / 3.0, 2.0]], dtype=torch.float64))


def test_point_on_center_takes_its_feature():
    centers = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    features = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)
    points = np.array([[1.0, 0.0, 0.0], [1.0 + 1e-9, 0.0, 0.0]])

    interpolated = interpolate_to_points(centers, features, points, k=3)

    assert interpolated.dtype == torch.float32
    torch.testing.assert_close(interpolated, torch.tensor([[3.0, 4.0], [3.0, 4.0]]))


def test_interpolation_matches_brute_force_across_blocks(monkeypatch):
    # Blocks of 7 query points for the 9 centers, and of 5 points when gathering features.
    monkeypatch.setattr(alignment, "DISTANCE_BLOCK_VALUES", 7 * 9)
    monkeypatch.setattr(alignment, "POINT_BLOCK_ROWS", 5)
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(9, 3))
    features = rng.normal(size=(9, 4))
    points = np.concatenate([rng.normal(size=(30, 3)), centers[:2]])

    for k in (1, 3, 9):
        interpolated = interpolate_to_points(centers, features, points, k=k)
        np.testing.assert_allclose(interpolated.numpy(), brute_interpolation(centers, features, points, k), atol=1e-10)


def test_interpolation_of_no_points_is_empty():
    interpolated = interpolate_to_points(np.eye(3), np.ones((3, 2)), np.zeros((0, 3)))

    assert tuple(interpolated.shape) == (0, 2)


def test_interpolation_rejects_bad_input():
    centers = np.eye(3)
    with pytest.raises(ValueError, match="k=4"):
        interpolate_to_points(centers, np.ones((3, 2)), np.zeros((1, 3)), k=4)
    with pytest.raises(ValueError, match="2 rows but there are 3 centers"):
        interpolate_to_points(centers, np.ones((2, 2)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"points must be 3-D coordinates \(N, 3\), got shape \(4, 2\)"):
        interpolate_to_points(centers, np.ones((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        interpolate_to_points(centers, np.ones((3, 2)), np.full((1, 3), np.nan))


# --- scatter and pooling ----------------------------------------------------------------


def test_organized_points_skips_empty_pixels():
    xyz = np.zeros((2, 3, 3), dtype=np.float32)
    xyz[0, 1] = [1.0, 2.0, 3.0]
    xyz[1, 2] = [0.0, 0.0, 5.0]

    points, pixel_index = organized_points(xyz)

    assert pixel_index.tolist() == [1, 5]
    torch.testing.assert_close(points, torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]]))


def test_scatter_matches_loop():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(5, 3))
    pixel_index = np.array([11, 0, 7, 3, 19])

    scattered = scatter_to_pixels(features, pixel_index, (4, 5))

    expected = np.zeros((3, 4, 5))
    for point, pixel in enumerate(pixel_index):
        expected[:, pixel // 5, pixel % 5] = features[point]
    np.testing.assert_array_equal(scattered.numpy(), expected)


def test_scatter_rejects_bad_pixel_index():
    features = np.ones((3, 2))
    with pytest.raises(ValueError, match="only 2 distinct pixels"):
        scatter_to_pixels(features, np.array([1, 1, 2]), (2, 2))
    with pytest.raises(ValueError, match=r"\[0, 3\].*\[0, 4\]"):
        scatter_to_pixels(features, np.array([0, 1, 4]), (2, 2))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        scatter_to_pixels(features, np.array([0, 1]), (2, 2))


@pytest.mark.parametrize(("image_shape", "grid"), [((8, 6), (4, 3)), ((7, 5), (3, 2)), ((5, 4), (5, 4)), ((3, 2), (4, 5))])
def test_pool_matches_brute_force(image_shape, grid):
    rng = np.random.default_rng(5)
    pixel_features = rng.normal(size=(3, *image_shape))
    valid = rng.random(image_shape) > 0.4
    valid[: image_shape[0] // 2 + 1, : image_shape[1] // 2 + 1] = False

    pooled, cell_valid = pool_to_grid(pixel_features, torch.from_numpy(valid), grid, smooth=False)

    expected, expected_valid = brute_pool(pixel_features, valid, grid)
    assert not expected_valid.all(), "the case must contain an empty cell"
    np.testing.assert_array_equal(cell_valid.numpy(), expected_valid)
    np.testing.assert_allclose(pooled.numpy(), expected, atol=1e-12)


def test_pool_ignores_values_at_invalid_pixels():
    pixel_features = np.zeros((1, 2, 2))
    pixel_features[0, 0, 0] = 4.0
    pixel_features[0, 1, 1] = 1000.0
    valid = torch.tensor([[True, False], [False, False]])

    pooled, cell_valid = pool_to_grid(pixel_features, valid, (1, 1))

    assert cell_valid.tolist() == [[True]]
    assert pooled.item() == pytest.approx(4.0)


def test_smoothing_matches_brute_force_over_valid_cells():
    rng = np.random.default_rng(6)
    features = rng.normal(size=(2, 5, 6))
    cell_valid = rng.random((5, 6)) > 0.3
    features[:, ~cell_valid] = 0.0

    smoothed = smooth_valid_cells(torch.from_numpy(features), torch.from_numpy(cell_valid))

    np.testing.assert_allclose(smoothed.numpy(), brute_smooth(features, cell_valid), atol=1e-12)


def test_pool_then_smooth_matches_brute_force():
    rng = np.random.default_rng(7)
    pixel_features = rng.normal(size=(2, 10, 9))
    valid = rng.random((10, 9)) > 0.2
    valid[:4, :4] = False

    pooled, cell_valid = pool_to_grid(pixel_features, torch.from_numpy(valid), (5, 4))

    expected, expected_valid = brute_pool(pixel_features, valid, (5, 4))
    np.testing.assert_array_equal(cell_valid.numpy(), expected_valid)
    np.testing.assert_allclose(pooled.numpy(), brute_smooth(expected, expected_valid), atol=1e-12)


def test_pool_rejects_mask_of_wrong_shape():
    with pytest.raises(ValueError, match=r"bool mask of shape \(3, 4\)"):
        pool_to_grid(np.zeros((2, 3, 4)), torch.ones(4, 3, dtype=torch.bool), (2, 2))
    with pytest.raises(ValueError, match="two positive sizes"):
        pool_to_grid(np.zeros((2, 3, 4)), torch.ones(3, 4, dtype=torch.bool), (0, 2))


# --- whole chain -----------------------------------------------------------------------


def test_align_matches_step_by_step_chain(monkeypatch):
    xyz, points, pixel_index, centers, center_features = random_cloud(8)
    height, width = xyz.shape[:2]

    interpolated = brute_interpolation(centers, center_features, points.numpy(), k=3)
    scattered = np.zeros((center_features.shape[1], height * width))
    scattered[:, pixel_index.numpy()] = interpolated.T
    valid = (xyz != 0).any(axis=2)
    pooled, expected_valid = brute_pool(scattered.reshape(-1, height, width), valid, (4, 3))
    expected = brute_smooth(pooled, expected_valid)

    # A block budget of two images' worth of pixels splits the five channels into three blocks.
    monkeypatch.setattr(alignment, "PIXEL_BLOCK_VALUES", 2 * height * width)
    features, cell_valid = align_point_features(centers, center_features, points, pixel_index, (height, width), (4, 3))

    assert not expected_valid.all(), "the cloud's hole must leave an empty cell"
    np.testing.assert_array_equal(cell_valid.numpy(), expected_valid)
    np.testing.assert_allclose(features.numpy(), expected, atol=1e-6)


def test_align_per_point_features():
    xyz, points, pixel_index, _, _ = random_cloud(9)
    height, width = xyz.shape[:2]
    per_point = np.random.default_rng(9).normal(size=(len(points), 4))

    features, cell_valid = align_point_features(
        None, per_point, points, pixel_index, (height, width), (height, width), smooth=False
    )
    as_own_centers, _ = align_point_features(
        points, per_point, points, pixel_index, (height, width), (height, width), k=1, smooth=False
    )

    expected = np.zeros((4, height * width))
    expected[:, pixel_index.numpy()] = per_point.T
    np.testing.assert_allclose(features.numpy(), expected.reshape(4, height, width), atol=1e-12)
    np.testing.assert_array_equal(cell_valid.numpy(), (xyz != 0).any(axis=2))
    torch.testing.assert_close(as_own_centers, features, rtol=0, atol=0)


def test_align_per_point_row_count():
    xyz, points, pixel_index, _, _ = random_cloud(10)

    with pytest.raises(ValueError, match=rf"{len(points) - 1} rows but there are {len(points)} points"):
        align_point_features(None, np.ones((len(points) - 1, 2)), points, pixel_index, xyz.shape[:2], (3, 3))
