"""Farthest point sampling, k nearest neighbours and grouping match brute-force loops.

The references below are plain Python loops over float64 coordinates. Clouds on an
integer grid make many distances exactly equal, which checks the tie rules: the
lowest index among equally far points in sampling, nearest first and then the lower
index in neighbour search.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcstream.models.point_ops import farthest_point_sample, group_points, knn


def squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 + (a[2] - b[2]) ** 2)


def reference_fps(points: np.ndarray, num_samples: int, start: int) -> list[int]:
    """Farthest point sampling of one ``(N, 3)`` cloud, the first index winning ties."""
    chosen = [start]
    min_distance = [math.inf] * len(points)
    while len(chosen) < num_samples:
        newest = points[chosen[-1]]
        best_index, best_distance = -1, -1.0
        for i, point in enumerate(points):
            min_distance[i] = min(min_distance[i], squared_distance(point, newest))
            if min_distance[i] > best_distance:
                best_index, best_distance = i, min_distance[i]
        chosen.append(best_index)
    return chosen


def reference_knn(query: np.ndarray, points: np.ndarray, k: int) -> list[list[int]]:
    """Indices of the k nearest points of every query, sorted by (distance, index)."""
    result = []
    for q in query:
        ranked = sorted((squared_distance(q, p), i) for i, p in enumerate(points))
        result.append([i for _, i in ranked[:k]])
    return result


def integer_grid_cloud(side: int, seed: int, duplicates: int = 0) -> np.ndarray:
    """Points of a ``side**3`` integer grid in random order, plus some repeated points."""
    rng = np.random.default_rng(seed)
    axis = np.arange(side, dtype=np.float64)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    grid = grid[rng.permutation(len(grid))]
    if duplicates:
        grid = np.concatenate([grid, grid[rng.choice(len(grid), duplicates, replace=False)]])
    return grid


@pytest.mark.parametrize("start", [0, 7])
def test_fps_matches_reference_random(start):
    rng = np.random.default_rng(1)
    clouds = rng.normal(size=(3, 50, 3))

    indices = farthest_point_sample(torch.from_numpy(clouds), 12, start=start)

    assert indices.shape == (3, 12)
    assert indices.dtype == torch.long
    for b in range(3):
        assert indices[b].tolist() == reference_fps(clouds[b], 12, start)


def test_fps_ties_take_lowest_index():
    clouds = np.stack([integer_grid_cloud(3, seed=s, duplicates=5) for s in range(2)])

    indices = farthest_point_sample(torch.from_numpy(clouds), 20, start=3)

    for b in range(2):
        assert indices[b].tolist() == reference_fps(clouds[b], 20, 3)


def test_fps_float32_matches_float64_on_grid():
    cloud = integer_grid_cloud(3, seed=4)[None]

    single = farthest_point_sample(torch.from_numpy(cloud).float(), 15)
    double = farthest_point_sample(torch.from_numpy(cloud), 15)

    assert torch.equal(single, double)


def test_fps_rejects_bad_arguments():
    points = torch.zeros(1, 5, 3)

    with pytest.raises(ValueError, match="num_samples"):
        farthest_point_sample(points, 6)
    with pytest.raises(ValueError, match="num_samples"):
        farthest_point_sample(points, 0)
    with pytest.raises(ValueError, match="start index 5"):
        farthest_point_sample(points, 2, start=5)
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        farthest_point_sample(torch.zeros(5, 3), 2)
    with pytest.raises(ValueError, match="NaN"):
        farthest_point_sample(torch.tensor([[[0.0, 0.0, float("nan")]] * 3]), 2)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_knn_matches_reference_random(k):
    rng = np.random.default_rng(2)
    points = rng.normal(size=(2, 40, 3))
    query = rng.normal(size=(2, 9, 3))

    neighbours = knn(torch.from_numpy(query), torch.from_numpy(points), k)

    assert neighbours.shape == (2, 9, k)
    assert neighbours.dtype == torch.long
    for b in range(2):
        assert neighbours[b].tolist() == reference_knn(query[b], points[b], k)


@pytest.mark.parametrize("k", [1, 4, 7, 10])
def test_knn_ties_lower_index_first(k):
    # Grid points as queries: up to 6 neighbours at distance 1, 12 at sqrt(2), so the
    # k-th place falls inside a group of equal distances for most k.
    points = np.stack([integer_grid_cloud(4, seed=s, duplicates=6) for s in (5, 6)])
    query = points[:, :20]

    neighbours = knn(torch.from_numpy(points[:, :20]).float(), torch.from_numpy(points).float(), k)

    for b in range(2):
        assert neighbours[b].tolist() == reference_knn(query[b], points[b], k)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_knn_chunking_changes_nothing(chunk_size):
    points = torch.from_numpy(integer_grid_cloud(4, seed=7, duplicates=10)).float()[None]
    query = points[:, ::3]

    chunked = knn(query, points, 9, chunk_size=chunk_size)
    whole = knn(query, points, 9, chunk_size=query.shape[1])

    assert torch.equal(chunked, whole)


def test_knn_rejects_bad_arguments():
    points = torch.zeros(2, 5, 3)

    with pytest.raises(ValueError, match="k must be between 1 and the 5 points"):
        knn(points, points, 6)
    with pytest.raises(ValueError, match="same batch size"):
        knn(points[:1], points, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        knn(points, points, 2, chunk_size=0)
    with pytest.raises(ValueError, match="floating-point"):
        knn(points.long(), points, 2)


def test_group_points_matches_reference():
    rng = np.random.default_rng(3)
    clouds = np.concatenate([rng.normal(size=(1, 64, 3)), integer_grid_cloud(4, seed=8)[None]])

    neighborhoods, centers = group_points(torch.from_numpy(clouds), num_groups=10, group_size=6)

    assert neighborhoods.shape == (2, 10, 6, 3)
    assert centers.shape == (2, 10, 3)
    for b in range(2):
        center_indices = reference_fps(clouds[b], 10, 0)
        expected_centers = clouds[b][center_indices]
        neighbour_indices = reference_knn(expected_centers, clouds[b], 6)
        expected_groups = clouds[b][np.array(neighbour_indices)] - expected_centers[:, None]
        np.testing.assert_array_equal(centers[b].numpy(), expected_centers)
        np.testing.assert_array_equal(neighborhoods[b].numpy(), expected_groups)


def test_group_points_center_is_first_neighbour():
    rng = np.random.default_rng(9)
    points = torch.from_numpy(rng.uniform(size=(1, 80, 3)))

    neighborhoods, _ = group_points(points, num_groups=8, group_size=5)

    # Without duplicate points each center is its own unique nearest point.
    assert torch.equal(neighborhoods[:, :, 0], torch.zeros(1, 8, 3, dtype=points.dtype))
    assert (neighborhoods[:, :, 1:].norm(dim=-1) > 0).all()


def test_group_points_too_few_points():
    points = torch.randn(1, 20, 3)

    with pytest.raises(ValueError, match="group_size 32 needs clouds of at least that many points, got 20"):
        group_points(points, num_groups=4, group_size=32)
    with pytest.raises(ValueError, match="num_groups 21"):
        group_points(points, num_groups=21, group_size=4)
