"""Self-supervised masked point modelling, to pretrain the Point-MAE encoder on normal scans.

No pretrained point weights can be downloaded on the air-gapped line, so the encoder
learns from the scans themselves, as Point-MAE pretraining does. 60% of the groups
of every cloud are masked, and the encoder receives only the visible groups. A light
decoder receives one mask token per masked group at its center's position embedding,
and a linear head predicts the masked group's points. The loss is the L2 Chamfer
distance between predicted and true relative coordinates.

Clouds are normalised per cloud by :func:`normalize_cloud`. Feature extraction must
apply the same function before the encoder.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qcstream.models.point_mae import PointMAEEncoder, init_point_mae_weights, position_embedding_mlp
from qcstream.models.point_ops import squared_distances
from qcstream.models.vit import Block

logger = logging.getLogger(__name__)

#: Share of groups hidden from the encoder, as in Point-MAE.
MASK_RATIO = 0.6


def cloud_centroid_and_scale(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Return the centroid ``(3,)`` of an ``(N, 3)`` cloud and its largest distance from it, in the input's units."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] == 0:
        raise ValueError(f"a cloud must have shape (N, 3) with N >= 1, got {points.shape}; drop empty pixels and flatten it first")
    if not np.isfinite(points).all():
        raise ValueError("the cloud contains NaN or infinite coordinates: drop those points first")

    points = points.astype(np.float64)
    centroid = points.mean(axis=0)
    scale = float(np.sqrt(((points - centroid) ** 2).sum(axis=1)).max())
    if scale == 0.0:
        raise ValueError(f"all {len(points)} points of the cloud coincide at {centroid}; it cannot be normalised")
    return centroid, scale


def normalize_cloud(points: np.ndarray) -> np.ndarray:
    """Centre an ``(N, 3)`` cloud on its centroid and scale it into the unit sphere.

    Returns ``(N, 3)`` float32 points. With ``centroid, scale = cloud_centroid_and_scale(points)``,
    ``normalized * scale + centroid`` restores the input.
    """
    centroid, scale = cloud_centroid_and_scale(points)
    return ((np.asarray(points, dtype=np.float64) - centroid) / scale).astype(np.float32)


def chamfer_distance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return the L2 Chamfer distance between ``(B, P, 3)`` and ``(B, Q, 3)`` point sets.

    The mean over predicted points of the squared distance to the nearest target
    point plus the mean over target points of the squared distance to the nearest
    predicted point, both averaged over the batch (as Point-MAE's ``ChamferDistanceL2``).
    """
    distances = squared_distances(predicted, target)
    return distances.amin(dim=2).mean() + distances.amin(dim=1).mean()


def masked_group_count(num_groups: int, mask_ratio: float) -> int:
    """Return ``int(mask_ratio * num_groups)``, raising ValueError unless it leaves groups on both sides."""
    num_masked = int(mask_ratio * num_groups)
    if not 1 <= num_masked < num_groups:
        raise ValueError(
            f"mask_ratio {mask_ratio} of {num_groups} groups masks {num_masked}; "
            "at least one group must be masked and one visible"
        )
    return num_masked


