"""Anomaly-detection metrics: image and pixel AUROC, AUPRO, rates at a threshold.

Conventions shared by every function here:

* A higher score means "more anomalous"; a sample or pixel is predicted
  defective when ``score >= threshold``.
* Labels and masks use 1 (or ``True``) for defect and 0 for good.
* Pixel metrics take either an ``(N, H, W)`` array or a sequence of 2-D arrays,
  so images of different sizes (such as the magnetic tile set) need no resizing.

AUROC is computed exactly from average ranks (the Mann-Whitney U statistic), so
tied scores count as half a correct ordering, as in scikit-learn.

AUPRO follows the MVTec AD evaluation. Ground-truth regions are the
8-connected components of each mask. At each threshold the per-region overlap
(PRO) is the mean, over all regions of all images, of the fraction of the
region predicted defective. The false-positive rate is taken over the good
pixels of all images. By default every distinct score is a threshold (an exact
curve from one sort of all pixels), and ``num_thresholds`` switches to an
evenly spaced grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Union

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

logger = logging.getLogger(__name__)

ArrayOrImages = Union[np.ndarray, Sequence[np.ndarray]]

#: 8-connectivity, as in the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class MetricError(ValueError):
    """Inputs for which a metric is undefined or malformed."""


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Compute the area under the ROC curve of image scores against 0/1 image labels."""
    labels, scores = _check_labels_scores(labels, scores, "image_auroc")
    return _auroc(labels, scores, "image_auroc")


def pixel_auroc(masks: ArrayOrImages, maps: ArrayOrImages) -> float:
    """Compute the area under the ROC curve over all pixels of all images."""
    pairs = _check_masks_maps(masks, maps, "pixel_auroc")
    labels = np.concatenate([mask.ravel() for mask, _ in pairs])
    scores = np.concatenate([amap.ravel() for _, amap in pairs])
    return _auroc(labels, scores, "pixel_auroc")


