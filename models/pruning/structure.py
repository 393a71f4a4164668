"""Remove attention heads and MLP neurons from the weight matrices.

A pruned head loses its rows of the query, key and value projections and its
columns of the output projection. A pruned neuron loses its row of ``fc1`` and
its column of ``fc2``. The smaller layers compute exactly what the full layers
compute with those heads and neurons masked to zero, and they are faster because
the matrices are smaller.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from qcstream.models.vit import Attention, Mlp


class BiasOnly(nn.Module):
    """A residual branch whose heads or neurons were all pruned: only its output bias is left."""

    def __init__(self, bias: torch.Tensor | None, dim: int) -> None:
        super().__init__()
        self.register_buffer("bias", bias.detach().clone() if bias is not None else torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*x.shape[:-1], -1).to(x.dtype)


def _checked(keep: Sequence[int], total: int, unit_name: str) -> list[int]:
    kept = sorted(set(int(i) for i in keep))
    if len(kept) != len(keep) or any(not 0 <= i < total for i in kept):
        raise ValueError(f"{unit_name} to keep {list(keep)} must be distinct indices between 0 and {total - 1}")
    return kept


def _linear(source: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.to(source.weight.dtype)


def prune_attention_heads(attention: Attention, keep: Sequence[int]) -> nn.Module:
    """Return an :class:`Attention` with only the heads ``keep``, or :class:`BiasOnly` when none are kept."""
    kept = _checked(keep, attention.num_heads, "heads")
    dim = attention.proj.out_features
    if not kept:
        return BiasOnly(attention.proj.bias, dim)

    head_dim = attention.head_dim
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])
    pruned = Attention(dim, len(kept), head_dim=head_dim)
    for name in ("query", "key", "value"):
        source = getattr(attention, name)
        bias = source.bias[rows] if source.bias is not None else None
        setattr(pruned, name, _linear(source, source.weight[rows], bias))
    pruned.proj = _linear(attention.proj, attention.proj.weight[:, rows], attention.proj.bias)
    pruned.scale = attention.scale
    return pruned


def prune_mlp_neurons(mlp: Mlp, keep: Sequence[int]) -> nn.Module:
    """Return an :class:`Mlp` with only the hidden neurons ``keep``, or :class:`BiasOnly` when none are kept."""
    kept = _checked(keep, mlp.fc1.out_features, "neurons")
    dim = mlp.fc2.out_features
    if not kept:
        return BiasOnly(mlp.fc2.bias, dim)

    index = torch.tensor(kept)
    pruned = Mlp(dim, len(kept), act_layer=type(mlp.act))
    fc1_bias = mlp.fc1.bias[index] if mlp.fc1.bias is not None else None
    pruned.fc1 = _linear(mlp.fc1, mlp.fc1.weight[index], fc1_bias)
    pruned.fc2 = _linear(mlp.fc2, mlp.fc2.weight[:, index], mlp.fc2.bias)
    return pruned


def prune_blocks(blocks: nn.ModuleList, heads: Sequence[Sequence[int]], neurons: Sequence[Sequence[int]]) -> None:
    """Replace, in place, each block's attention and MLP by the pruned ones keeping ``heads[i]`` and ``neurons[i]``."""
    if len(heads) != len(blocks) or len(neurons) != len(blocks):
        raise ValueError(f"need one list of heads and of neurons per block: {len(blocks)} blocks, got {len(heads)} and {len(neurons)}")
    for block, block_heads, block_neurons in zip(blocks, heads, neurons):
        block.attn = prune_attention_heads(block.attn, block_heads)
        block.mlp = prune_mlp_neurons(block.mlp, block_neurons)
