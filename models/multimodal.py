"""The multimodal detector (M3DM): RGB, point and fused memory banks with decision-layer fusion.

Fitting, on normal frames that have an RGB image and an organized point cloud:

1. RGB patch features (the RGB detector's backbone) and point patch features
   (FPFH or Point-MAE, aligned to the same grid) of every training frame.
2. Fusion MLPs trained on the training patches with a patch-wise InfoNCE loss;
   the fused patch feature joins their two projections.
3. One greedy-coreset memory bank per feature kind: RGB, points, fused.
4. On held-out normal frames: a one-class SVM over the three banks' patch
   scores, optionally one over their image scores (``config.image_fusion``), and
   a threshold per mode for ``config.target_fpr``.

Scoring a frame gives each bank's patch distances. The fused anomaly map is the
patch SVM's score of each patch's three distances, upsampled and blurred. The
fused image score is the image SVM's score of the three banks' maxima ("svm", as
M3DM), or the maximum of the fused patch scores ("map_max"). The patch SVM
works on the feature grid (28 x 28 by default), not on every pixel, so a frame
costs hundreds of SVM evaluations instead of tens of thousands. A frame without
a point cloud is scored by the RGB bank alone, and its prediction's mode is "rgb".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qcstream.models import data as data_io
from qcstream.models.anomaly_map import anomaly_map_from_patches
from qcstream.models.batching import load_in_batches
from qcstream.models.config import DetectorConfig
from qcstream.models.coreset import ChunkedCoreset
from qcstream.models.decision_fusion import ScoreFusion
from qcstream.models.detector import ModelError, Prediction, build_extractor, load_backbone, save_backbone
from qcstream.models.features import preprocess
from qcstream.models.fusion import FeatureFusion, train_fusion
from qcstream.models.memory_bank import nearest_neighbor_distances
from qcstream.models.metrics import threshold_for_fpr
from qcstream.models.multimodal_config import MultimodalConfig
from qcstream.models.point_features import PointFeatureExtractor

logger = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1
KIND = "m3dm"
CONFIG_FILE = "config.json"
BANKS_FILE = "memory_banks.npz"
FUSION_FILE = "fusion.pt"
SCORE_FUSION_FILE = "score_fusion.npz"

BANK_NAMES = ("rgb", "points", "rgb+xyz")


@dataclasses.dataclass
class Frame:
    """One frame to fit on or score: an RGB image and, when the camera has one, its organized cloud."""

    rgb: np.ndarray
    xyz: np.ndarray | None = None

    @classmethod
    def from_sample(cls, sample: data_io.Sample) -> "Frame":
        xyz = data_io.load_xyz(sample.xyz_path) if sample.xyz_path is not None else None
        return cls(rgb=data_io.load_rgb(sample.image_path), xyz=xyz)


@dataclasses.dataclass
class FrameScores:
    """Every bank's image score ``(B,)`` and patch scores ``(B, h, w)`` for a batch of frames."""

    image: dict[str, np.ndarray]
    patches: dict[str, torch.Tensor]


