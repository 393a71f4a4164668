"""Organized point clouds as in MVTec 3D-AD: reading, writing, background removal, resizing.

An organized point cloud is an ``(H, W, 3)`` float32 array that is pixel-aligned with
the RGB image: pixel ``(row, col)`` stores the x, y, z of the surface point seen
there, and all three are zero where the sensor measured nothing. On disk it is a
float32 TIFF with three samples per pixel (``xyz/NNN.tiff``).

Coordinates are in the sensor frame: the sensor sits at the origin and looks along
+z, so the part lies between the sensor and the table. Functions that need a unit
(the RANSAC distance) take it in the cloud's own units.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tifffile

from qcstream.models.data import DataError

logger = logging.getLogger(__name__)

# Candidate planes are scored in blocks of this many, so the (block, N) distance
# matrix stays small for clouds of a few hundred thousand points.
_RANSAC_BLOCK = 32

# Least-squares refits of the best RANSAC plane on its own inliers.
_PLANE_REFITS = 2


def read_organized_cloud(path: str | Path) -> np.ndarray:
    """Read an organized point cloud TIFF as ``(H, W, 3)`` float32 x, y, z.

    Raises :class:`~qcstream.models.data.DataError` naming the path when the file is
    missing, is not a readable TIFF, is not ``(H, W, 3)`` or is not float32.
    """
    path = Path(path)
    try:
        xyz = tifffile.imread(path)
    except FileNotFoundError as exc:
        raise DataError(f"point cloud {path} not found; check the path") from exc
    except (OSError, ValueError, IndexError, KeyError) as exc:
        raise DataError(
            f"cannot read point cloud {path}: {exc}. The file is damaged or not a TIFF; "
            "replace it or remove it from the data set"
        ) from exc

    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DataError(
            f"point cloud {path} has shape {xyz.shape}; expected (H, W, 3) with x, y, z per pixel "
            "as in MVTec 3D-AD"
        )
    if xyz.dtype != np.float32:
        raise DataError(
            f"point cloud {path} with shape {xyz.shape} has dtype {xyz.dtype}; expected float32. "
            "Write it again with write_organized_cloud, which stores float32"
        )
    return xyz


def write_organized_cloud(path: str | Path, xyz: np.ndarray) -> Path:
    """Write ``xyz`` ``(H, W, 3)`` as an uncompressed float32 TIFF and return the path.

    Floating-point input is stored as float32, so :func:`read_organized_cloud`
    returns ``xyz.astype(np.float32)`` bit for bit. Missing parent folders are created.
    """
    path = Path(path)
    xyz = np.asarray(xyz)
    _check_cloud(xyz, "write_organized_cloud")

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, xyz.astype(np.float32, copy=False), photometric="minisblack", planarconfig="contig")
    return path


def valid_mask(xyz: np.ndarray) -> np.ndarray:
    """Return the ``(H, W)`` bool mask of measured pixels: all of x, y, z finite and not all zero."""
    xyz = np.asarray(xyz)
    _check_cloud(xyz, "valid_mask")
    finite = np.isfinite(xyz).all(axis=2)
    nonzero = (xyz != 0).any(axis=2)
    return finite & nonzero


def fit_plane_ransac(
    points: np.ndarray,
    distance: float,
    iterations: int = 200,
    seed: int = 0,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Fit the plane with the most points within ``distance`` by RANSAC.

    ``points`` is ``(N, 3)`` with N >= 3, and ``distance`` is in the points' units.
    Each iteration draws 3 points and counts the points within ``distance`` of their
    plane. The best plane is then refit by least squares (SVD) on its inliers.

    Returns ``(normal, offset, inliers)``: ``normal`` ``(3,)`` has unit length and
    ``normal @ p + offset`` is the signed distance of a point ``p`` to the plane.
    The normal points to the side of the sensor at the origin, so points above the
    plane (between it and the sensor) have positive distances. ``inliers`` ``(N,)``
    bool marks ``|signed distance| <= distance``. The same seed gives the same result.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"fit_plane_ransac: points have shape {points.shape}; expected (N, 3)")
    if points.shape[0] < 3:
        raise ValueError(f"fit_plane_ransac: {points.shape[0]} points given; a plane needs at least 3")
    if not np.isfinite(points).all():
        raise ValueError("fit_plane_ransac: points contain NaN or infinity; pass only valid points (see cloud_to_points)")
    if not distance > 0:
        raise ValueError(f"fit_plane_ransac: distance {distance!r} must be positive, in the points' units")
    if iterations < 1:
        raise ValueError(f"fit_plane_ransac: iterations {iterations!r} must be at least 1")

    rng = np.random.default_rng(seed)
    samples = _draw_triples(rng, points.shape[0], iterations)
    normal, offset = _best_candidate_plane(points, samples, distance)
    if normal is None:
        raise ValueError(
            f"fit_plane_ransac: all {iterations} samples of 3 points were collinear; "
            "the points do not span a plane"
        )

    for _ in range(_PLANE_REFITS):
        inliers = np.abs(points @ normal + offset) <= distance
        if inliers.sum() < 3:
            break
        normal, offset = _least_squares_plane(points[inliers])

    normal, offset = _orient_to_sensor(normal, offset)
    inliers = np.abs(points @ normal + offset) <= distance
    return normal.astype(np.float64), float(offset), inliers


def remove_background_plane(
    xyz: np.ndarray,
    distance: float = 0.002,
    iterations: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """Return a copy of ``xyz`` ``(H, W, 3)`` with the background plane set to zero.

    The plane is fit by :func:`fit_plane_ransac` over the valid pixels. Pixels within
    ``distance`` of it and pixels below it (on the far side from the sensor) become
    empty, so only points more than ``distance`` above the table remain.
    ``distance`` is in the cloud's units: the default of 0.002 is 2 mm for clouds
    in metres, such as the generated scans.

    NOTE: the table must be the largest plane in view. A flat part that covers
    more pixels than the visible table would be removed instead.
    """
    xyz = np.asarray(xyz)
    _check_cloud(xyz, "remove_background_plane")
    points, pixel_index = cloud_to_points(xyz)
    if points.shape[0] < 3:
        raise ValueError(
            f"remove_background_plane: only {points.shape[0]} valid pixels in a cloud of shape {xyz.shape}; "
            "a plane needs at least 3"
        )

    normal, offset, _ = fit_plane_ransac(points, distance, iterations, seed)
    signed_distance = points.astype(np.float64) @ normal + offset
    background = signed_distance <= distance

    cleaned = xyz.astype(np.float32, copy=True)
    cleaned.reshape(-1, 3)[pixel_index[background]] = 0.0
    logger.debug(
        "removed background plane: %d of %d valid pixels within %g of the plane or below it",
        int(background.sum()), points.shape[0], distance,
    )
    return cleaned


def resize_organized_cloud(xyz: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``xyz`` ``(H, W, 3)`` to ``size = (h, w)`` by nearest-neighbour sampling.

    Output pixel ``(i, j)`` copies source pixel ``(floor((i + 0.5) * H / h),
    floor((j + 0.5) * W / w))``, the source pixel whose centre is nearest. No
    coordinates are averaged, so no point is invented between a part and the table
    or in an empty pixel, and empty pixels stay empty.
    """
    xyz = np.asarray(xyz)
    _check_cloud(xyz, "resize_organized_cloud")
    height, width = _check_size(size, "resize_organized_cloud")

    rows = _nearest_source_index(xyz.shape[0], height)
    cols = _nearest_source_index(xyz.shape[1], width)
    return xyz[rows[:, None], cols[None, :]].astype(np.float32, copy=False)


