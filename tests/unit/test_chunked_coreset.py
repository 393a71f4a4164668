"""The chunked coreset: same as one greedy pass within one chunk, right size and coverage across chunks."""

from __future__ import annotations

import pytest
import torch

from qcstream.models import data as data_io
from qcstream.models.coreset import ChunkedCoreset, greedy_coreset
from qcstream.models.detector import DetectorConfig, PatchCoreDetector


def random_rows(n_rows: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n_rows, width, generator=torch.Generator().manual_seed(seed)).half()


def run_chunked(features: torch.Tensor, ratio: float, chunk_rows: int, batch_rows: int, seed: int = 0, **kwargs) -> ChunkedCoreset:
    coreset = ChunkedCoreset(ratio, chunk_rows, seed=seed, progress=False, **kwargs)
    for start in range(0, features.shape[0], batch_rows):
        coreset.add(features[start : start + batch_rows])
    return coreset


def rows_of(matrix: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(row.tolist()) for row in matrix}


@pytest.mark.parametrize("chunk_rows", [3000, 10_000])
def test_one_chunk_equals_single_pass(chunk_rows):
    # 3000 rows in batches of 700; chunk_rows=3000 is the edge where the data fills the chunk exactly.
    features = random_rows(3000, 200, seed=1)
    expected = features[greedy_coreset(features, 300, seed=3, progress=False)]

    coreset = run_chunked(features, 0.1, chunk_rows, batch_rows=700, seed=3, expected_rows=3000)
    result = coreset.finish()

    assert coreset.n_chunks == 0
    assert torch.equal(result, expected)


def test_several_chunks_give_target_size_without_duplicates():
    features = random_rows(1050, 32, seed=2)

    coreset = run_chunked(features, 0.05, chunk_rows=300, batch_rows=128)
    result = coreset.finish()

    # Chunks of 300, 300, 300 and the last 150 rows; round(1050 * 0.05) = round(52.5) = 52.
    assert coreset.n_chunks == 4
    assert result.shape == (52, 32)
    assert result.dtype == torch.float16
    assert len(rows_of(result)) == 52
    assert rows_of(result) <= rows_of(features)


def test_several_chunks_cover_two_far_apart_clusters():
    # Cluster B sits only in the last, partial chunk; a coreset that covers the data keeps some of it.
    generator = torch.Generator().manual_seed(4)
    cluster_a = torch.randn(1000, 16, generator=generator) * 0.1
    cluster_b = 10.0 + torch.randn(50, 16, generator=generator) * 0.1
    features = torch.cat([cluster_a, cluster_b]).half()

    result = run_chunked(features, 0.05, chunk_rows=300, batch_rows=100).finish()

    near_b = result.float().mean(dim=1) > 5.0
    assert 0 < int(near_b.sum()) < result.shape[0]


def test_chunked_coreset_is_deterministic_for_a_seed():
    features = random_rows(900, 64, seed=5)

    first = run_chunked(features, 0.1, chunk_rows=250, batch_rows=64, seed=7).finish()
    again = run_chunked(features, 0.1, chunk_rows=250, batch_rows=64, seed=7).finish()

    assert torch.equal(first, again)


def test_finish_without_rows_raises():
    with pytest.raises(ValueError, match="no rows"):
        ChunkedCoreset(0.1, 100).finish()


def test_rows_of_another_width_raise():
    coreset = ChunkedCoreset(0.1, 100, progress=False)
    coreset.add(torch.zeros(10, 8))

    with pytest.raises(ValueError, match="width 9"):
        coreset.add(torch.zeros(10, 9))


def test_fit_small_chunks_bank_size(tire_root):
    train = [s.image_path for s in data_io.discover(tire_root, "train")][:6]
    validation = [s.image_path for s in data_io.discover(tire_root, "validation")][:2]
    config = DetectorConfig(backbone="dinov2_vits14", coreset_ratio=0.1, coreset_chunk_rows=1000)

    detector = PatchCoreDetector(config).fit(train, validation, progress=False)

    # 6 images x 24 x 24 patches = 3456 rows: chunks of 1000, 1000, 1000 and 456; round(345.6) = 346 kept.
    bank = detector.memory_bank_
    assert bank.shape == (346, 384)
    assert bank.dtype == torch.float16
    assert detector.fit_info_["coreset_chunks"] == 4
    assert len(rows_of(bank)) == 346
