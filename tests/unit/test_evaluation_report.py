"""The HTML evaluation report on a tiny synthetic test set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcstream.models.data import Sample
from qcstream.models.evaluate import ScoredSet, summarize
from qcstream.models.evaluation_report import worst_false_alarms, worst_misses, write_report

# Six 24x32 images: good 0..2, defects 3..5 (types cut, cut, hole).
TYPES = ["good", "good", "good", "cut", "cut", "hole"]
LABELS = np.array([0, 0, 0, 1, 1, 1])
SCORES = np.array([0.20, 0.70, 0.10, 0.90, 0.40, 0.30])
THRESHOLD = 0.5


def _scored(root: Path) -> ScoredSet:
    rng = np.random.default_rng(0)
    samples, maps, masks = [], [], []
    for index, (defect_type, label) in enumerate(zip(TYPES, LABELS)):
        folder = root / "test" / defect_type / "rgb"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:03d}.png"
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)

        mask = np.zeros((24, 32), dtype=bool)
        if label:
            mask[8:14, 10:18] = True
        amap = rng.random((24, 32)) * 0.3
        amap[mask] += SCORES[index]
        samples.append(Sample(image_path=path, mask_path=None, label=int(label), defect_type=defect_type))
        maps.append(amap.astype(np.float32))
        masks.append(mask)
    return ScoredSet(root=root, samples=samples, scores=SCORES, maps=maps, masks=masks, seconds=0.6)


def test_worst_examples_by_hand() -> None:
    # Defects 3 (0.9), 4 (0.4), 5 (0.3): lowest first -> 5, 4, 3.
    assert worst_misses(LABELS, SCORES, 2) == [5, 4]
    assert worst_misses(LABELS, SCORES, 10) == [5, 4, 3]
    # Good 0 (0.2), 1 (0.7), 2 (0.1): highest first -> 1, 0, 2.
    assert worst_false_alarms(LABELS, SCORES, 2) == [1, 0]
    # Ties keep file order.
    assert worst_misses(np.array([1, 1, 1]), np.array([0.5, 0.2, 0.2]), 2) == [1, 2]
    with pytest.raises(ValueError, match="example count"):
        worst_misses(LABELS, SCORES, -1)


def test_report_files_reference_and_decode(tmp_path: Path) -> None:
    scored = _scored(tmp_path / "data")
    result = summarize(scored, threshold=THRESHOLD, model_version="m-1")

    index = write_report(tmp_path / "report", result, scored, score_range=(0.0, 1.0), n_examples=2)

    report = tmp_path / "report"
    assert index == report / "index.html"
    page = index.read_text()
    referenced = re.findall(r'<img src="([^"]+)"', page)
    assert referenced == [
        "roc.png", "pro.png",
        "overlays/miss_01.png", "overlays/miss_02.png",
        "overlays/false_alarm_01.png", "overlays/false_alarm_02.png",
    ]
    for name in referenced:
        with Image.open(report / name) as image:
            image.load()
            assert image.width > 0
    with Image.open(report / "overlays/miss_01.png") as image:
        assert image.size == (32, 24)

    # The worst miss is hole/005 (0.30, missed), then cut/004 (0.40, missed).
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert captions[0].startswith("test/hole/rgb/005.png<br>type hole")
    assert "score 0.3000" in captions[0]
    assert "threshold 0.5000" in captions[0]
    assert "missed" in captions[0]
    assert captions[1].startswith("test/cut/rgb/004.png")
    # The worst false alarm is good/001 (0.70, flagged), then good/000 (0.20, passed).
    assert captions[2].startswith("test/good/rgb/001.png")
    assert "false alarm" in captions[2]
    assert captions[3].startswith("test/good/rgb/000.png")
    assert "passed" in captions[3]
    assert "<td>hole</td><td>1</td>" in page

    metrics = json.loads((report / "metrics.json").read_text())
    assert [e["file"] for e in metrics["worst_misses"]] == ["test/hole/rgb/005.png", "test/cut/rgb/004.png"]
    assert metrics["fnr"] == pytest.approx(2 / 3)


def test_overlay_shows_mask_outline(tmp_path: Path) -> None:
    scored = _scored(tmp_path / "data")
    result = summarize(scored, threshold=THRESHOLD, model_version="m-1")

    write_report(tmp_path / "report", result, scored, score_range=(0.0, 1.0), n_examples=1)

    with Image.open(tmp_path / "report/overlays/miss_01.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    magenta = np.all(pixels == (255, 0, 255), axis=-1)
    # The 6x8 mask at rows 8..13, cols 10..17: its border is painted, its centre is not.
    for row, col in [(8, 12), (13, 12), (10, 10), (10, 17)]:
        assert magenta[row, col]
    assert not magenta[11, 14]
    assert not magenta[0:5, 0:5].any()
