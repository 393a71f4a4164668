"""Fast Point Feature Histograms (FPFH): point descriptors that need no pretrained weights.

FPFH is defined by Rusu, Blodow and Beetz, "Fast Point Feature Histograms (FPFH) for
3D Registration", ICRA 2009. Horwitz and Hoshen, "Back to the Feature" (2022), use it
as the point feature of MVTec 3D-AD anomaly detection. Each point gets a 33-bin
descriptor of how the surface normals around it turn: three 11-bin histograms of the
Darboux frame angles ``alpha``, ``phi`` and ``theta`` of :func:`pair_features`.

Neighbourhoods are hybrid searches: the points within ``radius``, at most ``max_nn``
of them (the nearest), never the query point itself. Neighbour index arrays are
``(N, K)`` with ``-1`` marking an empty slot. All work runs on whole arrays in row
chunks, so memory stays bounded and there is no Python loop over points.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.spatial import cKDTree

logger = logging.getLogger(__name__)

#: Bins of each of the three sub-histograms (alpha, phi, theta).
HISTOGRAM_BINS = 11
#: Length of an FPFH descriptor: three sub-histograms.
FPFH_DIM = 3 * HISTOGRAM_BINS
#: Sum of every non-empty sub-histogram of an SPFH or FPFH, so bins read as percent of pairs.
HISTOGRAM_TOTAL = 100.0
#: Smallest cloud :func:`fpfh_features` accepts. A normal needs three points, and the
#: weighted FPFH sum needs neighbours that have neighbours of their own.
MIN_POINTS = 5
#: Default radii of :func:`fpfh_features` as multiples of the mean point spacing.
NORMAL_RADIUS_FACTOR = 2.0
FEATURE_RADIUS_FACTOR = 5.0
#: A neighbourhood counts as collinear (its normal is undefined) when the middle eigenvalue
#: of its covariance is below this fraction of the largest one.
COLLINEAR_TOLERANCE = 1e-9
#: Vectors shorter than this count as zero: the cross product ``u x d`` of a pair whose
#: source normal lies along the connecting line, or a fallback normal.
ZERO_LENGTH = 1e-12
#: Point pairs processed per chunk. The float64 temporaries of one chunk take an estimated 200 MB.
PAIRS_PER_CHUNK = 1 << 19


def find_neighbours(points: np.ndarray, radius: float, max_nn: int) -> tuple[np.ndarray, np.ndarray]:
    """Find up to ``max_nn`` nearest points within ``radius`` of each point, excluding the point itself.

    ``points`` is ``(N, 3)``. Returns ``(indices, distances)``, both ``(N, max_nn)`` and
    sorted by distance, with ``-1`` and ``inf`` in empty slots. A duplicate of a point
    (distance 0) is a neighbour like any other.
    """
    points = _check_points(points)
    radius = _check_radius(radius, "radius")
    max_nn = _check_max_nn(max_nn, "max_nn")
    n_points = points.shape[0]

    # Ask for one extra point because the query point finds itself.
    tree = cKDTree(points)
    distances, indices = tree.query(points, k=max_nn + 1, distance_upper_bound=radius)
    valid = (indices < n_points) & (indices != np.arange(n_points)[:, None])

    # Move the valid entries of each row to the front, keeping their distance order.
    order = np.argsort(~valid, axis=1, kind="stable")[:, :max_nn]
    valid = np.take_along_axis(valid, order, axis=1)
    indices = np.where(valid, np.take_along_axis(indices, order, axis=1), -1)
    distances = np.where(valid, np.take_along_axis(distances, order, axis=1), np.inf)
    return indices.astype(np.int64), distances


def estimate_normals(
    points: np.ndarray,
    radius: float,
    max_nn: int = 30,
    viewpoint: Sequence[float] | np.ndarray | None = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Estimate unit surface normals ``(N, 3)`` of ``points`` ``(N, 3)`` by PCA of each neighbourhood.

    The normal is the eigenvector of the smallest eigenvalue of the covariance of the
    point and its neighbours (:func:`find_neighbours` with ``radius`` and ``max_nn``).
    With a ``viewpoint`` (the sensor position, in the units of ``points``), each normal
    is flipped to point towards it. With ``None`` the sign is whatever the eigensolver
    returns, so it is arbitrary.

    Fallback: a neighbourhood of one or two points, or of collinear points, has no
    plane. Its normal is the line of sight (from the point to the viewpoint, or +z
    without one) with the component along the neighbourhood's line removed. In the
    rare case where the line of sight runs along that line, the eigenvector is kept.
    """
    points = _check_points(points)
    sight = _line_of_sight(points, viewpoint)
    indices, _ = find_neighbours(points, radius, max_nn)
    n_points = points.shape[0]

    # Each neighbourhood includes its own point, so every row has at least one member.
    members = np.concatenate([np.arange(n_points)[:, None], indices], axis=1)
    covariances = np.empty((n_points, 3, 3))
    for rows in _row_chunks(n_points, members.shape[1]):
        covariances[rows] = _neighbourhood_covariances(points, members[rows])
    eigenvalues, eigenvectors = np.linalg.eigh(covariances)
    normals = eigenvectors[:, :, 0].copy()

    collinear = eigenvalues[:, 1] <= COLLINEAR_TOLERANCE * eigenvalues[:, 2]
    if np.any(collinear):
        normals[collinear] = _fallback_normals(
            sight[collinear], eigenvalues[collinear], eigenvectors[collinear], normals[collinear]
        )
        logger.debug("Used the line-of-sight fallback normal for %d of %d points", int(collinear.sum()), n_points)

    if viewpoint is not None:
        facing_away = np.einsum("ij,ij->i", normals, sight) < 0.0
        normals[facing_away] *= -1.0
    return normals


