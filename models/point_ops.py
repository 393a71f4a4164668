"""Point grouping for Point-MAE: farthest point sampling, k nearest neighbours, groups.

Plain PyTorch, batched, CPU-friendly (no CUDA extensions), and deterministic.
Farthest point sampling starts from a given index and takes the lowest index among
equally far points. Nearest neighbours come sorted by distance, and among equally
near points the lower index comes first.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

#: Query points per chunk in :func:`knn`. A chunk needs ``chunk_size * N`` float32
#: distances (about 26 MB for N = 50 000), plus int32 tie ranks and masks for the
#: rows whose k-th place is tied.
KNN_CHUNK_SIZE = 128


def validate_points(points: torch.Tensor, name: str = "points") -> None:
    """Raise ValueError unless ``points`` is a finite floating-point ``(B, N, 3)`` tensor."""
    if not isinstance(points, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, N, 3), got {type(points).__name__}")
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (B, N, 3), got {tuple(points.shape)}; add a batch axis with points[None] for one cloud")
    if not points.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {points.dtype}; convert it with .float()")
    if points.shape[1] == 0:
        raise ValueError(f"{name} has no points (shape {tuple(points.shape)})")
    if not torch.isfinite(points).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates: drop those points first")


def squared_distances(query: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Return squared Euclidean distances ``(B, M, N)`` between ``(B, M, 3)`` and ``(B, N, 3)``.

    Computed from coordinate differences, not from ``|a|^2 + |b|^2 - 2ab``, so equal
    distances stay exactly equal and tie-breaking is reproducible.
    """
    distances = (query[:, :, None, 0] - points[:, None, :, 0]).square()
    distances += (query[:, :, None, 1] - points[:, None, :, 1]).square()
    distances += (query[:, :, None, 2] - points[:, None, :, 2]).square()
    return distances


@torch.no_grad()
def farthest_point_sample(points: torch.Tensor, num_samples: int, start: int = 0) -> torch.Tensor:
    """Pick ``num_samples`` indices per cloud by farthest point sampling.

    Args:
        points: ``(B, N, 3)`` clouds.
        num_samples: number of samples ``M``, between 1 and N.
        start: index of the first sample in every cloud.

    Returns:
        ``(B, M)`` long indices into N. Each next sample is the point with the largest
        distance to the samples so far, the lowest index among equally far points.
    """
    validate_points(points)
    batch, num_points, _ = points.shape
    if not 1 <= num_samples <= num_points:
        raise ValueError(f"num_samples must be between 1 and the {num_points} points per cloud, got {num_samples}")
    if not 0 <= start < num_points:
        raise ValueError(f"start index {start} is out of range for clouds of {num_points} points")

    indices = torch.empty(batch, num_samples, dtype=torch.long, device=points.device)
    min_distances = torch.full((batch, num_points), float("inf"), dtype=points.dtype, device=points.device)
    farthest = torch.full((batch,), start, dtype=torch.long, device=points.device)
    batch_index = torch.arange(batch, device=points.device)

    for i in range(num_samples):
        indices[:, i] = farthest
        newest = points[batch_index, farthest][:, None]
        distances = squared_distances(newest, points)[:, 0]
        min_distances = torch.minimum(min_distances, distances)
        # argmax returns the first maximal index, which is the tie rule.
        farthest = min_distances.argmax(dim=1)
    return indices


def _tied_k_smallest(distances: torch.Tensor, kth_value: torch.Tensor, k: int) -> torch.Tensor:
    """Return indices ``(R, k)`` of the k smallest of ``(R, N)`` rows, unordered, lower index first on ties.

    ``kth_value`` ``(R, 1)`` is each row's k-th smallest value. All entries below it are
    taken, then the entries equal to it in index order until k are chosen.
    """
    below = distances < kth_value
    at_kth = distances == kth_value
    still_needed = k - below.sum(dim=-1, keepdim=True, dtype=torch.int32)
    tie_rank = at_kth.to(torch.int32).cumsum(dim=-1, dtype=torch.int32)
    chosen = below | (at_kth & (tie_rank <= still_needed))

    # Every row has exactly k chosen entries, and nonzero() lists them row by row.
    return chosen.nonzero()[:, -1].reshape(distances.shape[0], k)


