"""Post-training quantization of the transformers: simulated, to measure accuracy."""

from qcstream.models.quantization.convert import build_quantized, calibrate
from qcstream.models.quantization.layers import METHODS, QuantLayerNorm, QuantLinear, QuantSoftmax, QuantSpec, quantized_layers
from qcstream.models.quantization.observers import CALIBRATORS

__all__ = [
    "CALIBRATORS",
    "METHODS",
    "QuantLayerNorm",
    "QuantLinear",
    "QuantSoftmax",
    "QuantSpec",
    "build_quantized",
    "calibrate",
    "quantized_layers",
]
