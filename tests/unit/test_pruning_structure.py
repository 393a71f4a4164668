"""Physical removal of attention heads and MLP neurons, against masking the same units."""

from __future__ import annotations

import pytest
import torch

from qcstream.models.pruning import BiasOnly, prune_attention_heads, prune_blocks, prune_mlp_neurons
from qcstream.models.vit import Attention, Mlp, VisionTransformer

HEAD_DIM = 16


def masked_attention(attention: Attention, keep: list[int]) -> Attention:
    """The full layer with the dropped heads' output-projection columns zeroed: what pruning must reproduce."""
    masked = Attention(attention.proj.out_features, attention.num_heads, head_dim=attention.head_dim)
    masked.load_state_dict(attention.state_dict())
    with torch.no_grad():
        for head in set(range(attention.num_heads)) - set(keep):
            masked.proj.weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0
    return masked


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0))


def test_pruned_heads_match_masked_heads(tokens):
    torch.manual_seed(0)
    attention = Attention(64, 4, head_dim=HEAD_DIM).eval()

    pruned = prune_attention_heads(attention, [0, 2])

    assert pruned.num_heads == 2
    assert pruned.query.weight.shape == (32, 64)
    assert pruned.proj.weight.shape == (64, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), masked_attention(attention, [0, 2])(tokens))


def test_pruned_neurons_match_masked_neurons(tokens):
    torch.manual_seed(0)
    mlp = Mlp(64, 256).eval()
    keep = [1, 5, 7, 100]
    masked = Mlp(64, 256)
    masked.load_state_dict(mlp.state_dict())
    with torch.no_grad():
        dropped = [i for i in range(256) if i not in keep]
        masked.fc2.weight[:, dropped] = 0

    pruned = prune_mlp_neurons(mlp, keep)

    assert pruned.fc1.weight.shape == (4, 64)
    assert pruned.fc2.weight.shape == (64, 4)
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), masked(tokens))


def test_branch_without_units_keeps_only_its_bias(tokens):
    torch.manual_seed(0)
    attention = Attention(64, 4, head_dim=HEAD_DIM)

    pruned = prune_attention_heads(attention, [])

    assert isinstance(pruned, BiasOnly)
    torch.testing.assert_close(pruned(tokens), attention.proj.bias.expand(2, 10, 64))


def test_invalid_keep_indices_are_named():
    with pytest.raises(ValueError, match=r"heads to keep \[0, 4\] must be distinct indices between 0 and 3"):
        prune_attention_heads(Attention(64, 4, head_dim=HEAD_DIM), [0, 4])


def test_pruned_vit_runs_and_shrinks():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=(28, 28), patch_size=14, embed_dim=64, depth=2, num_heads=4, layer_scale=None).eval()
    images = torch.randn(1, 3, 28, 28)
    before = sum(p.numel() for p in vit.parameters())

    prune_blocks(vit.blocks, heads=[[0, 1], [3]], neurons=[list(range(100)), []])

    assert sum(p.numel() for p in vit.parameters()) < before
    with torch.no_grad():
        assert vit(images).shape == (1, 5, 64)
