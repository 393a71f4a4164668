"""Save and load the Point-MAE encoder of a multimodal model in each backbone form.

- ``torch-fp32``: ``point_encoder.pt``, a Point-MAE checkpoint;
- ``torch-simq``: the same file, plus ``point_quantizers.pt`` with the
  calibrated ranges of the simulated quantizers;
- ``onnx-*``: ``point_encoder.onnx``, the learned part of the encoder; the
  grouping settings are kept in config.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

POINT_ENCODER_FILE = "point_encoder.pt"
POINT_QUANTIZERS_FILE = "point_quantizers.pt"
ONNX_POINT_ENCODER_FILE = "point_encoder.onnx"


def save_point_encoder(encoder, form: str, model_dir: Path) -> dict | None:
    """Write ``encoder`` in ``form``; return the settings config.json must keep, if any."""
    if form.startswith("onnx-"):
        target = model_dir / ONNX_POINT_ENCODER_FILE
        if encoder.onnx_path.resolve() != target.resolve():
            shutil.copyfile(encoder.onnx_path, target)
        return encoder.settings()

    from qcstream.models.point_mae import save_point_mae

    save_point_mae(model_dir / POINT_ENCODER_FILE, encoder)
    if form == "torch-simq":
        ranges = {name: value for name, value in encoder.state_dict().items() if "quantizer." in name}
        torch.save(ranges, model_dir / POINT_QUANTIZERS_FILE)
    return None


def load_point_encoder(model_dir: Path, form: str, quantization: dict | None, settings: dict | None):
    """Read the encoder that :func:`save_point_encoder` wrote."""
    if form.startswith("onnx-"):
        from qcstream.models.onnx_backbones import OnnxPointEncoder

        return OnnxPointEncoder(model_dir / ONNX_POINT_ENCODER_FILE, **settings)

    from qcstream.models.point_mae import load_point_mae

    encoder = load_point_mae(model_dir / POINT_ENCODER_FILE)
    if form == "torch-simq":
        from qcstream.models.quantization import QuantSpec, build_quantized

        encoder = build_quantized(encoder, QuantSpec(**quantization))
        ranges = torch.load(model_dir / POINT_QUANTIZERS_FILE, map_location="cpu", weights_only=True)
        missing, unexpected = encoder.load_state_dict(ranges, strict=False)
        if unexpected or any("quantizer." in name for name in missing):
            raise RuntimeError(f"{model_dir / POINT_QUANTIZERS_FILE} does not fit the encoder: unexpected {unexpected[:3]}")
    return encoder
