"""Simulated (fake) quantizers: uniform, per-channel weight, power-of-two factor and log2.

A fake quantizer rounds a float tensor to the values an integer kernel would see
and returns them as floats again, so the model's accuracy under quantization can
be measured with the float code. Speed comes only from a deployable form (see
:mod:`qcstream.models.onnx_export`).

Activation quantizers have three modes: ``"float"`` (pass through),
``"observe"`` (pass through and feed a calibrator) and ``"quantize"``. Their
scales and zero points are buffers, so they are saved in the state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from qcstream.models.quantization.observers import ChannelMinMaxObserver, make_observer

MODES = ("float", "observe", "quantize")


def asymmetric_qparams(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of an unsigned ``bits`` grid that covers ``[low, high]`` and zero."""
    low = torch.clamp(low, max=0.0)
    high = torch.clamp(high, min=0.0)
    levels = 2**bits - 1
    scale = torch.clamp((high - low) / levels, min=1e-8)
    zero_point = torch.clamp(torch.round(-low / scale), 0, levels)
    return scale, zero_point


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` to the unsigned ``bits`` grid of ``scale`` and ``zero_point`` and back to floats."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)
    return (q - zero_point) * scale


def quantize_weight_per_channel(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric fake quantization of a ``(out, in)`` weight with one scale per output channel."""
    qmax = 2 ** (bits - 1) - 1
    scale = torch.clamp(weight.abs().amax(dim=1, keepdim=True) / qmax, min=1e-12)
    return torch.clamp(torch.round(weight / scale), -qmax, qmax) * scale


def log2_quantize(probabilities: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize values in ``(0, 1]`` to powers of two ``2**-q``, ``q`` in ``0 .. 2**bits - 1``.

    Values below the smallest level ``2**-(2**bits - 1)`` become zero. Needs no
    calibration, and keeps the order of attention weights.
    """
    levels = 2**bits - 1
    exponent = torch.round(-torch.log2(torch.clamp(probabilities, min=1e-30)))
    exponent = torch.clamp(exponent, min=0)
    quantized = torch.pow(2.0, -exponent)
    return torch.where(exponent > levels, torch.zeros_like(quantized), quantized)


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer with a range from a calibrator."""

    def __init__(self, bits: int = 8, calibrator: str = "minmax") -> None:
        super().__init__()
        self.bits = bits
        self.calibrator = calibrator
        self.mode = "float"
        self.observer = None
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    def start_observing(self) -> None:
        self.observer = make_observer(self.calibrator, self.bits)
        self.mode = "observe"

    def finish_observing(self) -> None:
        low, high = self.observer.range()
        self.scale, self.zero_point = asymmetric_qparams(torch.tensor(low), torch.tensor(high), self.bits)
        self.calibrated.fill_(True)
        self.observer = None
        self.mode = "quantize"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.mode = "quantize" if bool(self.calibrated) else "float"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observer.observe(x)
            return x
        if self.mode == "quantize":
            return fake_quantize(x, self.scale, self.zero_point, self.bits)
        return x

    def extra_repr(self) -> str:
        return f"bits={self.bits}, calibrator={self.calibrator}, mode={self.mode}"


class PowerOfTwoFactorQuantizer(ActQuantizer):
    """Per-channel power-of-two factor on one shared scale and zero point (FQ-ViT's PTF).

    Channel ``c`` is quantized with scale ``2**alpha_c * s``, ``alpha_c`` in
    ``0 .. factor_bits``. The zero point is shared, so LayerNorm statistics can be
    computed on integers shifted by ``alpha_c`` bits. Each ``alpha_c`` is the
    smallest factor whose grid covers the channel's calibrated range.
    """

    def __init__(self, channels: int, bits: int = 8, factor_bits: int = 3) -> None:
        super().__init__(bits, "minmax")
        self.factor_bits = factor_bits
        self.register_buffer("factor", torch.zeros(channels))

    def start_observing(self) -> None:
        self.observer = ChannelMinMaxObserver()
        self.mode = "observe"

    def finish_observing(self) -> None:
        low, high = self.observer.range()
        levels = 2**self.bits - 1
        top = 2**self.factor_bits
        global_scale, zero_point = asymmetric_qparams(low.min(), high.max(), self.bits)
        base = global_scale / top

        factor = torch.full_like(low, float(self.factor_bits))
        for alpha in range(self.factor_bits, -1, -1):
            scale = base * 2**alpha
            fits = (low >= -zero_point * scale - 1e-12) & (high <= (levels - zero_point) * scale + 1e-12)
            factor = torch.where(fits, torch.full_like(factor, float(alpha)), factor)

        self.scale, self.zero_point = base, zero_point
        self.factor.copy_(factor)
        self.calibrated.fill_(True)
        self.observer = None
        self.mode = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observer.observe(x)
            return x
        if self.mode == "quantize":
            return fake_quantize(x, self.scale * torch.pow(2.0, self.factor), self.zero_point, self.bits)
        return x

    def extra_repr(self) -> str:
        return f"bits={self.bits}, factor_bits={self.factor_bits}, mode={self.mode}"


def activation_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """Return the activation quantizers in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]