def random_group_mask(batch: int, num_groups: int, mask_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return a ``(B, G)`` bool mask, True for masked groups, ``int(mask_ratio * G)`` per row."""
    num_masked = masked_group_count(num_groups, mask_ratio)
    noise = torch.rand(batch, num_groups, generator=generator)
    masked = noise.argsort(dim=1)[:, :num_masked]
    mask = torch.zeros(batch, num_groups, dtype=torch.bool)
    return mask.scatter_(1, masked, True)


class PointMAEDecoder(nn.Module):
    """Light transformer that predicts the relative points of masked groups.

    Visible tokens ``(B, V, encoder_dim)`` and one mask token per masked group run
    through ``depth`` blocks, with each group's center position embedding added
    before every block. A linear head maps each masked token to ``(S, 3)`` points.
    """

    def __init__(
        self,
        encoder_dim: int,
        group_size: int,
        embed_dim: int | None = None,
        depth: int = 4,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        embed_dim = embed_dim or encoder_dim
        if embed_dim % num_heads:
            raise ValueError(f"decoder embed_dim {embed_dim} must be a multiple of its num_heads {num_heads}")
        self.group_size = group_size
        self.encoder_to_decoder = nn.Linear(encoder_dim, embed_dim) if embed_dim != encoder_dim else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = position_embedding_mlp(embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, 3 * group_size)
        self.apply(init_point_mae_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, visible_tokens: torch.Tensor, visible_centers: torch.Tensor, masked_centers: torch.Tensor) -> torch.Tensor:
        """Predict ``(B, M, S, 3)`` relative points for the ``(B, M, 3)`` masked centers."""
        batch, num_masked, _ = masked_centers.shape
        mask_tokens = self.mask_token.expand(batch, num_masked, -1)
        x = torch.cat([self.encoder_to_decoder(visible_tokens), mask_tokens], dim=1)
        pos = torch.cat([self.pos_embed(visible_centers), self.pos_embed(masked_centers)], dim=1)

        for block in self.blocks:
            x = block(x + pos)

        x = self.norm(x[:, -num_masked:])
        return self.head(x).reshape(batch, num_masked, self.group_size, 3)


class MaskedPointModel(nn.Module):
    """Encoder plus decoder for masked point modelling. ``forward`` returns the Chamfer loss."""

    def __init__(self, encoder: PointMAEEncoder, decoder: PointMAEDecoder, mask_ratio: float = MASK_RATIO) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.mask_ratio = mask_ratio

    def forward(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mask the groups of ``(B, N, 3)`` clouds at random and return the reconstruction loss (scalar)."""
        neighborhoods, centers = self.encoder.group(points)
        batch, num_groups, group_size, _ = neighborhoods.shape
        mask = random_group_mask(batch, num_groups, self.mask_ratio, generator).to(points.device)
        visible = ~mask
        num_masked = int(mask[0].sum())
        num_visible = num_groups - num_masked

        # The mini-PointNet embeds all groups, so its batch norm statistics cover every group, as in Point-MAE.
        tokens = self.encoder.group_embed(neighborhoods)
        visible_tokens = tokens[visible].reshape(batch, num_visible, -1)
        visible_centers = centers[visible].reshape(batch, num_visible, 3)
        masked_centers = centers[mask].reshape(batch, num_masked, 3)

        encoded = self.encoder.forward_features(visible_tokens, self.encoder.pos_embed(visible_centers))
        predicted = self.decoder(encoded, visible_centers, masked_centers)

        target = neighborhoods[mask].reshape(batch * num_masked, group_size, 3)
        return chamfer_distance(predicted.reshape(batch * num_masked, group_size, 3), target)


def _validate_clouds(clouds: Sequence[np.ndarray], num_points: int) -> None:
    if len(clouds) == 0:
        raise ValueError("no clouds to pretrain on: give at least one (N, 3) array of a normal part")
    for i, cloud in enumerate(clouds):
        shape = np.shape(cloud)
        if len(shape) != 2 or shape[1] != 3:
            raise ValueError(f"cloud {i} has shape {shape}, expected (N, 3); flatten organized clouds and drop empty pixels first")
        if shape[0] < num_points:
            raise ValueError(f"cloud {i} has {shape[0]} points, fewer than num_points={num_points}: lower num_points or drop that cloud")


def pretrain_point_mae(
    clouds: Sequence[np.ndarray],
    epochs: int = 100,
    batch_size: int = 4,
    lr: float = 1e-3,
    num_points: int = 16384,
    seed: int = 0,
    mask_ratio: float = MASK_RATIO,
    weight_decay: float = 0.05,
    decoder_depth: int = 4,
    decoder_dim: int | None = None,
    decoder_heads: int | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
    **encoder_kwargs,
) -> PointMAEEncoder:
    """Pretrain a Point-MAE encoder by masked point modelling on ``(N_i, 3)`` normal clouds.

    Every cloud is normalised once with :func:`normalize_cloud`. Each step samples
    ``num_points`` points per cloud without replacement, for ``batch_size`` clouds.
    AdamW with cosine learning-rate decay runs for ``epochs`` passes over the clouds.
    ``encoder_kwargs`` go to :class:`PointMAEEncoder`. ``on_epoch_end(epoch, mean_loss)``
    is called after every epoch. The same ``seed`` and inputs give the same weights on
    the same machine and thread count.

    Returns the encoder in eval mode. The decoder is dropped.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    _validate_clouds(clouds, num_points)
    # NOTE: a group is the S nearest points, so its extent shrinks as the point density grows.
    # Pick num_points near the number of points per cloud that feature extraction passes.
    normalized = []
    for i, cloud in enumerate(clouds):
        try:
            normalized.append(torch.from_numpy(normalize_cloud(cloud)))
        except ValueError as error:
            raise ValueError(f"cloud {i}: {error}") from error

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = PointMAEEncoder(**encoder_kwargs)
        decoder = PointMAEDecoder(
            encoder.embed_dim,
            encoder.group_size,
            embed_dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads or encoder.num_heads,
        )
    if num_points < max(encoder.num_groups, encoder.group_size):
        raise ValueError(
            f"num_points {num_points} must be at least num_groups {encoder.num_groups} and group_size {encoder.group_size}"
        )
    model = MaskedPointModel(encoder, decoder, mask_ratio).train()
    masked_group_count(encoder.num_groups, mask_ratio)

    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(clouds) / batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    logger.info(
        "Starting Point-MAE pretraining: %d clouds, %d epochs of %d steps, %d points per cloud, %d groups of %d",
        len(clouds), epochs, steps_per_epoch, num_points, encoder.num_groups, encoder.group_size,
    )

    with tqdm(total=total_steps, desc="Point-MAE pretraining", unit="step") as progress:
        for epoch in range(epochs):
            order = torch.randperm(len(clouds), generator=generator).tolist()
            epoch_losses = []
            for begin in range(0, len(order), batch_size):
                batch = []
                for index in order[begin : begin + batch_size]:
                    cloud = normalized[index]
                    chosen = torch.randperm(len(cloud), generator=generator)[:num_points]
                    batch.append(cloud[chosen])

                loss = model(torch.stack(batch), generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()

                epoch_losses.append(loss.item())
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.5f}")

            mean_loss = float(np.mean(epoch_losses))
            logger.info("Epoch %d/%d: mean Chamfer loss %.6f", epoch + 1, epochs, mean_loss)
            if on_epoch_end is not None:
                on_epoch_end(epoch, mean_loss)

    logger.info("Finished Point-MAE pretraining after %d steps", total_steps)
    return encoder.eval()
