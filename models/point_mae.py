"""Point-MAE encoder as M3DM uses it for point features, and its checkpoints.

The design follows Point-MAE (Pang et al., "Masked Autoencoders for Point Cloud
Self-supervised Learning", ECCV 2022). Farthest point sampling picks G centers, and
each center's S nearest points form a group. A mini-PointNet embeds each group's
relative coordinates, and an MLP embeds the centers as position embeddings. A
pre-norm transformer encodes the groups, with the position embedding added to the
input of every block. M3DM takes the LayerNorm-ed outputs of blocks 3, 7 and 11 as
features.

Checkpoints use the key layout of Point-MAE's ``pretrain.pth``: a ``base_model``
dict (names sometimes under ``module.``) with the encoder under ``MAE_encoder.``, a
fused ``attn.qkv`` without bias, and decoder tensors that the encoder ignores.
:func:`save_point_mae` writes our own pretrained encoders in the same layout.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from qcstream.models.point_ops import group_points, validate_points
from qcstream.models.vit import Attention, Block, Mlp, stack_blocks
from qcstream.models.weights import WeightsError

logger = logging.getLogger(__name__)

#: Blocks whose outputs M3DM concatenates into point features (0-based).
M3DM_FEATURE_BLOCKS = (3, 7, 11)
#: Head width of Point-MAE (384 wide, 6 heads), used when a checkpoint stores no head count.
POINT_MAE_HEAD_DIM = 64
#: Groups embedded per pass in eval mode. For 128-point groups this bounds the
#: mini-PointNet's memory to roughly 130 MB per pass (estimate: four float32
#: tensors of 512 channels by 128 x 128 points).
EMBED_CHUNK_GROUPS = 128

ENCODER_PREFIX = "MAE_encoder."
#: Top-level entry of our own checkpoints with the settings the weights cannot show.
CONFIG_KEY = "qcstream_point_mae"


class MiniPointNet(nn.Module):
    """Embed each group of relative coordinates into one ``embed_dim`` vector.

    Shared 1x1 convolutions ``3 -> 128 -> 256``, a max-pool over the group, the
    pooled feature concatenated before every point's feature (512 channels), then
    ``512 -> 512 -> embed_dim`` and a second max-pool.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1),
            nn.BatchNorm1d(128),
            nn.ReLU(inplace=True),
            nn.Conv1d(128, 256, 1),
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Conv1d(512, embed_dim, 1),
        )

    def _embed(self, groups: torch.Tensor) -> torch.Tensor:
        """``(G', S, 3)`` groups to ``(G', embed_dim)``."""
        group_size = groups.shape[1]
        local = self.first_conv(groups.transpose(1, 2))
        pooled = local.amax(dim=2, keepdim=True)
        x = torch.cat([pooled.expand(-1, -1, group_size), local], dim=1)
        x = self.second_conv(x)
        return x.amax(dim=2)

    def forward(self, neighborhoods: torch.Tensor) -> torch.Tensor:
        """Embed ``(B, G, S, 3)`` neighborhoods into ``(B, G, embed_dim)`` tokens."""
        batch, num_groups, group_size, _ = neighborhoods.shape
        groups = neighborhoods.reshape(batch * num_groups, group_size, 3)

        # Batch norm in training mode needs all groups at once for its statistics.
        # In eval mode every group is independent, so chunks bound the memory.
        if self.training:
            tokens = self._embed(groups)
        else:
            tokens = torch.cat([self._embed(chunk) for chunk in groups.split(EMBED_CHUNK_GROUPS)])
        return tokens.reshape(batch, num_groups, self.embed_dim)


def position_embedding_mlp(embed_dim: int) -> nn.Sequential:
    """Return the center position embedding ``3 -> 128 -> GELU -> embed_dim``."""
    return nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, embed_dim))


