"""A plain Vision Transformer built from small, replaceable parts.

The parts follow the DINO / DINOv2 ViT design: patch embedding by a strided
convolution, a class token, learned position embeddings, pre-norm blocks with
optional layer scale. Layer classes (``norm_layer``, ``act_layer``, ``attn_layer``,
``mlp_layer``, and the ``linear_layer`` and ``softmax_layer`` inside them) are
passed in, so quantized or prunable variants substitute for the float parts
instead of forking this file.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each to ``embed_dim``.

    Input ``(B, 3, H, W)`` with H and W multiples of ``patch_size``; output
    ``(B, H/p * W/p, embed_dim)`` in row-major patch order.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with separate query, key and value projections.

    Separate projections (not one fused ``qkv``) keep per-head pruning a matter of
    slicing rows, and match the DINOv2 checkpoints in Hugging Face layout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        linear_layer: Callable[[int, int], nn.Module] = nn.Linear,
        softmax_layer: Callable[[], nn.Module] = partial(nn.Softmax, dim=-1),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.query = linear_layer(dim, inner_dim)
        self.key = linear_layer(dim, inner_dim)
        self.value = linear_layer(dim, inner_dim)
        self.proj = linear_layer(inner_dim, dim)
        self.attn_softmax = softmax_layer()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(x))
        v = self._split_heads(self.value(x))

        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.attn_softmax(attn)
        x = attn @ v

        x = x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.proj(x)


class Mlp(nn.Module):
    """Two-layer feed-forward network: ``fc1 -> act -> fc2``."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act_layer: type[nn.Module] = nn.GELU,
        linear_layer: Callable[[int, int], nn.Module] = nn.Linear,
    ) -> None:
        super().__init__()
        self.fc1 = linear_layer(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = linear_layer(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.act(x)
        return self.fc2(x)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (DINOv2, CaiT)."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: attention and MLP residual branches."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        layer_scale: float | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        attn_layer: type[Attention] = Attention,
        mlp_layer: type[Mlp] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


def stack_blocks(
    depth: int,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    layer_scale: float | None,
    norm_layer: Callable[[int], nn.Module],
    act_layer: type[nn.Module],
    attn_layer: type[Attention],
    mlp_layer: type[Mlp],
    block_fn: type[Block] = Block,
) -> nn.ModuleList:
    """Build ``depth`` transformer blocks of width ``dim`` from the given layer classes."""
    return nn.ModuleList(
        block_fn(
            dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            layer_scale=layer_scale,
            norm_layer=norm_layer,
            act_layer=act_layer,
            attn_layer=attn_layer,
            mlp_layer=mlp_layer,
        )
        for _ in range(depth)
    )


def layer_norm_eps6(dim: int) -> nn.LayerNorm:
    """LayerNorm with eps 1e-6, as DINO and DINOv2 use."""
    return nn.LayerNorm(dim, eps=1e-6)


class VisionTransformer(nn.Module):
    """ViT backbone that returns patch tokens, not class logits.

    ``img_size`` fixes the token grid. Position embeddings are stored for that grid,
    and converters resample pretrained ones to it, so the traced ONNX graph has no
    run-time interpolation.
    """

    def __init__(
        self,
        img_size: tuple[int, int] = (224, 224),
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        layer_scale: float | None = 1e-5,
        norm_layer: Callable[[int], nn.Module] = layer_norm_eps6,
        act_layer: type[nn.Module] = nn.GELU,
        attn_layer: type[Attention] = Attention,
        mlp_layer: type[Mlp] = Mlp,
        block_fn: type[Block] = Block,
    ) -> None:
        super().__init__()
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(
                f"img_size {img_size} must be a multiple of patch_size {patch_size}; "
                f"for example {(img_size[0] // patch_size * patch_size, img_size[1] // patch_size * patch_size)}"
            )
        self.img_size = tuple(img_size)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        self.blocks = stack_blocks(
            depth, embed_dim, num_heads, mlp_ratio, layer_scale, norm_layer, act_layer, attn_layer, mlp_layer, block_fn
        )
        self.norm = norm_layer(embed_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"expected input of size {self.img_size}, got {tuple(x.shape[-2:])}; resize it first")
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return all tokens after the final norm, ``(B, 1 + N, C)``."""
        x = self._embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: list[int], norm: bool = True) -> list[torch.Tensor]:
        """Return the patch tokens of the given blocks as grids ``(B, C, h, w)``.

        ``norm`` applies the final LayerNorm to each, as DINO feature extraction does.
        Blocks after the last requested index are not run.
        """
        requested = {i if i >= 0 else len(self.blocks) + i for i in indices}
        if not requested or max(requested) >= len(self.blocks):
            raise ValueError(f"block indices {indices} out of range for a {len(self.blocks)}-block model")

        x = self._embed(x)
        outputs: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[: max(requested) + 1]):
            x = block(x)
            if i in requested:
                outputs[i] = self.norm(x) if norm else x

        grids = []
        for i in sorted(requested):
            tokens = outputs[i][:, 1:]
            grid = tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *self.grid_size)
            grids.append(grid)
        return grids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample ``(1, prefix + h*w, C)`` position embeddings to ``new_grid`` (bicubic).

    The old grid must be square, as in published DINO and DINOv2 checkpoints.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_side = int(math.isqrt(patches.shape[1]))
    if old_side * old_side != patches.shape[1]:
        raise ValueError(f"position embeddings of {patches.shape[1]} patches do not form a square grid")
    if (old_side, old_side) == tuple(new_grid):
        return pos_embed

    dim = patches.shape[-1]
    grid = patches.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, patches.to(pos_embed.dtype)], dim=1)


def vit_small_patch14_dinov2(img_size: tuple[int, int] = (224, 224), **kwargs) -> VisionTransformer:
    """ViT-S/14 in the DINOv2 configuration (384 wide, 12 blocks, 6 heads, layer scale)."""
    return VisionTransformer(img_size=img_size, patch_size=14, embed_dim=384, depth=12, num_heads=6, layer_scale=1e-5, **kwargs)
