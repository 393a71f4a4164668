"""The fit memory estimate and the budget check, against hand-computed bytes."""

from __future__ import annotations

import pytest

from qcstream.models.config import DetectorConfig
from qcstream.models.detector import PatchCoreDetector
from qcstream.models.memory_budget import check_memory_budget, estimate_fit_memory

MIB = 2**20


def test_estimate_matches_hand_computed_bytes():
    # 336 / 14 = 24 -> 576 patches per image; 200 images -> 115200 patches; 10 % -> 11520 bank rows.
    config = DetectorConfig(backbone="dinov2_vits14", coreset_ratio=0.1, coreset_chunk_rows=20_000)

    estimate = estimate_fit_memory(config, 200)

    assert estimate.total_patches == 115_200
    assert estimate.bank_rows == 11_520
    assert estimate.bank_bytes == 11_520 * 384 * 2 == 8_847_360
    # 20000 rows x (384 fp16 values + 128 fp32 projection values) = 20000 x 1280 bytes.
    assert estimate.chunk_bytes == 25_600_000
    assert estimate.total_bytes == 34_447_360


def test_estimate_counts_the_feature_grid_and_layers():
    config = DetectorConfig(backbone="dinov2_vits14", feature_grid=(10, 12), layers=(5, 8), coreset_ratio=0.5)

    estimate = estimate_fit_memory(config, 3)

    # 120 patches x 3 images = 360 rows, 180 kept, 768 dims; the whole 360 rows fit one chunk.
    assert (estimate.total_patches, estimate.bank_rows, estimate.feature_dim) == (360, 180, 768)
    assert estimate.bank_bytes == 180 * 768 * 2
    assert estimate.chunk_bytes == 360 * (768 * 2 + 128 * 4)


def test_budget_rejection_message_gives_ratio():
    config = DetectorConfig(backbone="dinov2_vits14", coreset_ratio=0.1, coreset_chunk_rows=20_000, memory_budget_mb=30)

    with pytest.raises(ValueError) as caught:
        check_memory_budget(config, 200)

    # 34447360 bytes = 32.85 MiB. Bank rows that fit: (30 MiB - 25600000) // 768 = 7626,
    # and 7626 / 115200 = 0.06619..., rounded down to 0.0661.
    message = str(caught.value)
    assert "estimated 32.9 MiB" in message
    assert "memory_budget_mb 30" in message
    assert "lower coreset_ratio to 0.0661" in message
    assert "smaller feature_grid or image_size" in message
    assert "raise memory_budget_mb to at least 33" in message


def test_suggested_ratio_passes_the_check():
    config = DetectorConfig(backbone="dinov2_vits14", coreset_ratio=0.0661, coreset_chunk_rows=20_000, memory_budget_mb=30)

    estimate = check_memory_budget(config, 200)

    # round(115200 * 0.0661) = 7615 rows: 7615 * 768 + 25600000 = 31448320 <= 31457280 bytes.
    assert estimate.total_bytes == 31_448_320
    assert estimate.total_bytes <= 30 * MIB


def test_budget_below_the_chunk_buffer_suggests_smaller_chunks():
    # Default 200000-row chunks hold all 115200 patches: 147456000 bytes, over 100 MiB alone.
    config = DetectorConfig(backbone="dinov2_vits14", memory_budget_mb=100)

    with pytest.raises(ValueError) as caught:
        check_memory_budget(config, 200)

    # (104857600 - 8847360) // 1280 = 75008 rows leave room for the bank.
    message = str(caught.value)
    assert "lower coreset_chunk_rows to 75008" in message
    assert "coreset_ratio to" not in message
    check_memory_budget(DetectorConfig(backbone="dinov2_vits14", memory_budget_mb=100, coreset_chunk_rows=75_008), 200)


def test_no_budget_skips_the_check():
    estimate = check_memory_budget(DetectorConfig(backbone="dinov2_vits14"), 10_000)

    assert estimate.total_patches == 5_760_000


def test_estimate_takes_a_built_extractors_geometry():
    # Any backbone: 3 images x 7 x 9 = 189 patches of 112 dims, 19 kept (round(18.9)).
    config = DetectorConfig(backbone="efficientnet_lite0", image_size=(100, 140))

    estimate = estimate_fit_memory(config, 3, feature_grid=(7, 9), feature_dim=112)

    assert (estimate.total_patches, estimate.bank_rows) == (189, 19)
    assert estimate.bank_bytes == 19 * 112 * 2
    assert estimate.chunk_bytes == 189 * (112 * 2 + 128 * 4)


def test_estimate_without_geometry_of_other_backbone_raises():
    config = DetectorConfig(backbone="efficientnet_lite0", image_size=(100, 140))

    with pytest.raises(ValueError, match="pass feature_grid and feature_dim"):
        estimate_fit_memory(config, 3)


def test_fit_rejects_over_budget_before_reading_images():
    # 6 images x 576 = 3456 patches: bank 346 x 768 + chunk 3456 x 1280 = 4689408 bytes = 4.5 MiB.
    # The image paths do not exist, so reading any of them would raise DataError instead.
    detector = PatchCoreDetector(DetectorConfig(backbone="dinov2_vits14", memory_budget_mb=1))

    with pytest.raises(ValueError, match=r"estimated 4\.5 MiB .* exceeds memory_budget_mb 1"):
        detector.fit([f"missing-{i}.png" for i in range(6)], progress=False)

    assert detector.memory_bank_ is None


@pytest.mark.parametrize("field, value", [("memory_budget_mb", 0), ("memory_budget_mb", -5.0), ("coreset_chunk_rows", 0)])
def test_invalid_budget_settings_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        DetectorConfig(**{field: value})
