"""Point-MAE checkpoints load into our encoder and reproduce the official forward pass.

The checkpoint is written here in the key layout of Point-MAE's ``pretrain.pth``
(``base_model`` with ``module.MAE_encoder.`` names, fused ``attn.qkv`` without bias,
decoder tensors beside the encoder). The reference forward below is computed from
those raw tensors: 1x1 convolutions as matrix products, batch norm from its running
statistics, fused-qkv attention split as ``(3, heads, head_dim)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qcstream.models import point_mae
from qcstream.models.point_mae import PointMAEEncoder, load_point_mae, save_point_mae
from qcstream.models.point_ops import group_points
from qcstream.models.vit import Attention
from qcstream.models.weights import WeightsError

WIDTH = 32
HEADS = 2
DEPTH = 3
GROUPS = 12
GROUP_SIZE = 8
FEATURE_BLOCKS = (0, 2)


def official_state(qkv_bias: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under Point-MAE's pretraining names, encoder and a decoder stub."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    def batch_norm(prefix: str, channels: int) -> dict[str, torch.Tensor]:
        return {
            prefix + "weight": 1 + rand(channels),
            prefix + "bias": rand(channels),
            prefix + "running_mean": rand(channels),
            prefix + "running_var": 0.5 + rand(channels).abs(),
            prefix + "num_batches_tracked": torch.tensor(1000),
        }

    e = "MAE_encoder."
    state = {
        e + "encoder.first_conv.0.weight": rand(128, 3, 1),
        e + "encoder.first_conv.0.bias": rand(128),
        **batch_norm(e + "encoder.first_conv.1.", 128),
        e + "encoder.first_conv.3.weight": rand(256, 128, 1, scale=0.1),
        e + "encoder.first_conv.3.bias": rand(256),
        e + "encoder.second_conv.0.weight": rand(512, 512, 1, scale=0.05),
        e + "encoder.second_conv.0.bias": rand(512),
        **batch_norm(e + "encoder.second_conv.1.", 512),
        e + "encoder.second_conv.3.weight": rand(WIDTH, 512, 1, scale=0.05),
        e + "encoder.second_conv.3.bias": rand(WIDTH),
        e + "pos_embed.0.weight": rand(128, 3),
        e + "pos_embed.0.bias": rand(128),
        e + "pos_embed.2.weight": rand(WIDTH, 128, scale=0.1),
        e + "pos_embed.2.bias": rand(WIDTH),
        e + "norm.weight": 1 + rand(WIDTH),
        e + "norm.bias": rand(WIDTH),
    }
    for i in range(DEPTH):
        block = f"{e}blocks.blocks.{i}."
        state |= {
            block + "norm1.weight": 1 + rand(WIDTH),
            block + "norm1.bias": rand(WIDTH),
            block + "attn.qkv.weight": rand(3 * WIDTH, WIDTH, scale=0.3),
            block + "attn.proj.weight": rand(WIDTH, WIDTH, scale=0.2),
            block + "attn.proj.bias": rand(WIDTH),
            block + "norm2.weight": 1 + rand(WIDTH),
            block + "norm2.bias": rand(WIDTH),
            block + "mlp.fc1.weight": rand(4 * WIDTH, WIDTH, scale=0.2),
            block + "mlp.fc1.bias": rand(4 * WIDTH),
            block + "mlp.fc2.weight": rand(WIDTH, 4 * WIDTH, scale=0.1),
            block + "mlp.fc2.bias": rand(WIDTH),
        }
        if qkv_bias:
            state[block + "attn.qkv.bias"] = rand(3 * WIDTH)
    # Decoder tensors of the pretraining model, which the encoder must ignore.
    state |= {
        "mask_token": rand(1, 1, WIDTH),
        "decoder_pos_embed.0.weight": rand(128, 3),
        "MAE_decoder.blocks.blocks.0.attn.qkv.weight": rand(3 * WIDTH, WIDTH),
        "MAE_decoder.norm.weight": rand(WIDTH),
        "increase_dim.0.weight": rand(3 * GROUP_SIZE, WIDTH, 1),
    }
    return state


def write_official_checkpoint(path, state: dict[str, torch.Tensor]) -> None:
    """Save as Point-MAE's training script does after DataParallel: ``module.`` names, extra entries."""
    wrapped = {"module." + k: v for k, v in state.items()}
    torch.save({"base_model": wrapped, "epoch": 300, "metrics": {}, "best_metrics": {}}, path)


