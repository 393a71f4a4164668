"""Head and neuron masks on a transformer, and the FLOPs they leave.

A mask variable scales one attention head's output (before the output
projection) or one MLP neuron's activation (before ``fc2``). Masks are applied
by forward pre-hooks on ``attn.proj`` and ``mlp.fc2``, so the float
:class:`~qcstream.models.vit.Attention` and :class:`~qcstream.models.vit.Mlp`
run unchanged. All ones is the original model; zeros remove units; real values
are what mask tuning fits.

:class:`TransformerView` gives one interface over the two transformers the
detector uses: the DINOv2 ViT (blocks on patch tokens) and the Point-MAE
encoder (blocks on group tokens plus position embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from qcstream.models.point_mae import PointMAEEncoder
from qcstream.models.vit import VisionTransformer


@dataclasses.dataclass(frozen=True)
class UnitCost:
    """Multiply-adds per frame of one attention head and one MLP neuron of a block."""

    head: int
    neuron: int


def unit_cost(tokens: int, dim: int, head_dim: int) -> UnitCost:
    """Multiply-adds of one head and one neuron for ``tokens`` tokens of width ``dim``.

    A head projects queries, keys and values (3 T D d), forms and applies the
    attention matrix (2 T^2 d) and projects back (T d D). A neuron is one row of
    ``fc1`` and one column of ``fc2`` (2 T D). Norms, softmax and GELU are left out.
    """
    return UnitCost(head=4 * tokens * dim * head_dim + 2 * tokens * tokens * head_dim, neuron=2 * tokens * dim)


class TransformerView:
    """The blocks of a ViT or Point-MAE encoder that compute the detector's features.

    ``feature_blocks`` are the block indices whose outputs are features; blocks
    after the last of them never run, so only ``blocks[:last + 1]`` are pruned.
    ``tokens`` is the sequence length of one frame in a block.
    """

    def __init__(self, model: nn.Module, feature_blocks: Sequence[int]) -> None:
        if not isinstance(model, (VisionTransformer, PointMAEEncoder)):
            raise TypeError(f"cannot prune a {type(model).__name__}: expected a VisionTransformer or a PointMAEEncoder")
        depth = len(model.blocks)
        resolved = sorted({i if i >= 0 else depth + i for i in feature_blocks})
        if not resolved or resolved[0] < 0 or resolved[-1] >= depth:
            raise ValueError(f"feature blocks {list(feature_blocks)} are out of range for a {depth}-block transformer")
        self.model = model
        self.feature_blocks = tuple(resolved)
        self.blocks = list(model.blocks[: resolved[-1] + 1])
        self.is_vit = isinstance(model, VisionTransformer)
        self.dim = model.embed_dim
        self.tokens = 1 + model.grid_size[0] * model.grid_size[1] if self.is_vit else model.num_groups

    @property
    def num_heads(self) -> list[int]:
        return [block.attn.num_heads for block in self.blocks]

    @property
    def num_neurons(self) -> list[int]:
        return [block.mlp.fc1.out_features for block in self.blocks]

    @property
    def head_dim(self) -> int:
        return self.blocks[0].attn.head_dim

    def cost(self) -> UnitCost:
        return unit_cost(self.tokens, self.dim, self.head_dim)

    def embed(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the tokens entering block 0 and what each block adds to its input (Point-MAE positions)."""
        if self.is_vit:
            return self.model._embed(batch), None
        neighborhoods, centers = batch
        return self.model.group_embed(neighborhoods), self.model.pos_embed(centers)

    def block_input(self, x: torch.Tensor, added: torch.Tensor | None) -> torch.Tensor:
        return x if added is None else x + added

    def features(self, batch) -> torch.Tensor:
        """Compute the backbone's output features for ``batch``: the normed outputs of the feature blocks, concatenated."""
        x, added = self.embed(batch)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(self.block_input(x, added))
            if index in self.feature_blocks:
                tokens = x[:, 1:] if self.is_vit else x
                outputs.append(self.model.norm(tokens))
        return torch.cat(outputs, dim=-1)


class Masks:
    """Head and neuron mask tensors attached to the blocks of a :class:`TransformerView`.

    ``heads[i]`` has one value per head of block ``i`` and ``neurons[i]`` one per
    MLP neuron. Use as a context manager: the hooks are removed on exit.
    """

    def __init__(self, view: TransformerView) -> None:
        self.view = view
        self.heads = [torch.ones(n) for n in view.num_heads]
        self.neurons = [torch.ones(n) for n in view.num_neurons]
        self._handles: list = []

    def __enter__(self) -> "Masks":
        for index, block in enumerate(self.view.blocks):
            self._handles.append(block.attn.proj.register_forward_pre_hook(self._head_hook(index)))
            self._handles.append(block.mlp.fc2.register_forward_pre_hook(self._neuron_hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _head_hook(self, index: int):
        head_dim = self.view.head_dim

        def hook(module, inputs):
            (x,) = inputs
            scale = self.heads[index].repeat_interleave(head_dim, dim=-1).to(x.dtype)
            return (x * _per_frame(scale),)

        return hook

    def _neuron_hook(self, index: int):
        def hook(module, inputs):
            (x,) = inputs
            return (x * _per_frame(self.neurons[index].to(x.dtype)),)

        return hook

    def parameters(self) -> list[torch.Tensor]:
        return self.heads + self.neurons

    def per_frame(self, frames: int) -> None:
        """Give every mask one row per frame of the next batch, so gradients come out per frame."""
        self.heads = [torch.ones(frames, n, requires_grad=True) for n in self.view.num_heads]
        self.neurons = [torch.ones(frames, n, requires_grad=True) for n in self.view.num_neurons]

    def set_binary(self, heads: Sequence[torch.Tensor], neurons: Sequence[torch.Tensor]) -> None:
        """Set every mask value to the given 0/1 (or real) values, without gradients."""
        with torch.no_grad():
            for target, value in zip(self.heads + self.neurons, list(heads) + list(neurons)):
                target.copy_(torch.as_tensor(value, dtype=target.dtype))


def _per_frame(scale: torch.Tensor) -> torch.Tensor:
    """Broadcast a ``(frames, units)`` mask over the token axis of ``(frames, tokens, units)``."""
    return scale[:, None, :] if scale.dim() == 2 else scale


def flops_fraction(view: TransformerView, heads_kept: Sequence[int], neurons_kept: Sequence[int]) -> float:
    """Return the fraction of the prunable multiply-adds that ``heads_kept`` and ``neurons_kept`` (per block) leave."""
    cost = view.cost()
    total = sum(view.num_heads) * cost.head + sum(view.num_neurons) * cost.neuron
    kept = sum(heads_kept) * cost.head + sum(neurons_kept) * cost.neuron
    return kept / total
