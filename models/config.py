"""Settings of the RGB detector, importable without torch."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class DetectorConfig:
    """Settings of the RGB detector; saved with the model."""

    backbone: str = "dinov2_vits14"
    #: Network input (height, width) in pixels; multiples of the 14-pixel patch.
    image_size: tuple[int, int] = (336, 336)
    #: ViT blocks (0-based) whose patch tokens are joined into the patch feature.
    layers: tuple[int, ...] = (5,)
    #: Patch grid (rows, cols) of the memory bank; None keeps the ViT's token grid.
    feature_grid: tuple[int, int] | None = None
    #: Fraction of the training patches kept in the memory bank.
    coreset_ratio: float = 0.1
    #: Gaussian blur of the anomaly map, in pixels of the original image.
    blur_sigma: float = 4.0
    #: False-positive rate on normal validation frames that sets the threshold.
    target_fpr: float = 0.05
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        self.image_size = tuple(self.image_size)
        self.layers = tuple(self.layers)
        if self.feature_grid is not None:
            self.feature_grid = tuple(self.feature_grid)
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio {self.coreset_ratio} must be in (0, 1]")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"target_fpr {self.target_fpr} must be in [0, 1)")
        for side in self.image_size:
            if side % 14:
                raise ValueError(f"image_size {self.image_size} must be multiples of 14, the ViT-S/14 patch size")
