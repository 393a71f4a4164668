"""Nearest-neighbour search of patch features against a memory bank."""

from __future__ import annotations

import torch


def nearest_neighbor_distances(queries: torch.Tensor, memory_bank: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Return the Euclidean distance of each query ``(M, C)`` to its nearest bank row.

    The bank ``(N, C)`` may be stored in half precision; distances are computed in
    float32 with ``|q|^2 - 2 q.b + |b|^2`` in chunks of ``chunk_size`` bank rows,
    so memory stays at ``M * chunk_size`` floats whatever the bank size.
    """
    if queries.shape[1] != memory_bank.shape[1]:
        raise ValueError(f"query width {queries.shape[1]} does not match memory bank width {memory_bank.shape[1]}")

    queries = queries.float()
    query_sq = (queries * queries).sum(dim=1, keepdim=True)
    best = torch.full((queries.shape[0],), float("inf"))
    for start in range(0, memory_bank.shape[0], chunk_size):
        bank = memory_bank[start : start + chunk_size].float()
        bank_sq = (bank * bank).sum(dim=1)
        squared = query_sq - 2.0 * (queries @ bank.T) + bank_sq
        best = torch.minimum(best, squared.min(dim=1).values)
    return best.clamp_min(0.0).sqrt()
