"""Recalibrate a fitted detector's threshold for a target FPR or FNR and report the rates it gives.

FPR mode uses the good images of a folder (by default its ``validation``
split); FNR mode uses the defective images of a labelled folder (by default its
``test`` split). The model gets a new version string, because its decisions
change.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from qcstream.models import data as data_io
from qcstream.models import metrics
from qcstream.models.detector import PatchCoreDetector

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CalibrationResult:
    """The new operating point and the rates it gives on the calibration folder."""

    mode: str
    target: float
    threshold: float
    previous_threshold: float | None
    version: str
    previous_version: str
    n_good: int
    n_defective: int
    #: NaN when the folder has no image of that class.
    fpr: float
    fnr: float
    n_false_alarms: int
    n_missed: int

    def format(self) -> str:
        previous = "none" if self.previous_threshold is None else f"{self.previous_threshold:.4f}"
        return "\n".join([
            f"Model {self.previous_version} -> {self.version}",
            f"  calibrated for {self.mode.upper()} <= {self.target:.3f}: threshold {self.threshold:.4f} (was {previous})",
            f"  on this folder: FPR {_text(self.fpr)} ({self.n_false_alarms}/{self.n_good} good images flagged), "
            f"FNR {_text(self.fnr)} ({self.n_missed}/{self.n_defective} defective images missed)",
        ])


def recalibrate(
    detector: PatchCoreDetector,
    folder: str | Path,
    target_fpr: float | None = None,
    target_fnr: float | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Set ``detector``'s threshold for exactly one of ``target_fpr`` and ``target_fnr`` using ``folder``."""
    if (target_fpr is None) == (target_fnr is None):
        raise ValueError("invalid targets: pass exactly one of target_fpr (good images) and target_fnr (defective images)")
    mode = "fpr" if target_fnr is None else "fnr"
    samples = data_io.discover(folder, "validation" if mode == "fpr" else "test")
    good = [s.image_path for s in samples if s.label == 0]
    defective = [s.image_path for s in samples if s.label == 1]
    previous_threshold, previous_version = detector.threshold_, detector.version

    if mode == "fpr":
        if not good:
            raise ValueError(f"no good images in {folder}: calibrating for a false-positive rate needs good images")
        detector.config.calibration = "fpr"
        detector.config.target_fnr = None
        detector.calibrate(good, target_fpr=target_fpr, progress=progress)
        detector.version_ = detector._compute_version()
    else:
        if not defective:
            raise ValueError(
                f"no defective images in {folder}: calibrating for a false-negative rate needs a labelled folder "
                f"in MVTec layout (<root>/test/<defect type>/...)"
            )
        detector.calibrate_for_fnr(defective, target_fnr, progress=progress)

    logger.info("Scoring %d images of %s for the rates at the new threshold", len(samples), folder)
    labels = np.array([s.label for s in samples])
    scores, _ = detector.score([s.image_path for s in samples], progress=progress, desc="rates")
    rates = metrics.rates_at_threshold(labels, scores, detector.threshold_)
    return CalibrationResult(
        mode=mode,
        target=float(target_fpr if mode == "fpr" else target_fnr),
        threshold=float(detector.threshold_),
        previous_threshold=previous_threshold,
        version=detector.version,
        previous_version=previous_version,
        n_good=len(good),
        n_defective=len(defective),
        fpr=float(rates["fpr"]),
        fnr=float(rates["fnr"]),
        n_false_alarms=int(rates["fp"]),
        n_missed=int(rates["fn"]),
    )


def _text(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"
