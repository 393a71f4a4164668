"""Calibrating for a target FNR, and `qcstream calibrate` / `qcstream evaluate --report`, on real tire images."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcstream.cli import main
from qcstream.models import data as data_io
from qcstream.models.detector import load_detector


def _labelled_folder(tire_root: Path, target: Path, counts: dict[str, int]) -> Path:
    """Link the first images of some test types into a small MVTec 3D-AD folder."""
    for defect_type, count in counts.items():
        source = tire_root / "test" / defect_type
        for sub in ("rgb", "gt"):
            (target / "test" / defect_type / sub).mkdir(parents=True)
        for image in sorted((source / "rgb").glob("*.png"))[:count]:
            (target / "test" / defect_type / "rgb" / image.name).symlink_to(image)
            mask = source / "gt" / image.name
            if mask.is_file():
                (target / "test" / defect_type / "gt" / image.name).symlink_to(mask)
    return target


def test_calibrate_for_fnr_round_trips(fitted_model_dir, tire_root, tmp_path):
    detector = load_detector(fitted_model_dir)
    old_version = detector.version
    defects = [s.image_path for s in data_io.discover(tire_root, "test") if s.defect_type == "cut"][:5]

    threshold = detector.calibrate_for_fnr(defects, 0.2, progress=False)

    scores, _ = detector.score(defects)
    assert len(set(scores.tolist())) == 5
    # Five distinct scores and FNR <= 0.2: one defect may be missed, so the second lowest.
    assert threshold == sorted(scores)[1]
    assert detector.version != old_version

    detector.save(tmp_path / "model")
    again = load_detector(tmp_path / "model")
    assert (again.config.calibration, again.config.target_fnr) == ("fnr", 0.2)
    assert again.threshold_ == threshold
    assert again.version == detector.version
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["config"]["calibration"] == "fnr"


def test_cli_calibrate_fnr_then_fpr(fitted_model_dir, tire_root, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(fitted_model_dir, model_dir)
    monkeypatch.setenv("QCSTREAM_MODEL_DIR", str(model_dir))
    labelled = _labelled_folder(tire_root, tmp_path / "labelled", {"good": 3, "hole": 4})
    before = load_detector(model_dir)

    assert main(["calibrate", "--target-fnr", "0.5", str(labelled)]) == 0

    out = capsys.readouterr().out
    after = load_detector(model_dir)
    assert (after.config.calibration, after.config.target_fnr) == ("fnr", 0.5)
    assert after.version != before.version
    assert f"threshold {after.threshold_:.4f}" in out
    # Four distinct hole scores and FNR <= 0.5: the third lowest, so exactly 2 of 4 are missed.
    assert "FNR 0.500 (2/4 defective images missed)" in out
    assert re.search(r"FPR \d\.\d{3} \(\d/3 good images flagged\)", out)

    good = tire_root / "validation" / "good"
    assert main(["calibrate", "--target-fpr", "0.1", str(good)]) == 0

    out = capsys.readouterr().out
    refitted = load_detector(model_dir)
    assert (refitted.config.calibration, refitted.config.target_fnr, refitted.config.target_fpr) == ("fpr", None, 0.1)
    assert refitted.version not in (before.version, after.version)
    # 29 validation images and FPR <= 0.1: at most 2 flagged; no defect in the folder.
    flagged = int(re.search(r"\((\d+)/29 good images flagged\)", out).group(1))
    assert flagged <= 2
    assert "FNR n/a" in out


def test_cli_calibrate_rejects_folder_without_defects(fitted_model_dir, tire_root, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(fitted_model_dir, model_dir)
    labelled = _labelled_folder(tire_root, tmp_path / "labelled", {"good": 2})

    assert main(["calibrate", "--target-fnr", "0.1", str(labelled), "--model-dir", str(model_dir)]) == 1

    assert "no defective images" in capsys.readouterr().err


def test_cli_evaluate_writes_report(fitted_model_dir, tire_root, tmp_path, capsys):
    report = tmp_path / "report"
    metrics_file = report / "m.json"

    assert main(["evaluate", str(tire_root), "--model-dir", str(fitted_model_dir), "--report", str(report), "--json", str(metrics_file)]) == 0

    out, err = capsys.readouterr()
    assert "evaluation" in err  # the progress bar
    assert "per defect type" in out
    metrics = json.loads(metrics_file.read_text())
    rows = {row["defect_type"]: row for row in metrics["per_type"]}
    assert {name: row["n_images"] for name, row in rows.items()} == {"combined": 3, "contamination": 14, "cut": 14, "hole": 14}
    assert sum(row["n_missed"] for row in rows.values()) == metrics["n_missed"]
    assert metrics["fnr"] == pytest.approx(metrics["n_missed"] / 45)
    assert all(0.0 <= row["image_auroc"] <= 1.0 for row in rows.values())

    page = (report / "index.html").read_text()
    for name in re.findall(r'<img src="([^"]+)"', page):
        with Image.open(report / name) as image:
            image.load()
    assert 'src="roc.png"' in page
    assert 'src="pro.png"' in page

    full = json.loads((report / "metrics.json").read_text())
    misses = full["worst_misses"]
    assert len(misses) == 6 and all(m["defect_type"] != "good" for m in misses)
    assert [m["score"] for m in misses] == sorted(m["score"] for m in misses)
    assert sum(not m["flagged"] for m in misses) == min(6, metrics["n_missed"])
    alarms = full["worst_false_alarms"]
    assert [a["score"] for a in alarms] == sorted((a["score"] for a in alarms), reverse=True)
    assert all(a["defect_type"] == "good" for a in alarms)
    assert np.isclose(full["threshold"], metrics["threshold"])
