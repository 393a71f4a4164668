"""Evaluate a fitted detector on a labelled test folder, overall and per defect type.

Each defect type is scored against all good images of the test set. Its image
AUROC ranks that type's images against the good ones. Its pixel AUROC and AUPRO
use that type's maps plus the good images' maps, whose pixels are all good.
Rates use the model's operating threshold (``score >= threshold`` is
flagged as defective).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from qcstream.models import data as data_io
from qcstream.models import metrics
from qcstream.models.detector import PatchCoreDetector

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DefectTypeMetrics:
    """Metrics of one defect type against all good images of the test set."""

    defect_type: str
    n_images: int
    #: Images of this type scored below the threshold.
    n_missed: int
    fnr: float
    image_auroc: float
    pixel_auroc: float
    aupro: float


@dataclasses.dataclass
class EvaluationResult:
    """Detection metrics on one test set; rates are at the model's threshold.

    A metric that is undefined on this set (for example pixel metrics of a type
    without masks) is NaN here and ``None`` in :meth:`to_dict`.
    """

    test_folder: str
    n_images: int
    n_defective: int
    image_auroc: float
    pixel_auroc: float
    aupro: float
    aupro_fpr_limit: float
    threshold: float
    fnr: float
    fpr: float
    ms_per_image: float
    model_version: str
    #: "fpr" or "fnr": which rate the threshold was calibrated for, and its target.
    calibration: str = "fpr"
    calibration_target: float = float("nan")
    n_missed: int = 0
    n_false_alarms: int = 0
    per_type: list[DefectTypeMetrics] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return plain types only, with NaN and infinity as ``None``, ready for strict JSON."""
        return _finite_or_none(dataclasses.asdict(self))

    def format(self) -> str:
        n_good = self.n_images - self.n_defective
        lines = [
            f"Evaluation of model {self.model_version} on {self.test_folder}",
            f"  images            {self.n_images} ({self.n_defective} defective, {n_good} good)",
            f"  image AUROC       {_fmt(self.image_auroc, '.4f')}",
            f"  pixel AUROC       {_fmt(self.pixel_auroc, '.4f')}",
            f"  AUPRO (FPR<={self.aupro_fpr_limit:.0%}) {_fmt(self.aupro, '.4f')}",
            f"  threshold         {self.threshold:.4f} (calibrated for {self.calibration.upper()} {_fmt(self.calibration_target, '.3f')})",
            f"  at threshold:     FNR {_fmt(self.fnr, '.3f')} ({self.n_missed}/{self.n_defective} missed), "
            f"FPR {_fmt(self.fpr, '.3f')} ({self.n_false_alarms}/{n_good} false alarms)",
            f"  scoring           {self.ms_per_image:.0f} ms per image",
        ]
        if self.per_type:
            lines += [
                f"  per defect type, each against the {n_good} good images:",
                f"    {'type':<16}{'images':>7}{'image AUROC':>13}{'pixel AUROC':>13}{'AUPRO':>8}{'missed':>8}{'FNR':>7}",
            ]
            for row in self.per_type:
                lines.append(
                    f"    {row.defect_type:<16}{row.n_images:>7}{_fmt(row.image_auroc, '.4f'):>13}"
                    f"{_fmt(row.pixel_auroc, '.4f'):>13}{_fmt(row.aupro, '.4f'):>8}"
                    f"{f'{row.n_missed}/{row.n_images}':>8}{_fmt(row.fnr, '.3f'):>7}"
                )
        return "\n".join(lines)


@dataclasses.dataclass
class ScoredSet:
    """A labelled test set with the detector's outputs, kept for metrics and reports."""

    root: Path
    samples: list[data_io.Sample]
    scores: np.ndarray
    #: ``(H, W)`` anomaly maps and bool ground-truth masks, one per sample.
    maps: list[np.ndarray]
    masks: list[np.ndarray]
    seconds: float

    @property
    def labels(self) -> np.ndarray:
        return np.array([sample.label for sample in self.samples], dtype=np.int64)

    @property
    def defect_types(self) -> list[str]:
        return [sample.defect_type for sample in self.samples]

    def display_name(self, index: int) -> str:
        """Return the image path relative to the test folder when possible, for captions."""
        path = self.samples[index].image_path
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def score_test_set(detector: PatchCoreDetector, test_folder: str | Path, split: str = "test", progress: bool = True) -> ScoredSet:
    """Score every sample of ``test_folder`` (a data set root, then ``split`` is used, or a split folder)."""
    samples = data_io.discover(test_folder, split)
    n_defective = sum(sample.label for sample in samples)
    logger.info("Evaluating on %d images (%d defective) from %s", len(samples), n_defective, test_folder)

    started = time.perf_counter()
    # A multimodal detector reads each sample's point cloud too, so it gets the samples.
    inputs = samples if getattr(detector, "reads_point_clouds", False) else [s.image_path for s in samples]
    scores, maps = detector.score(inputs, progress=progress, desc="evaluation")
    seconds = time.perf_counter() - started

    masks = [data_io.load_mask(s.mask_path, m.shape) for s, m in zip(samples, maps)]
    return ScoredSet(root=Path(test_folder), samples=samples, scores=scores, maps=maps, masks=masks, seconds=seconds)


