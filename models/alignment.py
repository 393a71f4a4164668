"""Point feature alignment: from point-group features to a pixel-aligned feature grid (M3DM).

A point encoder gives features at M group centers (Point-MAE), or at every point
(FPFH). The organized point cloud maps each valid point to one pixel. The chain is:

1. :func:`interpolate_to_points`: inverse distance weighting over the k nearest
   centers gives every point a feature ``(N, C)``. Per-point features skip this step.
2. :func:`scatter_to_pixels`: each point's feature is written to its pixel ``(C, H, W)``.
3. :func:`pool_to_grid`: the valid pixels of each grid cell are averaged to the RGB
   feature grid ``(C, h, w)`` and smoothed by a 3x3 mean over valid cells.

:func:`align_point_features` runs the chain in channel blocks, so its full-resolution
maps contain at most :data:`PIXEL_BLOCK_VALUES` values at a time.
"""

from __future__ import annotations

import logging
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]

#: Distances per block in the nearest-center search: a block of ``rows`` query points
#: and M centers has ``rows * M <= DISTANCE_BLOCK_VALUES`` float64 distances (8 MB).
DISTANCE_BLOCK_VALUES = 1024 * 1024

#: Points per block when gathering interpolated features ``(rows, C)``.
POINT_BLOCK_ROWS = 1024

#: Pixel features per channel block in :func:`align_point_features`. The block's
#: full-resolution map ``(channels, H, W)`` contains at most this many float32 values (64 MB).
PIXEL_BLOCK_VALUES = 16 * 1024 * 1024


