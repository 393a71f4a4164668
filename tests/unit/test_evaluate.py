"""Per-defect-type evaluation against values worked out by hand on tiny synthetic maps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from qcstream.models.data import Sample
from qcstream.models.evaluate import ScoredSet, per_type_metrics, summarize

# Image scores: good 0.1, 0.4, 0.35; cut 0.3, 0.8; hole 0.2, 0.35; crack 0.6 (no mask).
TYPES = ["good", "good", "good", "cut", "cut", "hole", "hole", "crack"]
LABELS = np.array([0, 0, 0, 1, 1, 1, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.3, 0.8, 0.2, 0.35, 0.6])
THRESHOLD = 0.3


def _maps_and_masks() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """2x2 maps; each defect region is one pixel."""
    def grid(a, b, c=0.0, d=0.0):
        return np.array([[a, b], [c, d]])

    maps = [
        grid(0.1, 0.2), grid(0.0, 0.3), grid(0.0, 0.0),  # good
        grid(0.9, 0.0), grid(0.0, 0.25),  # cut
        grid(0.05, 0.0), grid(0.0, 0.0),  # hole
        grid(0.0, 0.0),  # crack
    ]
    empty = np.zeros((2, 2), dtype=bool)
    masks = [
        empty, empty, empty,
        grid(1, 0).astype(bool), grid(0, 1).astype(bool),
        grid(1, 0).astype(bool), empty,  # the second hole image has no mask
        empty,  # crack: no mask at all, so its pixel metrics are undefined
    ]
    return maps, masks


def test_per_type_metrics_by_hand() -> None:
    maps, masks = _maps_and_masks()

    rows = {row.defect_type: row for row in per_type_metrics(TYPES, LABELS, SCORES, masks, maps, THRESHOLD)}

    assert list(rows) == ["crack", "cut", "hole"]
    cut, hole, crack = rows["cut"], rows["hole"], rows["crack"]
    # cut vs good: 0.3 beats 0.1 only (1 of 3), 0.8 beats all 3 -> 4/6.
    assert cut.image_auroc == pytest.approx(4 / 6)
    # hole vs good: 0.2 beats 0.1 (1); 0.35 beats 0.1, ties 0.35 (0.5) -> 2.5/6.
    assert hole.image_auroc == pytest.approx(2.5 / 6)
    assert crack.image_auroc == pytest.approx(1.0)
    # Pixels. cut: positives 0.9, 0.25 against 18 good pixels (15 zeros, 0.1, 0.2, 0.3):
    # 0.9 beats 18, 0.25 beats 17 -> 35/36.
    assert cut.pixel_auroc == pytest.approx(35 / 36)
    # hole: positive 0.05 against 19 good pixels, 16 of them zero -> 16/19.
    assert hole.pixel_auroc == pytest.approx(16 / 19)
    # AUPRO(0.3). cut: PRO 0.5 for FPR in [0, 1/18], then 1 -> (0.3 - 0.5/18) / 0.3.
    assert cut.aupro == pytest.approx((0.3 - 0.5 / 18) / 0.3)
    # hole: PRO 0 until FPR 3/19 (three good pixels score above 0.05), then 1 -> 9/19.
    assert hole.aupro == pytest.approx(9 / 19)
    assert math.isnan(crack.pixel_auroc)
    assert math.isnan(crack.aupro)
    # Misses at threshold 0.3 (score < 0.3): cut none, hole 0.2.
    assert (cut.n_images, cut.n_missed, cut.fnr) == (2, 0, 0.0)
    assert (hole.n_images, hole.n_missed, hole.fnr) == (2, 1, 0.5)
    assert (crack.n_images, crack.n_missed) == (1, 0)


def _scored() -> ScoredSet:
    maps, masks = _maps_and_masks()
    samples = [
        Sample(image_path=Path(f"/data/test/{t}/{i:03d}.png"), mask_path=None, label=int(label), defect_type=t)
        for i, (t, label) in enumerate(zip(TYPES, LABELS))
    ]
    return ScoredSet(root=Path("/data/test"), samples=samples, scores=SCORES, maps=maps, masks=masks, seconds=0.8)


def test_summarize_overall_and_strict_json() -> None:
    result = summarize(_scored(), threshold=THRESHOLD, model_version="m-1", calibration="fnr", calibration_target=0.1)

    # Defects 0.3, 0.8, 0.2, 0.35, 0.6 vs good 0.1, 0.4, 0.35: 1 + 3 + 1 + 1.5 + 3 = 9.5 of 15.
    assert result.image_auroc == pytest.approx(9.5 / 15)
    # FNR: 0.2 missed of 5; FPR: 0.4 and 0.35 flagged of 3.
    assert (result.n_missed, result.fnr) == (1, pytest.approx(0.2))
    assert (result.n_false_alarms, result.fpr) == (2, pytest.approx(2 / 3))
    assert result.ms_per_image == pytest.approx(100.0)
    assert [row.defect_type for row in result.per_type] == ["crack", "cut", "hole"]

    as_dict = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert as_dict["per_type"][0]["pixel_auroc"] is None
    assert as_dict["per_type"][1]["image_auroc"] == pytest.approx(4 / 6)
    assert as_dict["calibration"] == "fnr"


def test_format_has_per_type_table() -> None:
    text = summarize(_scored(), threshold=THRESHOLD, model_version="m-1").format()

    hole_line = next(line for line in text.splitlines() if line.strip().startswith("hole"))
    assert hole_line.split() == ["hole", "2", "0.4167", "0.8421", "0.4737", "1/2", "0.500"]
    crack_line = next(line for line in text.splitlines() if line.strip().startswith("crack"))
    assert "n/a" in crack_line
    assert "FNR 0.200 (1/5 missed)" in text