def pair_features(
    p_s: np.ndarray, n_s: np.ndarray, p_t: np.ndarray, n_t: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Compute the Darboux frame features ``(alpha, phi, theta, distance)`` of point pairs.

    Inputs are ``(..., 3)`` positions and unit normals. Outputs have shape ``(...)``.
    The pair is first ordered: the source is the point whose normal makes the smaller
    angle with the connecting line, that is the larger ``|n . d|`` with ``d`` the unit
    vector between the points. This makes the result independent of the argument
    order, except on ties, where the arguments keep their order. With ``d`` now
    running from source to target:

    - ``u = n_s``, ``v = (u x d) / |u x d|``, ``w = u x v``
    - ``alpha = v . n_t`` in [-1, 1]
    - ``phi = u . d`` in [-1, 1]
    - ``theta = atan2(w . n_t, u . n_t)`` in [-pi, pi] radians
    - ``distance = |p_t - p_s|`` in the units of the points

    Coincident points give ``distance`` 0 and NaN angles. A source normal parallel to
    ``d`` leaves ``v`` undefined, so ``alpha`` and ``theta`` are NaN there.

    NOTE: PCL's FPFH code (``computePairFeatures`` in ``fpfh.hpp``) builds ``v`` from
    ``d x u``, the opposite sign, so its ``alpha`` and ``theta`` are the negatives of these.
    """
    p_s, n_s, p_t, n_t = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (p_s, n_s, p_t, n_t)))
    if p_s.shape[-1] != 3:
        raise ValueError(f"pair_features expects (..., 3) points and normals, got shape {p_s.shape}")

    offset = p_t - p_s
    distance = np.linalg.norm(offset, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        direction = offset / distance[..., None]
    cos_s = np.sum(n_s * direction, axis=-1)
    cos_t = np.sum(n_t * direction, axis=-1)

    # Swap source and target where the target's normal is closer to the connecting line.
    swap = (np.abs(cos_t) > np.abs(cos_s))[..., None]
    u = np.where(swap, n_t, n_s)
    target_normal = np.where(swap, n_s, n_t)
    direction = np.where(swap, -direction, direction)
    phi = np.sum(u * direction, axis=-1)

    v = np.cross(u, direction)
    v_norm = np.linalg.norm(v, axis=-1)
    has_frame = v_norm > ZERO_LENGTH
    v = v / np.where(has_frame, v_norm, 1.0)[..., None]
    w = np.cross(u, v)

    alpha = np.where(has_frame, np.sum(v * target_normal, axis=-1), np.nan)
    theta = np.where(
        has_frame, np.arctan2(np.sum(w * target_normal, axis=-1), np.sum(u * target_normal, axis=-1)), np.nan
    )
    return alpha, phi, theta, distance


def compute_spfh(points: np.ndarray, normals: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Compute the Simplified Point Feature Histogram ``(N, 33)`` of each point.

    ``points`` and ``normals`` are ``(N, 3)``. ``neighbours`` is ``(N, K)`` indices with
    ``-1`` in empty slots, as :func:`find_neighbours` returns. Each point is paired
    with each of its neighbours. Bins 0-10 histogram ``alpha`` over [-1, 1], bins 11-21
    ``phi`` over [-1, 1] and bins 22-32 ``theta`` over [-pi, pi], all 11 bins of equal
    width. Each sub-histogram sums to 100 over the pairs whose features are defined
    (see :func:`pair_features`), and is all zero for a point without such a pair.
    """
    points = _check_points(points)
    normals = _check_normals(normals, points.shape[0])
    neighbours = np.asarray(neighbours)
    if neighbours.ndim != 2 or neighbours.shape[0] != points.shape[0]:
        raise ValueError(f"neighbours must be ({points.shape[0]}, K) indices, got shape {neighbours.shape}")
    if neighbours.size and (neighbours.min() < -1 or neighbours.max() >= points.shape[0]):
        raise ValueError(
            f"neighbour indices must lie in [0, {points.shape[0] - 1}] with -1 for an empty slot, "
            f"got values from {neighbours.min()} to {neighbours.max()}"
        )

    n_points, n_slots = neighbours.shape
    counts = np.zeros((n_points, FPFH_DIM))
    for rows in _row_chunks(n_points, n_slots):
        counts[rows] = _pair_histograms(points, normals, rows, neighbours[rows])
    return _normalise_sub_histograms(counts)


def compute_fpfh(points: np.ndarray, normals: np.ndarray, radius: float, max_nn: int = 100) -> np.ndarray:
    """Compute the Fast Point Feature Histogram ``(N, 33)`` float32 of each point.

    ``FPFH(p) = SPFH(p) + (1/k) * sum_i SPFH(p_i) / w_i`` over the ``k`` neighbours
    ``p_i`` within ``radius`` (at most ``max_nn``), with ``w_i`` the distance from ``p`` to
    ``p_i`` and SPFH from :func:`compute_spfh` on the same neighbourhoods. Duplicates
    of ``p`` (``w_i`` = 0) are left out of the sum and of ``k``. Each 11-bin
    sub-histogram of the result is then rescaled to sum to 100. It stays all zero when
    neither the point nor any of its neighbours has a defined pair. ``normals`` must be
    unit length and ``radius`` is in the units of ``points``.
    """
    points = _check_points(points)
    normals = _check_normals(normals, points.shape[0])
    indices, distances = find_neighbours(points, radius, max_nn)
    spfh = compute_spfh(points, normals, indices)

    usable = (indices >= 0) & (distances > 0.0)
    k = usable.sum(axis=1)
    weights = np.zeros_like(distances)
    weights[usable] = 1.0 / distances[usable]
    weights /= np.maximum(k, 1)[:, None]

    # Sparse (N, N) weight matrix, so the neighbour sum is one matrix product.
    rows = np.broadcast_to(np.arange(points.shape[0])[:, None], indices.shape)
    neighbour_weights = csr_matrix(
        (weights[usable], (rows[usable], indices[usable])), shape=(points.shape[0], points.shape[0])
    )
    fpfh = spfh + neighbour_weights @ spfh
    return _normalise_sub_histograms(fpfh).astype(np.float32)


def fpfh_features(
    points: np.ndarray,
    spacing: float | None = None,
    normal_radius: float | None = None,
    feature_radius: float | None = None,
    normal_max_nn: int = 30,
    feature_max_nn: int = 100,
    viewpoint: Sequence[float] | np.ndarray | None = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Estimate normals and compute FPFH descriptors ``(N, 33)`` float32 of a cloud ``(N, 3)``.

    ``spacing`` is the scale of the cloud in the units of ``points``. It defaults to the
    mean distance from each point to its nearest distinct neighbour. The normal
    radius defaults to 2 x ``spacing`` and the feature radius to 5 x ``spacing``, with
    at most 30 and 100 neighbours, a common choice for FPFH. ``viewpoint`` is the
    sensor position that normals are oriented towards (see :func:`estimate_normals`).
    The caller removes invalid points first, such as the all-zero pixels of an
    organized MVTec 3D-AD cloud.
    """
    points = _check_points(points)
    if points.shape[0] < MIN_POINTS:
        raise ValueError(
            f"FPFH needs at least {MIN_POINTS} points, got {points.shape[0]}: "
            "pass a denser cloud or skip this frame's point features"
        )

    if spacing is None:
        spacing = mean_point_spacing(points)
    spacing = _check_radius(spacing, "spacing")
    normal_radius = NORMAL_RADIUS_FACTOR * spacing if normal_radius is None else normal_radius
    feature_radius = FEATURE_RADIUS_FACTOR * spacing if feature_radius is None else feature_radius

    started = time.perf_counter()
    logger.debug(
        "Computing FPFH of %d points: spacing %.4g, normal radius %.4g, feature radius %.4g",
        points.shape[0],
        spacing,
        normal_radius,
        feature_radius,
    )
    normals = estimate_normals(points, normal_radius, normal_max_nn, viewpoint)
    features = compute_fpfh(points, normals, feature_radius, feature_max_nn)
    logger.debug("Computed FPFH of %d points in %.2f s", points.shape[0], time.perf_counter() - started)
    return features


def mean_point_spacing(points: np.ndarray) -> float:
    """Return the mean distance from each point of ``(N, 3)`` to its nearest distinct point.

    Duplicates are skipped, so repeated points do not shrink the spacing.
    """
    points = _check_points(points)
    unique_points = np.unique(points, axis=0)
    if unique_points.shape[0] < 2:
        raise ValueError(f"point spacing needs at least 2 distinct points, got {unique_points.shape[0]}")
    distances, _ = cKDTree(unique_points).query(unique_points, k=2)
    return float(distances[:, 1].mean())


def _neighbourhood_covariances(points: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Return the covariance ``(n, 3, 3)`` of each row of member indices ``(n, K)``, skipping ``-1``."""
    present = (members >= 0)[..., None]
    neighbourhoods = points[np.maximum(members, 0)] * present
    counts = present.sum(axis=1)
    centroids = neighbourhoods.sum(axis=1) / counts
    centred = (neighbourhoods - centroids[:, None, :]) * present
    return np.einsum("nki,nkj->nij", centred, centred) / counts[..., None]


def _fallback_normals(
    sight: np.ndarray, eigenvalues: np.ndarray, eigenvectors: np.ndarray, current: np.ndarray
) -> np.ndarray:
    """Return line-of-sight normals ``(n, 3)`` made orthogonal to each neighbourhood's line.

    A single-point neighbourhood has no line (largest eigenvalue 0), so its normal is
    the line of sight itself. Rows whose line of sight runs along the line keep ``current``.
    """
    axis = eigenvectors[:, :, 2] * (eigenvalues[:, 2] > 0.0)[:, None]
    candidate = sight - np.einsum("ij,ij->i", sight, axis)[:, None] * axis
    length = np.linalg.norm(candidate, axis=1)
    usable = length > ZERO_LENGTH
    normals = current.copy()
    normals[usable] = candidate[usable] / length[usable, None]
    return normals


def _pair_histograms(points: np.ndarray, normals: np.ndarray, rows: slice, neighbours: np.ndarray) -> np.ndarray:
    """Count the pairs of each row in ``rows`` per bin, returning ``(n, 33)`` unnormalised counts."""
    n_rows = neighbours.shape[0]
    sources = np.arange(rows.start, rows.stop)
    present = neighbours >= 0
    owner = np.broadcast_to(np.arange(n_rows)[:, None], neighbours.shape)[present]
    source_index = sources[owner]
    target_index = neighbours[present]

    alpha, phi, theta, _ = pair_features(
        points[source_index], normals[source_index], points[target_index], normals[target_index]
    )
    defined = np.isfinite(alpha) & np.isfinite(phi) & np.isfinite(theta)
    owner = owner[defined]

    columns = np.concatenate(
        [
            _bin_index(alpha[defined], -1.0, 1.0),
            HISTOGRAM_BINS + _bin_index(phi[defined], -1.0, 1.0),
            2 * HISTOGRAM_BINS + _bin_index(theta[defined], -np.pi, np.pi),
        ]
    )
    flat_bins = np.tile(owner, 3) * FPFH_DIM + columns
    counts = np.bincount(flat_bins, minlength=n_rows * FPFH_DIM)
    return counts.reshape(n_rows, FPFH_DIM).astype(np.float64)


def _bin_index(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Return the bin ``0 .. HISTOGRAM_BINS - 1`` of each value on ``HISTOGRAM_BINS`` equal bins of [low, high]."""
    index = np.floor((values - low) / (high - low) * HISTOGRAM_BINS).astype(np.int64)
    return np.clip(index, 0, HISTOGRAM_BINS - 1)


def _normalise_sub_histograms(histograms: np.ndarray) -> np.ndarray:
    """Rescale each 11-bin block of ``(N, 33)`` histograms to sum to 100, leaving all-zero blocks at zero."""
    blocks = histograms.reshape(histograms.shape[0], 3, HISTOGRAM_BINS)
    totals = blocks.sum(axis=2, keepdims=True)
    scale = np.divide(HISTOGRAM_TOTAL, totals, out=np.zeros_like(totals), where=totals > 0.0)
    return (blocks * scale).reshape(histograms.shape)


def _row_chunks(n_rows: int, n_columns: int) -> Iterator[slice]:
    """Yield row slices of about ``PAIRS_PER_CHUNK`` elements of an ``(n_rows, n_columns)`` array."""
    step = max(1, PAIRS_PER_CHUNK // max(n_columns, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _line_of_sight(points: np.ndarray, viewpoint: Sequence[float] | np.ndarray | None) -> np.ndarray:
    """Return the vector ``(N, 3)`` from each point to ``viewpoint``, or +z for every point without one."""
    if viewpoint is None:
        return np.broadcast_to(np.array([0.0, 0.0, 1.0]), points.shape)
    viewpoint = np.asarray(viewpoint, dtype=np.float64)
    if viewpoint.shape != (3,) or not np.all(np.isfinite(viewpoint)):
        raise ValueError(f"viewpoint must be 3 finite coordinates (x, y, z) or None, got {viewpoint!r}")
    return viewpoint - points


def _check_points(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be an (N, 3) array of x, y, z, got shape {points.shape}")
    if points.shape[0] == 0:
        raise ValueError("points is empty: FPFH needs a non-empty (N, 3) cloud")
    if not np.all(np.isfinite(points)):
        bad = int((~np.isfinite(points)).any(axis=1).sum())
        raise ValueError(f"points contains {bad} rows with NaN or inf: remove them before computing FPFH")
    return points


def _check_normals(normals: np.ndarray, n_points: int) -> np.ndarray:
    normals = np.asarray(normals, dtype=np.float64)
    if normals.shape != (n_points, 3):
        raise ValueError(f"normals must be ({n_points}, 3) like the points, got shape {normals.shape}")
    lengths = np.linalg.norm(normals, axis=1)
    if not np.all(np.abs(lengths - 1.0) < 1e-3):
        worst = float(lengths[np.argmax(np.abs(lengths - 1.0))]) if np.all(np.isfinite(lengths)) else float("nan")
        raise ValueError(
            f"normals must have unit length, found length {worst:.4g}: divide each normal by its norm first"
        )
    return normals


def _check_radius(value: float, name: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a positive distance in the units of the points, got {value}")
    return value


def _check_max_nn(value: int, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive whole number of neighbours, got {value!r}")
    return int(value)
