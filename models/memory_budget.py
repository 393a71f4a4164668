"""Estimate of the memory a fit needs for its memory bank, checked against a budget.

Pure arithmetic on :class:`DetectorConfig` and the feature geometry, importable
without torch. For "dinov2_vits14" the geometry follows from the config alone, so
the check can run before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from qcstream.models.config import DetectorConfig

logger = logging.getLogger(__name__)

#: Token width of DINOv2 ViT-S/14; one patch feature has this many values per ViT block.
VIT_SMALL_WIDTH = 384
VIT_PATCH_SIZE = 14
#: Bytes of one float16 value, the storage type of the bank and of the chunk buffer.
FP16_BYTES = 2
#: Width of the float32 random projection the coreset search keeps per chunk row (greedy_coreset's default).
CORESET_PROJECTION_DIM = 128
FP32_BYTES = 4
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class FitMemoryEstimate:
    """Estimated memory of a fit's memory bank and of its coreset chunk buffer, in bytes."""

    n_train_images: int
    total_patches: int
    bank_rows: int
    feature_dim: int
    bank_bytes: int
    #: The float16 chunk buffer plus its float32 projection used by the coreset search.
    chunk_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.bank_bytes + self.chunk_bytes


def feature_geometry(config: DetectorConfig) -> tuple[tuple[int, int], int]:
    """Return the feature grid (rows, cols) and feature dimension of a "dinov2_vits14" config.

    Other backbones know their geometry only once built: pass the extractor's
    ``feature_grid`` and ``feature_dim`` to :func:`estimate_fit_memory` instead.
    """
    if config.backbone != "dinov2_vits14":
        raise ValueError(
            f"the feature geometry of backbone {config.backbone!r} is known only from its built extractor; "
            "pass feature_grid and feature_dim"
        )
    grid = config.feature_grid or (config.image_size[0] // VIT_PATCH_SIZE, config.image_size[1] // VIT_PATCH_SIZE)
    return tuple(grid), VIT_SMALL_WIDTH * len(config.layers)


def estimate_fit_memory(
    config: DetectorConfig,
    n_train_images: int,
    feature_grid: tuple[int, int] | None = None,
    feature_dim: int | None = None,
) -> FitMemoryEstimate:
    """Estimate the bank and chunk buffer bytes of fitting ``config`` on ``n_train_images`` images.

    Bank: ``round(n_train_images * grid rows * grid cols * coreset_ratio)`` rows of
    ``feature_dim`` float16 values. Chunk buffer: ``min(coreset_chunk_rows, total
    patches)`` rows, each ``feature_dim`` float16 values plus a 128-value float32
    projection. ``feature_grid`` and ``feature_dim`` default to the
    :func:`feature_geometry` of the config.
    """
    # NOTE: the final coreset pass briefly keeps the union of the chunk coresets and
    # the bank in memory together, which this estimate does not count.
    if feature_grid is None or feature_dim is None:
        default_grid, default_dim = feature_geometry(config)
        feature_grid = feature_grid or default_grid
        feature_dim = feature_dim or default_dim
    total_patches = n_train_images * feature_grid[0] * feature_grid[1]
    bank_rows = max(1, int(round(total_patches * config.coreset_ratio)))
    chunk_rows = min(config.coreset_chunk_rows, total_patches)
    return FitMemoryEstimate(
        n_train_images=n_train_images,
        total_patches=total_patches,
        bank_rows=bank_rows,
        feature_dim=feature_dim,
        bank_bytes=bank_rows * feature_dim * FP16_BYTES,
        chunk_bytes=chunk_rows * _chunk_row_bytes(feature_dim),
    )


def check_memory_budget(
    config: DetectorConfig,
    n_train_images: int,
    feature_grid: tuple[int, int] | None = None,
    feature_dim: int | None = None,
) -> FitMemoryEstimate:
    """Return the fit's memory estimate, or raise ValueError when it exceeds ``config.memory_budget_mb``.

    The error message names the estimate, the budget and the settings that would
    make it fit. These are the largest ``coreset_ratio`` (rounded down to 4
    decimals), or a smaller ``coreset_chunk_rows`` when the chunk buffer alone is
    too large, a smaller ``feature_grid`` or ``image_size``, and a larger budget.
    Arguments are as for :func:`estimate_fit_memory`.
    """
    estimate = estimate_fit_memory(config, n_train_images, feature_grid, feature_dim)
    budget_mb = config.memory_budget_mb
    if budget_mb is None:
        return estimate
    budget_bytes = int(budget_mb * MIB)
    if estimate.total_bytes <= budget_bytes:
        logger.info("Fit memory estimate %.1f MiB is within the budget of %.1f MiB", estimate.total_bytes / MIB, budget_mb)
        return estimate

    fixes = []
    max_bank_rows = (budget_bytes - estimate.chunk_bytes) // (estimate.feature_dim * FP16_BYTES)
    max_ratio = math.floor(max_bank_rows / estimate.total_patches * 10_000) / 10_000
    if max_ratio > 0:
        fixes.append(f"lower coreset_ratio to {max_ratio:.4f} or less")
    else:
        max_chunk_rows = (budget_bytes - estimate.bank_bytes) // _chunk_row_bytes(estimate.feature_dim)
        if max_chunk_rows >= 1:
            fixes.append(f"lower coreset_chunk_rows to {max_chunk_rows} or less")
    fixes.append("use a smaller feature_grid or image_size (fewer patches per image)")
    fixes.append(f"raise memory_budget_mb to at least {math.ceil(estimate.total_bytes / MIB)}")
    raise ValueError(
        f"the memory bank will not fit the memory budget: estimated {estimate.total_bytes / MIB:.1f} MiB "
        f"(bank of {estimate.bank_rows} x {estimate.feature_dim} float16 = {estimate.bank_bytes / MIB:.1f} MiB "
        f"plus coreset chunk buffer {estimate.chunk_bytes / MIB:.1f} MiB, from {n_train_images} images x "
        f"{estimate.total_patches // n_train_images} patches x coreset_ratio {config.coreset_ratio}) "
        f"exceeds memory_budget_mb {budget_mb}; " + ", or ".join(fixes)
    )


def _chunk_row_bytes(feature_dim: int) -> int:
    return feature_dim * FP16_BYTES + CORESET_PROJECTION_DIM * FP32_BYTES
