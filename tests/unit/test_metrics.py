"""Metrics against values worked out by hand on tiny inputs, and against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from qcstream.models.metrics import (
    MetricError,
    aupro,
    image_auroc,
    pixel_auroc,
    pro_curve,
    rates_at_threshold,
    roc_curve_points,
    threshold_for_fnr,
    threshold_for_fpr,
)


def two_image_example() -> tuple[np.ndarray, np.ndarray]:
    """Two 4x4 images, two defect regions of different sizes.

    Image 0: region R1 = pixels (0,0) and (1,1). They touch only diagonally,
    so with 8-connectivity they are ONE region of area 2 (4-connectivity
    would make two regions). Image 1: region R2 = the 2x2 block rows 1-2,
    columns 2-3, area 4. Good pixels: 14 + 12 = 26.

    Scores (everything not listed is 1):
      image 0: R1 (0,0)=9, R1 (1,1)=5, good (0,3)=7
      image 1: R2 (1,2)=9, R2 (1,3)=7, R2 (2,2)=3, R2 (2,3)=3,
               good (3,0)=5, good (0,0)=3, good (0,1)=3
    """
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.ones((2, 4, 4), dtype=np.float64)

    masks[0, 0, 0] = masks[0, 1, 1] = True
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 0, 3] = 9, 5, 7

    masks[1, 1:3, 2:4] = True
    maps[1, 1, 2], maps[1, 1, 3], maps[1, 2, 2], maps[1, 2, 3] = 9, 7, 3, 3
    maps[1, 3, 0], maps[1, 0, 0], maps[1, 0, 1] = 5, 3, 3
    return masks, maps


# Per threshold t (defect where score >= t), by hand from the docstring above:
#   t   good pixels >= t   FPR     R1 overlap  R2 overlap  PRO = mean
#   9          0           0         1/2         1/4       0.375
#   7          1           1/26      1/2         2/4       0.5
#   5          2           2/26      2/2         2/4       0.75
#   3          4           4/26      2/2         4/4       1.0
#   1         26           1         1           1         1.0
# plus the start point (0, 0) for a threshold above every score.
EXPECTED_FPR = [0.0, 0.0, 1 / 26, 2 / 26, 4 / 26, 1.0]
EXPECTED_PRO = [0.0, 0.375, 0.5, 0.75, 1.0, 1.0]


def test_pro_curve_by_hand() -> None:
    masks, maps = two_image_example()

    fpr, pro = pro_curve(masks, maps)

    np.testing.assert_allclose(fpr, EXPECTED_FPR)
    np.testing.assert_allclose(pro, EXPECTED_PRO)


def test_aupro_default_limit_by_hand() -> None:
    masks, maps = two_image_example()
    # Trapezoids up to FPR 0.3 (the curve is flat at PRO 1 after 4/26):
    #   0    -> 1/26 : (0.375 + 0.5 ) / 2 * 1/26 = 0.4375 / 26
    #   1/26 -> 2/26 : (0.5   + 0.75) / 2 * 1/26 = 0.625  / 26
    #   2/26 -> 4/26 : (0.75  + 1.0 ) / 2 * 2/26 = 1.75   / 26
    #   4/26 -> 0.3  : 1.0 * (0.3 - 4/26)
    # area = 2.8125/26 + 0.3 - 4/26 = 0.3 - 1.1875/26; divided by 0.3.
    expected = (0.3 - 1.1875 / 26) / 0.3

    assert aupro(masks, maps) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.8477564, abs=1e-7)


def test_aupro_interpolates_end_point() -> None:
    masks, maps = two_image_example()
    # Limit 3/26 lies between (2/26, 0.75) and (4/26, 1.0): PRO there is 0.875.
    # area = 0.4375/26 + 0.625/26 + (0.75 + 0.875)/2 * 1/26 = 1.875/26
    # normalised by 3/26: 0.625
    assert aupro(masks, maps, fpr_limit=3 / 26) == pytest.approx(0.625, rel=1e-12)


def test_pro_curve_three_regions() -> None:
    # One 3x5 image with regions A = (0,0), B = (0,2) (not touching, area 1 each)
    # and C = (1,4)-(2,4) (area 2). Of the 11 good pixels, (0,1) is scored 3.
    # The FPR stays at 1/11 while PRO jumps from 0.5 to 1, a vertical step.
    mask = np.zeros((3, 5), dtype=bool)
    mask[0, 0] = mask[0, 2] = mask[1, 4] = mask[2, 4] = True
    amap = np.ones((3, 5))
    amap[0, 0], amap[0, 2], amap[1, 4], amap[2, 4], amap[0, 1] = 4, 2, 4, 2, 3
    #   t   FPR    A   B   C    PRO
    #   4   0      1   0   1/2  0.5
    #   3   1/11   1   0   1/2  0.5
    #   2   1/11   1   1   1    1.0
    #   1   1      1   1   1    1.0
    fpr, pro = pro_curve([mask], [amap])

    np.testing.assert_allclose(fpr, [0.0, 0.0, 1 / 11, 1 / 11, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.5, 0.5, 1.0, 1.0])
    # area = 0.5 * 1/11 + 1.0 * (0.3 - 1/11)
    assert aupro([mask], [amap]) == pytest.approx((0.3 - 0.5 / 11) / 0.3, rel=1e-12)


def test_aupro_threshold_grid() -> None:
    masks, maps = two_image_example()
    # linspace(9, 1, 5) = 9, 7, 5, 3, 1: exactly the distinct scores.
    assert aupro(masks, maps, num_thresholds=5) == pytest.approx(aupro(masks, maps), rel=1e-12)

    # A coarser grid 9, 5, 1 skips two curve points:
    # (0, 0), (0, 0.375), (2/26, 0.75), (1, 1); PRO at 0.3 on the last segment:
    # 0.75 + 0.25 * (0.3 - 2/26) / (1 - 2/26)
    pro_at_limit = 0.75 + 0.25 * (0.3 - 2 / 26) / (1 - 2 / 26)
    area = (0.375 + 0.75) / 2 * 2 / 26 + (0.75 + pro_at_limit) / 2 * (0.3 - 2 / 26)
    assert aupro(masks, maps, num_thresholds=3) == pytest.approx(area / 0.3, rel=1e-12)


def test_aupro_perfect_and_constant() -> None:
    masks, _ = two_image_example()

    perfect = masks.astype(np.float64)
    assert aupro(masks, perfect) == pytest.approx(1.0)

    # One threshold only: the curve is (0, 0) -> (1, 1), PRO = FPR,
    # area up to 0.3 = 0.045, normalised 0.15.
    constant = np.zeros_like(perfect)
    assert aupro(masks, constant) == pytest.approx(0.15)


def test_aupro_mixed_image_sizes() -> None:
    masks, maps = two_image_example()
    # Padding image 1 with good pixels scored 1 only adds good pixels at the
    # lowest threshold, so the PRO curve up to FPR 0.3 stays as in the table
    # with a different denominator: 26 + 8 = 34 good pixels.
    wide_mask = np.zeros((4, 6), dtype=bool)
    wide_mask[:, :4] = masks[1]
    wide_map = np.ones((4, 6))
    wide_map[:, :4] = maps[1]

    fpr, pro = pro_curve([masks[0], wide_mask], [maps[0], wide_map])

    np.testing.assert_allclose(fpr, [0.0, 0.0, 1 / 34, 2 / 34, 4 / 34, 1.0])
    np.testing.assert_allclose(pro, EXPECTED_PRO)


def test_aupro_errors() -> None:
    masks, maps = two_image_example()

    with pytest.raises(MetricError, match="no defect pixel"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(MetricError, match="false-positive rate is undefined"):
        aupro(np.ones_like(masks), maps)
    with pytest.raises(MetricError, match="mask shape"):
        aupro(masks, maps[:, :3, :])
    with pytest.raises(MetricError, match="2 masks but 1 maps"):
        aupro(list(masks), [maps[0]])
    with pytest.raises(MetricError, match="empty"):
        aupro([], [])
    with pytest.raises(MetricError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(MetricError, match=r"found \[255\]"):
        aupro(masks.astype(np.uint8) * 255, maps)
    with pytest.raises(MetricError, match="NaN"):
        aupro(masks, np.where(masks, np.nan, maps))
    with pytest.raises(MetricError, match="num_thresholds"):
        aupro(masks, maps, num_thresholds=1)


def test_image_auroc_hand_computed() -> None:
    # Positive-negative pairs: 0.35 beats 0.1, loses to 0.4; 0.8 beats both -> 3/4.
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    # A tie counts one half: 0.4 beats 0.1, ties 0.4; 0.8 beats both -> 3.5/4.
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.4, 0.8])) == pytest.approx(0.875)


def test_image_auroc_perfect_and_inverted() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])

    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0
    assert image_auroc(labels.astype(bool), scores) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=500)
    # Rounded scores give many ties.
    scores = np.round(rng.normal(size=500) + labels * 0.5, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)

    masks = rng.random((3, 20, 30)) < 0.1
    maps = np.round(rng.random((3, 20, 30)) + masks * 0.3, 2)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_hand_computed() -> None:
    # One defect pixel scored 0.6 against good pixels 0.7, 0.2, 0.1: beats two of three.
    masks = np.array([[[True, False], [False, False]]])
    maps = np.array([[[0.6, 0.7], [0.2, 0.1]]])
    assert pixel_auroc(masks, maps) == pytest.approx(2 / 3)


def test_auroc_errors() -> None:
    with pytest.raises(MetricError, match="all 3 labels are good"):
        image_auroc(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(MetricError, match="all 2 labels are defect"):
        image_auroc(np.array([1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(MetricError, match=r"labels have shape \(3,\) but scores have shape \(2,\)"):
        image_auroc(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(MetricError, match="empty"):
        image_auroc(np.array([]), np.array([]))
    with pytest.raises(MetricError, match=r"found \[2\]"):
        image_auroc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(MetricError, match="all 4 labels are good"):
        pixel_auroc(np.zeros((1, 2, 2), dtype=bool), np.zeros((1, 2, 2)))
    with pytest.raises(MetricError, match=r"\(N, H, W\)"):
        pixel_auroc(np.zeros((2, 2), dtype=bool), np.zeros((2, 2)))


def test_roc_curve_points_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.4, 0.8])
    # thresholds: inf -> nothing; 0.8 -> 1 TP; 0.4 -> 2 TP + 1 FP; 0.1 -> all.
    fpr, tpr, thresholds = roc_curve_points(labels, scores)

    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.1])
    # The trapezoid area under these points is the AUROC (0.875 by hand above).
    assert np.trapezoid(tpr, fpr) == pytest.approx(image_auroc(labels, scores))


def test_rates_at_threshold_hand_computed() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.5, 0.6, 0.5, 0.9])

    # t = 0.5: ">=" flags 0.5, 0.6, 0.5, 0.9 -> TP 2, FP 2, TN 1, FN 0.
    assert rates_at_threshold(labels, scores, 0.5) == {
        "fnr": 0.0, "fpr": pytest.approx(2 / 3), "tp": 2, "fp": 2, "tn": 1, "fn": 0,
    }
    # t = 0.55: flags 0.6 and 0.9 -> TP 1, FP 1, TN 2, FN 1.
    assert rates_at_threshold(labels, scores, 0.55) == {
        "fnr": 0.5, "fpr": pytest.approx(1 / 3), "tp": 1, "fp": 1, "tn": 2, "fn": 1,
    }


def test_rates_without_defects_nan_fnr() -> None:
    rates = rates_at_threshold(np.array([0, 0]), np.array([0.1, 0.9]), 0.5)

    assert np.isnan(rates["fnr"])
    assert rates["fpr"] == 0.5
    with pytest.raises(MetricError, match="NaN"):
        rates_at_threshold(np.array([0, 1]), np.array([0.1, 0.9]), float("nan"))


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # Normal scores 0.1, 0.2, 0.2, 0.3, 0.4 (n = 5), and the fraction >= t is
        # t=0.1: 5/5, t=0.2: 4/5, t=0.3: 2/5, t=0.4: 1/5
        (1.0, 0.1),
        (0.8, 0.2),
        (0.5, 0.3),
        (0.4, 0.3),
        (0.2, 0.4),
        # Tie: 0.7 allows 3.5 samples, but the tie at 0.2 flags 4, so 0.3 (2/5).
        (0.7, 0.3),
    ],
)
def test_threshold_for_fpr_hand_computed(target: float, expected: float) -> None:
    normal = np.array([0.3, 0.1, 0.2, 0.4, 0.2])

    threshold = threshold_for_fpr(normal, target)

    assert threshold == expected
    assert np.mean(normal >= threshold) <= target


def test_threshold_for_zero_fpr() -> None:
    normal = np.array([0.3, 0.1, 0.4])

    threshold = threshold_for_fpr(normal, 0.0)

    assert threshold > 0.4
    assert threshold == np.nextafter(0.4, np.inf)
    with pytest.raises(MetricError, match="target_fpr"):
        threshold_for_fpr(normal, 1.5)
    with pytest.raises(MetricError, match="empty"):
        threshold_for_fpr(np.array([]), 0.1)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # Defect scores 0.1, 0.2, 0.2, 0.4, 0.8 (n = 5), and the fraction < t is
        # t=0.1: 0/5, t=0.2: 1/5, t=0.4: 3/5, t=0.8: 4/5
        (0.0, 0.1),
        (0.2, 0.2),
        (0.6, 0.4),
        (0.79, 0.4),
        (0.8, 0.8),
        (0.99, 0.8),
        # Tie: 0.5 allows 2.5 misses, but moving past the tie at 0.2 misses 3,
        # so the threshold stays at 0.2 (1/5 missed).
        (0.5, 0.2),
        (0.3, 0.2),
    ],
)
def test_threshold_for_fnr_hand_computed(target: float, expected: float) -> None:
    defects = np.array([0.4, 0.2, 0.8, 0.1, 0.2])

    threshold = threshold_for_fnr(defects, target)

    assert threshold == expected
    assert np.mean(defects < threshold) <= target


def test_threshold_for_fnr_errors() -> None:
    with pytest.raises(MetricError, match="target_fnr"):
        threshold_for_fnr(np.array([0.1, 0.2]), 1.0)
    with pytest.raises(MetricError, match="target_fnr"):
        threshold_for_fnr(np.array([0.1, 0.2]), -0.1)
    with pytest.raises(MetricError, match="empty"):
        threshold_for_fnr(np.array([]), 0.1)
    with pytest.raises(MetricError, match="NaN"):
        threshold_for_fnr(np.array([0.1, np.nan]), 0.1)
