"""Patch feature extraction from a ViT backbone."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from qcstream.models.vit import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(images: list[np.ndarray], image_size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(H, W, 3)`` uint8 images to ``image_size`` (bicubic) and normalise them.

    Returns a float32 batch ``(B, 3, h, w)`` normalised with the ImageNet mean and
    standard deviation, as DINO and DINOv2 were trained.
    """
    height, width = image_size
    batch = np.empty((len(images), height, width, 3), dtype=np.float32)
    for i, image in enumerate(images):
        resized = Image.fromarray(image).resize((width, height), Image.BICUBIC)
        batch[i] = np.asarray(resized, dtype=np.float32) / 255.0
    batch = (batch - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


class PatchFeatureExtractor(torch.nn.Module):
    """Locally aware patch features from chosen ViT blocks.

    The patch tokens of each block in ``layers`` are reshaped to a grid, smoothed by
    a 3x3 average pool (stride 1), resized to ``feature_grid`` and concatenated
    along channels. Output ``(B, C * len(layers), *feature_grid)``.
    """

    def __init__(self, backbone: VisionTransformer, layers: tuple[int, ...], feature_grid: tuple[int, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)
        self.feature_grid = tuple(feature_grid)

    @property
    def feature_dim(self) -> int:
        return self.backbone.embed_dim * len(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grids = self.backbone.forward_intermediates(x, list(self.layers))
        return pool_and_join(grids, self.feature_grid)


def pool_and_join(feature_maps: list[torch.Tensor], feature_grid: tuple[int, int]) -> torch.Tensor:
    """Smooth each ``(B, C_i, h_i, w_i)`` map by a 3x3 average, resize it to ``feature_grid``, and concatenate.

    Returns ``(B, sum C_i, *feature_grid)``: the locally aware patch features of PatchCore.
    """
    pooled = []
    for feature_map in feature_maps:
        feature_map = F.avg_pool2d(feature_map, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        if tuple(feature_map.shape[-2:]) != tuple(feature_grid):
            feature_map = F.interpolate(feature_map, size=tuple(feature_grid), mode="bilinear", align_corners=False)
        pooled.append(feature_map)
    return torch.cat(pooled, dim=1)
