"""Organized point clouds: TIFF round trip, validity, RANSAC plane removal, nearest resize, point lists."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from qcstream.models.data import DataError
from qcstream.models.point_clouds import (
    cloud_to_points,
    fit_plane_ransac,
    read_organized_cloud,
    remove_background_plane,
    resize_organized_cloud,
    valid_mask,
    write_organized_cloud,
)


def random_cloud(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A cloud of random coordinates with a block of empty pixels."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-1.0, 1.0, size=(height, width, 3)).astype(np.float32)
    xyz[1:3, 2:5] = 0.0
    return xyz


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(np.clip(abs(float(unit(a) @ unit(b))), -1.0, 1.0)))


# --- TIFF input and output ----------------------------------------------------


def test_round_trip_exact(tmp_path: Path):
    xyz = random_cloud(7, 9)
    path = write_organized_cloud(tmp_path / "sub" / "000.tiff", xyz)

    back = read_organized_cloud(path)

    assert back.dtype == np.float32
    assert back.shape == (7, 9, 3)
    assert np.array_equal(back, xyz)


def test_round_trip_float64_stored_as_float32(tmp_path: Path):
    xyz = random_cloud(5, 4).astype(np.float64) + 1e-9

    back = read_organized_cloud(write_organized_cloud(tmp_path / "000.tiff", xyz))

    assert back.dtype == np.float32
    assert np.array_equal(back, xyz.astype(np.float32))


def test_read_missing_file_names_path(tmp_path: Path):
    path = tmp_path / "absent.tiff"
    with pytest.raises(DataError, match="absent.tiff.*not found"):
        read_organized_cloud(path)


def test_read_non_tiff_file(tmp_path: Path):
    path = tmp_path / "notes.tiff"
    path.write_text("not a tiff")
    with pytest.raises(DataError, match="notes.tiff"):
        read_organized_cloud(path)


def test_read_wrong_shape_names_shape(tmp_path: Path):
    path = tmp_path / "depth.tiff"
    tifffile.imwrite(path, np.ones((6, 5), dtype=np.float32))
    with pytest.raises(DataError, match=r"depth.tiff has shape \(6, 5\)"):
        read_organized_cloud(path)


def test_read_wrong_dtype_names_dtype(tmp_path: Path):
    path = tmp_path / "ints.tiff"
    tifffile.imwrite(path, np.ones((6, 5, 3), dtype=np.uint16), photometric="minisblack", planarconfig="contig")
    with pytest.raises(DataError, match=r"ints.tiff with shape \(6, 5, 3\) has dtype uint16"):
        read_organized_cloud(path)


def test_write_rejects_bad_arrays(tmp_path: Path):
    with pytest.raises(ValueError, match=r"shape \(4, 4\)"):
        write_organized_cloud(tmp_path / "a.tiff", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="dtype int64"):
        write_organized_cloud(tmp_path / "b.tiff", np.zeros((4, 4, 3), dtype=np.int64))
    assert not list(tmp_path.iterdir())


# --- valid pixels and point lists ---------------------------------------------


def test_valid_mask_cases():
    xyz = np.ones((2, 3, 3), dtype=np.float32)
    xyz[0, 0] = 0.0                       # not measured
    xyz[0, 1] = (0.0, 0.0, 0.5)           # on the optical axis: valid
    xyz[1, 0, 2] = np.nan
    xyz[1, 1, 0] = np.inf
    xyz[1, 2] = (0.3, 0.0, 0.0)           # only z is zero: valid

    expected = np.array([[False, True, True], [False, False, True]])
    assert np.array_equal(valid_mask(xyz), expected)


def test_valid_mask_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        valid_mask(np.zeros((4, 3)))


def test_cloud_to_points_indices():
    xyz = np.zeros((3, 4, 3), dtype=np.float32)
    for flat in (1, 2, 5, 11):
        xyz[flat // 4, flat % 4] = (flat, -flat, 10.0 + flat)

    points, pixel_index = cloud_to_points(xyz)

    assert pixel_index.dtype == np.int64
    assert pixel_index.tolist() == [1, 2, 5, 11]
    assert points.dtype == np.float32
    assert points.tolist() == [[1, -1, 11], [2, -2, 12], [5, -5, 15], [11, -11, 21]]

    # A value per point goes back to its pixel.
    image = np.zeros(3 * 4)
    image[pixel_index] = points[:, 2]
    assert np.array_equal(image.reshape(3, 4), xyz[:, :, 2])


def test_cloud_to_points_empty_cloud():
    points, pixel_index = cloud_to_points(np.zeros((2, 2, 3), dtype=np.float32))
    assert points.shape == (0, 3)
    assert pixel_index.shape == (0,)


# --- RANSAC plane fit ----------------------------------------------------------


def plane_with_outliers(
    n_points: int, outlier_fraction: float, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Points on a tilted plane 0.5 from the origin plus outliers at least 5 mm off it.

    Returns ``(points, truth, normal, offset)``; ``normal`` faces the origin.
    """
    rng = np.random.default_rng(seed)
    normal = unit(np.array([0.10, -0.06, -1.0]))
    offset = 0.5
    basis_a = unit(np.cross(normal, [1.0, 0.0, 0.0]))
    basis_b = np.cross(normal, basis_a)
    n_outliers = int(round(outlier_fraction * n_points))
    n_inliers = n_points - n_outliers

    coords = rng.uniform(-0.1, 0.1, size=(n_inliers, 2))
    on_plane = -offset * normal + coords[:, :1] * basis_a + coords[:, 1:] * basis_b
    on_plane += rng.normal(0.0, noise, size=(n_inliers, 1)) * normal

    coords = rng.uniform(-0.1, 0.1, size=(n_outliers, 2))
    height = rng.uniform(0.005, 0.05, size=(n_outliers, 1)) * rng.choice([-1.0, 1.0], size=(n_outliers, 1))
    off_plane = -offset * normal + coords[:, :1] * basis_a + coords[:, 1:] * basis_b + height * normal

    points = np.concatenate([on_plane, off_plane])
    truth = np.concatenate([np.ones(n_inliers, bool), np.zeros(n_outliers, bool)])
    order = rng.permutation(n_points)
    return points[order], truth[order], normal, offset