def batch_norm_eval(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Batch norm over the last axis of ``x`` from running statistics (eps 1e-5)."""
    normalized = (x - state[prefix + "running_mean"]) / torch.sqrt(state[prefix + "running_var"] + 1e-5)
    return normalized * state[prefix + "weight"] + state[prefix + "bias"]


def pointwise(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """A 1x1 Conv1d applied to channels-last points ``(..., S, C_in)``."""
    return x @ state[prefix + "weight"][:, :, 0].T + state[prefix + "bias"]


def reference_features(state: dict[str, torch.Tensor], neighborhoods: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Official Point-MAE encoder forward, features of FEATURE_BLOCKS after the final norm."""
    e = "MAE_encoder."
    group_size = neighborhoods.shape[2]

    # Mini-PointNet: pooled group feature first, then each point's own feature.
    h = pointwise(neighborhoods, state, e + "encoder.first_conv.0.")
    h = F.relu(batch_norm_eval(h, state, e + "encoder.first_conv.1."))
    h = pointwise(h, state, e + "encoder.first_conv.3.")
    pooled = h.max(dim=2, keepdim=True).values.expand(-1, -1, group_size, -1)
    h = torch.cat([pooled, h], dim=-1)
    h = pointwise(h, state, e + "encoder.second_conv.0.")
    h = F.relu(batch_norm_eval(h, state, e + "encoder.second_conv.1."))
    h = pointwise(h, state, e + "encoder.second_conv.3.")
    x = h.max(dim=2).values

    pos = F.linear(centers, state[e + "pos_embed.0.weight"], state[e + "pos_embed.0.bias"])
    pos = F.linear(F.gelu(pos), state[e + "pos_embed.2.weight"], state[e + "pos_embed.2.bias"])

    batch, tokens, _ = x.shape
    head_dim = WIDTH // HEADS
    features = []
    for i in range(DEPTH):
        p = f"{e}blocks.blocks.{i}."
        x = x + pos
        h = F.layer_norm(x, (WIDTH,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-5)
        qkv = F.linear(h, state[p + "attn.qkv.weight"], state.get(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(batch, tokens, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * head_dim**-0.5).softmax(dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(batch, tokens, WIDTH)
        x = x + F.linear(h, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = F.layer_norm(x, (WIDTH,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-5)
        h = F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        if i in FEATURE_BLOCKS:
            features.append(F.layer_norm(x, (WIDTH,), state[e + "norm.weight"], state[e + "norm.bias"], eps=1e-5))
    return torch.cat(features, dim=-1)


def load_from_file(tmp_path, state: dict[str, torch.Tensor]) -> PointMAEEncoder:
    path = tmp_path / "pretrain.pth"
    write_official_checkpoint(path, state)
    return load_point_mae(path, num_heads=HEADS, num_groups=GROUPS, group_size=GROUP_SIZE, feature_blocks=FEATURE_BLOCKS)


@pytest.fixture(scope="module")
def clouds() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(2, 60, 3)).astype(np.float32))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_official_checkpoint_matches_reference(tmp_path, clouds, qkv_bias):
    state = official_state(qkv_bias=qkv_bias)
    encoder = load_from_file(tmp_path, state)

    with torch.inference_mode():
        centers, features = encoder(clouds)
    neighborhoods, expected_centers = group_points(clouds, GROUPS, GROUP_SIZE)
    expected = reference_features(state, neighborhoods, expected_centers)

    assert encoder.embed_dim == WIDTH
    assert len(encoder.blocks) == DEPTH
    assert features.shape == (2, GROUPS, len(FEATURE_BLOCKS) * WIDTH)
    torch.testing.assert_close(centers, expected_centers)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


def test_missing_qkv_bias_loads_as_zero(tmp_path):
    encoder = load_from_file(tmp_path, official_state())

    attention = encoder.blocks[1].attn
    for projection in (attention.query, attention.key, attention.value):
        assert torch.equal(projection.bias, torch.zeros(WIDTH))


def test_qkv_rows_split_in_order(tmp_path):
    state = official_state()
    encoder = load_from_file(tmp_path, state)

    fused = state["MAE_encoder.blocks.blocks.2.attn.qkv.weight"]
    attention = encoder.blocks[2].attn
    assert torch.equal(attention.query.weight, fused[:WIDTH])
    assert torch.equal(attention.key.weight, fused[WIDTH : 2 * WIDTH])
    assert torch.equal(attention.value.weight, fused[2 * WIDTH :])


def test_missing_tensor_is_named(tmp_path):
    state = official_state()
    del state["MAE_encoder.blocks.blocks.1.mlp.fc1.bias"]

    with pytest.raises(WeightsError, match=r"MAE_encoder\.blocks\.blocks\.1\.mlp\.fc1\.bias"):
        load_from_file(tmp_path, state)


def test_checkpoint_without_encoder_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"base_model": {"module.cls_head.weight": torch.zeros(2, 2)}}, path)

    with pytest.raises(WeightsError, match="no MAE_encoder"):
        load_point_mae(path)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_point_mae(tmp_path / "absent.pth")


def test_save_writes_official_layout(tmp_path):
    state = official_state()
    encoder = load_from_file(tmp_path, state)

    path = save_point_mae(tmp_path / "ours.pth", encoder)
    saved = torch.load(path, map_location="cpu", weights_only=True)["base_model"]

    official_encoder_keys = {k for k in state if k.startswith("MAE_encoder.")}
    assert set(saved) == official_encoder_keys
    for key in official_encoder_keys:
        assert torch.equal(saved[key], state[key]), key


def test_saved_encoder_round_trip(tmp_path, clouds):
    torch.manual_seed(3)
    encoder = PointMAEEncoder(num_groups=GROUPS, group_size=GROUP_SIZE, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, feature_blocks=(1, 2))
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.key.bias.normal_()
    encoder.eval()

    path = save_point_mae(tmp_path / "ours.pth", encoder)
    loaded = load_point_mae(path)

    assert loaded.num_heads == HEADS
    assert loaded.feature_blocks == (1, 2)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(clouds), encoder(clouds), rtol=0, atol=0)


def test_chunked_group_embedding_matches_single_pass(monkeypatch, clouds):
    torch.manual_seed(4)
    encoder = PointMAEEncoder(num_groups=GROUPS, group_size=GROUP_SIZE, embed_dim=WIDTH, depth=1, num_heads=HEADS, feature_blocks=(0,)).eval()
    neighborhoods, _ = group_points(clouds, GROUPS, GROUP_SIZE)

    with torch.inference_mode():
        single = encoder.group_embed(neighborhoods)
        monkeypatch.setattr(point_mae, "EMBED_CHUNK_GROUPS", 5)
        chunked = encoder.group_embed(neighborhoods)

    torch.testing.assert_close(chunked, single)


def test_layer_classes_reach_blocks():
    class TaggedAttention(Attention):
        pass

    encoder = PointMAEEncoder(num_groups=4, group_size=4, embed_dim=16, depth=2, num_heads=2, feature_blocks=(1,), attn_layer=TaggedAttention)

    assert all(isinstance(block.attn, TaggedAttention) for block in encoder.blocks)


@pytest.mark.parametrize("blocks", [(), (0, 3), (2, 1), (-1,)])
def test_invalid_feature_blocks_rejected(blocks):
    with pytest.raises(ValueError, match="feature_blocks"):
        PointMAEEncoder(num_groups=4, group_size=4, embed_dim=16, depth=3, num_heads=2, feature_blocks=blocks)


def test_too_few_points_rejected():
    encoder = PointMAEEncoder(num_groups=16, group_size=8, embed_dim=16, depth=1, num_heads=2, feature_blocks=(0,))

    with pytest.raises(ValueError, match="at least 16 points"):
        encoder(torch.randn(1, 10, 3))
