"""Settings of the multimodal (RGB + point cloud) detector, importable without torch."""

from __future__ import annotations

import dataclasses

MODES = ("rgb+xyz", "rgb", "xyz")
POINT_FEATURES = ("fpfh", "point_mae")


@dataclasses.dataclass
class MultimodalConfig:
    """Settings of :class:`~qcstream.models.multimodal.MultimodalDetector`, saved with the model.

    The RGB side reuses the backbones of the RGB detector. The point side uses
    FPFH descriptors (no weights) or a Point-MAE encoder loaded from a checkpoint.
    """

    #: "rgb+xyz" fits the RGB, point and fused memory banks and fuses their scores;
    #: "rgb" and "xyz" fit one modality only.
    mode: str = "rgb+xyz"
    #: "fpfh" (weight-free descriptors) or "point_mae" (needs ``point_checkpoint``).
    point_features: str = "fpfh"
    #: Point-MAE checkpoint: an official ``pretrain.pth`` or one written by
    #: ``qcstream pretrain-points``. Only fitting reads it; the saved model keeps the weights.
    point_checkpoint: str | None = None
    #: RGB backbone, as for the RGB detector.
    backbone: str = "dinov2_vits14"
    #: RGB network input (height, width) in pixels.
    image_size: tuple[int, int] = (224, 224)
    #: ViT blocks (0-based) whose patch tokens form the RGB patch feature.
    layers: tuple[int, ...] = (5,)
    #: Common patch grid of all three memory banks (rows, cols).
    feature_grid: tuple[int, int] = (28, 28)
    #: Size (rows, cols) the organized point cloud is resized to (nearest neighbour).
    cloud_size: tuple[int, int] = (224, 224)
    #: RANSAC inlier distance of the background plane, in point-cloud units.
    #: None keeps the background (for scans that have none).
    plane_distance: float | None = 0.002
    #: Points of a cloud passed to the Point-MAE encoder: a seeded random sample, or
    #: all points when there are fewer. Use the value the checkpoint was pretrained with, because
    #: a group is the nearest ``group_size`` points and so depends on density.
    point_mae_points: int = 8192
    #: FPFH neighbourhood scale, in multiples of the mean point spacing.
    fpfh_scale: float = 3.0
    #: Fusion MLPs: hidden and output width per modality, training epochs.
    fusion_hidden_dim: int = 256
    fusion_out_dim: int = 128
    fusion_epochs: int = 10
    #: Training patches used to train the fusion MLPs (a random sample).
    fusion_max_patches: int = 40_000
    #: Fraction of the training patches kept in each memory bank.
    coreset_ratio: float = 0.1
    coreset_chunk_rows: int = 200_000
    #: How the fused image score is made: "svm", a linear one-class SVM over the three
    #: banks' image scores fitted on the validation frames (M3DM's image fusion), or
    #: "map_max", the maximum of the fused patch scores. The image SVM learns from one
    #: vector per validation frame, so "map_max" can be the better choice when there
    #: are only a few validation frames.
    image_fusion: str = "svm"
    #: Validation patch score vectors the patch-score SVM is fitted on (a seeded
    #: sample). Scoring cost grows with it, because an RBF fit keeps at least half
    #: of them as support vectors.
    patch_fusion_samples: int = 10_000
    blur_sigma: float = 4.0
    target_fpr: float = 0.05
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "feature_grid", "cloud_size"):
            setattr(self, name, tuple(getattr(self, name)))
        self.layers = tuple(self.layers)
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.point_features not in POINT_FEATURES:
            raise ValueError(f"point_features {self.point_features!r} is unknown; use one of {', '.join(POINT_FEATURES)}")
        if self.image_fusion not in ("map_max", "svm"):
            raise ValueError(f"image_fusion {self.image_fusion!r} is unknown; use 'map_max' or 'svm'")
        if self.point_checkpoint is not None:
            self.point_checkpoint = str(self.point_checkpoint)
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio {self.coreset_ratio} must be in (0, 1]")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"target_fpr {self.target_fpr} must be in [0, 1)")
        if self.backbone == "dinov2_vits14" and any(side % 14 for side in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be multiples of 14, the ViT-S/14 patch size")
        if min(self.feature_grid) < 1 or min(self.cloud_size) < 1:
            raise ValueError(f"feature_grid {self.feature_grid} and cloud_size {self.cloud_size} must be positive")

    @property
    def uses_rgb(self) -> bool:
        return self.mode in ("rgb+xyz", "rgb")

    @property
    def uses_points(self) -> bool:
        return self.mode in ("rgb+xyz", "xyz")

    def check_point_checkpoint(self) -> None:
        """Raise ValueError when Point-MAE features are chosen without a checkpoint to fit with."""
        if self.uses_points and self.point_features == "point_mae" and not self.point_checkpoint:
            raise ValueError(
                "point_features 'point_mae' needs point_checkpoint: the path of an official Point-MAE "
                "pretrain.pth or of one written by `qcstream pretrain-points`; "
                "or use point_features 'fpfh', which needs no weights"
            )
