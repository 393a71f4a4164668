"""Decision-layer fusion: one-class SVMs over the score vectors of several memory banks (M3DM).

Each frame (or pixel) has a vector of K anomaly scores, one per memory bank (RGB,
point, fused). :class:`ScoreFusion` learns the region that normal score vectors
occupy and scores new vectors by how far outside it they fall. The detector keeps
one instance for image scores and one for pixel scores.

Two models:

- ``kernel="linear"`` (the default, as M3DM): a linear one-class SVM on the scores
  divided by their normal standard deviation. It separates the normal score vectors
  from the origin, the vector of perfect matches in every bank, and its normal
  vector ``w`` (a non-negative combination of support vectors) weights the banks.
  The fused score is ``w . x``, scikit-learn's ``score_samples``: it rises with
  every bank's score, so a defect seen by one bank raises it, and ranking never
  saturates however far a defect lies from normal.
- ``kernel="rbf"``: an RBF one-class SVM on scores standardised by their normal
  mean and standard deviation (values below the mean raised to it), scored by the
  negated decision function. It encloses the normal cluster, so it also catches
  a broken correlation between banks, but its score saturates: all vectors far
  outside the boundary score alike, which flattens the ranking of strong defects.

Both fits are exact and deterministic (libsvm); their quadratic cost is bounded by
subsampling at most ``max_samples`` vectors. Default ``nu = 0.5``: ``nu`` bounds
the fraction of training vectors outside the boundary from above and the fraction
of support vectors from below. The score is used for ranking, and the operating
threshold is calibrated separately on normal frames, so ``nu`` is not the
false-alarm rate.

Scoring evaluates the fitted decision function from plain arrays (support vectors,
dual coefficients, intercept, gamma) in numpy, so a fusion stored with
:meth:`~ScoreFusion.to_arrays` or :meth:`~ScoreFusion.save` needs no pickle and
scores exactly as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from sklearn.svm import OneClassSVM

logger = logging.getLogger(__name__)

#: Version of the file written by :meth:`ScoreFusion.save`.
SCORE_FUSION_FORMAT_VERSION = 1

#: Score vectors per block when evaluating the RBF kernel: the block's kernel matrix
#: contains ``rows x support vectors`` float64 values (40 MB for 5000 support vectors).
SCORE_BLOCK_ROWS = 1024

#: A column whose normal standard deviation is below this is treated as constant (scale 1).
MIN_SCALE = 1e-12


class ScoreFusion:
    """One-class SVM over standardised anomaly-score vectors ``(N, K)``, where a higher fused score is more anomalous.

    ``fit`` takes score vectors of normal frames (or pixels). Each column is
    standardised by its normal mean and standard deviation, then an RBF
    ``OneClassSVM`` with ``nu`` and ``gamma`` is fitted on at most ``max_samples``
    vectors drawn without replacement by ``seed`` (``None`` uses all). ``gamma="scale"``
    resolves to ``1 / (K * variance)`` of the standardised training vectors, as
    scikit-learn defines it, and is stored as a number.

    ``score`` returns the negated SVM decision function: positive outside the learned
    boundary, negative inside, 0 on it.

    Standardised values below 0 (scores below the normal mean) are raised to 0
    before fitting and scoring, so only scores above normal raise the fused score.
    """

    def __init__(
        self,
        kernel: str = "linear",
        nu: float = 0.5,
        gamma: float | str = "scale",
        max_samples: int | None = 10_000,
        seed: int = 0,
    ) -> None:
        self.kernel = kernel
        self.nu = nu
        self.gamma = gamma
        self.max_samples = max_samples
        self.seed = seed

    # --- fitting ------------------------------------------------------------------------

    def fit(self, scores: np.ndarray) -> "ScoreFusion":
        """Fit on normal score vectors ``(N, K)``, one column per memory bank. Returns ``self``."""
        self._check_params()
        scores = _check_scores(scores, "scores")
        n_vectors, n_banks = scores.shape
        if n_vectors < 2:
            raise ValueError(f"fitting needs at least 2 normal score vectors, got {n_vectors}")

        self.mean_ = scores.mean(axis=0)
        scale = scores.std(axis=0)
        constant = scale < MIN_SCALE
        if constant.any():
            logger.warning("Score columns %s are constant on normal data, so they keep scale 1", np.flatnonzero(constant).tolist())
        self.scale_ = np.where(constant, 1.0, scale)

        standardized = self._standardize(scores)
        if self.max_samples is not None and n_vectors > self.max_samples:
            rows = np.random.default_rng(self.seed).choice(n_vectors, size=self.max_samples, replace=False)
            standardized = standardized[np.sort(rows)]
        self.gamma_ = self._resolve_gamma(standardized)

        logger.info(
            "Fitting %s one-class SVM score fusion on %d of %d vectors of %d scores (nu=%g, gamma=%.4g)",
            self.kernel, standardized.shape[0], n_vectors, n_banks, self.nu, self.gamma_,
        )
        svm = OneClassSVM(kernel=self.kernel, nu=self.nu, gamma=self.gamma_).fit(standardized)
        self.support_vectors_ = np.asarray(svm.support_vectors_, dtype=np.float64)
        self.dual_coef_ = np.asarray(svm.dual_coef_[0], dtype=np.float64)
        self.intercept_ = float(svm.intercept_[0])
        self.n_features_in_ = n_banks
        logger.info("Score fusion keeps %d support vectors", self.support_vectors_.shape[0])
        return self

    def fit_maps(self, maps: np.ndarray) -> "ScoreFusion":
        """Fit on the pixel score vectors of normal maps ``(B, K, H, W)``. Returns ``self``."""
        return self.fit(pixel_vectors(maps))

    # --- scoring ------------------------------------------------------------------------

    def score(self, scores: np.ndarray) -> np.ndarray:
        """Return the fused anomaly score ``(N,)`` float64 of score vectors ``(N, K)``.

        NOTE: the cost is one kernel value per vector and support vector, and an RBF
        fit keeps at least ``nu`` times its fitted vectors (at most ``max_samples``)
        as support vectors. For full-resolution pixel maps, lower ``max_samples`` or
        ``nu`` of the pixel fusion, or fuse at the feature grid before upsampling.
        """
        self._require_fitted()
        scores = _check_scores(scores, "scores")
        if scores.shape[1] != self.n_features_in_:
            raise ValueError(f"score vectors have {scores.shape[1]} columns but the fusion was fitted on {self.n_features_in_}")

        standardized = self._standardize(scores)
        if self.kernel == "linear":
            return standardized @ (self.dual_coef_ @ self.support_vectors_)
        fused = np.empty(scores.shape[0])
        support_norms = (self.support_vectors_**2).sum(axis=1)
        for start in range(0, scores.shape[0], SCORE_BLOCK_ROWS):
            block = standardized[start : start + SCORE_BLOCK_ROWS]
            squared = (block**2).sum(axis=1)[:, None] + support_norms[None, :] - 2.0 * block @ self.support_vectors_.T
            kernel = np.exp(-self.gamma_ * np.maximum(squared, 0.0))
            fused[start : start + SCORE_BLOCK_ROWS] = -(kernel @ self.dual_coef_ + self.intercept_)
        return fused

    def score_maps(self, maps: np.ndarray) -> np.ndarray:
        """Fuse pixel score maps ``(K, H, W)`` or ``(B, K, H, W)`` into ``(H, W)`` or ``(B, H, W)``.

        Each pixel's K scores are one score vector, scored as :meth:`score` does.
        """
        maps = np.asarray(maps)
        single = maps.ndim == 3
        batch = maps[None] if single else maps
        fused = self.score(pixel_vectors(batch))
        fused = fused.reshape(batch.shape[0], *batch.shape[2:])
        return fused[0] if single else fused

    # --- persistence --------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the fitted state as named numpy arrays, ready for ``np.savez`` (no pickle needed).

        ``header`` is a 0-d string array that contains the parameters as JSON.
        """
        self._require_fitted()
        header = {
            "format_version": SCORE_FUSION_FORMAT_VERSION,
            "params": {"kernel": self.kernel, "nu": self.nu, "gamma": self.gamma, "max_samples": self.max_samples, "seed": self.seed},
            "gamma_": self.gamma_,
            "intercept_": self.intercept_,
        }
        return {
            "header": np.array(json.dumps(header)),
            "mean": self.mean_,
            "scale": self.scale_,
            "support_vectors": self.support_vectors_,
            "dual_coef": self.dual_coef_,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "ScoreFusion":
        """Rebuild a fitted fusion from :meth:`to_arrays` output."""
        missing = sorted({"header", "mean", "scale", "support_vectors", "dual_coef"} - set(arrays))
        if missing:
            raise ValueError(f"score fusion arrays are missing {missing}: save them with to_arrays()")
        header = json.loads(str(arrays["header"]))
        if header.get("format_version") != SCORE_FUSION_FORMAT_VERSION:
            raise ValueError(
                f"score fusion has format_version {header.get('format_version')!r}, "
                f"but this qcstream reads {SCORE_FUSION_FORMAT_VERSION}: refit it"
            )

        fusion = cls(**header["params"])
        fusion.mean_ = np.asarray(arrays["mean"], dtype=np.float64)
        fusion.scale_ = np.asarray(arrays["scale"], dtype=np.float64)
        fusion.support_vectors_ = np.asarray(arrays["support_vectors"], dtype=np.float64)
        fusion.dual_coef_ = np.asarray(arrays["dual_coef"], dtype=np.float64)
        fusion.gamma_ = float(header["gamma_"])
        fusion.intercept_ = float(header["intercept_"])
        fusion.n_features_in_ = int(fusion.mean_.shape[0])
        return fusion

    def save(self, path: str | Path) -> Path:
        """Write the fitted fusion to an ``.npz`` file at ``path`` and return the path."""
        path = Path(path)
        with path.open("wb") as handle:
            np.savez(handle, **self.to_arrays())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ScoreFusion":
        """Load a fusion written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no score fusion file at {path}: fit the detector first")
        with np.load(path, allow_pickle=False) as arrays:
            return cls.from_arrays({name: arrays[name] for name in arrays.files})

    # --- helpers ------------------------------------------------------------------------

    def _standardize(self, scores: np.ndarray) -> np.ndarray:
        """Bring each column to the scale of its normal spread, as the model's kernel needs.

        Linear: divided by the normal standard deviation, not centred, so the origin
        stays the vector of perfect matches. RBF: centred on the normal mean too, with
        values below it raised to it. Bank scores are distances to normal features,
        so only values above normal are evidence of a defect, and the RBF boundary,
        which encloses the normal cluster from all sides, would flag low scores too.
        """
        if self.kernel == "linear":
            return scores / self.scale_
        return np.maximum((scores - self.mean_) / self.scale_, 0.0)

    def _resolve_gamma(self, standardized: np.ndarray) -> float:
        if self.kernel == "linear":
            return 0.0
        if self.gamma != "scale":
            return float(self.gamma)
        variance = float(standardized.var())
        return 1.0 / (standardized.shape[1] * variance) if variance > 0 else 1.0

    def _check_params(self) -> None:
        if self.kernel not in ("linear", "rbf"):
            raise ValueError(f"kernel must be 'linear' or 'rbf', got {self.kernel!r}")
        if not 0 < self.nu <= 1:
            raise ValueError(f"nu must be in (0, 1], got {self.nu}")
        if isinstance(self.gamma, str):
            if self.gamma != "scale":
                raise ValueError(f"gamma must be 'scale' or a positive number, got {self.gamma!r}")
        elif not self.gamma > 0:
            raise ValueError(f"gamma must be 'scale' or a positive number, got {self.gamma!r}")
        if self.max_samples is not None and self.max_samples < 2:
            raise ValueError(f"max_samples must be None or at least 2, got {self.max_samples}")

    def _require_fitted(self) -> None:
        if not hasattr(self, "support_vectors_"):
            raise RuntimeError("this ScoreFusion is not fitted: call fit() on normal score vectors first, or load() a saved one")


def pixel_vectors(maps: np.ndarray) -> np.ndarray:
    """Reshape score maps ``(B, K, H, W)`` to pixel score vectors ``(B * H * W, K)``, pixels in row-major order."""
    maps = np.asarray(maps)
    if maps.ndim != 4:
        raise ValueError(f"score maps must be (B, K, H, W), one map per memory bank, got shape {maps.shape}")
    return np.moveaxis(maps, 1, -1).reshape(-1, maps.shape[1])


def _check_scores(scores: np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"{name} must be (N, K), one column per memory bank, got shape {scores.shape}: reshape a single vector with reshape(1, -1)")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} contains NaN or infinite values: check the memory-bank scores")
    return scores
