"""Turn patch scores into a full-resolution, smoothed anomaly map."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Return a normalised 2-D Gaussian kernel ``(1, 1, k, k)`` with ``k = 2*ceil(4 sigma)+1``."""
    radius = math.ceil(4 * sigma)
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    return (kernel_1d[:, None] * kernel_1d[None, :])[None, None]


def anomaly_map_from_patches(patch_scores: torch.Tensor, output_size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Upsample patch scores ``(B, h, w)`` to ``output_size`` and blur them.

    Bilinear upsampling, then a Gaussian blur of ``sigma`` output pixels with
    reflected borders, as PatchCore does. Returns ``(B, H, W)``.
    """
    maps = F.interpolate(patch_scores[:, None], size=output_size, mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel(sigma)
        pad = kernel.shape[-1] // 2
        mode = "reflect" if min(output_size) > pad else "replicate"
        maps = F.conv2d(F.pad(maps, (pad, pad, pad, pad), mode=mode), kernel)
    return maps[:, 0]
