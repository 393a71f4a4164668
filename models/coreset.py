"""Greedy k-center coreset subsampling of a memory bank (PatchCore)."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Select ``n_select`` rows of ``features`` ``(N, C)`` by greedy k-center search.

    Each step adds the row farthest from all rows selected so far, so the subset
    covers the feature space with the smallest maximum gap. Distances are computed
    on a random Gaussian projection to ``projection_dim`` dimensions (``None``
    keeps the full width), which preserves them approximately at a fraction of the
    cost. Returns the selected row indices ``(n_select,)`` in selection order.
    """
    n_rows = features.shape[0]
    if n_select <= 0:
        raise ValueError(f"n_select must be positive, got {n_select}")
    if n_select >= n_rows:
        return torch.arange(n_rows)

    generator = torch.Generator().manual_seed(seed)
    reduced = features.float()
    if projection_dim is not None and projection_dim < features.shape[1]:
        projection = torch.randn(features.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        reduced = reduced @ projection

    # Squared distances as |x|^2 + |c|^2 - 2 x.c: one matrix-vector product per step
    # reads the features once and allocates no (N, C) temporary.
    squared_norms = (reduced * reduced).sum(dim=1)

    def squared_distances_to(index: int) -> torch.Tensor:
        return squared_norms + squared_norms[index] - 2.0 * (reduced @ reduced[index])

    start = int(torch.randint(n_rows, (1,), generator=generator))
    selected = torch.empty(n_select, dtype=torch.long)
    selected[0] = start
    min_distances = squared_distances_to(start)

    logger.info("Applying coreset subsampling: %d of %d patch features", n_select, n_rows)
    steps = tqdm(range(1, n_select), desc="coreset", unit="pt", disable=not progress, mininterval=1.0)
    for i in steps:
        farthest = int(torch.argmax(min_distances))
        selected[i] = farthest
        torch.minimum(min_distances, squared_distances_to(farthest), out=min_distances)
    return selected
