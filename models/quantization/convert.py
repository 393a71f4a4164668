"""Build a quantized copy of a transformer and calibrate its activation ranges."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from qcstream.models.point_mae import PointMAEEncoder
from qcstream.models.quantization.layers import QuantSpec, quantized_layers
from qcstream.models.quantization.quantizers import activation_quantizers
from qcstream.models.vit import VisionTransformer
from qcstream.models.weights import build_vit, infer_vit_architecture

logger = logging.getLogger(__name__)


def build_quantized(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Return an uncalibrated copy of ``model`` built from quantized layer classes.

    ``model`` is a :class:`VisionTransformer` or a :class:`PointMAEEncoder`; its
    weights are copied, and the copy runs as float until :func:`calibrate`.
    """
    if isinstance(model, VisionTransformer):
        quantized = build_vit(infer_vit_architecture(model.state_dict()), model.img_size, **quantized_layers(spec, norm_eps=1e-6))
    elif isinstance(model, PointMAEEncoder):
        quantized = PointMAEEncoder(
            num_groups=model.num_groups,
            group_size=model.group_size,
            embed_dim=model.embed_dim,
            depth=len(model.blocks),
            num_heads=model.num_heads,
            mlp_ratio=model.mlp_ratio,
            feature_blocks=model.feature_blocks,
            **quantized_layers(spec, norm_eps=1e-5),
        )
    else:
        raise TypeError(f"cannot quantize a {type(model).__name__}: expected a VisionTransformer or a PointMAEEncoder")

    missing, unexpected = quantized.load_state_dict(model.state_dict(), strict=False)
    not_quantizer = [key for key in missing if "quantizer." not in key]
    if not_quantizer or unexpected:
        raise RuntimeError(f"weights do not match the quantized model: missing {not_quantizer[:5]}, unexpected {unexpected[:5]}")
    return quantized.eval()


@torch.no_grad()
def calibrate(model: nn.Module, run: Callable[[object], object], batches: Iterable, total: int | None = None, progress: bool = True) -> nn.Module:
    """Feed ``batches`` through ``run`` with every quantizer observing, then fix their ranges.

    ``run(batch)`` runs the part of the model that matters (for example the
    feature extractor up to its last block). Returns ``model``, now quantizing.
    """
    quantizers = activation_quantizers(model)
    if not quantizers:
        raise ValueError("the model has no activation quantizers: build it with build_quantized() first")
    for quantizer in quantizers:
        quantizer.start_observing()

    seen = 0
    for batch in tqdm(batches, total=total, desc="calibration", unit="batch", disable=not progress):
        run(batch)
        seen += 1
    if seen == 0:
        raise ValueError("no calibration frames: quantization needs normal frames to calibrate on")

    unused = 0
    for quantizer in quantizers:
        if quantizer.observer.low is not None:
            quantizer.finish_observing()
            continue
        # Blocks after the last feature block never run, so their ranges are unknown and they stay float.
        quantizer.observer = None
        quantizer.mode = "float"
        unused += 1
    logger.info(
        "Calibrated %d activation quantizers on %d batches; %d more sit in blocks after the last feature block, which never run",
        len(quantizers) - unused, seen, unused,
    )
    return model
