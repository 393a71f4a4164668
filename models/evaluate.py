"""Evaluate a fitted detector on a labelled test folder."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from qcstream.models import data as data_io
from qcstream.models import metrics
from qcstream.models.detector import PatchCoreDetector

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EvaluationResult:
    """Detection metrics on one test set; rates are at the model's threshold."""

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [
            f"Evaluation of model {self.model_version} on {self.test_folder}",
            f"  images            {self.n_images} ({self.n_defective} defective)",
            f"  image AUROC       {self.image_auroc:.4f}",
            f"  pixel AUROC       {self.pixel_auroc:.4f}",
            f"  AUPRO (FPR<={self.aupro_fpr_limit:.0%}) {self.aupro:.4f}",
            f"  at threshold {self.threshold:.4f}: FNR {self.fnr:.3f}, FPR {self.fpr:.3f}",
            f"  scoring           {self.ms_per_image:.0f} ms per image",
        ]
        return "\n".join(lines)


def evaluate(detector: PatchCoreDetector, test_folder: str | Path, split: str = "test", progress: bool = True, fpr_limit: float = 0.3) -> EvaluationResult:
    """Score every sample of ``test_folder`` and compute image and pixel metrics.

    ``test_folder`` is a data set root (then ``split`` is used) or a split folder.
    """
    samples = data_io.discover(test_folder, split)
    labels = np.array([s.label for s in samples])
    logger.info("Evaluating on %d images (%d defective) from %s", len(samples), int(labels.sum()), test_folder)

    started = time.perf_counter()
    scores, maps = detector.score([s.image_path for s in samples], progress=progress, desc="evaluation")
    ms_per_image = (time.perf_counter() - started) * 1000 / len(samples)

    masks = [data_io.load_mask(s.mask_path, m.shape) for s, m in zip(samples, maps)]
    rates = metrics.rates_at_threshold(labels, scores, detector.threshold_)
    return EvaluationResult(
        test_folder=str(test_folder),
        n_images=len(samples),
        n_defective=int(labels.sum()),
        image_auroc=metrics.image_auroc(labels, scores),
        pixel_auroc=metrics.pixel_auroc(masks, maps),
        aupro=metrics.aupro(masks, maps, fpr_limit=fpr_limit),
        aupro_fpr_limit=fpr_limit,
        threshold=float(detector.threshold_),
        fnr=float(rates["fnr"]),
        fpr=float(rates["fpr"]),
        ms_per_image=ms_per_image,
        model_version=detector.version,
    )
