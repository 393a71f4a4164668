"""Unsupervised feature fusion (UFF) of RGB and point patch features (M3DM).

One small MLP per modality projects its patch features to a shared space. The
MLPs are trained on normal patches only, with a patch-wise InfoNCE loss: the RGB
and point features of the same patch are the positive pair, and the other patches
of the batch are the negatives. The fused patch feature joins the two projections.
"""

from __future__ import annotations

import logging
import math
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]

#: Version of the config written by :meth:`FeatureFusion.to_dict`.
FUSION_FORMAT_VERSION = 1


class FeatureFusion(nn.Module):
    """Per-modality projection heads whose joined outputs are the fused patch features.

    Each modality's features are first standardised by per-channel statistics of the
    training patches (buffers set by :func:`train_fusion`, identity by default),
    because ViT and point features can differ in scale by orders of magnitude. Then
    Linear-GELU-Linear projects them to ``out_dim``. Each projection is L2-normalised,
    so both halves of the fused feature have unit norm and neither modality dominates
    the Euclidean nearest-neighbour distance of the fused memory bank. The same cosine
    geometry is what the InfoNCE loss trains.
    """

    def __init__(self, rgb_dim: int, point_dim: int, hidden_dim: int = 512, out_dim: int = 256) -> None:
        super().__init__()
        for name, value in (("rgb_dim", rgb_dim), ("point_dim", point_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if int(value) <= 0:
                raise ValueError(f"{name} must be a positive number of channels, got {value}")
        self.rgb_dim = int(rgb_dim)
        self.point_dim = int(point_dim)
        self.hidden_dim = int(hidden_dim)
        self.out_dim = int(out_dim)

        self.register_buffer("rgb_mean", torch.zeros(self.rgb_dim))
        self.register_buffer("rgb_std", torch.ones(self.rgb_dim))
        self.register_buffer("point_mean", torch.zeros(self.point_dim))
        self.register_buffer("point_std", torch.ones(self.point_dim))
        self.rgb_head = _projection_head(self.rgb_dim, self.hidden_dim, self.out_dim)
        self.point_head = _projection_head(self.point_dim, self.hidden_dim, self.out_dim)

    @property
    def fused_dim(self) -> int:
        return 2 * self.out_dim

    def project(self, rgb: torch.Tensor, point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project RGB ``(N, rgb_dim)`` and point ``(N, point_dim)`` patches to unit vectors ``(N, out_dim)`` each."""
        self._check_inputs(rgb, point)
        rgb_embedding = self.rgb_head((rgb - self.rgb_mean) / self.rgb_std)
        point_embedding = self.point_head((point - self.point_mean) / self.point_std)
        return F.normalize(rgb_embedding, dim=1), F.normalize(point_embedding, dim=1)

    def forward(self, rgb: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        """Return the fused patch features ``(N, 2 * out_dim)``: RGB projection, then point projection."""
        rgb_embedding, point_embedding = self.project(rgb, point)
        return torch.cat([rgb_embedding, point_embedding], dim=1)

    def to_dict(self) -> dict[str, int]:
        """Return the format version and constructor arguments, a JSON-ready dict.

        The weights and standardisation statistics are in :meth:`state_dict`, so a
        saved model is ``{"config": model.to_dict(), "state_dict": model.state_dict()}``.
        """
        return {
            "format_version": FUSION_FORMAT_VERSION,
            "rgb_dim": self.rgb_dim,
            "point_dim": self.point_dim,
            "hidden_dim": self.hidden_dim,
            "out_dim": self.out_dim,
        }

    @classmethod
    def from_dict(cls, config: dict[str, int]) -> "FeatureFusion":
        """Build an untrained model from :meth:`to_dict` output. Load the weights with ``load_state_dict``."""
        config = dict(config)
        version = config.pop("format_version", None)
        if version != FUSION_FORMAT_VERSION:
            raise ValueError(
                f"feature fusion format_version {version!r} is not the supported {FUSION_FORMAT_VERSION}: retrain the fusion"
            )
        return cls(**config)

    def _check_inputs(self, rgb: torch.Tensor, point: torch.Tensor) -> None:
        if rgb.ndim != 2 or rgb.shape[1] != self.rgb_dim:
            raise ValueError(f"rgb patches must be (N, {self.rgb_dim}), got shape {tuple(rgb.shape)}")
        if point.ndim != 2 or point.shape[1] != self.point_dim:
            raise ValueError(f"point patches must be (N, {self.point_dim}), got shape {tuple(point.shape)}")
        if rgb.shape[0] != point.shape[0]:
            raise ValueError(f"rgb and point patches must pair up row by row, got {rgb.shape[0]} and {point.shape[0]} rows")


def _projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def patch_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Compute the symmetric patch-wise InfoNCE loss of paired embeddings ``a`` and ``b`` ``(N, D)``.

    Rows are L2-normalised, so logits are cosine similarities divided by
    ``temperature``. Row ``i`` of ``a`` and row ``i`` of ``b`` are the positive pair
    and all other rows of the batch are negatives. The loss is the mean of the
    cross-entropy from ``a`` to ``b`` and from ``b`` to ``a`` (a scalar, in nats).
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be paired embeddings of the same shape (N, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0:
        raise ValueError("a and b are empty: the loss needs at least one pair")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature
    targets = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def train_fusion(
    rgb_patches: ArrayLike,
    point_patches: ArrayLike,
    epochs: int = 3,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    hidden_dim: int = 512,
    out_dim: int = 256,
    temperature: float = 0.07,
    weight_decay: float = 1e-4,
    progress: bool = True,
) -> FeatureFusion:
    """Train a :class:`FeatureFusion` on paired normal patches with the InfoNCE loss.

    ``rgb_patches (N, Cr)`` and ``point_patches (N, Cp)`` contain the features of the
    same N patches, row by row. Each epoch visits the patches in a new random order,
    in batches of ``batch_size`` (the last, shorter batch included), with AdamW at
    learning rate ``lr``. Initial weights and batch order come from ``seed``, so a
    repeat run on the same machine and thread count gives the same weights.
    Returns the model in eval mode on the CPU.
    """
    rgb = _as_float32(rgb_patches, "rgb_patches")
    point = _as_float32(point_patches, "point_patches")
    if rgb.shape[0] != point.shape[0]:
        raise ValueError(f"rgb_patches has {rgb.shape[0]} rows but point_patches has {point.shape[0]}: pass one row per patch in both")
    n_patches = rgb.shape[0]
    if n_patches < 2:
        raise ValueError(f"InfoNCE needs at least 2 patches for negatives, got {n_patches}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 so each batch has negatives, got {batch_size}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureFusion(rgb.shape[1], point.shape[1], hidden_dim=hidden_dim, out_dim=out_dim)
    _set_standardization(model, rgb, point)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    batches_per_epoch = math.ceil(n_patches / batch_size)

    logger.info(
        "Training feature fusion on %d patch pairs (rgb %d, point %d channels): %d epochs of %d batches",
        n_patches, rgb.shape[1], point.shape[1], epochs, batches_per_epoch,
    )
    model.train()
    epoch_bar = tqdm(range(1, epochs + 1), desc="feature fusion", unit="epoch", disable=not progress)
    for epoch in epoch_bar:
        order = torch.randperm(n_patches, generator=generator)
        total_loss = 0.0
        for start in range(0, n_patches, batch_size):
            batch = order[start : start + batch_size]
            if batch.numel() < 2:
                continue  # A single leftover patch has no negatives.
            rgb_embedding, point_embedding = model.project(rgb[batch], point[batch])
            loss = patch_info_nce(rgb_embedding, point_embedding, temperature)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * batch.numel()

        mean_loss = total_loss / n_patches
        epoch_bar.set_postfix(loss=f"{mean_loss:.4f}")
        logger.info("Feature fusion epoch %d/%d: mean InfoNCE loss %.4f", epoch, epochs, mean_loss)
    return model.eval()


def _set_standardization(model: FeatureFusion, rgb: torch.Tensor, point: torch.Tensor) -> None:
    """Store each modality's per-channel mean and standard deviation, with scale 1 for constant channels."""
    with torch.no_grad():
        for features, mean, std in ((rgb, model.rgb_mean, model.rgb_std), (point, model.point_mean, model.point_std)):
            mean.copy_(features.mean(dim=0))
            channel_std = features.std(dim=0)
            std.copy_(torch.where(channel_std > 1e-6, channel_std, torch.ones_like(channel_std)))


def _as_float32(values: ArrayLike, name: str) -> torch.Tensor:
    if not isinstance(values, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(values).__name__}")
    tensor = torch.as_tensor(values).detach().float().cpu()
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be (N, C) patch features, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values: check the feature extractor output")
    return tensor