def cloud_to_points(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the valid pixels of ``xyz`` ``(H, W, 3)`` as points and their pixel indices.

    Returns ``points`` ``(N, 3)`` float32 and ``pixel_index`` ``(N,)`` int64, the flat
    index ``row * W + col`` of each point's pixel, in raster order. A per-point value
    goes back to its pixel with ``image.reshape(H * W, ...)[pixel_index] = value``.
    """
    mask = valid_mask(xyz)
    pixel_index = np.flatnonzero(mask).astype(np.int64)
    points = np.asarray(xyz).reshape(-1, 3)[pixel_index].astype(np.float32, copy=False)
    return points, pixel_index


def _check_cloud(xyz: np.ndarray, caller: str) -> None:
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"{caller}: point cloud has shape {xyz.shape}; expected (H, W, 3) with x, y, z per pixel")
    if not np.issubdtype(xyz.dtype, np.floating):
        raise ValueError(
            f"{caller}: point cloud with shape {xyz.shape} has dtype {xyz.dtype}; "
            "expected floating point, e.g. xyz.astype(np.float32)"
        )


def _check_size(size: tuple[int, int], caller: str) -> tuple[int, int]:
    if len(size) != 2 or any(int(side) != side or side < 1 for side in size):
        raise ValueError(f"{caller}: size {size!r} must be (height, width) with positive integers")
    return int(size[0]), int(size[1])


def _nearest_source_index(source_length: int, target_length: int) -> np.ndarray:
    centres = (np.arange(target_length) + 0.5) * (source_length / target_length)
    return np.minimum(np.floor(centres).astype(np.int64), source_length - 1)


def _draw_triples(rng: np.random.Generator, n_points: int, iterations: int) -> np.ndarray:
    """Draw ``(iterations, 3)`` indices, three distinct points per row."""
    first = rng.integers(0, n_points, size=iterations)
    second = (first + rng.integers(1, n_points, size=iterations)) % n_points
    third = rng.integers(0, n_points, size=iterations)
    # A clash of the third index with the first two gives a degenerate sample, which is skipped.
    return np.stack([first, second, third], axis=1)


def _best_candidate_plane(
    points: np.ndarray, samples: np.ndarray, distance: float
) -> tuple[np.ndarray | None, float]:
    """Return the sampled plane ``(normal, offset)`` with the most inliers, or ``(None, 0.0)``."""
    best_count = -1
    best_normal: np.ndarray | None = None
    best_offset = 0.0

    for start in range(0, samples.shape[0], _RANSAC_BLOCK):
        triples = points[samples[start:start + _RANSAC_BLOCK]]
        normals = np.cross(triples[:, 1] - triples[:, 0], triples[:, 2] - triples[:, 0])
        lengths = np.linalg.norm(normals, axis=1)
        scale = np.abs(triples - triples[:, :1]).max(axis=(1, 2))
        usable = lengths > 1e-12 * np.maximum(scale, 1e-300) ** 2
        if not usable.any():
            continue

        normals = normals[usable] / lengths[usable, None]
        offsets = -np.einsum("ij,ij->i", normals, triples[usable, 0])
        counts = (np.abs(points @ normals.T + offsets) <= distance).sum(axis=0)
        winner = int(np.argmax(counts))
        if counts[winner] > best_count:
            best_count = int(counts[winner])
            best_normal = normals[winner]
            best_offset = float(offsets[winner])
    return best_normal, best_offset


def _least_squares_plane(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Return the plane through the centroid whose normal is the direction of least variance."""
    centroid = points.mean(axis=0)
    _, _, vt = np.linalg.svd(points - centroid, full_matrices=False)
    normal = vt[-1]
    return normal, float(-normal @ centroid)


def _orient_to_sensor(normal: np.ndarray, offset: float) -> tuple[np.ndarray, float]:
    """Flip the plane so the sensor at the origin has a positive signed distance.

    A plane through the origin falls back to a normal with negative z, which also
    faces a sensor looking along +z.
    """
    if offset < 0 or (offset == 0 and normal[2] > 0):
        return -normal, -offset
    return normal, offset