class MultimodalDetector:
    """Fit on normal RGB + point-cloud frames, then score new ones; see the module docstring.

    Fitted state: ``banks_`` (name -> ``(N, C)`` float16), ``fusion_`` (the fusion
    MLPs), ``patch_fusion_`` and, for ``image_fusion="svm"``, ``image_fusion_``
    (one-class SVMs), ``thresholds_``
    (mode -> threshold), ``score_ranges_``, ``version_``.
    """

    #: Evaluation passes data set samples (image and cloud paths), not image paths.
    reads_point_clouds = True

    def __init__(self, config: MultimodalConfig | None = None, point_encoder: torch.nn.Module | None = None) -> None:
        self.config = config or MultimodalConfig()
        self._rgb_extractor = None
        self._point_extractor: PointFeatureExtractor | None = None
        self._point_encoder = point_encoder
        self.banks_: dict[str, torch.Tensor] = {}
        self.fusion_: FeatureFusion | None = None
        self.image_fusion_: ScoreFusion | None = None
        self.patch_fusion_: ScoreFusion | None = None
        self.thresholds_: dict[str, float] = {}
        self.score_ranges_: dict[str, tuple[float, float]] = {}
        self.version_: str | None = None
        self.fit_info_: dict = {}
        self.backbone_form = "torch-fp32"
        self.quantization: dict | None = None
        self.point_encoder_form = "torch-fp32"
        self.point_quantization: dict | None = None
        #: The pruning layout of a pruned Point-MAE encoder (kept heads and neurons per block).
        self.point_pruning: dict | None = None

    # --- feature extractors -------------------------------------------------------

    def _rgb_config(self) -> DetectorConfig:
        config = self.config
        return DetectorConfig(
            backbone=config.backbone, image_size=config.image_size, layers=config.layers, feature_grid=config.feature_grid
        )

    @property
    def rgb_extractor(self):
        if self._rgb_extractor is None:
            self._rgb_extractor = build_extractor(self._rgb_config(), pretrained=True)
        return self._rgb_extractor

    @property
    def point_extractor(self) -> PointFeatureExtractor:
        if self._point_extractor is None:
            if self.config.point_features == "point_mae" and self._point_encoder is None:
                from qcstream.models.point_mae import load_point_mae

                self.config.check_point_checkpoint()
                self._point_encoder = load_point_mae(self.config.point_checkpoint)
            self._point_extractor = PointFeatureExtractor(self.config, self._point_encoder)
        return self._point_extractor

    @torch.inference_mode()
    def extract_rgb(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB patch features ``(B, h, w, C)`` of ``(H, W, 3)`` uint8 images."""
        batch = preprocess(list(images), self.config.image_size)
        return self.rgb_extractor(batch).permute(0, 2, 3, 1)

    def extract_points(self, clouds: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Point patch features ``(B, h, w, C)`` and cell validity ``(B, h, w)`` of organized clouds."""
        features, valid = zip(*(self.point_extractor(xyz) for xyz in clouds))
        return torch.stack(features).permute(0, 2, 3, 1), torch.stack(valid)

    def _fused(self, rgb: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Fused patch features ``(B, h, w, D)`` from RGB and point features on the same grid."""
        batch, rows, cols, _ = rgb.shape
        with torch.inference_mode():
            fused = self.fusion_(rgb.reshape(-1, rgb.shape[-1]).float(), points.reshape(-1, points.shape[-1]).float())
        return fused.reshape(batch, rows, cols, -1)

    def _features(self, frames: Sequence[Frame]) -> dict[str, torch.Tensor]:
        """Return the patch features of each bank this model uses, for frames that all have clouds."""
        features = {}
        if self.config.uses_rgb:
            features["rgb"] = self.extract_rgb([frame.rgb for frame in frames])
        if self.config.uses_points:
            features["points"], _ = self.extract_points([frame.xyz for frame in frames])
        if self.config.mode == "rgb+xyz" and self.fusion_ is not None:
            features["rgb+xyz"] = self._fused(features["rgb"], features["points"])
        return features

    def _batches(self, frames: Sequence[Frame | data_io.Sample], desc: str, progress: bool):
        return load_in_batches(frames, self.config.batch_size, _as_frame, desc, "frame", progress)

    # --- fitting ------------------------------------------------------------------

    def fit(
        self,
        train_frames: Sequence[Frame | data_io.Sample],
        validation_frames: Sequence[Frame | data_io.Sample],
        progress: bool = True,
    ) -> "MultimodalDetector":
        """Fit the banks on ``train_frames`` and the score fusion and thresholds on ``validation_frames``.

        Both are normal frames, and every frame needs a point cloud unless the mode is "rgb".

        NOTE: unlike the RGB detector, this keeps all training patch features in memory
        (float16) until the banks are built, because the fusion MLPs train on them.
        That is 25 MiB for 40 frames on a 28 x 28 grid with DINOv2 and FPFH features,
        and it grows with the frame count.
        """
        if len(train_frames) == 0:
            raise ValueError("no training frames: fit needs at least one normal frame")
        if len(validation_frames) == 0:
            raise ValueError("no validation frames: the score fusion and the thresholds need held-out normal frames")
        self.config.check_point_checkpoint()
        started = time.perf_counter()

        logger.info("Extracting features of %d training frames (mode %s, point features %s)", len(train_frames), self.config.mode, self.config.point_features)
        train = {name: [] for name in ("rgb", "points")}
        for batch in self._batches(train_frames, "features", progress):
            _require_clouds(batch, self.config)
            for name, features in self._features(batch).items():
                train[name].append(features.reshape(-1, features.shape[-1]).half())
        train = {name: torch.cat(rows) for name, rows in train.items() if rows}

        if self.config.mode == "rgb+xyz":
            logger.info("Training the fusion MLPs on up to %d of %d patches", self.config.fusion_max_patches, train["rgb"].shape[0])
            sample = _sample_rows(train["rgb"].shape[0], self.config.fusion_max_patches, self.config.seed)
            self.fusion_ = train_fusion(
                train["rgb"][sample].float(),
                train["points"][sample].float(),
                hidden_dim=self.config.fusion_hidden_dim,
                out_dim=self.config.fusion_out_dim,
                epochs=self.config.fusion_epochs,
                seed=self.config.seed,
                progress=progress,
            ).eval()
            train["rgb+xyz"] = self._fused(train["rgb"][:, None, None], train["points"][:, None, None]).reshape(train["rgb"].shape[0], -1).half()

        for name, rows in train.items():
            logger.info("Building the %s memory bank from %d patches", name, rows.shape[0])
            coreset = ChunkedCoreset(self.config.coreset_ratio, self.config.coreset_chunk_rows, seed=self.config.seed, progress=progress, expected_rows=rows.shape[0])
            coreset.add(rows)
            self.banks_[name] = coreset.finish()

        self._fit_decision(validation_frames, progress)
        self.fit_info_ = {
            "n_train_frames": len(train_frames),
            "n_validation_frames": len(validation_frames),
            "memory_bank_sizes": {name: int(bank.shape[0]) for name, bank in self.banks_.items()},
            "fit_seconds": round(time.perf_counter() - started, 1),
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.version_ = self._compute_version()
        logger.info("Fitted model %s: banks %s, thresholds %s", self.version_, self.fit_info_["memory_bank_sizes"], self.thresholds_)
        return self

    def _fit_decision(self, validation_frames: Sequence[Frame | data_io.Sample], progress: bool) -> None:
        """Fit the score fusion on validation frames and calibrate one threshold per mode."""
        image_rows, patch_rows = [], []
        for batch in self._batches(validation_frames, "calibration", progress):
            _require_clouds(batch, self.config)
            scores = self._bank_scores(batch)
            image_rows.append(np.stack([scores.image[name] for name in self.banks_], axis=1))
            patch_rows.append(torch.stack([scores.patches[name] for name in self.banks_], dim=-1).reshape(-1, len(self.banks_)))
        image_scores = np.concatenate(image_rows)
        patch_scores = torch.cat(patch_rows).numpy()

        names = list(self.banks_)
        for mode, name in (("rgb", "rgb"), ("xyz", "points")):
            if name in self.banks_:
                column = names.index(name)
                self.thresholds_[mode] = threshold_for_fpr(image_scores[:, column], self.config.target_fpr)
                self.score_ranges_[mode] = _score_range(patch_scores[:, column], self.thresholds_[mode])

        if self.config.mode == "rgb+xyz":
            logger.info("Fitting the decision-layer fusion on %d validation frames", len(image_scores))
            # RBF for patches and linear for images scored best on generated scans (docs/multimodal-results.md).
            self.patch_fusion_ = ScoreFusion(
                kernel="rbf", max_samples=self.config.patch_fusion_samples, seed=self.config.seed
            ).fit(patch_scores)
            fused_patches = self.patch_fusion_.score(patch_scores).reshape(len(image_scores), -1)
            if self.config.image_fusion == "svm":
                self.image_fusion_ = ScoreFusion(kernel="linear", seed=self.config.seed).fit(image_scores)
                fused_image = self.image_fusion_.score(image_scores)
            else:
                fused_image = fused_patches.max(axis=1)
            self.thresholds_["rgb+xyz"] = threshold_for_fpr(fused_image, self.config.target_fpr)
            self.score_ranges_["rgb+xyz"] = _score_range(fused_patches.ravel(), self.thresholds_["rgb+xyz"])

    # --- scoring ------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if not self.banks_:
            raise ModelError("the detector is not fitted: call fit() or load a model directory")

    def _bank_scores(self, frames: Sequence[Frame]) -> FrameScores:
        """Patch and image scores of every bank for frames that all have clouds (or an RGB-only model)."""
        self._require_fitted()
        features = self._features(frames)
        patches, image = {}, {}
        for name, bank in self.banks_.items():
            batch, rows, cols, channels = features[name].shape
            distances = nearest_neighbor_distances(features[name].reshape(-1, channels).half(), bank)
            patches[name] = distances.reshape(batch, rows, cols).float()
            image[name] = patches[name].reshape(batch, -1).max(dim=1).values.numpy().astype(np.float64)
        return FrameScores(image=image, patches=patches)

    def _rgb_only_scores(self, frames: Sequence[Frame]) -> FrameScores:
        features = self.extract_rgb([frame.rgb for frame in frames])
        batch, rows, cols, channels = features.shape
        distances = nearest_neighbor_distances(features.reshape(-1, channels).half(), self.banks_["rgb"]).reshape(batch, rows, cols).float()
        return FrameScores(image={"rgb": distances.reshape(batch, -1).max(dim=1).values.numpy().astype(np.float64)}, patches={"rgb": distances})

    def score_modes(self, frames: Sequence[Frame | data_io.Sample], progress: bool = False) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
        """Score frames that all have clouds in every mode this model has.

        Returns mode -> (image scores ``(B,)``, anomaly maps ``[(H, W)]``), for the
        modes "rgb", "xyz" and "rgb+xyz" as fitted. Used by evaluation to compare modes.
        """
        results: dict[str, tuple[list, list]] = {}
        for batch in self._batches(frames, "scoring", progress):
            _require_clouds(batch, self.config)
            scores = self._bank_scores(batch)
            for mode, (image, patches) in self._mode_outputs(scores).items():
                maps = [self._anomaly_map(patches[i], frame.rgb.shape[:2]) for i, frame in enumerate(batch)]
                collected = results.setdefault(mode, ([], []))
                collected[0].append(image)
                collected[1].extend(maps)
        return {mode: (np.concatenate(images), maps) for mode, (images, maps) in results.items()}

    def score(self, frames: Sequence[Frame | data_io.Sample], progress: bool = False, desc: str = "scoring") -> tuple[np.ndarray, list[np.ndarray]]:
        """Score frames one by one as :meth:`predict` does; return image scores ``(B,)`` and maps.

        Each frame is scored in the model's mode, or RGB-only when it has no cloud.
        So the scores of a mixed set are on the scales of different thresholds.
        To compare modes, use :meth:`score_modes` on frames that all have clouds.
        """
        scores, maps = [], []
        for batch in self._batches(frames, desc, progress):
            for frame in batch:
                prediction = self.predict(frame.rgb, frame.xyz)
                scores.append(prediction.image_score)
                maps.append(prediction.anomaly_map)
        return np.asarray(scores, dtype=np.float64), maps

    def _mode_outputs(self, scores: FrameScores) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        outputs = {}
        if "rgb" in scores.image:
            outputs["rgb"] = (scores.image["rgb"], scores.patches["rgb"])
        if "points" in scores.image:
            outputs["xyz"] = (scores.image["points"], scores.patches["points"])
        if self.patch_fusion_ is not None and len(scores.image) == len(self.banks_):
            names = list(self.banks_)
            stacked = torch.stack([scores.patches[name] for name in names], dim=-1)
            fused = self.patch_fusion_.score(stacked.reshape(-1, len(names)).numpy()).reshape(stacked.shape[:-1])
            if self.image_fusion_ is not None:
                image = self.image_fusion_.score(np.stack([scores.image[name] for name in names], axis=1))
            else:
                image = fused.reshape(fused.shape[0], -1).max(axis=1)
            outputs["rgb+xyz"] = (np.asarray(image, dtype=np.float64), torch.as_tensor(fused, dtype=torch.float32))
        return outputs

    def _anomaly_map(self, patch_scores: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        full = anomaly_map_from_patches(patch_scores[None], size, self.config.blur_sigma)
        return full[0].numpy().astype(np.float32)

    def predict(self, rgb: np.ndarray, xyz: np.ndarray | None = None) -> Prediction:
        """Score one frame in the best mode it allows and name that mode in the prediction's ``mode``."""
        self._require_fitted()
        frame = Frame(rgb=rgb, xyz=xyz)
        mode = self.config.mode if xyz is not None else "rgb"
        if mode == "rgb" and "rgb" not in self.banks_:
            raise ValueError("this model scores point clouds only (mode '3d') and the frame has none; send the frame with its xyz cloud")

        if xyz is None and self.config.mode != "rgb":
            scores = self._rgb_only_scores([frame])
        else:
            scores = self._bank_scores([frame])
        image, patches = self._mode_outputs(scores)[mode]
        score = float(image[0])
        threshold = self.thresholds_[mode]
        return Prediction(
            image_score=score,
            anomaly_map=self._anomaly_map(patches[0], rgb.shape[:2]),
            is_defect=score >= threshold,
            threshold=threshold,
            mode=mode,
        )

    @property
    def threshold_(self) -> float:
        """The threshold of the model's own mode, as the RGB detector has one."""
        return self.thresholds_[self.config.mode]

    @property
    def version(self) -> str:
        return self.version_ or "unfitted"

    @property
    def score_range(self) -> tuple[float, float]:
        return self.score_ranges_.get(self.config.mode, (0.0, 1.0))

    # --- persistence --------------------------------------------------------------

    def _compute_version(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode())
        for name, bank in self.banks_.items():
            digest.update(name.encode())
            digest.update(bank.numpy().tobytes())
        digest.update(json.dumps(self.thresholds_, sort_keys=True).encode())
        return f"m3dm-{self.config.mode}-{digest.hexdigest()[:12]}"

    def save(self, model_dir: str | Path) -> Path:
        """Write the config, banks, networks and score fusion to ``model_dir``."""
        self._require_fitted()
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)

        np.savez(model_dir / BANKS_FILE, **{name: bank.numpy() for name, bank in self.banks_.items()})
        if self.config.uses_rgb:
            save_backbone(self.rgb_extractor, self.backbone_form, model_dir)
        point_encoder = None
        if self.config.uses_points and self.point_extractor.encoder is not None:
            from qcstream.models.point_encoder_io import save_point_encoder

            point_encoder = save_point_encoder(self.point_extractor.encoder, self.point_encoder_form, model_dir, self.point_pruning)
        if self.fusion_ is not None:
            torch.save({"config": self.fusion_.to_dict(), "state_dict": self.fusion_.state_dict()}, model_dir / FUSION_FILE)
        if self.patch_fusion_ is not None:
            arrays = {f"patch_{key}": value for key, value in self.patch_fusion_.to_arrays().items()}
            if self.image_fusion_ is not None:
                arrays.update({f"image_{key}": value for key, value in self.image_fusion_.to_arrays().items()})
            np.savez(model_dir / SCORE_FUSION_FILE, **arrays)

        meta = {
            "format_version": MODEL_FORMAT_VERSION,
            "kind": KIND,
            "backbone_form": self.backbone_form,
            "quantization": self.quantization,
            "feature_dim": int(self.rgb_extractor.feature_dim) if self.config.uses_rgb else None,
            "point_encoder_form": self.point_encoder_form,
            "point_quantization": self.point_quantization,
            "point_pruning": self.point_pruning,
            "point_encoder": point_encoder,
            "version": self.version,
            "config": dataclasses.asdict(self.config),
            "thresholds": self.thresholds_,
            "score_ranges": {mode: list(bounds) for mode, bounds in self.score_ranges_.items()},
            "fit_info": self.fit_info_,
        }
        (model_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        logger.info("Saved model %s to %s", self.version, model_dir)
        return model_dir

    @classmethod
    def load(cls, model_dir: str | Path) -> "MultimodalDetector":
        """Load a model directory written by :meth:`save`."""
        model_dir = Path(model_dir)
        meta = json.loads((model_dir / CONFIG_FILE).read_text())
        if meta.get("kind") != KIND or meta.get("format_version") != MODEL_FORMAT_VERSION:
            raise ModelError(
                f"model in {model_dir} is kind {meta.get('kind')!r} format {meta.get('format_version')!r}; "
                f"this loader reads kind {KIND!r} format {MODEL_FORMAT_VERSION}: refit it"
            )
        config = MultimodalConfig(**meta["config"])
        encoder = None
        point_form = meta.get("point_encoder_form", "torch-fp32")
        if config.uses_points and config.point_features == "point_mae":
            from qcstream.models.point_encoder_io import load_point_encoder

            encoder = load_point_encoder(model_dir, point_form, meta.get("point_quantization"), meta.get("point_encoder"), meta.get("point_pruning"))
        detector = cls(config, point_encoder=encoder)
        detector.point_encoder_form = point_form
        detector.point_pruning = meta.get("point_pruning")
        detector.point_quantization = meta.get("point_quantization")
        detector.backbone_form = meta.get("backbone_form", "torch-fp32")
        detector.quantization = meta.get("quantization")

        if config.uses_rgb:
            detector._rgb_extractor = load_backbone(
                detector._rgb_config(), model_dir, detector.backbone_form, detector.quantization, meta.get("feature_dim")
            )
        with np.load(model_dir / BANKS_FILE) as banks:
            detector.banks_ = {name: torch.from_numpy(banks[name]) for name in BANK_NAMES if name in banks}
        if (model_dir / FUSION_FILE).is_file():
            saved = torch.load(model_dir / FUSION_FILE, map_location="cpu", weights_only=True)
            detector.fusion_ = FeatureFusion.from_dict(saved["config"])
            detector.fusion_.load_state_dict(saved["state_dict"])
            detector.fusion_.eval()
        if (model_dir / SCORE_FUSION_FILE).is_file():
            with np.load(model_dir / SCORE_FUSION_FILE) as arrays:
                detector.patch_fusion_ = ScoreFusion.from_arrays({key[6:]: arrays[key] for key in arrays.files if key.startswith("patch_")})
                if any(key.startswith("image_") for key in arrays.files):
                    detector.image_fusion_ = ScoreFusion.from_arrays({key[6:]: arrays[key] for key in arrays.files if key.startswith("image_")})

        detector.thresholds_ = {mode: float(value) for mode, value in meta["thresholds"].items()}
        detector.score_ranges_ = {mode: tuple(bounds) for mode, bounds in meta["score_ranges"].items()}
        detector.version_ = meta["version"]
        detector.fit_info_ = meta.get("fit_info", {})
        return detector


def _as_frame(frame: Frame | data_io.Sample) -> Frame:
    if isinstance(frame, Frame):
        return frame
    return Frame.from_sample(frame)


def _require_clouds(frames: Sequence[Frame], config: MultimodalConfig) -> None:
    if config.uses_points and any(frame.xyz is None for frame in frames):
        raise ValueError(
            f"mode {config.mode!r} needs a point cloud with every frame it fits or evaluates on; "
            "use frames with xyz clouds, or mode 'rgb'"
        )


def _sample_rows(n_rows: int, limit: int, seed: int) -> torch.Tensor:
    """Indices of at most ``limit`` of ``n_rows`` rows, in order, chosen at random by ``seed``."""
    if n_rows <= limit:
        return torch.arange(n_rows)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_rows, generator=generator)[:limit].sort().values


def _score_range(patch_scores: np.ndarray, threshold: float) -> tuple[float, float]:
    return float(np.percentile(patch_scores, 50)), float(max(threshold, np.percentile(patch_scores, 99.9)))
