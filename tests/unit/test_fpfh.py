"""FPFH point descriptors: pair features, normals and histograms against hand-computed and loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from qcstream.models.fpfh import (
    FPFH_DIM,
    HISTOGRAM_BINS,
    HISTOGRAM_TOTAL,
    compute_fpfh,
    compute_spfh,
    estimate_normals,
    find_neighbours,
    fpfh_features,
    pair_features,
)

# On a plane every pair has n_s = n_t = u and d in the plane, so phi = u.d = 0,
# v is orthogonal to u and n_t, so alpha = v.n_t = 0, and theta = atan2(w.u, u.u) = atan2(0, 1) = 0.
# Each value sits in the middle bin (index 5) of its 11 bins.
PLANE_DESCRIPTOR = np.zeros(FPFH_DIM)
PLANE_DESCRIPTOR[[5, 16, 27]] = HISTOGRAM_TOTAL


def as_floats(features) -> list[float]:
    return [float(value) for value in features]


def wavy_surface(n_points: int, seed: int, noise: float = 0.0) -> np.ndarray:
    """Sample ``(n_points, 3)`` points of z = 0.1 sin(4x) cos(3y) over the unit square."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.0, 1.0, size=(n_points, 2))
    z = 0.1 * np.sin(4.0 * xy[:, 0]) * np.cos(3.0 * xy[:, 1]) + noise * rng.standard_normal(n_points)
    return np.column_stack([xy, z])


def plane_grid(side: int, step: float) -> np.ndarray:
    x, y = np.meshgrid(np.arange(side) * step, np.arange(side) * step)
    return np.column_stack([x.ravel(), y.ravel(), np.zeros(side * side)])


def angle_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cosine = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


# ---------------------------------------------------------------- pair features


def test_pair_features_hand_case():
    p_s, n_s = np.array([0.0, 0.0, 0.0]), np.array([0.6, 0.0, 0.8])
    p_t, n_t = np.array([2.0, 0.0, 0.0]), np.array([0.0, 0.6, 0.8])

    # d = (2, 0, 0) / 2 = (1, 0, 0). |n_s.d| = 0.6 > |n_t.d| = 0, so p_s stays the source.
    # u = (0.6, 0, 0.8), phi = u.d = 0.6.
    # u x d = (0*0 - 0.8*0, 0.8*1 - 0.6*0, 0.6*0 - 0*1) = (0, 0.8, 0), so v = (0, 1, 0).
    # w = u x v = (0*0 - 0.8*1, 0.8*0 - 0.6*0, 0.6*1 - 0*0) = (-0.8, 0, 0.6).
    # alpha = v.n_t = 0.6. w.n_t = 0.6*0.8 = 0.48 and u.n_t = 0.8*0.8 = 0.64,
    # so theta = atan2(0.48, 0.64) = atan(0.75). distance = 2.
    alpha, phi, theta, distance = as_floats(pair_features(p_s, n_s, p_t, n_t))

    assert alpha == pytest.approx(0.6)
    assert phi == pytest.approx(0.6)
    assert theta == pytest.approx(math.atan(0.75))
    assert distance == pytest.approx(2.0)


def test_pair_features_swaps_source_and_target():
    root_half = math.sqrt(0.5)
    p_1, n_1 = np.array([0.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])
    p_2, n_2 = np.array([1.0, 0.0, 0.0]), np.array([root_half, 0.0, root_half])

    # d = (1, 0, 0). |n_1.d| = 0 < |n_2.d| = sqrt(1/2), so p_2 becomes the source and d = (-1, 0, 0).
    # u = n_2, phi = u.d = -sqrt(1/2).
    # u x d = (0*0 - s*0, s*(-1) - s*0, s*0 - 0*(-1)) = (0, -s, 0) with s = sqrt(1/2), so v = (0, -1, 0).
    # w = u x v = (0*0 - s*(-1), s*0 - s*0, s*(-1) - 0*0) = (s, 0, -s).
    # alpha = v.n_1 = 0. w.n_1 = -s and u.n_1 = s, so theta = atan2(-s, s) = -pi/4. distance = 1.
    expected = [0.0, -root_half, -math.pi / 4.0, 1.0]

    forward = as_floats(pair_features(p_1, n_1, p_2, n_2))
    backward = as_floats(pair_features(p_2, n_2, p_1, n_1))

    assert forward == pytest.approx(expected, abs=1e-12)
    assert backward == pytest.approx(expected, abs=1e-12)