def init_point_mae_weights(module: nn.Module) -> None:
    """Initialise as Point-MAE does: truncated normal (std 0.02) weights and zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PointMAEEncoder(nn.Module):
    """Point-MAE encoder that returns group centers and multi-block group features.

    ``forward`` takes ``(B, N, 3)`` points and returns ``centers`` ``(B, G, 3)`` and
    ``features`` ``(B, G, len(feature_blocks) * embed_dim)``: the outputs of the
    ``feature_blocks``, each through the final LayerNorm, concatenated in block order.
    Layer classes are passed to every ``block_fn``, so quantized or prunable parts
    substitute for the float ones.
    """

    def __init__(
        self,
        num_groups: int = 1024,
        group_size: int = 128,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        feature_blocks: Sequence[int] = M3DM_FEATURE_BLOCKS,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        attn_layer: type[Attention] = Attention,
        mlp_layer: type[Mlp] = Mlp,
        block_fn: type[Block] = Block,
    ) -> None:
        super().__init__()
        if num_groups < 1 or group_size < 1:
            raise ValueError(f"num_groups and group_size must be positive, got {num_groups} and {group_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of num_heads {num_heads}")
        feature_blocks = tuple(int(i) for i in feature_blocks)
        if not feature_blocks or any(not 0 <= i < depth for i in feature_blocks):
            raise ValueError(f"feature_blocks {feature_blocks} must be non-empty indices between 0 and depth - 1 = {depth - 1}")
        if list(feature_blocks) != sorted(set(feature_blocks)):
            raise ValueError(f"feature_blocks {feature_blocks} must be strictly increasing")

        self.num_groups = num_groups
        self.group_size = group_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.feature_blocks = feature_blocks
        self.feature_dim = len(feature_blocks) * embed_dim

        self.group_embed = MiniPointNet(embed_dim)
        self.pos_embed = position_embedding_mlp(embed_dim)
        self.blocks = stack_blocks(
            depth, embed_dim, num_heads, mlp_ratio, None, norm_layer, act_layer, attn_layer, mlp_layer, block_fn
        )
        self.norm = norm_layer(embed_dim)
        self.apply(init_point_mae_weights)

    def group(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``neighborhoods`` ``(B, G, S, 3)`` relative to ``centers`` ``(B, G, 3)``."""
        validate_points(points)
        if points.shape[1] < max(self.num_groups, self.group_size):
            raise ValueError(
                f"the encoder needs at least {max(self.num_groups, self.group_size)} points per cloud "
                f"({self.num_groups} groups of {self.group_size}), got {points.shape[1]}"
            )
        return group_points(points, self.num_groups, self.group_size)

    def forward_features(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Run all blocks on ``(B, G, C)`` tokens with position embeddings ``pos`` and apply the final norm."""
        x = tokens
        for block in self.blocks:
            x = block(x + pos)
        return self.norm(x)

    def forward_intermediates(self, tokens: torch.Tensor, pos: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Return the LayerNorm-ed ``(B, G, C)`` outputs of the blocks ``indices``, in block order.

        Blocks after the last requested index are not run.
        """
        requested = set(indices)
        if not requested or min(requested) < 0 or max(requested) >= len(self.blocks):
            raise ValueError(f"block indices {sorted(requested)} out of range for a {len(self.blocks)}-block encoder")

        outputs = []
        x = tokens
        for i, block in enumerate(self.blocks[: max(requested) + 1]):
            x = block(x + pos)
            if i in requested:
                outputs.append(self.norm(x))
        return outputs

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``(B, N, 3)`` points into ``centers`` ``(B, G, 3)`` and ``features`` ``(B, G, feature_dim)``."""
        neighborhoods, centers = self.group(points)
        tokens = self.group_embed(neighborhoods)
        pos = self.pos_embed(centers)
        outputs = self.forward_intermediates(tokens, pos, self.feature_blocks)
        return centers, torch.cat(outputs, dim=-1)


# ---------------------------------------------------------------------------
# Checkpoints in Point-MAE's key layout
# ---------------------------------------------------------------------------

#: Block parts named alike in both layouts: all but the attention's q/k/v.
_BLOCK_PARTS = ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def unwrap_point_mae_checkpoint(checkpoint: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the model tensors of a Point-MAE checkpoint, ``module.`` prefixes removed.

    Accepts the file's top-level dict (tensors under ``base_model``) or that state
    dict itself.
    """
    state = checkpoint.get("base_model", checkpoint)
    if not isinstance(state, dict):
        raise WeightsError(f"{source}: 'base_model' is a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith(ENCODER_PREFIX) for k in state):
        raise WeightsError(
            f"{source} has no {ENCODER_PREFIX}* tensors (first keys: {sorted(state)[:5]}); "
            "expected a Point-MAE pretraining checkpoint such as pretrain.pth"
        )
    return state


def convert_point_mae(state: dict[str, torch.Tensor], encoder: PointMAEEncoder) -> dict[str, torch.Tensor]:
    """Convert Point-MAE encoder tensors to the state dict of ``encoder``.

    The fused ``attn.qkv`` rows are split into query, key and value (in that order).
    When the checkpoint has no ``attn.qkv.bias``, as Point-MAE's has not, their biases are zero.
    Raises WeightsError listing every tensor that ``encoder`` needs and the checkpoint lacks.
    """
    used: set[str] = set()
    missing: list[str] = []
    out: dict[str, torch.Tensor] = {}

    def take(ours: str, theirs: str) -> None:
        key = ENCODER_PREFIX + theirs
        if key in state:
            used.add(key)
            out[ours] = state[key]
        elif ours.endswith("num_batches_tracked"):
            out[ours] = torch.zeros((), dtype=torch.long)
        else:
            missing.append(key)

    for name in encoder.group_embed.state_dict():
        take(f"group_embed.{name}", f"encoder.{name}")
    for name in encoder.pos_embed.state_dict():
        take(f"pos_embed.{name}", f"pos_embed.{name}")
    take("norm.weight", "norm.weight")
    take("norm.bias", "norm.bias")

    for i in range(len(encoder.blocks)):
        ours, theirs = f"blocks.{i}.", f"blocks.blocks.{i}."
        for part in _BLOCK_PARTS:
            take(f"{ours}{part}.weight", f"{theirs}{part}.weight")
            take(f"{ours}{part}.bias", f"{theirs}{part}.bias")

        qkv_weight = ENCODER_PREFIX + theirs + "attn.qkv.weight"
        qkv_bias = ENCODER_PREFIX + theirs + "attn.qkv.bias"
        if qkv_weight not in state:
            missing.append(qkv_weight)
            continue
        used.add(qkv_weight)
        weights = state[qkv_weight].chunk(3, dim=0)
        if qkv_bias in state:
            used.add(qkv_bias)
            biases = state[qkv_bias].chunk(3, dim=0)
        else:
            biases = [torch.zeros(w.shape[0], dtype=w.dtype) for w in weights]
        for projection, weight, bias in zip(("query", "key", "value"), weights, biases):
            out[f"{ours}attn.{projection}.weight"] = weight
            out[f"{ours}attn.{projection}.bias"] = bias

    if missing:
        raise WeightsError(
            f"Point-MAE checkpoint lacks {len(missing)} tensors that a {len(encoder.blocks)}-block encoder needs, "
            f"e.g. {missing[:5]}; is it a Point-MAE checkpoint of this depth?"
        )
    unused = sorted(k for k in state if k.startswith(ENCODER_PREFIX) and k not in used)
    if unused:
        logger.warning("Ignoring %d %s* tensors the encoder does not use, e.g. %s", len(unused), ENCODER_PREFIX, unused[:5])
    return out


def load_point_mae_state(encoder: PointMAEEncoder, state: dict[str, torch.Tensor]) -> PointMAEEncoder:
    """Load Point-MAE tensors (unwrapped) into ``encoder`` (strict) and return it."""
    converted = convert_point_mae(state, encoder)
    try:
        encoder.load_state_dict(converted, strict=True)
    except RuntimeError as error:
        raise WeightsError(f"Point-MAE tensors do not fit the encoder (embed_dim {encoder.embed_dim}): {error}") from error
    logger.info("Loaded Point-MAE weights into a %d-block encoder of width %d", len(encoder.blocks), encoder.embed_dim)
    return encoder


def read_point_mae_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a Point-MAE ``.pth`` file (tensors only, no code unpickled).

    Returns the unwrapped tensors and our saved encoder settings, empty for official files.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Point-MAE checkpoint {path} does not exist: give the path of pretrain.pth or of a save_point_mae file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(
            f"could not read {path} as a tensors-only checkpoint ({error.__class__.__name__}: {str(error)[:200]})"
        ) from error
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path} contains a {type(checkpoint).__name__}, not a checkpoint dict")
    config = checkpoint.get(CONFIG_KEY, {})
    return unwrap_point_mae_checkpoint(checkpoint, source=str(path)), config if isinstance(config, dict) else {}


def load_point_mae(path: str | Path, **encoder_kwargs) -> PointMAEEncoder:
    """Build the encoder a Point-MAE checkpoint describes, load its weights, return it in eval mode.

    Width, depth and MLP ratio are read from the tensors. Settings the tensors cannot
    show (``num_heads``, ``num_groups``, ``group_size``, ``feature_blocks``) come from
    ``encoder_kwargs``, else from the settings that :func:`save_point_mae` stored,
    else from the M3DM defaults, with one head per 64 channels.
    """
    state, saved = read_point_mae_checkpoint(path)
    try:
        embed_dim = state[ENCODER_PREFIX + "norm.weight"].shape[0]
        hidden_dim = state[ENCODER_PREFIX + "blocks.blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise WeightsError(f"{path} lacks {error.args[0]!r}, needed to infer the encoder size") from error
    depth = len({k.split(".")[3] for k in state if k.startswith(ENCODER_PREFIX + "blocks.blocks.")})

    settings = {"num_heads": max(1, embed_dim // POINT_MAE_HEAD_DIM)}
    settings |= {k: v for k, v in saved.items() if k in ("num_heads", "num_groups", "group_size", "feature_blocks")}
    settings |= {"embed_dim": embed_dim, "depth": depth, "mlp_ratio": hidden_dim / embed_dim}
    settings |= encoder_kwargs
    logger.info("Point-MAE checkpoint %s: width %d, %d blocks, settings %s", path, embed_dim, depth, settings)
    return load_point_mae_state(PointMAEEncoder(**settings), state).eval()


def point_mae_state(encoder: PointMAEEncoder) -> dict[str, torch.Tensor]:
    """Return the encoder's tensors under Point-MAE's ``MAE_encoder.`` names (inverse of :func:`convert_point_mae`).

    The q/k/v rows are fused into ``attn.qkv``. Its bias is written only when some
    q/k/v bias is non-zero, so converted official weights keep their bias-free layout.
    """
    ours = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name in encoder.group_embed.state_dict():
        out[f"{ENCODER_PREFIX}encoder.{name}"] = ours[f"group_embed.{name}"]
    for name in encoder.pos_embed.state_dict():
        out[f"{ENCODER_PREFIX}pos_embed.{name}"] = ours[f"pos_embed.{name}"]
    out[ENCODER_PREFIX + "norm.weight"] = ours["norm.weight"]
    out[ENCODER_PREFIX + "norm.bias"] = ours["norm.bias"]

    for i in range(len(encoder.blocks)):
        src, dst = f"blocks.{i}.", f"{ENCODER_PREFIX}blocks.blocks.{i}."
        for part in _BLOCK_PARTS:
            out[f"{dst}{part}.weight"] = ours[f"{src}{part}.weight"]
            out[f"{dst}{part}.bias"] = ours[f"{src}{part}.bias"]
        projections = ("query", "key", "value")
        out[f"{dst}attn.qkv.weight"] = torch.cat([ours[f"{src}attn.{p}.weight"] for p in projections])
        bias = torch.cat([ours[f"{src}attn.{p}.bias"] for p in projections])
        if bias.any():
            out[f"{dst}attn.qkv.bias"] = bias
    return out


def save_point_mae(path: str | Path, encoder: PointMAEEncoder) -> Path:
    """Write ``encoder`` as a Point-MAE checkpoint that :func:`load_point_mae` reads back.

    The file contains ``{"base_model": tensors in Point-MAE layout, "qcstream_point_mae": settings}``.
    The settings are the head count, grouping and feature blocks, which the tensors cannot show.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "num_heads": encoder.num_heads,
        "num_groups": encoder.num_groups,
        "group_size": encoder.group_size,
        "feature_blocks": list(encoder.feature_blocks),
    }
    torch.save({"base_model": point_mae_state(encoder), CONFIG_KEY: settings}, path)
    logger.info("Saved Point-MAE encoder (%d blocks, width %d) to %s", len(encoder.blocks), encoder.embed_dim, path)
    return path
