"""Save and load the Point-MAE encoder of a multimodal model in each backbone form.

- ``torch-fp32``: ``point_encoder.pt``, a Point-MAE checkpoint;
- ``torch-simq``: the same file, plus ``point_quantizers.pt`` with the
  calibrated ranges of the simulated quantizers;
- ``onnx-*``: ``point_encoder.onnx``, the learned part of the encoder; the
  grouping settings are kept in config.json.

A pruned ``torch-fp32`` encoder has blocks of different sizes, which Point-MAE's
checkpoint layout cannot represent. It is saved as ``point_encoder_pruned.pt``
(our state dict with the encoder settings), and config.json keeps the pruning layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

POINT_ENCODER_FILE = "point_encoder.pt"
POINT_QUANTIZERS_FILE = "point_quantizers.pt"
ONNX_POINT_ENCODER_FILE = "point_encoder.onnx"
PRUNED_POINT_ENCODER_FILE = "point_encoder_pruned.pt"


def encoder_settings(encoder) -> dict:
    """The constructor arguments of a :class:`PointMAEEncoder` before any pruning."""
    return {
        "num_groups": encoder.num_groups,
        "group_size": encoder.group_size,
        "embed_dim": encoder.embed_dim,
        "depth": len(encoder.blocks),
        "num_heads": encoder.num_heads,
        "mlp_ratio": encoder.mlp_ratio,
        "feature_blocks": list(encoder.feature_blocks),
    }


def save_point_encoder(encoder, form: str, model_dir: Path, pruning: dict | None = None) -> dict | None:
    """Write ``encoder`` in ``form``; return the settings config.json must keep, if any."""
    if pruning is not None and form == "torch-fp32":
        torch.save({"settings": encoder_settings(encoder), "state_dict": encoder.state_dict()}, model_dir / PRUNED_POINT_ENCODER_FILE)
        return None
    if pruning is not None and form == "torch-simq":
        raise ValueError("a pruned point encoder cannot be saved with simulated quantization; export it to ONNX instead")
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


def load_point_encoder(model_dir: Path, form: str, quantization: dict | None, settings: dict | None, pruning: dict | None = None):
    """Read the encoder that :func:`save_point_encoder` wrote."""
    if pruning is not None and form == "torch-fp32":
        from qcstream.models.point_mae import PointMAEEncoder
        from qcstream.models.pruning import shrink_to_layout

        saved = torch.load(model_dir / PRUNED_POINT_ENCODER_FILE, map_location="cpu", weights_only=True)
        encoder = shrink_to_layout(PointMAEEncoder(**saved["settings"]), pruning)
        encoder.load_state_dict(saved["state_dict"])
        return encoder.eval()
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