def organized_points(xyz: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an organized cloud ``(H, W, 3)`` into its valid points and their pixels.

    A pixel is valid when any of its x, y, z is non-zero, because the sensor writes
    all-zero where it saw nothing. Returns ``points (N, 3)`` in the cloud's units and
    ``pixel_index (N,)`` int64, the flat index ``row * W + col`` of each point.
    """
    xyz = _as_float_tensor(xyz, "xyz")
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"xyz must be an organized cloud (H, W, 3), got shape {tuple(xyz.shape)}")

    flat = xyz.reshape(-1, 3)
    pixel_index = torch.nonzero((flat != 0).any(dim=1)).squeeze(1)
    return flat[pixel_index], pixel_index


def nearest_center_weights(
    centers: ArrayLike, points: ArrayLike, k: int = 3, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the k nearest centers ``(M, 3)`` of each point ``(N, 3)`` and their interpolation weights.

    The weight of a center is ``1 / d`` for Euclidean distance ``d``, normalised so
    each point's k weights sum to 1. A point within ``eps`` (coordinate units) of its
    nearest center gets weight 1 on that center and 0 on the others.
    Returns ``indices (N, k)`` int64 and ``weights (N, k)`` float64.
    """
    centers = _as_float_tensor(centers, "centers").double()
    points = _as_float_tensor(points, "points").double()
    _check_coordinates(centers, "centers", allow_empty=False)
    _check_coordinates(points, "points", allow_empty=True)
    n_centers = centers.shape[0]
    if not 1 <= k <= n_centers:
        raise ValueError(f"k must be between 1 and the number of centers ({n_centers}), got k={k}")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")

    n_points = points.shape[0]
    indices = torch.empty(n_points, k, dtype=torch.long)
    weights = torch.empty(n_points, k, dtype=torch.float64)
    block_rows = max(1, DISTANCE_BLOCK_VALUES // n_centers)
    for start in range(0, n_points, block_rows):
        stop = start + block_rows
        # Exact differences, not the |x|^2 + |c|^2 - 2 x.c shortcut, because the
        # shortcut's rounding hides a point that sits on a center.
        distances = torch.cdist(points[start:stop], centers, compute_mode="donot_use_mm_for_euclid_dist")
        nearest, nearest_index = torch.topk(distances, k, dim=1, largest=False, sorted=True)

        inverse = 1.0 / nearest.clamp_min(eps if eps > 0 else torch.finfo(torch.float64).tiny)
        block_weights = inverse / inverse.sum(dim=1, keepdim=True)

        on_center = nearest[:, 0] <= eps
        block_weights[on_center] = 0.0
        block_weights[on_center, 0] = 1.0

        indices[start:stop] = nearest_index
        weights[start:stop] = block_weights
    return indices, weights


def interpolate_to_points(
    centers: ArrayLike, center_features: ArrayLike, points: ArrayLike, k: int = 3, eps: float = 1e-8
) -> torch.Tensor:
    """Interpolate center features ``(M, C)`` to points ``(N, 3)`` by inverse distance weighting.

    Each point's feature is the mean of its k nearest centers' features weighted by
    ``1 / distance`` (see :func:`nearest_center_weights`). A point within ``eps`` of
    a center takes that center's feature. Returns ``(N, C)`` in the dtype of
    ``center_features`` (float32 when it is not floating point).
    """
    center_features = _as_float_tensor(center_features, "center_features")
    _check_center_features(center_features, centers)

    indices, weights = nearest_center_weights(centers, points, k=k, eps=eps)
    return _weighted_gather(center_features, indices, weights)


def scatter_to_pixels(point_features: ArrayLike, pixel_index: ArrayLike, image_shape: tuple[int, int]) -> torch.Tensor:
    """Write each point's feature ``(N, C)`` to its pixel of an ``image_shape`` ``(H, W)`` image.

    ``pixel_index (N,)`` is the flat index ``row * W + col``, one distinct pixel per
    point, as in an organized cloud. Returns ``(C, H, W)`` with zeros at pixels
    that no point maps to.
    """
    point_features = _as_float_tensor(point_features, "point_features")
    if point_features.ndim != 2:
        raise ValueError(f"point_features must be (N, C), got shape {tuple(point_features.shape)}")
    height, width = _check_shape(image_shape, "image_shape")
    pixel_index = _check_pixel_index(pixel_index, point_features.shape[0], height * width)

    channels = point_features.shape[1]
    flat = point_features.new_zeros(height * width, channels)
    flat[pixel_index] = point_features
    return flat.T.reshape(channels, height, width)


def pool_to_grid(
    pixel_features: ArrayLike, valid: ArrayLike, grid: tuple[int, int], smooth: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the valid pixels of ``(C, H, W)`` features in each cell of a ``grid`` ``(h, w)``.

    Cells are those of ``adaptive_avg_pool2d``: cell row ``i`` covers pixel rows
    ``floor(i * H / h)`` to ``ceil((i + 1) * H / h) - 1``, so neighbouring cells
    overlap when ``h`` does not divide ``H``. A cell is valid when it contains at least
    one valid pixel ``valid (H, W)``, and an invalid cell is zero. With ``smooth``,
    each valid cell is then replaced by the mean of the valid cells in its 3x3
    neighbourhood: the 3x3 average of the RGB patch features, restricted to cells
    the sensor saw. Returns ``features (C, h, w)`` and ``cell_valid (h, w)`` bool.
    """
    pixel_features = _as_float_tensor(pixel_features, "pixel_features")
    if pixel_features.ndim != 3:
        raise ValueError(f"pixel_features must be (C, H, W), got shape {tuple(pixel_features.shape)}")
    valid = torch.as_tensor(valid)
    if valid.dtype != torch.bool or tuple(valid.shape) != tuple(pixel_features.shape[1:]):
        raise ValueError(
            f"valid must be a bool mask of shape {tuple(pixel_features.shape[1:])}, "
            f"got {valid.dtype} of shape {tuple(valid.shape)}"
        )
    grid = _check_shape(grid, "grid")

    mask = valid.to(pixel_features.dtype)[None]
    # Both averages divide by the same cell area, so their ratio is the mean over valid pixels.
    summed = F.adaptive_avg_pool2d(pixel_features * mask, grid)
    coverage = F.adaptive_avg_pool2d(mask, grid)
    features, cell_valid = _masked_ratio(summed, coverage)

    if smooth:
        features = smooth_valid_cells(features, cell_valid)
    return features, cell_valid


def smooth_valid_cells(features: torch.Tensor, cell_valid: torch.Tensor) -> torch.Tensor:
    """Replace each valid cell of ``(C, h, w)`` features by the mean of the valid cells around it.

    The neighbourhood is 3x3, cut at the grid border. Invalid cells stay zero.
    """
    mask = cell_valid.to(features.dtype)[None]
    summed = F.avg_pool2d(features * mask, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    coverage = F.avg_pool2d(mask, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    smoothed, _ = _masked_ratio(summed, coverage)
    return smoothed * mask


def align_point_features(
    centers: ArrayLike | None,
    center_features: ArrayLike,
    points: ArrayLike,
    pixel_index: ArrayLike,
    image_shape: tuple[int, int],
    grid: tuple[int, int],
    k: int = 3,
    eps: float = 1e-8,
    smooth: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align point-group features to the RGB feature grid: interpolate, scatter, pool and smooth.

    ``centers (M, 3)`` and ``center_features (M, C)`` come from the point encoder,
    ``points (N, 3)`` are the cloud's valid points and ``pixel_index (N,)`` their flat
    pixel indices in an ``image_shape`` ``(H, W)`` image (see :func:`organized_points`).
    For per-point features such as FPFH, pass ``centers=None`` and one feature row per
    point: interpolation is then skipped. Returns ``features (C, h, w)`` and
    ``cell_valid (h, w)`` as :func:`pool_to_grid` does, for ``grid`` ``(h, w)``.

    Channels are processed in blocks of at most :data:`PIXEL_BLOCK_VALUES` pixel
    values, so memory stays bounded for large images and wide features.
    """
    center_features = _as_float_tensor(center_features, "center_features")
    points = _as_float_tensor(points, "points")
    if centers is None:
        _check_center_features(center_features, points, "points")
    else:
        _check_center_features(center_features, centers, "centers")
    height, width = _check_shape(image_shape, "image_shape")
    pixel_index = _check_pixel_index(pixel_index, points.shape[0], height * width)
    grid = _check_shape(grid, "grid")

    if centers is not None:
        indices, weights = nearest_center_weights(centers, points, k=k, eps=eps)
    valid = torch.zeros(height * width, dtype=torch.bool)
    valid[pixel_index] = True
    valid = valid.reshape(height, width)

    channels = center_features.shape[1]
    block_channels = max(1, PIXEL_BLOCK_VALUES // (height * width))
    logger.debug(
        "Aligning %d point features of width %d to grid %s in blocks of %d channels",
        points.shape[0], channels, grid, block_channels,
    )
    blocks = []
    cell_valid = None
    for start in range(0, channels, block_channels):
        block_features = center_features[:, start : start + block_channels]
        if centers is not None:
            block_features = _weighted_gather(block_features, indices, weights)
        pixel_features = scatter_to_pixels(block_features, pixel_index, (height, width))
        block, cell_valid = pool_to_grid(pixel_features, valid, grid, smooth=smooth)
        blocks.append(block)
    return torch.cat(blocks, dim=0), cell_valid


# --- helpers ----------------------------------------------------------------------


def _weighted_gather(features: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Return ``sum_j weights[:, j] * features[indices[:, j]]``: ``(N, C)`` from ``(M, C)``.

    Rows go in blocks of :data:`POINT_BLOCK_ROWS`, so the temporaries stay small
    next to the ``(N, C)`` result.
    """
    weights = weights.to(features.dtype)
    result = features.new_empty(indices.shape[0], features.shape[1])
    for start in range(0, indices.shape[0], POINT_BLOCK_ROWS):
        stop = start + POINT_BLOCK_ROWS
        block_indices, block_weights = indices[start:stop], weights[start:stop]
        block = torch.mul(block_weights[:, :1], features[block_indices[:, 0]], out=result[start:stop])
        for j in range(1, indices.shape[1]):
            block.addcmul_(block_weights[:, j : j + 1], features[block_indices[:, j]])
    return result


def _masked_ratio(summed: torch.Tensor, coverage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide ``(C, h, w)`` sums by ``(1, h, w)`` coverage where it is positive, and zero elsewhere."""
    covered = coverage[0] > 0
    ratio = torch.where(covered, summed / coverage.clamp_min(torch.finfo(summed.dtype).tiny), 0.0)
    return ratio, covered


def _as_float_tensor(values: ArrayLike, name: str) -> torch.Tensor:
    if not isinstance(values, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(values).__name__}")
    tensor = torch.as_tensor(values)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor


def _check_coordinates(coordinates: torch.Tensor, name: str, allow_empty: bool) -> None:
    if coordinates.ndim != 2 or coordinates.shape[1] != 3:
        raise ValueError(f"{name} must be 3-D coordinates (N, 3), got shape {tuple(coordinates.shape)}")
    if coordinates.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: at least one is needed")
    if not torch.isfinite(coordinates).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates: drop those points first")


def _check_center_features(center_features: torch.Tensor, owners: ArrayLike, owner_name: str = "centers") -> None:
    """Check that ``center_features`` is ``(M, C)`` with one row per entry of ``owners``."""
    if center_features.ndim != 2 or center_features.shape[1] == 0:
        raise ValueError(f"center_features must be (M, C) with C >= 1, got shape {tuple(center_features.shape)}")
    n_owners = len(owners)
    if center_features.shape[0] != n_owners:
        raise ValueError(
            f"center_features has {center_features.shape[0]} rows but there are {n_owners} {owner_name}: "
            f"pass one feature row per entry of {owner_name}"
        )


def _check_shape(shape: tuple[int, int], name: str) -> tuple[int, int]:
    if len(shape) != 2 or any(int(size) <= 0 for size in shape):
        raise ValueError(f"{name} must be two positive sizes (height, width), got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _check_pixel_index(pixel_index: ArrayLike, n_points: int, n_pixels: int) -> torch.Tensor:
    pixel_index = torch.as_tensor(pixel_index)
    if pixel_index.ndim != 1 or pixel_index.shape[0] != n_points:
        raise ValueError(f"pixel_index must have shape ({n_points},), one entry per point, got {tuple(pixel_index.shape)}")
    if pixel_index.is_floating_point() or pixel_index.dtype == torch.bool:
        raise ValueError(f"pixel_index must contain integers, got {pixel_index.dtype}")
    pixel_index = pixel_index.long()
    if n_points == 0:
        return pixel_index

    low, high = int(pixel_index.min()), int(pixel_index.max())
    if low < 0 or high >= n_pixels:
        raise ValueError(f"pixel_index values must lie in [0, {n_pixels - 1}] (H * W pixels), got range [{low}, {high}]")
    n_distinct = int(torch.unique(pixel_index).numel())
    if n_distinct != n_points:
        raise ValueError(
            f"pixel_index maps {n_points} points to only {n_distinct} distinct pixels: "
            "an organized cloud has one point per pixel, so remove the duplicates"
        )
    return pixel_index