def test_pair_features_order_free_on_random_pairs():
    rng = np.random.default_rng(3)
    p_s, p_t = rng.standard_normal((2, 500, 3))
    n_s, n_t = rng.standard_normal((2, 500, 3))
    n_s /= np.linalg.norm(n_s, axis=1, keepdims=True)
    n_t /= np.linalg.norm(n_t, axis=1, keepdims=True)

    forward = np.stack(pair_features(p_s, n_s, p_t, n_t))
    backward = np.stack(pair_features(p_t, n_t, p_s, n_s))

    assert forward.shape == (4, 500)
    np.testing.assert_allclose(forward, backward, atol=1e-12)
    assert np.all(np.abs(forward[:3]) <= np.array([[1.0], [1.0], [math.pi]]))


def test_pair_features_degenerate_pairs():
    up = np.array([0.0, 0.0, 1.0])
    origin = np.zeros(3)

    alpha, phi, theta, distance = as_floats(pair_features(origin, up, origin, up))
    assert distance == 0.0
    assert math.isnan(alpha)
    assert math.isnan(phi)
    assert math.isnan(theta)

    # The source normal lies along the connecting line, so v = u x d is the zero vector.
    alpha, phi, theta, distance = as_floats(pair_features(origin, up, np.array([0.0, 0.0, 2.0]), up))
    assert distance == pytest.approx(2.0)
    assert phi == pytest.approx(1.0)
    assert math.isnan(alpha)
    assert math.isnan(theta)


# ---------------------------------------------------------------- normals


def test_normals_of_tilted_plane():
    x, y = np.meshgrid(np.linspace(-1.0, 1.0, 20), np.linspace(-1.0, 1.0, 20))
    points = np.column_stack([x.ravel(), y.ravel(), (0.2 * x - 0.1 * y + 1.0).ravel()])
    # z = 0.2x - 0.1y + 1 has normal direction (0.2, -0.1, -1). From the origin, below the
    # plane: (origin - p).(0.2, -0.1, -1) = -(0.2x - 0.1y) + z = 1 > 0, so that sign faces the origin.
    towards_origin = np.array([0.2, -0.1, -1.0]) / math.sqrt(0.04 + 0.01 + 1.0)

    below = estimate_normals(points, radius=0.25, max_nn=30, viewpoint=(0.0, 0.0, 0.0))
    above = estimate_normals(points, radius=0.25, max_nn=30, viewpoint=(0.0, 0.0, 10.0))
    unoriented = estimate_normals(points, radius=0.25, max_nn=30, viewpoint=None)

    np.testing.assert_allclose(below, np.broadcast_to(towards_origin, points.shape), atol=1e-9)
    np.testing.assert_allclose(above, np.broadcast_to(-towards_origin, points.shape), atol=1e-9)
    np.testing.assert_allclose(np.abs(unoriented @ towards_origin), 1.0, atol=1e-9)


def test_normals_of_sphere_cap():
    center, sphere_radius = np.array([0.0, 0.0, 2.0]), 0.5
    rng = np.random.default_rng(1)
    # Uniform directions within 50 degrees of -z, the side of the sphere that faces the origin.
    cos_polar = rng.uniform(math.cos(math.radians(50.0)), 1.0, 3000)
    azimuth = rng.uniform(0.0, 2.0 * math.pi, 3000)
    sin_polar = np.sqrt(1.0 - cos_polar**2)
    outward = np.column_stack([sin_polar * np.cos(azimuth), sin_polar * np.sin(azimuth), -cos_polar])
    points = center + sphere_radius * outward

    normals = estimate_normals(points, radius=0.06, max_nn=50, viewpoint=(0.0, 0.0, 0.0))

    # Seen from the origin, the outward normal of this cap points towards the camera.
    errors = angle_between(normals, outward)
    interior = cos_polar > math.cos(math.radians(40.0))
    assert np.linalg.norm(normals, axis=1) == pytest.approx(np.ones(len(points)))
    assert np.median(errors) < 1.0
    assert errors[interior].max() < 3.0
    assert errors.max() < 8.0


def test_normals_fallback_for_isolated_and_collinear_points():
    line = np.column_stack([np.linspace(0.0, 1.0, 11), np.zeros(11), np.full(11, 2.0)])
    isolated = np.array([[5.0, 5.0, 5.0]])
    points = np.vstack([line, isolated])
    viewpoint = np.array([0.5, 1.0, 0.0])

    normals = estimate_normals(points, radius=0.15, max_nn=10, viewpoint=viewpoint)

    # The isolated point has only itself, so its normal is the unit line of sight.
    sight = viewpoint - isolated[0]
    np.testing.assert_allclose(normals[-1], sight / np.linalg.norm(sight), atol=1e-12)
    # A line point's normal is its line of sight without the x component along the line.
    expected = viewpoint - line
    expected[:, 0] = 0.0
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(normals[:-1], expected, atol=1e-9)


