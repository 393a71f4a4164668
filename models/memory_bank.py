"""Nearest-neighbour search of patch features against a memory bank.

Exact search only, so scores do not depend on the path: faiss ``IndexFlatL2`` when
faiss-cpu is installed (faster on CPU, see docs/benchmarks.md), else a chunked
matrix product in torch.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

try:
    import faiss
except ImportError:  # faiss-cpu is optional: the matrix-product path needs only torch.
    faiss = None

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "matmul")

#: faiss index per bank tensor, with the tensor's in-place version counter when built.
_faiss_indexes: WeakIdKeyDictionary = WeakIdKeyDictionary()


def nearest_neighbor_distances(
    queries: torch.Tensor, memory_bank: torch.Tensor, chunk_size: int = 4096, backend: str = "auto"
) -> torch.Tensor:
    """Return the Euclidean distance of each query ``(M, C)`` to its nearest bank row ``(N, C)``.

    ``backend`` "auto" uses faiss when it is installed and the matrix product
    otherwise. The faiss path keeps one float32 ``IndexFlatL2`` per bank tensor,
    built on first use, so it takes twice the memory of a float16 bank.
    ``chunk_size`` applies to the matrix-product path only.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown nearest-neighbour backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if queries.shape[1] != memory_bank.shape[1]:
        raise ValueError(f"query width {queries.shape[1]} does not match memory bank width {memory_bank.shape[1]}")
    if backend == "faiss" and faiss is None:
        raise ValueError("backend 'faiss' needs faiss-cpu, which is missing: pip install faiss-cpu, or use backend 'matmul'")

    if backend == "matmul" or faiss is None or memory_bank.shape[0] == 0:
        return matmul_nearest_neighbor_distances(queries, memory_bank, chunk_size)
    index = _faiss_index_for(memory_bank)
    squared, _ = index.search(np.ascontiguousarray(queries.detach().float().numpy()), 1)
    return torch.from_numpy(squared[:, 0]).clamp_min(0.0).sqrt()


def _faiss_index_for(memory_bank: torch.Tensor):
    """Return the cached ``IndexFlatL2`` of ``memory_bank``, rebuilding it after an in-place change."""
    cached = _faiss_indexes.get(memory_bank)
    if cached is not None and cached[0] == memory_bank._version:
        return cached[1]
    index = faiss.IndexFlatL2(memory_bank.shape[1])
    index.add(np.ascontiguousarray(memory_bank.detach().float().numpy()))
    _faiss_indexes[memory_bank] = (memory_bank._version, index)
    logger.info("Built a faiss IndexFlatL2 over the memory bank %s", tuple(memory_bank.shape))
    return index


def matmul_nearest_neighbor_distances(queries: torch.Tensor, memory_bank: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Return the Euclidean distance of each query ``(M, C)`` to its nearest bank row, by matrix products in torch.

    The bank ``(N, C)`` may be stored in half precision. Distances are computed in
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

