"""Quantized layer classes that substitute for the float ones of our transformers.

:func:`quantized_layers` returns ``norm_layer``, ``attn_layer`` and ``mlp_layer``
for :class:`~qcstream.models.vit.VisionTransformer` and
:class:`~qcstream.models.point_mae.PointMAEEncoder`; the model code is not forked.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from qcstream.models.compression_options import CALIBRATORS, METHODS  # noqa: F401 - METHODS is re-exported
from qcstream.models.quantization.quantizers import ActQuantizer, PowerOfTwoFactorQuantizer, log2_quantize, quantize_weight_per_channel
from qcstream.models.vit import Attention, Mlp


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize a transformer.

    ``calibrator`` sets the ranges of the Linear inputs. ``layer_norm`` is
    ``"per-tensor"`` (the calibrator's range) or ``"ptf"`` (per-channel
    power-of-two factor). ``softmax`` is ``"uniform"`` (``act_bits``, the
    calibrator's range) or ``"log2"`` (``softmax_bits``, no calibration).
    """

    weight_bits: int = 8
    act_bits: int = 8
    calibrator: str = "minmax"
    layer_norm: str = "ptf"
    softmax: str = "log2"
    softmax_bits: int = 4
    factor_bits: int = 3

    def __post_init__(self) -> None:
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits {self.weight_bits} is not supported; use 8 or 4")
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"unknown calibrator {self.calibrator!r}; choose one of {', '.join(CALIBRATORS)}")
        if self.layer_norm not in ("per-tensor", "ptf"):
            raise ValueError(f"layer_norm {self.layer_norm!r} must be 'per-tensor' or 'ptf'")
        if self.softmax not in ("uniform", "log2"):
            raise ValueError(f"softmax {self.softmax!r} must be 'uniform' or 'log2'")

    @classmethod
    def for_method(cls, method: str, weight_bits: int = 8, calibrator: str = "minmax") -> "QuantSpec":
        """The spec of a ``--quantize`` method: a calibrator name, or ``ptf-log2`` with ``calibrator``."""
        if method == "ptf-log2":
            return cls(weight_bits=weight_bits, calibrator=calibrator, layer_norm="ptf", softmax="log2")
        if method in CALIBRATORS:
            return cls(weight_bits=weight_bits, calibrator=method, layer_norm="per-tensor", softmax="uniform", softmax_bits=8)
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")

    @property
    def label(self) -> str:
        """Short name for tables and logs, e.g. ``ptf-log2/minmax W4A8``."""
        name = "ptf-log2/" + self.calibrator if self.layer_norm == "ptf" else self.calibrator
        return f"{name} W{self.weight_bits}A{self.act_bits}"


class QuantLinear(nn.Linear):
    """Linear layer with per-output-channel weights and a per-tensor input quantizer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, spec: QuantSpec) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.weight_bits = spec.weight_bits
        self.input_quantizer = ActQuantizer(spec.act_bits, spec.calibrator)
        self._quantized_weight: torch.Tensor | None = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._quantized_weight = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        if self.input_quantizer.mode != "quantize":
            return F.linear(x, self.weight, self.bias)
        # Post-training: the weights are fixed, so they are rounded once, not on every call.
        if self._quantized_weight is None:
            with torch.no_grad():
                self._quantized_weight = quantize_weight_per_channel(self.weight, self.weight_bits)
        return F.linear(x, self._quantized_weight, self.bias)


class QuantLayerNorm(nn.LayerNorm):
    """LayerNorm whose input is quantized per channel (PTF) or per tensor."""

    def __init__(self, dim: int, eps: float = 1e-5, *, spec: QuantSpec) -> None:
        super().__init__(dim, eps=eps)
        if spec.layer_norm == "ptf":
            self.input_quantizer = PowerOfTwoFactorQuantizer(dim, spec.act_bits, spec.factor_bits)
        else:
            self.input_quantizer = ActQuantizer(spec.act_bits, spec.calibrator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quantizer(x))


class QuantSoftmax(nn.Module):
    """Softmax over the last dimension with log2 (no calibration) or uniform output quantization."""

    def __init__(self, *, spec: QuantSpec) -> None:
        super().__init__()
        self.log2 = spec.softmax == "log2"
        self.bits = spec.softmax_bits
        # The uniform variant calibrates like any activation; log2 only follows the model's mode.
        self.output_quantizer = ActQuantizer(self.bits, "minmax" if self.log2 else spec.calibrator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(x, dim=-1)
        if not self.log2:
            return self.output_quantizer(probabilities)
        if self.output_quantizer.mode == "quantize":
            return log2_quantize(probabilities, self.bits)
        # Observing only marks the layer as used, so calibration switches it on with the rest.
        return self.output_quantizer(probabilities)


def quantized_layers(spec: QuantSpec, norm_eps: float) -> dict:
    """Layer classes for a transformer quantized as ``spec``; LayerNorms get ``norm_eps``."""
    linear = partial(QuantLinear, spec=spec)
    return {
        "norm_layer": partial(QuantLayerNorm, eps=norm_eps, spec=spec),
        "attn_layer": partial(Attention, linear_layer=linear, softmax_layer=partial(QuantSoftmax, spec=spec)),
        "mlp_layer": partial(Mlp, linear_layer=linear),
    }
