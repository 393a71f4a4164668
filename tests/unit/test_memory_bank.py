"""Nearest-neighbour search: faiss and the matrix product give the same exact distances."""

from __future__ import annotations

import pytest
import torch

from qcstream.models import memory_bank
from qcstream.models.memory_bank import nearest_neighbor_distances

faiss = pytest.importorskip("faiss")


def bank_and_queries(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(40, 24, generator=generator), torch.randn(700, 24, generator=generator).half()


def test_faiss_and_matmul_agree_with_cdist():
    queries, bank = bank_and_queries()
    expected = torch.cdist(queries, bank.float()).min(dim=1).values

    via_faiss = nearest_neighbor_distances(queries, bank, backend="faiss")
    via_matmul = nearest_neighbor_distances(queries, bank, chunk_size=128, backend="matmul")

    torch.testing.assert_close(via_faiss, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(via_matmul, expected, atol=1e-4, rtol=1e-4)


def test_auto_uses_faiss_when_installed(monkeypatch):
    queries, bank = bank_and_queries(1)
    built = []
    real_index = faiss.IndexFlatL2
    monkeypatch.setattr(faiss, "IndexFlatL2", lambda dim: built.append(dim) or real_index(dim))

    nearest_neighbor_distances(queries, bank)
    nearest_neighbor_distances(queries, bank)

    # One index per bank tensor, built on the first call and reused.
    assert built == [24]


def test_faiss_index_follows_an_in_place_bank_change():
    queries, bank = bank_and_queries(2)
    nearest_neighbor_distances(queries, bank, backend="faiss")

    bank[:] = 0
    after = nearest_neighbor_distances(queries, bank, backend="faiss")

    torch.testing.assert_close(after, queries.norm(dim=1), atol=1e-4, rtol=1e-4)


def test_auto_falls_back_to_matmul_without_faiss(monkeypatch):
    queries, bank = bank_and_queries(3)
    monkeypatch.setattr(memory_bank, "faiss", None)

    distances = nearest_neighbor_distances(queries, bank)

    torch.testing.assert_close(distances, torch.cdist(queries, bank.float()).min(dim=1).values, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pip install faiss-cpu"):
        nearest_neighbor_distances(queries, bank, backend="faiss")


def test_unknown_backend_rejected():
    queries, bank = bank_and_queries()

    with pytest.raises(ValueError, match="'annoy'"):
        nearest_neighbor_distances(queries, bank, backend="annoy")