def roc_curve_points(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the ROC curve ``(fpr, tpr, thresholds)``, one point per distinct score.

    Points run from the highest threshold down; the first point is
    ``(0, 0)`` with threshold ``+inf`` (nothing predicted defective).
    """
    labels, scores = _check_labels_scores(labels, scores, "roc_curve_points")
    _require_both_classes(labels, "roc_curve_points")

    order, sorted_scores = _descending_order(scores)
    ends = _run_ends(sorted_scores)
    true_positives = np.cumsum(labels[order], dtype=np.int64)[ends]
    false_positives = (ends + 1) - true_positives

    num_positive = int(np.count_nonzero(labels))
    fpr = np.concatenate([[0.0], false_positives / (labels.size - num_positive)])
    tpr = np.concatenate([[0.0], true_positives / num_positive])
    thresholds = np.concatenate([[np.inf], sorted_scores[ends]])
    return fpr, tpr, thresholds


def pro_curve(
    masks: ArrayOrImages,
    maps: ArrayOrImages,
    num_thresholds: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute the per-region-overlap curve ``(fpr, pro)``, sorted by increasing FPR.

    With ``num_thresholds=None`` every distinct score is a threshold. Otherwise
    ``num_thresholds`` evenly spaced thresholds run from the highest to the
    lowest score. The curve starts at ``(0, 0)`` (threshold above every score).
    Both modes sort all pixels once and need about 50 bytes per pixel
    (about 340 MB measured for 56 float32 maps of 400x300).
    """
    pairs = _check_masks_maps(masks, maps, "pro_curve")
    if num_thresholds is not None and num_thresholds < 2:
        raise MetricError(
            f"pro_curve: invalid num_thresholds={num_thresholds!r}; use None or an integer >= 2"
        )

    scores, is_good, region_weight, num_regions = _pixel_table(pairs)

    # Sort once, highest score first. Cumulative sums then give, for the k
    # highest-scoring pixels, the good pixels and the region overlap among them.
    order, sorted_scores = _descending_order(scores)
    del scores
    false_positives = np.cumsum(is_good[order], dtype=np.int64)
    del is_good
    overlap = region_weight[order]
    del region_weight, order
    np.cumsum(overlap, out=overlap)

    if num_thresholds is None:
        ends = _run_ends(sorted_scores)
    else:
        thresholds = np.linspace(sorted_scores[0], sorted_scores[-1], num_thresholds)
        ascending = sorted_scores[::-1]
        counts = ascending.size - np.searchsorted(ascending, thresholds, side="left")
        ends = counts - 1

    fpr = np.concatenate([[0.0], false_positives[ends] / false_positives[-1]])
    pro = np.concatenate([[0.0], overlap[ends] / num_regions])
    return fpr, pro


def aupro(
    masks: ArrayOrImages,
    maps: ArrayOrImages,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Compute the area under the PRO curve from FPR 0 to ``fpr_limit``, divided by ``fpr_limit``.

    The curve is cut at exactly ``fpr_limit`` by linear interpolation and
    integrated with the trapezoid rule, so a perfect detector scores 1.0.
    See :func:`pro_curve` for ``num_thresholds``.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise MetricError(f"aupro: fpr_limit={fpr_limit!r} must be in (0, 1]; the usual value is 0.3")
    fpr, pro = pro_curve(masks, maps, num_thresholds=num_thresholds)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def rates_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Count the confusion matrix and rates, predicting "defect" where ``score >= threshold``.

    Returns ``tp, fp, tn, fn`` (ints) and ``fnr = fn / (tp + fn)``,
    ``fpr = fp / (fp + tn)``. A rate without any sample of its class is NaN.
    """
    labels, scores = _check_labels_scores(labels, scores, "rates_at_threshold")
    if np.isnan(threshold):
        raise MetricError("rates_at_threshold: threshold is NaN; pass a number")
    predicted = scores >= threshold
    defect = labels

    tp = int(np.count_nonzero(predicted & defect))
    fp = int(np.count_nonzero(predicted & ~defect))
    tn = int(np.count_nonzero(~predicted & ~defect))
    fn = int(np.count_nonzero(~predicted & defect))
    return {
        "fnr": fn / (tp + fn) if tp + fn else float("nan"),
        "fpr": fp / (fp + tn) if fp + tn else float("nan"),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def threshold_for_fpr(normal_scores: np.ndarray, target_fpr: float) -> float:
    """Find the smallest threshold whose false-positive rate on ``normal_scores`` is <= ``target_fpr``.

    Candidates are the distinct normal scores plus the next float above the
    highest one (which flags no normal sample). Because ``score >= threshold``
    is defective, tied normal scores are flagged together: when a tie would
    push the rate above the target, the next higher score is returned and the
    achieved rate is below the target.
    """
    scores = _as_finite_1d(normal_scores, "threshold_for_fpr", "normal_scores")
    if not 0.0 <= target_fpr <= 1.0:
        raise MetricError(f"threshold_for_fpr: target_fpr={target_fpr!r} must be in [0, 1]")

    distinct, counts = np.unique(scores, return_counts=True)
    # flagged[i] = number of normal scores >= distinct[i]
    flagged = np.cumsum(counts[::-1])[::-1]
    allowed = np.flatnonzero(flagged / scores.size <= target_fpr)
    if allowed.size:
        return float(distinct[allowed[0]])
    return float(np.nextafter(distinct[-1], np.inf))


def threshold_for_fnr(defect_scores: np.ndarray, target_fnr: float) -> float:
    """Find the largest threshold whose false-negative rate on ``defect_scores`` is <= ``target_fnr``.

    A defect is missed when ``score < threshold``, so the rate only changes at
    the defect scores, and the candidates are the distinct defect scores. The
    lowest one misses nothing, so a candidate always exists. Tied defect scores
    are missed together: when raising the threshold past a tie would push the
    rate above the target, the tied score itself is returned and the achieved
    rate is below the target. ``target_fnr`` must be in [0, 1), because a rate
    of 1 allows any threshold above every defect score.
    """
    scores = _as_finite_1d(defect_scores, "threshold_for_fnr", "defect_scores")
    if not 0.0 <= target_fnr < 1.0:
        raise MetricError(
            f"threshold_for_fnr: target_fnr={target_fnr!r} must be in [0, 1), for example 0.05"
        )

    distinct, counts = np.unique(scores, return_counts=True)
    # missed[i] = number of defect scores < distinct[i]
    missed = np.concatenate([[0], np.cumsum(counts)[:-1]])
    allowed = np.flatnonzero(missed / scores.size <= target_fnr)
    return float(distinct[allowed[-1]])


def _auroc(labels: np.ndarray, scores: np.ndarray, caller: str) -> float:
    _require_both_classes(labels, caller)
    positive = labels
    num_positive = int(np.count_nonzero(positive))
    num_negative = labels.size - num_positive

    ranks = rankdata(scores)
    rank_sum = float(ranks[positive].sum())
    u_statistic = rank_sum - num_positive * (num_positive + 1) / 2.0
    return u_statistic / (num_positive * num_negative)


def _descending_order(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the indices that sort ``scores`` high to low, and the sorted scores."""
    order = np.argsort(scores)[::-1]
    return order, scores[order]


def _run_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Return the index of the last element of each run of equal values in a sorted array.

    Cutting the cumulative counts there gives one curve point per distinct
    threshold, with all tied scores on the same side of it.
    """
    last_of_run = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    return np.append(last_of_run, sorted_scores.size - 1)


def _pixel_table(
    pairs: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Flatten all images into scores, good-pixel flags and region weights, and count the regions.

    A defect pixel weighs ``1 / area`` of its region, so summing the weights of
    the pixels predicted defective gives the sum of per-region overlaps.
    """
    num_pixels = sum(mask.size for mask, _ in pairs)
    scores = np.empty(num_pixels, dtype=np.result_type(*[amap.dtype for _, amap in pairs]))
    is_good = np.empty(num_pixels, dtype=bool)
    region_weight = np.zeros(num_pixels, dtype=np.float64)
    num_regions = 0

    start = 0
    for mask, amap in pairs:
        stop = start + mask.size
        scores[start:stop] = amap.ravel()
        is_good[start:stop] = ~mask.ravel()

        regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if count:
            areas = np.bincount(regions.ravel())
            inverse_area = np.zeros(areas.size, dtype=np.float64)
            inverse_area[1:] = 1.0 / areas[1:]
            region_weight[start:stop] = inverse_area[regions.ravel()]
            num_regions += count
        start = stop

    if num_regions == 0:
        raise MetricError(
            "pro_curve: the masks contain no defect pixel, so the per-region overlap is "
            "undefined; evaluate on a set that includes defective images with masks"
        )
    if not is_good.any():
        raise MetricError(
            "pro_curve: every pixel is a defect pixel, so the false-positive rate is "
            "undefined; include good pixels or good images"
        )
    return scores, is_good, region_weight, num_regions


def _area_up_to(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Integrate ``y(x)`` from ``x[0]`` to ``x_limit`` with the trapezoid rule (x non-decreasing)."""
    inside = int(np.searchsorted(x, x_limit, side="right"))
    xs = x[:inside]
    ys = y[:inside]
    if inside < x.size and xs[-1] < x_limit:
        x0, x1 = x[inside - 1], x[inside]
        y0, y1 = y[inside - 1], y[inside]
        y_at_limit = y0 + (y1 - y0) * (x_limit - x0) / (x1 - x0)
        xs = np.append(xs, x_limit)
        ys = np.append(ys, y_at_limit)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def _check_labels_scores(
    labels: np.ndarray, scores: np.ndarray, caller: str
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = _as_finite_1d(scores, caller, "scores")
    if labels.ndim != 1:
        raise MetricError(f"{caller}: labels must be 1-D, got shape {labels.shape}")
    if labels.shape != scores.shape:
        raise MetricError(
            f"{caller}: labels have shape {labels.shape} but scores have shape {scores.shape}; "
            "pass one label per score"
        )
    return _as_binary(labels, caller, "labels"), scores


def _check_masks_maps(
    masks: ArrayOrImages, maps: ArrayOrImages, caller: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    mask_list = _as_images(masks, caller, "masks")
    map_list = _as_images(maps, caller, "maps")
    if len(mask_list) != len(map_list):
        raise MetricError(
            f"{caller}: {len(mask_list)} masks but {len(map_list)} maps; pass one map per mask"
        )

    pairs = []
    for index, (mask, amap) in enumerate(zip(mask_list, map_list)):
        if mask.shape != amap.shape:
            raise MetricError(
                f"{caller}: image {index} has mask shape {mask.shape} but map shape {amap.shape}; "
                "resize the anomaly map to the mask size first"
            )
        if not np.issubdtype(amap.dtype, np.number) or np.issubdtype(amap.dtype, np.complexfloating):
            raise MetricError(f"{caller}: maps must be real numbers, got dtype {amap.dtype}")
        if not np.isfinite(amap).all():
            raise MetricError(f"{caller}: map {index} contains NaN or infinite values")
        pairs.append((_as_binary(mask, caller, f"mask {index}"), amap))
    return pairs


def _as_images(images: ArrayOrImages, caller: str, name: str) -> list[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim != 3:
            raise MetricError(f"{caller}: {name} must have shape (N, H, W), got {images.shape}")
        image_list = list(images)
    else:
        image_list = [np.asarray(image) for image in images]
    if not image_list:
        raise MetricError(f"{caller}: {name} is empty; pass at least one image")
    for index, image in enumerate(image_list):
        if image.ndim != 2 or image.size == 0:
            raise MetricError(
                f"{caller}: {name}[{index}] must be a non-empty 2-D array, got shape {image.shape}"
            )
    return image_list


def _as_finite_1d(values: np.ndarray, caller: str, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1:
        raise MetricError(f"{caller}: {name} must be 1-D, got shape {values.shape}")
    if values.size == 0:
        raise MetricError(f"{caller}: {name} is empty; pass at least one value")
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise MetricError(f"{caller}: {name} must be real numbers, got dtype {values.dtype}")
    if not np.isfinite(values).all():
        raise MetricError(f"{caller}: {name} contains NaN or infinite values")
    return values


def _as_binary(values: np.ndarray, caller: str, name: str) -> np.ndarray:
    """Return ``values`` as a bool array, accepting only 0/1 or True/False."""
    if values.dtype == bool:
        return values
    if not ((values == 0) | (values == 1)).all():
        unexpected = np.setdiff1d(np.unique(values), [0, 1])
        raise MetricError(
            f"{caller}: {name} must contain only 0/1 or True/False, found {unexpected[:5].tolist()}; "
            "convert a 0/255 mask with `mask > 0`"
        )
    return values == 1


def _require_both_classes(labels: np.ndarray, caller: str) -> None:
    num_positive = int(np.count_nonzero(labels))
    if num_positive == 0 or num_positive == labels.size:
        only = "defect" if num_positive else "good"
        raise MetricError(
            f"{caller}: all {labels.size} labels are {only}, so the ROC curve is undefined; "
            "evaluate on a set with both good and defective samples"
        )
