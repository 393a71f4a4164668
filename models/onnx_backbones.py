"""Backbones served by ONNX Runtime, with the interfaces of the torch ones they replace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcstream.models.onnx_export import export_onnx, inference_session
from qcstream.models.point_mae import PointMAEEncoder
from qcstream.models.point_ops import group_points


class OnnxFeatureExtractor:
    """RGB patch features from an exported feature extractor: ``(B, 3, H, W)`` -> ``(B, C, h, w)``."""

    def __init__(self, path: str | Path, feature_grid: tuple[int, int], feature_dim: int, threads: int | None = None) -> None:
        self.onnx_path = Path(path)
        self.feature_grid = tuple(feature_grid)
        self.feature_dim = int(feature_dim)
        self.session = inference_session(self.onnx_path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        features = self.session.run(None, {self.input_name: batch.numpy()})[0]
        return torch.from_numpy(features)


def export_feature_extractor(extractor: nn.Module, image_size: tuple[int, int], path: str | Path) -> Path:
    """Export a torch RGB feature extractor (ViT or EfficientNet) for ``image_size`` inputs."""
    example = torch.zeros(1, 3, *image_size)
    return export_onnx(extractor, (example,), path, ["images"], ["features"])


class PointEncoderHead(nn.Module):
    """The learned part of a Point-MAE encoder: grouped points -> multi-block group features.

    Farthest point sampling and kNN grouping stay outside, in torch, because their
    loops do not trace into a fixed graph.
    """

    def __init__(self, encoder: PointMAEEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, neighborhoods: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        # All groups in one pass: the chunked eval path would trace into fixed split sizes.
        batch, groups, group_size, _ = neighborhoods.shape
        tokens = self.encoder.group_embed._embed(neighborhoods.reshape(batch * groups, group_size, 3)).reshape(batch, groups, -1)
        pos = self.encoder.pos_embed(centers)
        outputs = self.encoder.forward_intermediates(tokens, pos, self.encoder.feature_blocks)
        return torch.cat(outputs, dim=-1)


def export_point_encoder(encoder: PointMAEEncoder, path: str | Path) -> Path:
    """Export the learned part of ``encoder`` (see :class:`PointEncoderHead`)."""
    neighborhoods = torch.zeros(1, encoder.num_groups, encoder.group_size, 3)
    centers = torch.zeros(1, encoder.num_groups, 3)
    return export_onnx(PointEncoderHead(encoder), (neighborhoods, centers), path, ["neighborhoods", "centers"], ["features"])


class OnnxPointEncoder:
    """A Point-MAE encoder whose learned part runs in ONNX Runtime; called like :class:`PointMAEEncoder`."""

    def __init__(self, path: str | Path, num_groups: int, group_size: int, feature_dim: int, threads: int | None = None) -> None:
        self.onnx_path = Path(path)
        self.num_groups = int(num_groups)
        self.group_size = int(group_size)
        self.feature_dim = int(feature_dim)
        self.session = inference_session(self.onnx_path, threads)

    def eval(self) -> "OnnxPointEncoder":
        return self

    def settings(self) -> dict:
        return {"num_groups": self.num_groups, "group_size": self.group_size, "feature_dim": self.feature_dim}

    def __call__(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        neighborhoods, centers = group_points(points, self.num_groups, self.group_size)
        inputs = {"neighborhoods": neighborhoods.numpy().astype(np.float32), "centers": centers.numpy().astype(np.float32)}
        features = self.session.run(None, inputs)[0]
        return centers, torch.from_numpy(features)
