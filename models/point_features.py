"""Point-cloud patch features on the RGB feature grid.

One organized cloud ``(H, W, 3)`` becomes a ``(C, h, w)`` feature grid in four
steps. The background plane is removed (RANSAC) and the cloud is resized by
nearest neighbour. Point features are computed: FPFH per point, or Point-MAE per
group of points. Finally the features are written back to their pixels and pooled
per grid cell (see :mod:`qcstream.models.alignment`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from qcstream.models.alignment import align_point_features, organized_points
from qcstream.models.multimodal_config import MultimodalConfig
from qcstream.models.point_clouds import remove_background_plane, resize_organized_cloud

logger = logging.getLogger(__name__)

FPFH_DIM = 33


class PointFeatureExtractor:
    """Turn organized clouds into point patch features on ``config.feature_grid``.

    ``encoder`` is a Point-MAE encoder for ``point_features="point_mae"``; FPFH
    needs none. Calling the extractor returns ``features (C, h, w)`` float32 and
    ``cell_valid (h, w)`` bool; cells without a measured point hold zeros.
    """

    def __init__(self, config: MultimodalConfig, encoder: torch.nn.Module | None = None) -> None:
        if config.point_features == "point_mae" and encoder is None:
            raise ValueError("point_features 'point_mae' needs a Point-MAE encoder; load one from point_checkpoint")
        self.config = config
        self.encoder = encoder.eval() if encoder is not None else None

    @property
    def feature_dim(self) -> int:
        if self.encoder is None:
            return FPFH_DIM
        return int(self.encoder.feature_dim)

    def prepare_cloud(self, xyz: np.ndarray) -> np.ndarray:
        """Remove the background plane and resize the cloud to ``config.cloud_size``."""
        xyz = np.asarray(xyz, dtype=np.float32)
        if xyz.ndim != 3 or xyz.shape[2] != 3:
            raise ValueError(f"point cloud has shape {xyz.shape}; expected (H, W, 3) x, y, z per pixel")
        if self.config.plane_distance is not None:
            xyz = remove_background_plane(xyz, distance=self.config.plane_distance, seed=self.config.seed)
        return resize_organized_cloud(xyz, self.config.cloud_size)

    @torch.inference_mode()
    def __call__(self, xyz: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        cloud = self.prepare_cloud(xyz)
        points, pixel_index = organized_points(cloud)
        grid = self.config.feature_grid
        if points.shape[0] < 16:
            logger.warning("Point cloud has %d valid points after background removal; its point features are empty", points.shape[0])
            return torch.zeros(self.feature_dim, *grid), torch.zeros(grid, dtype=torch.bool)

        if self.encoder is None:
            return self._fpfh(points, pixel_index)
        return self._point_mae(points, pixel_index)

    def _fpfh(self, points: torch.Tensor, pixel_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from qcstream.models.fpfh import fpfh_features, mean_point_spacing

        cloud = points.numpy().astype(np.float64)
        spacing = mean_point_spacing(cloud) * self.config.fpfh_scale
        descriptors = torch.from_numpy(np.asarray(fpfh_features(cloud, spacing=spacing), dtype=np.float32))
        return align_point_features(None, descriptors, points, pixel_index, self.config.cloud_size, self.config.feature_grid)

    def _encoder_points(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the normalized cloud and the subsample of at most ``point_mae_points`` that the encoder receives."""
        from qcstream.models.point_pretrain import normalize_cloud

        normalized = torch.as_tensor(normalize_cloud(points.numpy()), dtype=torch.float32)
        encoded = normalized
        if normalized.shape[0] > self.config.point_mae_points:
            generator = torch.Generator().manual_seed(self.config.seed)
            chosen = torch.randperm(normalized.shape[0], generator=generator)[: self.config.point_mae_points]
            encoded = normalized[chosen.sort().values]
        return normalized, encoded

    def encoder_input(self, xyz: np.ndarray) -> torch.Tensor:
        """Return the ``(1, N, 3)`` points that the Point-MAE encoder receives for organized cloud ``xyz``."""
        points, _ = organized_points(self.prepare_cloud(xyz))
        return self._encoder_points(points)[1][None]

    def _point_mae(self, points: torch.Tensor, pixel_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normalized, encoded = self._encoder_points(points)
        centers, features = self.encoder(encoded[None])
        return align_point_features(
            centers[0], features[0], normalized, pixel_index, self.config.cloud_size, self.config.feature_grid, k=3
        )
