"""ONNX export and ONNX Runtime quantization of the backbones, run by the real ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qcstream.models.features import PatchFeatureExtractor
from qcstream.models.onnx_backbones import OnnxFeatureExtractor, OnnxPointEncoder, export_feature_extractor, export_point_encoder
from qcstream.models.onnx_export import activation_products, quantize_int4, quantize_int8
from qcstream.models.point_mae import PointMAEEncoder
from qcstream.models.vit import VisionTransformer

SIZE = (56, 56)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def extractor() -> PatchFeatureExtractor:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=SIZE, patch_size=14, embed_dim=128, depth=3, num_heads=2, layer_scale=None)
    return PatchFeatureExtractor(vit, (1,), (4, 4)).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(8, 3, *SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fp32_path(extractor, tmp_path_factory) -> Path:
    return export_feature_extractor(extractor, SIZE, tmp_path_factory.mktemp("onnx") / "fp32.onnx")


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_exported_extractor_matches_torch_for_any_batch_size(extractor, images, fp32_path):
    onnx_extractor = OnnxFeatureExtractor(fp32_path, extractor.feature_grid, extractor.feature_dim)

    with torch.no_grad():
        expected = extractor(images[:3])
    got = onnx_extractor(images[:3])

    assert got.shape == (3, 128, 4, 4)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4)


def test_int8_model_quantizes_weight_products_only(images, fp32_path, extractor, tmp_path):
    int8 = quantize_int8(fp32_path, tmp_path / "int8.onnx", [{"images": images[i : i + 2].numpy()} for i in range(0, 8, 2)], progress=False)

    graph = onnx.load(str(int8)).graph
    quantized_inputs = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    attention = set(activation_products(fp32_path))
    attention_inputs = [name for node in graph.node if node.name in attention for name in node.input]
    assert "QuantizeLinear" in op_types(int8)
    assert attention and not any(name in quantized_inputs for name in attention_inputs)
    assert int8.stat().st_size < fp32_path.stat().st_size / 2

    with torch.no_grad():
        expected = extractor(images).numpy()
    got = OnnxFeatureExtractor(int8, (4, 4), 128)(images).numpy()
    assert 0.98 < cosine(got, expected) < 1.0


def test_int4_model_uses_matmulnbits_and_stays_close(images, fp32_path, extractor, tmp_path):
    int4 = quantize_int4(fp32_path, tmp_path / "int4.onnx", block_size=32)

    assert "MatMulNBits" in op_types(int4)
    # Patch embedding and position embeddings stay float, a large share of this small model.
    assert int4.stat().st_size < fp32_path.stat().st_size / 3
    with torch.no_grad():
        expected = extractor(images).numpy()
    got = OnnxFeatureExtractor(int4, (4, 4), 128)(images).numpy()
    assert 0.95 < cosine(got, expected) < 1.0


def test_onnx_point_encoder_matches_the_torch_encoder(tmp_path):
    torch.manual_seed(0)
    encoder = PointMAEEncoder(num_groups=16, group_size=8, embed_dim=64, depth=2, num_heads=1, feature_blocks=(0, 1)).eval()
    points = torch.rand(1, 256, 3, generator=torch.Generator().manual_seed(2))
    path = export_point_encoder(encoder, tmp_path / "points.onnx")

    with torch.no_grad():
        centers, expected = encoder(points)
    onnx_centers, got = OnnxPointEncoder(path, 16, 8, encoder.feature_dim)(points)

    assert torch.equal(onnx_centers, centers)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4)
