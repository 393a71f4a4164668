"""Masks, Fisher information, mask tuning and the whole pruning pass on small transformers."""

from __future__ import annotations

import pytest
import torch

from qcstream.models.point_mae import PointMAEEncoder
from qcstream.models.point_ops import group_points
from qcstream.models.pruning import BiasOnly, prune_transformer, shrink_to_layout
from qcstream.models.pruning.masks import Masks, TransformerView
from qcstream.models.pruning.search import collect_fisher
from qcstream.models.pruning.tuning import tune_masks
from qcstream.models.vit import VisionTransformer


def small_vit(seed: int = 0, depth: int = 3) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=(42, 42), patch_size=14, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0, layer_scale=0.5).eval()


def image_batches(count: int = 8, frames: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(frames, 3, 42, 42, generator=generator) for _ in range(count)]


def test_all_one_masks_change_nothing():
    view = TransformerView(small_vit(), [1, 2])
    batch = image_batches(1)[0]

    with torch.no_grad():
        expected = view.features(batch)
        with Masks(view):
            masked = view.features(batch)

    torch.testing.assert_close(masked, expected)


def test_fisher_of_silent_head_is_zero():
    model = small_vit()
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 16:] = 0  # head 1 of block 0 never reaches the output
    view = TransformerView(model, [2])

    fisher = collect_fisher(view, image_batches(4), progress=False)

    importance = fisher.head_importance()[0]
    assert importance[1] == 0
    assert importance[0] > 0
    assert fisher.heads[0].shape == (4 * 2 * 2, 2)  # 4 batches of 2 frames, 2 draws: one sample per frame and draw
    assert all(p.requires_grad for p in model.parameters())


def test_tuning_doubles_twin_head():
    # Two identical heads: without one, the other at mask value 2 gives the original output exactly.
    model = small_vit(depth=1)
    with torch.no_grad():
        attention = model.blocks[0].attn
        for layer in (attention.query, attention.key, attention.value):
            layer.weight[16:] = layer.weight[:16]
            layer.bias[16:] = layer.bias[:16]
        attention.proj.weight[:, 16:] = attention.proj.weight[:, :16]
    view = TransformerView(model, [0])

    heads, neurons, fits = tune_masks(view, [torch.tensor([1.0, 0.0])], [torch.ones(64)], image_batches(), progress=False)

    torch.testing.assert_close(heads[0], torch.tensor([2.0, 0.0]), atol=1e-4, rtol=0)
    assert fits[0].branch == "attention"
    assert fits[0].loss < 1e-8
    assert fits[0].relative_losses["unchanged"] > 0.01


def test_constraint_one_keeps_model():
    model = small_vit()
    batches = image_batches()

    pruned, report = prune_transformer(model, [1, 2], batches, 1.0, progress=False)

    assert report.flops == pytest.approx(1.0)
    assert report.layout()["heads"] == [2, 2, 2]
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_intermediates(batches[0], [1, 2])[1], model.forward_intermediates(batches[0], [1, 2])[1], atol=1e-4, rtol=1e-4)


def test_pruned_model_matches_tuned_masks():
    model = small_vit()
    batches = image_batches()

    pruned, report = prune_transformer(model, [1], batches, 0.5, progress=False)

    assert report.flops <= 0.5
    layout = report.layout()
    # Block 2 comes after the last feature block, so it is emptied.
    assert layout["heads"][2] == 0
    assert layout["neurons"][2] == 0
    assert isinstance(pruned.blocks[2].attn, BiasOnly)
    assert report.distortion_tuned < report.distortion_masked
    # The report's distortion was measured with masks on the full model; the smaller model must match it.
    error = total = 0.0
    with torch.no_grad():
        for batch in batches:
            original = model.forward_intermediates(batch, [1])[0]
            error += float((pruned.forward_intermediates(batch, [1])[0] - original).pow(2).sum())
            total += float(original.pow(2).sum())
    assert error / total == pytest.approx(report.distortion_tuned, rel=1e-3)


def test_pruning_leaves_input_untouched():
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    prune_transformer(model, [2], image_batches(4), 0.6, progress=False)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layout_rebuilds_pruned_shapes():
    pruned, report = prune_transformer(small_vit(), [1, 2], image_batches(), 0.6, progress=False)

    rebuilt = shrink_to_layout(small_vit(seed=5), report.layout())
    rebuilt.load_state_dict(pruned.state_dict())

    batch = image_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.forward_intermediates(batch, [2])[0], pruned.forward_intermediates(batch, [2])[0])


def test_layout_depth_mismatch_raises():
    _, report = prune_transformer(small_vit(), [1], image_batches(4), 0.6, progress=False)

    with pytest.raises(ValueError, match="the pruning layout has 3 blocks, the model 2"):
        shrink_to_layout(small_vit(depth=2), report.layout())


def test_pruning_twice_raises():
    pruned, _ = prune_transformer(small_vit(), [1], image_batches(4), 0.6, progress=False)

    with pytest.raises(ValueError, match="already pruned"):
        prune_transformer(pruned, [1], image_batches(4), 0.6, progress=False)


def test_point_mae_encoder_prunes():
    torch.manual_seed(0)
    encoder = PointMAEEncoder(num_groups=16, group_size=8, embed_dim=64, depth=2, num_heads=2, feature_blocks=(0, 1)).eval()
    generator = torch.Generator().manual_seed(4)
    batches = [group_points(torch.rand(1, 256, 3, generator=generator), 16, 8) for _ in range(6)]

    pruned, report = prune_transformer(encoder, encoder.feature_blocks, batches, 0.5, progress=False)

    assert report.flops <= 0.5
    points = torch.rand(1, 256, 3, generator=generator)
    with torch.no_grad():
        centers, features = pruned(points)
        reference_centers, reference = encoder(points)
    torch.testing.assert_close(centers, reference_centers)
    assert features.shape == reference.shape
    assert report.distortion_tuned < report.distortion_masked


def test_view_rejects_other_modules():
    with pytest.raises(TypeError, match="cannot prune a Linear"):
        TransformerView(torch.nn.Linear(2, 2), [0])
