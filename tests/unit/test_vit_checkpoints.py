"""Official DINO and DINOv2 checkpoints load into our ViT and reproduce their forward pass.

Each test writes a small random checkpoint in the official key layout itself
(fused ``attn.qkv``, ``blocks.N.`` names, ``ls1.gamma`` for DINOv2) and compares
our model against a forward pass written here from the official design.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qcstream.models import data as data_io
from qcstream.models import weights
from qcstream.models.config import DetectorConfig
from qcstream.models.detector import PatchCoreDetector, load_detector
from qcstream.models.vit import LayerScale

WIDTH = 128
HEADS = 2  # 64-dimensional heads, as in every DINO model
DEPTH = 2


def official_state(patch: int, grid: int, dinov2: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official DINO (or DINOv2) key names."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    state = {
        "cls_token": rand(1, 1, WIDTH),
        "pos_embed": rand(1, 1 + grid * grid, WIDTH),
        "patch_embed.proj.weight": rand(WIDTH, 3, patch, patch, scale=0.05),
        "patch_embed.proj.bias": rand(WIDTH),
        "norm.weight": 1 + rand(WIDTH),
        "norm.bias": rand(WIDTH),
    }
    for i in range(DEPTH):
        block = f"blocks.{i}."
        state |= {
            block + "norm1.weight": 1 + rand(WIDTH),
            block + "norm1.bias": rand(WIDTH),
            block + "attn.qkv.weight": rand(3 * WIDTH, WIDTH, scale=0.1),
            block + "attn.qkv.bias": rand(3 * WIDTH),
            block + "attn.proj.weight": rand(WIDTH, WIDTH, scale=0.1),
            block + "attn.proj.bias": rand(WIDTH),
            block + "norm2.weight": 1 + rand(WIDTH),
            block + "norm2.bias": rand(WIDTH),
            block + "mlp.fc1.weight": rand(4 * WIDTH, WIDTH, scale=0.1),
            block + "mlp.fc1.bias": rand(4 * WIDTH),
            block + "mlp.fc2.weight": rand(WIDTH, 4 * WIDTH, scale=0.05),
            block + "mlp.fc2.bias": rand(WIDTH),
        }
        if dinov2:
            state[block + "ls1.gamma"] = rand(WIDTH, scale=0.5)
            state[block + "ls2.gamma"] = rand(WIDTH, scale=0.5)
    if dinov2:
        state["mask_token"] = rand(1, WIDTH)
    return state


def reference_tokens(state: dict[str, torch.Tensor], images: torch.Tensor, patch: int, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """The official ViT forward (fused qkv split as ``(3, heads, head_dim)``), final norm applied."""
    pos_embed = state["pos_embed"] if pos_embed is None else pos_embed
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    batch = x.shape[0]
    x = torch.cat([state["cls_token"].expand(batch, -1, -1), x], dim=1) + pos_embed
    tokens = x.shape[1]
    head_dim = WIDTH // HEADS

    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (WIDTH,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * head_dim**-0.5).softmax(dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(batch, tokens, WIDTH)
        h = F.linear(h, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        x = x + h * state.get(p + "ls1.gamma", torch.ones(WIDTH))

        h = F.layer_norm(x, (WIDTH,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])), state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        x = x + h * state.get(p + "ls2.gamma", torch.ones(WIDTH))
    return F.layer_norm(x, (WIDTH,), state["norm.weight"], state["norm.bias"], eps=1e-6)


def images_of(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


WRAPPINGS = {
    "plain": lambda state: state,
    "teacher": lambda state: {"teacher": {f"backbone.{k}": v for k, v in state.items()} | {"head.last_layer.weight": torch.zeros(3, 3)}, "epoch": 100},
    "student": lambda state: {"student": {f"module.backbone.{k}": v for k, v in state.items()}},
    "state_dict": lambda state: {"state_dict": dict(state)},
    "model": lambda state: {"model": {f"module.{k}": v for k, v in state.items()}},
}


@pytest.mark.parametrize("wrapping", sorted(WRAPPINGS))
def test_dino_checkpoint_weights_land_in_place(tmp_path, wrapping):
    state = official_state(patch=8, grid=4, dinov2=False)
    path = tmp_path / "dino_tiny8_pretrain.pth"
    torch.save(WRAPPINGS[wrapping](state), path)

    model = weights.vit_from_checkpoint(path, (32, 32))

    assert weights.detect_source(weights.read_checkpoint(path)) == "dino"
    assert (model.patch_size, model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (8, WIDTH, DEPTH, HEADS)
    ours = model.state_dict()
    for i in range(DEPTH):
        qkv_weight, qkv_bias = state[f"blocks.{i}.attn.qkv.weight"], state[f"blocks.{i}.attn.qkv.bias"]
        assert torch.equal(ours[f"blocks.{i}.attn.query.weight"], qkv_weight[:WIDTH])
        assert torch.equal(ours[f"blocks.{i}.attn.key.weight"], qkv_weight[WIDTH : 2 * WIDTH])
        assert torch.equal(ours[f"blocks.{i}.attn.value.weight"], qkv_weight[2 * WIDTH :])
        assert torch.equal(ours[f"blocks.{i}.attn.value.bias"], qkv_bias[2 * WIDTH :])
        for name in ("norm1.weight", "norm2.bias", "attn.proj.weight", "mlp.fc1.bias", "mlp.fc2.weight"):
            assert torch.equal(ours[f"blocks.{i}.{name}"], state[f"blocks.{i}.{name}"])
        assert not isinstance(model.blocks[i].ls1, LayerScale)
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.bias"):
        assert torch.equal(ours[name], state[name])


def test_dino_checkpoint_forward_matches_reference(tmp_path):
    state = official_state(patch=16, grid=3, dinov2=False)
    torch.save(state, tmp_path / "dino_tiny16.pth")
    images = images_of(48)

    model = weights.vit_from_checkpoint(tmp_path / "dino_tiny16.pth", (48, 48))
    with torch.inference_mode():
        ours = model.forward_features(images)

    torch.testing.assert_close(ours, reference_tokens(state, images, patch=16), atol=1e-4, rtol=1e-4)


def test_dinov2_weights_and_forward_at_518(tmp_path):
    state = official_state(patch=14, grid=37, dinov2=True)
    torch.save(state, tmp_path / "dinov2_tiny14_pretrain.pth")
    images = images_of(518)[:1]

    model = weights.vit_from_checkpoint(tmp_path / "dinov2_tiny14_pretrain.pth", (518, 518))
    with torch.inference_mode():
        ours = model.forward_features(images)

    assert weights.detect_source(state) == "dinov2"
    assert model.grid_size == (37, 37)
    assert torch.equal(model.blocks[1].ls1.gamma.detach(), state["blocks.1.ls1.gamma"])
    assert torch.equal(model.blocks[0].ls2.gamma.detach(), state["blocks.0.ls2.gamma"])
    assert torch.equal(model.blocks[1].attn.key.bias.detach(), state["blocks.1.attn.qkv.bias"][WIDTH : 2 * WIDTH])
    torch.testing.assert_close(ours, reference_tokens(state, images, patch=14), atol=1e-4, rtol=1e-4)


def test_dinov2_pos_embed_resampled_to_grid(tmp_path):
    state = official_state(patch=14, grid=37, dinov2=True)
    torch.save(state, tmp_path / "dinov2.pth")
    images = images_of(224)

    model = weights.vit_from_checkpoint(tmp_path / "dinov2.pth", (224, 224))
    with torch.inference_mode():
        ours = model.forward_features(images)

    patches = state["pos_embed"][:, 1:].reshape(1, 37, 37, WIDTH).permute(0, 3, 1, 2)
    resampled = F.interpolate(patches, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, WIDTH)
    expected_pos = torch.cat([state["pos_embed"][:, :1], resampled], dim=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected_pos)
    torch.testing.assert_close(ours, reference_tokens(state, images, patch=14, pos_embed=expected_pos), atol=1e-4, rtol=1e-4)


def test_dinov2_chunked_blocks_flattened(tmp_path):
    state = official_state(patch=14, grid=4, dinov2=True)
    chunked = {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in state.items()}
    torch.save(chunked, tmp_path / "chunked.pth")

    model = weights.vit_from_checkpoint(tmp_path / "chunked.pth", (56, 56))

    assert len(model.blocks) == DEPTH
    assert torch.equal(model.blocks[1].mlp.fc1.weight.detach(), state["blocks.1.mlp.fc1.weight"])


def test_dinov2_register_variant_rejected(tmp_path):
    state = official_state(patch=14, grid=4, dinov2=True) | {"register_tokens": torch.zeros(1, 4, WIDTH)}
    torch.save(state, tmp_path / "dinov2_vits14_reg4_pretrain.pth")

    with pytest.raises(weights.WeightsError, match="register tokens"):
        weights.vit_from_checkpoint(tmp_path / "dinov2_vits14_reg4_pretrain.pth", (56, 56))


def test_unknown_checkpoint_file_rejected(tmp_path):
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.bias": torch.zeros(10)}, tmp_path / "resnet.pth")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_tensors.pth")

    with pytest.raises(weights.WeightsError, match="unknown checkpoint layout"):
        weights.vit_from_checkpoint(tmp_path / "resnet.pth", (56, 56))
    with pytest.raises(weights.WeightsError, match="contains no tensors"):
        weights.vit_from_checkpoint(tmp_path / "no_tensors.pth", (56, 56))
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.vit_from_checkpoint(tmp_path / "missing.pth", (56, 56))


def test_checkpoint_missing_tensor_rejected(tmp_path):
    state = official_state(patch=8, grid=4, dinov2=False)
    del state["blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "broken.pth")

    with pytest.raises(weights.WeightsError, match="blocks.1.mlp.fc2.bias"):
        weights.vit_from_checkpoint(tmp_path / "broken.pth", (32, 32))


def test_image_size_fits_patch_size(tmp_path):
    torch.save(official_state(patch=8, grid=4, dinov2=False), tmp_path / "dino8.pth")

    with pytest.raises(ValueError, match="patch size 8"):
        weights.vit_from_checkpoint(tmp_path / "dino8.pth", (36, 36))


def test_config_checks_backbone_and_checkpoint():
    with pytest.raises(ValueError, match="needs checkpoint"):
        DetectorConfig(backbone="vit_checkpoint")
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        DetectorConfig(backbone="resnet")
    with pytest.raises(ValueError, match="only used with backbone 'vit_checkpoint'"):
        DetectorConfig(checkpoint="dino.pth")


def test_checkpoint_detector_reloads_without_file(tmp_path, tire_root):
    checkpoint = tmp_path / "dino_tiny8.pth"
    torch.save({"teacher": official_state(patch=8, grid=4, dinov2=False)}, checkpoint)
    train = [s.image_path for s in data_io.discover(tire_root, "train")][:4]
    config = DetectorConfig(backbone="vit_checkpoint", checkpoint=str(checkpoint), image_size=(64, 64), layers=(1,), coreset_ratio=0.5)
    detector = PatchCoreDetector(config).fit(train, train[:2], progress=False)
    model_dir = detector.save(tmp_path / "model")
    checkpoint.unlink()
    image = data_io.load_rgb(data_io.discover(tire_root, "test")[0].image_path)

    first = detector.predict(image)
    again = load_detector(model_dir).predict(image)

    assert again.image_score == pytest.approx(first.image_score, rel=1e-5)
    np.testing.assert_allclose(again.anomaly_map, first.anomaly_map, rtol=1e-5, atol=1e-5)