def test_ransac_recovers_plane_with_outliers():
    points, truth, normal, offset = plane_with_outliers(3000, 0.3, noise=0.0002, seed=1)

    fitted_normal, fitted_offset, inliers = fit_plane_ransac(points, distance=0.002, iterations=100, seed=0)

    assert angle_degrees(fitted_normal, normal) < 0.2
    assert fitted_normal @ normal > 0, "the normal must face the sensor at the origin"
    assert np.linalg.norm(fitted_normal) == pytest.approx(1.0)
    assert fitted_offset == pytest.approx(offset, abs=1e-4)
    assert np.array_equal(inliers, truth)


def test_ransac_deterministic_by_seed():
    points, _, _, _ = plane_with_outliers(800, 0.3, noise=0.0005, seed=2)

    first = fit_plane_ransac(points, distance=0.002, iterations=30, seed=5)
    second = fit_plane_ransac(points, distance=0.002, iterations=30, seed=5)

    assert np.array_equal(first[0], second[0])
    assert first[1] == second[1]
    assert np.array_equal(first[2], second[2])


def test_ransac_input_errors():
    points = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match=r"shape \(10, 2\)"):
        fit_plane_ransac(points[:, :2], distance=0.1)
    with pytest.raises(ValueError, match="2 points"):
        fit_plane_ransac(points[:2], distance=0.1)
    with pytest.raises(ValueError, match="distance 0"):
        fit_plane_ransac(points, distance=0)
    with pytest.raises(ValueError, match="iterations 0"):
        fit_plane_ransac(points, distance=0.1, iterations=0)
    bad = points.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_plane_ransac(bad, distance=0.1)
    line = np.outer(np.arange(10.0), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="collinear"):
        fit_plane_ransac(line, distance=0.1, iterations=20)


# --- background removal on an organized scene ----------------------------------


