"""Quantized transformers built from substituted layer classes, and their calibration."""

from __future__ import annotations

import pytest
import torch

from qcstream.models.point_mae import PointMAEEncoder
from qcstream.models.quantization import QuantLayerNorm, QuantLinear, QuantSoftmax, QuantSpec, build_quantized, calibrate
from qcstream.models.quantization.quantizers import activation_quantizers
from qcstream.models.vit import VisionTransformer


def small_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=(56, 56), patch_size=14, embed_dim=128, depth=3, num_heads=2, layer_scale=None).eval()


def features(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_intermediates(x, [1])[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(6, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def calibrated_vit(spec: QuantSpec, images: torch.Tensor) -> tuple[VisionTransformer, VisionTransformer]:
    model = small_vit()
    quantized = build_quantized(model, spec)
    calibrate(quantized, lambda batch: quantized.forward_intermediates(batch, [1]), [images[:3], images[3:]], progress=False)
    return model, quantized


def test_quantized_layers_replace_the_float_ones():
    quantized = build_quantized(small_vit(), QuantSpec())

    block = quantized.blocks[0]
    assert isinstance(block.attn.query, QuantLinear) and isinstance(block.mlp.fc2, QuantLinear)
    assert isinstance(block.norm1, QuantLayerNorm) and isinstance(quantized.norm, QuantLayerNorm)
    assert isinstance(block.attn.attn_softmax, QuantSoftmax)


def test_uncalibrated_copy_computes_the_float_model(images):
    model = small_vit()
    quantized = build_quantized(model, QuantSpec())

    assert torch.equal(features(quantized, images), features(model, images))


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "omse", "ptf-log2"])
def test_calibrated_model_close_to_float(method, images):
    model, quantized = calibrated_vit(QuantSpec.for_method(method), images)

    error = relative_error(features(quantized, images), features(model, images))

    assert 0 < error < 0.2


def test_four_bit_weights_cost_more_than_eight(images):
    model, eight = calibrated_vit(QuantSpec.for_method("ptf-log2", weight_bits=8), images)
    _, four = calibrated_vit(QuantSpec.for_method("ptf-log2", weight_bits=4), images)
    reference = features(model, images)

    assert relative_error(features(four, images), reference) > relative_error(features(eight, images), reference)


def test_blocks_after_the_feature_block_stay_float(images):
    _, quantized = calibrated_vit(QuantSpec(), images)

    assert quantized.blocks[1].mlp.fc1.input_quantizer.mode == "quantize"
    assert quantized.blocks[2].mlp.fc1.input_quantizer.mode == "float"


def test_calibrated_ranges_reload_to_the_same_features(images):
    spec = QuantSpec.for_method("ptf-log2", weight_bits=4)
    _, quantized = calibrated_vit(spec, images)

    reloaded = build_quantized(small_vit(), spec)
    reloaded.load_state_dict(quantized.state_dict())

    assert torch.equal(features(reloaded, images), features(quantized, images))


def test_calibration_without_frames_is_refused():
    quantized = build_quantized(small_vit(), QuantSpec())

    with pytest.raises(ValueError, match="no calibration frames"):
        calibrate(quantized, lambda batch: None, [], progress=False)


def test_unsupported_weight_bits_are_named():
    with pytest.raises(ValueError, match="weight_bits 6 .* 8 or 4"):
        QuantSpec(weight_bits=6)


def test_point_transformer_quantizes_the_same_way():
    torch.manual_seed(0)
    encoder = PointMAEEncoder(num_groups=16, group_size=8, embed_dim=64, depth=2, num_heads=1, feature_blocks=(0, 1)).eval()
    points = torch.rand(2, 256, 3, generator=torch.Generator().manual_seed(2))
    quantized = build_quantized(encoder, QuantSpec())

    calibrate(quantized, quantized, [points[:1], points[1:]], progress=False)
    with torch.no_grad():
        centers, expected = encoder(points)
        quantized_centers, got = quantized(points)

    assert torch.equal(quantized_centers, centers)
    assert 0 < relative_error(got, expected) < 0.2
    assert all(q.mode == "quantize" for q in activation_quantizers(quantized))