def _k_smallest_in_order(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Return indices ``(..., k)`` of the k smallest values per row, sorted, lower index first on ties.

    ``torch.topk`` may pick any of several entries tied at the k-th value. Only the
    rows where such ties straddle the k-th place take the slower exact selection.
    """
    # One value beyond the k-th shows whether a tie straddles the k-th place.
    num_taken = min(k + 1, distances.shape[-1])
    values, indices = distances.topk(num_taken, dim=-1, largest=False, sorted=True)
    kth_value = values[..., k - 1 : k]
    indices = indices[..., :k]
    if num_taken > k:
        ambiguous = values[..., k] == values[..., k - 1]
        if ambiguous.any():
            rows = ambiguous.nonzero(as_tuple=True)
            indices[rows] = _tied_k_smallest(distances[rows], kth_value[rows], k)

    # Sort by index, then stably by distance: nearest first, the lower index first on ties.
    indices = indices.sort(dim=-1).values
    order = distances.gather(-1, indices).argsort(dim=-1, stable=True)
    return indices.gather(-1, order)


@torch.no_grad()
def knn(query: torch.Tensor, points: torch.Tensor, k: int, chunk_size: int = KNN_CHUNK_SIZE) -> torch.Tensor:
    """Find the k nearest points of every query point (brute force, in chunks of queries).

    Args:
        query: ``(B, M, 3)`` query points.
        points: ``(B, N, 3)`` points to search, with N >= k.
        k: neighbours per query.
        chunk_size: queries per chunk. Memory per chunk grows as ``chunk_size * N``.

    Returns:
        ``(B, M, k)`` long indices into N, by increasing Euclidean distance, the lower
        index first on equal distances.
    """
    validate_points(query, "query")
    validate_points(points, "points")
    if query.shape[0] != points.shape[0]:
        raise ValueError(f"query and points must have the same batch size, got {query.shape[0]} and {points.shape[0]}")
    num_points = points.shape[1]
    if not 1 <= k <= num_points:
        raise ValueError(f"k must be between 1 and the {num_points} points per cloud, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")

    batch, num_queries, _ = query.shape
    neighbours = torch.empty(batch, num_queries, k, dtype=torch.long, device=query.device)
    for begin in range(0, num_queries, chunk_size):
        end = min(begin + chunk_size, num_queries)
        # The direct (not matrix-product) mode computes each distance from coordinate
        # differences, so equal distances stay exactly equal and ties resolve by index.
        distances = torch.cdist(query[:, begin:end], points, compute_mode="donot_use_mm_for_euclid_dist")
        neighbours[:, begin:end] = _k_smallest_in_order(distances, k)
    return neighbours


def gather_points(points: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather ``points[b, indices[b, ...]]``: ``(B, N, C)`` and ``(B, *I)`` give ``(B, *I, C)``."""
    batch, num_points, channels = points.shape
    offsets = torch.arange(batch, device=points.device).view(batch, *([1] * (indices.ndim - 1))) * num_points
    flat = points.reshape(batch * num_points, channels)
    return flat[indices + offsets]


@torch.no_grad()
def group_points(points: torch.Tensor, num_groups: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split clouds into local groups around farthest-point-sampled centers.

    Args:
        points: ``(B, N, 3)`` clouds with N >= ``group_size`` and N >= ``num_groups``.
        num_groups: centers G per cloud, chosen by farthest point sampling from index 0.
        group_size: points S per group, the S nearest points of each center (the center included).

    Returns:
        ``neighborhoods`` ``(B, G, S, 3)``, the group points minus their center, nearest
        first, and ``centers`` ``(B, G, 3)``, in the units of ``points``.
    """
    validate_points(points)
    num_points = points.shape[1]
    if group_size < 1 or group_size > num_points:
        raise ValueError(
            f"group_size {group_size} needs clouds of at least that many points, got {num_points}: "
            "use a smaller group_size or sample more points"
        )
    if num_groups < 1 or num_groups > num_points:
        raise ValueError(
            f"num_groups {num_groups} needs clouds of at least that many points, got {num_points}: "
            "use fewer groups or sample more points"
        )

    center_indices = farthest_point_sample(points, num_groups)
    centers = gather_points(points, center_indices)
    neighbour_indices = knn(centers, points, group_size)
    neighborhoods = gather_points(points, neighbour_indices) - centers[:, :, None]
    return neighborhoods, centers