# ---------------------------------------------------------------- loop reference


def reference_fpfh(points: np.ndarray, normals: np.ndarray, radius: float, max_nn: int):
    """Return neighbour lists, SPFH and FPFH computed point by point, pair by pair."""
    n_points = len(points)
    distances = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=2)
    neighbours = []
    for i in range(n_points):
        by_distance = np.argsort(distances[i], kind="stable")
        neighbours.append([int(j) for j in by_distance if j != i and distances[i, j] <= radius][:max_nn])

    unit_edges = np.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1)[1:-1]
    angle_edges = np.linspace(-math.pi, math.pi, HISTOGRAM_BINS + 1)[1:-1]
    spfh = np.zeros((n_points, FPFH_DIM))
    for i in range(n_points):
        for j in neighbours[i]:
            alpha, phi, theta, _ = as_floats(pair_features(points[i], normals[i], points[j], normals[j]))
            if math.isnan(alpha) or math.isnan(phi) or math.isnan(theta):
                continue
            spfh[i, int(np.digitize(alpha, unit_edges))] += 1
            spfh[i, HISTOGRAM_BINS + int(np.digitize(phi, unit_edges))] += 1
            spfh[i, 2 * HISTOGRAM_BINS + int(np.digitize(theta, angle_edges))] += 1
    spfh = normalise_blocks(spfh)

    fpfh = spfh.copy()
    for i in range(n_points):
        weighted = [(j, distances[i, j]) for j in neighbours[i] if distances[i, j] > 0.0]
        for j, distance in weighted:
            fpfh[i] += spfh[j] / distance / len(weighted)
    return neighbours, spfh, normalise_blocks(fpfh)


def normalise_blocks(histograms: np.ndarray) -> np.ndarray:
    result = histograms.copy()
    for i in range(len(result)):
        for block in range(3):
            columns = slice(block * HISTOGRAM_BINS, (block + 1) * HISTOGRAM_BINS)
            total = result[i, columns].sum()
            if total > 0.0:
                result[i, columns] *= HISTOGRAM_TOTAL / total
    return result


def test_vectorized_fpfh_matches_loop_reference():
    points = wavy_surface(200, seed=0, noise=0.01)
    points[17] = points[42]  # a duplicate point: its pair has no features and no FPFH weight
    normals = estimate_normals(points, radius=0.12, max_nn=20, viewpoint=(0.5, 0.5, 3.0))
    radius, max_nn = 0.15, 16

    expected_neighbours, expected_spfh, expected_fpfh = reference_fpfh(points, normals, radius, max_nn)
    indices, distances = find_neighbours(points, radius, max_nn)
    spfh = compute_spfh(points, normals, indices)
    fpfh = compute_fpfh(points, normals, radius, max_nn)

    # The case mixes truncated neighbourhoods (more than max_nn in range) and smaller ones.
    counts = np.array([len(row) for row in expected_neighbours])
    assert (counts == max_nn).any()
    assert (counts < max_nn).any()
    # Compare as sets: the kd-tree may order the two equidistant duplicates either way.
    assert [sorted(row[row >= 0].tolist()) for row in indices] == [sorted(row) for row in expected_neighbours]
    assert np.all(np.isinf(distances[indices < 0]))
    np.testing.assert_allclose(spfh, expected_spfh, atol=1e-9)
    assert fpfh.dtype == np.float32
    assert fpfh.shape == (200, FPFH_DIM)
    np.testing.assert_allclose(fpfh, expected_fpfh, atol=1e-4)


# ---------------------------------------------------------------- descriptor properties


def test_fpfh_invariant_to_rotation_and_translation():
    points = wavy_surface(400, seed=5)
    viewpoint = np.array([0.5, 0.5, 3.0])
    rotation = Rotation.from_rotvec([0.4, -1.1, 0.7]).as_matrix()
    shift = np.array([10.0, -3.0, 2.5])

    original = fpfh_features(points, viewpoint=viewpoint)
    moved = fpfh_features(points @ rotation.T + shift, viewpoint=rotation @ viewpoint + shift)

    assert np.abs(original - PLANE_DESCRIPTOR).sum(axis=1).mean() > 10.0  # the surface is not flat
    np.testing.assert_allclose(moved, original, atol=1e-3)


def test_fpfh_of_plane_is_hand_computed():
    features = fpfh_features(plane_grid(12, 0.1), viewpoint=(0.5, 0.5, 5.0))

    np.testing.assert_allclose(features, np.broadcast_to(PLANE_DESCRIPTOR, features.shape), atol=1e-4)