def table_with_box(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tilted table 0.4 m away with a 10 mm box on it, noise, dropouts and spikes.

    Returns ``(xyz, box, spikes_above)`` where ``box`` marks the measured box pixels and
    ``spikes_above`` the outliers between the table and the sensor.
    """
    rng = np.random.default_rng(seed)
    height, width = 60, 80
    pitch = 0.001
    x, y = np.meshgrid((np.arange(width) - width / 2) * pitch, (np.arange(height) - height / 2) * pitch)
    z = 0.4 + 0.05 * x - 0.03 * y + rng.normal(0.0, 0.0002, size=x.shape)

    box = np.zeros_like(x, dtype=bool)
    box[20:40, 30:55] = True
    z[box] -= 0.010

    # 30 % of the table pixels are outliers: half of them spikes towards the sensor,
    # half of them behind the table (multipath), all at least 5 mm off.
    table_pixels = np.flatnonzero(~box)
    outliers = rng.choice(table_pixels, size=int(0.3 * table_pixels.size), replace=False)
    above, below = outliers[::2], outliers[1::2]
    z.flat[above] -= rng.uniform(0.005, 0.02, size=above.size)
    z.flat[below] += rng.uniform(0.005, 0.02, size=below.size)

    xyz = np.stack([x, y, z], axis=-1).astype(np.float32)
    dropped = rng.random(x.shape) < 0.05
    xyz[dropped] = 0.0
    spikes_above = np.zeros_like(box)
    spikes_above.flat[above] = True
    return xyz, box & ~dropped, spikes_above & ~dropped


def test_remove_background_keeps_box_and_spikes_above():
    xyz, box, spikes_above = table_with_box(seed=3)

    cleaned = remove_background_plane(xyz, distance=0.002, iterations=100, seed=0)

    remaining = valid_mask(cleaned)
    assert np.array_equal(remaining, box | spikes_above)
    assert np.array_equal(cleaned[remaining], xyz[remaining])
    assert (cleaned[~remaining] == 0).all()


def test_remove_background_leaves_input_untouched():
    xyz, _, _ = table_with_box(seed=4)
    before = xyz.copy()
    remove_background_plane(xyz, distance=0.002, iterations=50)
    assert np.array_equal(xyz, before)


def test_remove_background_needs_three_points():
    xyz = np.zeros((4, 4, 3), dtype=np.float32)
    xyz[0, 0] = (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="only 1 valid pixels"):
        remove_background_plane(xyz)


# --- nearest-neighbour resize ----------------------------------------------------


def nearest_reference(xyz: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize by searching, per output pixel, the source pixel whose centre is nearest."""
    height, width = xyz.shape[:2]
    out = np.empty((size[0], size[1], 3), dtype=xyz.dtype)
    source_rows = np.arange(height) + 0.5
    source_cols = np.arange(width) + 0.5
    for i in range(size[0]):
        row = int(np.argmin(np.abs(source_rows - (i + 0.5) * height / size[0])))
        for j in range(size[1]):
            col = int(np.argmin(np.abs(source_cols - (j + 0.5) * width / size[1])))
            out[i, j] = xyz[row, col]
    return out


@pytest.mark.parametrize("size", [(16, 9), (50, 31), (37, 23)])
def test_resize_matches_nearest_reference(size):
    # Sizes are chosen so that no output centre lies halfway between two source centres.
    xyz = random_cloud(37, 23, seed=7)
    xyz[10:20, 5:15] = 0.0

    resized = resize_organized_cloud(xyz, size)

    assert resized.shape == (*size, 3)
    assert resized.dtype == np.float32
    assert np.array_equal(resized, nearest_reference(xyz, size))


def test_resize_invents_no_points():
    xyz = random_cloud(37, 23, seed=8)
    xyz[::3] = 0.0

    resized = resize_organized_cloud(xyz, (50, 31))

    source_points = {tuple(p) for p in xyz.reshape(-1, 3)[valid_mask(xyz).ravel()]}
    resized_points = {tuple(p) for p in resized.reshape(-1, 3)[valid_mask(resized).ravel()]}
    assert resized_points <= source_points
    assert (resized[~valid_mask(resized)] == 0).all()


def test_resize_integer_upsampling_repeats_pixels():
    xyz = random_cloud(4, 6, seed=9)
    resized = resize_organized_cloud(xyz, (8, 18))
    assert np.array_equal(resized, np.repeat(np.repeat(xyz, 2, axis=0), 3, axis=1))


def test_resize_rejects_bad_size():
    with pytest.raises(ValueError, match=r"size \(0, 4\)"):
        resize_organized_cloud(random_cloud(4, 6), (0, 4))