def per_type_metrics(
    defect_types: list[str],
    labels: np.ndarray,
    scores: np.ndarray,
    masks: list[np.ndarray],
    maps: list[np.ndarray],
    threshold: float,
    fpr_limit: float = 0.3,
) -> list[DefectTypeMetrics]:
    """Compute the metrics of each defect type against all good images, sorted by type name.

    A metric that is undefined for a type (no mask with a defect pixel, or no
    good image) is NaN and a warning names the type.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    good = np.flatnonzero(labels == 0)
    types = sorted({t for t, label in zip(defect_types, labels) if label == 1})

    rows = []
    for defect_type in types:
        own = np.array([i for i, (t, label) in enumerate(zip(defect_types, labels)) if t == defect_type and label == 1])
        subset = np.concatenate([own, good])
        sub_masks = [masks[i] for i in subset]
        sub_maps = [maps[i] for i in subset]
        n_missed = int(np.count_nonzero(scores[own] < threshold))
        rows.append(
            DefectTypeMetrics(
                defect_type=defect_type,
                n_images=int(own.size),
                n_missed=n_missed,
                fnr=n_missed / own.size,
                image_auroc=_or_nan(defect_type, "image AUROC", metrics.image_auroc, labels[subset], scores[subset]),
                pixel_auroc=_or_nan(defect_type, "pixel AUROC", metrics.pixel_auroc, sub_masks, sub_maps),
                aupro=_or_nan(defect_type, "AUPRO", metrics.aupro, sub_masks, sub_maps, fpr_limit=fpr_limit),
            )
        )
    return rows


def summarize(
    scored: ScoredSet,
    threshold: float,
    model_version: str,
    fpr_limit: float = 0.3,
    calibration: str = "fpr",
    calibration_target: float = float("nan"),
) -> EvaluationResult:
    """Compute the overall and per-type metrics of a scored test set."""
    labels = scored.labels
    rates = metrics.rates_at_threshold(labels, scored.scores, threshold)
    logger.info("Computing pixel metrics over %d anomaly maps", len(scored.maps))
    return EvaluationResult(
        test_folder=str(scored.root),
        n_images=len(scored.samples),
        n_defective=int(labels.sum()),
        image_auroc=metrics.image_auroc(labels, scored.scores),
        pixel_auroc=metrics.pixel_auroc(scored.masks, scored.maps),
        aupro=metrics.aupro(scored.masks, scored.maps, fpr_limit=fpr_limit),
        aupro_fpr_limit=fpr_limit,
        threshold=float(threshold),
        fnr=float(rates["fnr"]),
        fpr=float(rates["fpr"]),
        ms_per_image=scored.seconds * 1000 / len(scored.samples),
        model_version=model_version,
        calibration=calibration,
        calibration_target=float(calibration_target),
        n_missed=int(rates["fn"]),
        n_false_alarms=int(rates["fp"]),
        per_type=per_type_metrics(scored.defect_types, labels, scored.scores, scored.masks, scored.maps, threshold, fpr_limit),
    )


def summarize_for(detector: PatchCoreDetector, scored: ScoredSet, fpr_limit: float = 0.3) -> EvaluationResult:
    """Summarize ``scored`` at ``detector``'s threshold, recording how that threshold was calibrated."""
    config = detector.config
    calibration = getattr(config, "calibration", "fpr")
    target = config.target_fnr if calibration == "fnr" else config.target_fpr
    return summarize(
        scored,
        threshold=detector.threshold_,
        model_version=detector.version,
        fpr_limit=fpr_limit,
        calibration=calibration,
        calibration_target=float("nan") if target is None else target,
    )


def evaluate(detector: PatchCoreDetector, test_folder: str | Path, split: str = "test", progress: bool = True, fpr_limit: float = 0.3) -> EvaluationResult:
    """Score every sample of ``test_folder`` and compute image and pixel metrics, overall and per type.

    ``test_folder`` is a data set root (then ``split`` is used) or a split folder.
    """
    return summarize_for(detector, score_test_set(detector, test_folder, split, progress), fpr_limit)


def _or_nan(defect_type: str, name: str, metric, *args, **kwargs) -> float:
    """Return ``metric(*args)``, or NaN with a warning when it is undefined for this type."""
    try:
        return float(metric(*args, **kwargs))
    except metrics.MetricError as error:
        logger.warning("%s of defect type %r is undefined, reported as NaN: %s", name, defect_type, error)
        return float("nan")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value


def _fmt(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else "n/a"