def test_fpfh_separates_plane_sphere_and_edge():
    step = 0.05
    # Sphere of radius 0.5 from a Fibonacci lattice, seen from its center, so all normals
    # point inwards. A pair d apart has phi = d / (2 * 0.5) = d and |theta| about d / 0.5 = 2d.
    # The middle bins that a plane fills end at phi = 1/11 and theta = pi/11, so pairs more
    # than 0.09 apart leave the middle phi bin and pairs more than 0.14 apart the middle theta bin.
    index = np.arange(1000) + 0.5
    polar = np.arccos(1.0 - 2.0 * index / 1000)
    azimuth = math.pi * (1.0 + math.sqrt(5.0)) * index
    sphere = 0.5 * np.column_stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)])
    # A roof: two half-planes meeting at a right angle along the y axis, seen from above.
    x, y = np.meshgrid(np.arange(-30, 31) * step, np.arange(0, 31) * step)
    roof = np.column_stack([x.ravel(), y.ravel(), -np.abs(x.ravel())])

    sphere_features = fpfh_features(sphere, spacing=step, viewpoint=(0.0, 0.0, 0.0))
    roof_features = fpfh_features(roof, spacing=step, viewpoint=(0.0, 0.75, 5.0))

    def distance_to_plane(features: np.ndarray) -> np.ndarray:
        return np.abs(features - PLANE_DESCRIPTOR).sum(axis=1)

    # Roof points farther than feature radius + neighbour feature radius + normal radius
    # (5 + 5 + 2 steps) from the ridge see only flat ground.
    distance_to_ridge = np.abs(roof[:, 0])
    assert np.all(distance_to_plane(roof_features[distance_to_ridge > 12.5 * step]) < 1e-3)
    assert np.all(distance_to_plane(roof_features[distance_to_ridge < 0.5 * step]) > 100.0)
    assert np.all(distance_to_plane(sphere_features) > 150.0)


def test_sub_histograms_sum_to_total():
    features = fpfh_features(wavy_surface(300, seed=2, noise=0.005), viewpoint=(0.5, 0.5, 3.0))

    sums = features.reshape(-1, 3, HISTOGRAM_BINS).sum(axis=2)

    np.testing.assert_allclose(sums, HISTOGRAM_TOTAL, rtol=1e-5)
    assert np.all(features >= 0.0)


def test_isolated_point_has_empty_histograms():
    points = np.vstack([plane_grid(6, 0.1), [[10.0, 10.0, 0.0]]])
    normals = estimate_normals(points, radius=0.2, max_nn=10, viewpoint=(0.0, 0.0, 5.0))

    features = compute_fpfh(points, normals, radius=0.3, max_nn=20)

    assert np.all(features[-1] == 0.0)
    np.testing.assert_allclose(features[:-1], np.broadcast_to(PLANE_DESCRIPTOR, (36, FPFH_DIM)), atol=1e-4)


# ---------------------------------------------------------------- input errors


def test_too_few_points_rejected():
    with pytest.raises(ValueError, match="at least 5 points, got 4"):
        fpfh_features(np.eye(4, 3))


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (np.zeros((10, 2)), r"\(N, 3\).*got shape \(10, 2\)"),
        (np.zeros((0, 3)), "empty"),
        (np.array([[0.0, 0.0, np.nan]] + [[float(i), 0.0, 0.0] for i in range(9)]), "1 rows with NaN"),
    ],
)
def test_bad_points_rejected(points, message):
    with pytest.raises(ValueError, match=message):
        fpfh_features(points, spacing=1.0)


def test_bad_settings_rejected():
    points = plane_grid(4, 0.1)
    unit_normals = np.tile([0.0, 0.0, 1.0], (16, 1))

    with pytest.raises(ValueError, match="radius must be a positive distance"):
        estimate_normals(points, radius=-0.1)
    with pytest.raises(ValueError, match="max_nn must be a positive whole number"):
        find_neighbours(points, radius=0.2, max_nn=0)
    with pytest.raises(ValueError, match="viewpoint must be 3 finite coordinates"):
        estimate_normals(points, radius=0.2, viewpoint=(0.0, 1.0))
    with pytest.raises(ValueError, match="unit length, found length 2"):
        compute_fpfh(points, 2.0 * unit_normals, radius=0.2)
    with pytest.raises(ValueError, match=r"must be \(16, 3\)"):
        compute_fpfh(points, unit_normals[:5], radius=0.2)
    with pytest.raises(ValueError, match=r"neighbour indices must lie in \[0, 15\]"):
        compute_spfh(points, unit_normals, np.full((16, 2), 16))
