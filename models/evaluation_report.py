"""An evaluation report that a quality engineer opens in a browser.

``write_report`` fills a folder with ``index.html`` (self-contained, images by
relative path), ``metrics.json``, ``roc.png``, ``pro.png`` and heat-map overlays
of the worst misses and worst false alarms, with the ground-truth defect
outline drawn on each. Plots use matplotlib's Agg canvas directly, so no
display and no global backend switch are needed.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage

from qcstream.models import data as data_io
from qcstream.models import metrics
from qcstream.models.evaluate import EvaluationResult, ScoredSet
from qcstream.models.overlay import render_overlay

logger = logging.getLogger(__name__)

ROC_FILE = "roc.png"
PRO_FILE = "pro.png"
INDEX_FILE = "index.html"
METRICS_FILE = "metrics.json"
OVERLAY_FOLDER = "overlays"
#: Ground-truth outline colour on overlays: magenta, which the jet colour map never uses.
CONTOUR_RGB = (255, 0, 255)


@dataclasses.dataclass
class Example:
    """One image shown in the report, with the facts its caption shows."""

    index: int
    file: str
    defect_type: str
    score: float
    flagged: bool
    overlay: str


def worst_misses(labels: np.ndarray, scores: np.ndarray, count: int) -> list[int]:
    """Return the indices of the ``count`` lowest-scored defective images, lowest first (ties by index)."""
    return _extreme(np.asarray(labels) == 1, np.asarray(scores, dtype=np.float64), count)


def worst_false_alarms(labels: np.ndarray, scores: np.ndarray, count: int) -> list[int]:
    """Return the indices of the ``count`` highest-scored good images, highest first (ties by index)."""
    return _extreme(np.asarray(labels) == 0, -np.asarray(scores, dtype=np.float64), count)


def write_report(
    report_dir: str | Path,
    result: EvaluationResult,
    scored: ScoredSet,
    score_range: tuple[float, float],
    n_examples: int = 6,
) -> Path:
    """Write the report into ``report_dir`` (created if needed) and return the path of ``index.html``.

    ``score_range`` is the ``(vmin, vmax)`` of the overlay colours; pass the
    detector's ``score_range`` so that the overlays match the live ones.
    """
    report_dir = Path(report_dir)
    (report_dir / OVERLAY_FOLDER).mkdir(parents=True, exist_ok=True)
    logger.info("Writing the evaluation report to %s", report_dir)

    _save_figure(_roc_figure(result, scored), report_dir / ROC_FILE)
    _save_figure(_pro_figure(result, scored), report_dir / PRO_FILE)

    labels = scored.labels
    misses = [
        _write_example(report_dir, scored, index, f"miss_{rank:02d}.png", result.threshold, score_range)
        for rank, index in enumerate(worst_misses(labels, scored.scores, n_examples), start=1)
    ]
    alarms = [
        _write_example(report_dir, scored, index, f"false_alarm_{rank:02d}.png", result.threshold, score_range)
        for rank, index in enumerate(worst_false_alarms(labels, scored.scores, n_examples), start=1)
    ]

    summary = result.to_dict()
    summary["worst_misses"] = [_example_dict(example) for example in misses]
    summary["worst_false_alarms"] = [_example_dict(example) for example in alarms]
    (report_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")

    index_path = report_dir / INDEX_FILE
    index_path.write_text(_html(result, misses, alarms), encoding="utf-8")
    logger.info("Report written: %s (%d misses, %d false alarms shown)", index_path, len(misses), len(alarms))
    return index_path


# --- selection ----------------------------------------------------------------------

def _extreme(candidates: np.ndarray, keys: np.ndarray, count: int) -> list[int]:
    """Return up to ``count`` candidate indices with the smallest ``keys``, ties by index."""
    if count < 0:
        raise ValueError(f"invalid example count {count}: expected 0 or more")
    indices = np.flatnonzero(candidates)
    order = np.argsort(keys[indices], kind="stable")
    return [int(i) for i in indices[order][:count]]


# --- plots --------------------------------------------------------------------------

def _roc_figure(result: EvaluationResult, scored: ScoredSet) -> Figure:
    """Image-level ROC: all defects, each type against the good images, and the operating point."""
    figure = Figure(figsize=(6, 5), dpi=100)
    axes = figure.add_subplot()
    labels, scores, types = scored.labels, scored.scores, scored.defect_types

    fpr, tpr, _ = metrics.roc_curve_points(labels, scores)
    axes.plot(fpr, tpr, color="black", linewidth=2, label=f"all defects (AUROC {result.image_auroc:.3f})")
    for row in result.per_type:
        keep = np.array([label == 0 or t == row.defect_type for t, label in zip(types, labels)])
        type_fpr, type_tpr, _ = metrics.roc_curve_points(labels[keep], scores[keep])
        axes.plot(type_fpr, type_tpr, linewidth=1, alpha=0.8, label=f"{row.defect_type} (AUROC {_text(row.image_auroc, '.3f')})")

    if math.isfinite(result.fpr) and math.isfinite(result.fnr):
        axes.plot([result.fpr], [1.0 - result.fnr], "o", color="red", markersize=8, clip_on=False, zorder=5,
                  label=f"threshold {result.threshold:.3f}: FPR {result.fpr:.2f}, FNR {result.fnr:.2f}")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    axes.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="false-positive rate (good images flagged)",
             ylabel="true-positive rate (defective images flagged)", title="Image-level ROC")
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3)
    return figure


def _pro_figure(result: EvaluationResult, scored: ScoredSet) -> Figure:
    """Per-region-overlap curve with the FPR limit marked and the integrated area shaded."""
    figure = Figure(figsize=(6, 5), dpi=100)
    axes = figure.add_subplot()
    limit = result.aupro_fpr_limit
    grid = np.union1d(np.linspace(0.0, 1.0, 2001), [limit])

    fpr, pro = metrics.pro_curve(scored.masks, scored.maps)
    curve = np.interp(grid, fpr, pro)
    inside = grid <= limit
    axes.fill_between(grid[inside], curve[inside], color="tab:blue", alpha=0.25,
                      label=f"integrated area: AUPRO {result.aupro:.3f}")
    axes.plot(grid, curve, color="tab:blue", linewidth=2, label="all defects")
    axes.axvline(limit, color="red", linestyle="--", linewidth=1.5, label=f"FPR limit {limit:.0%}")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="pixel false-positive rate (good pixels above threshold)",
             ylabel="per-region overlap", title="Per-region overlap (PRO) curve")
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3)
    del fpr, pro
    return figure


def _save_figure(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))


# --- overlays -----------------------------------------------------------------------

def _write_example(
    report_dir: Path, scored: ScoredSet, index: int, name: str, threshold: float, score_range: tuple[float, float]
) -> Example:
    sample = scored.samples[index]
    rgb = data_io.load_rgb(sample.image_path)
    png = render_overlay(rgb, scored.maps[index], *score_range)
    overlay = _draw_contour(np.array(Image.open(io.BytesIO(png)).convert("RGB")), scored.masks[index])
    relative = f"{OVERLAY_FOLDER}/{name}"
    Image.fromarray(overlay).save(report_dir / relative)

    score = float(scored.scores[index])
    return Example(index=index, file=scored.display_name(index), defect_type=sample.defect_type,
                   score=score, flagged=score >= threshold, overlay=relative)


def _draw_contour(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Paint a 2-pixel outline of each ground-truth region onto ``rgb``."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return rgb
    edge = mask & ~ndimage.binary_erosion(mask)
    outline = ndimage.binary_dilation(edge)
    painted = rgb.copy()
    painted[outline] = CONTOUR_RGB
    return painted


def _example_dict(example: Example) -> dict:
    return {"file": example.file, "defect_type": example.defect_type, "score": example.score,
            "flagged": example.flagged, "overlay": example.overlay}


# --- HTML ---------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1280px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
.plots img { width: 48%; min-width: 360px; border: 1px solid #ddd; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 300px; }
figure img { width: 300px; border: 1px solid #ddd; }
figcaption { font-size: 12px; line-height: 1.4; }
.bad { color: #b00020; font-weight: bold; } .ok { color: #1b5e20; font-weight: bold; }
.note { font-size: 13px; color: #555; }
"""


def _html(result: EvaluationResult, misses: list[Example], alarms: list[Example]) -> str:
    esc = html.escape
    n_good = result.n_images - result.n_defective
    overall = f"""
<table>
<tr><th>metric</th><th>value</th></tr>
<tr><td>images</td><td>{result.n_images} ({result.n_defective} defective, {n_good} good)</td></tr>
<tr><td>image AUROC</td><td>{_text(result.image_auroc, '.4f')}</td></tr>
<tr><td>pixel AUROC</td><td>{_text(result.pixel_auroc, '.4f')}</td></tr>
<tr><td>AUPRO (FPR &le; {result.aupro_fpr_limit:.0%})</td><td>{_text(result.aupro, '.4f')}</td></tr>
<tr><td>threshold</td><td>{result.threshold:.4f} (calibrated for {esc(result.calibration.upper())} {_text(result.calibration_target, '.3f')})</td></tr>
<tr><td>false-negative rate (missed defects)</td><td>{_text(result.fnr, '.3f')} ({result.n_missed}/{result.n_defective})</td></tr>
<tr><td>false-positive rate (false alarms)</td><td>{_text(result.fpr, '.3f')} ({result.n_false_alarms}/{n_good})</td></tr>
<tr><td>scoring time</td><td>{result.ms_per_image:.0f} ms per image</td></tr>
</table>"""

    type_rows = "\n".join(
        f"<tr><td>{esc(row.defect_type)}</td><td>{row.n_images}</td><td>{_text(row.image_auroc, '.4f')}</td>"
        f"<td>{_text(row.pixel_auroc, '.4f')}</td><td>{_text(row.aupro, '.4f')}</td>"
        f"<td>{row.n_missed}/{row.n_images}</td><td>{_text(row.fnr, '.3f')}</td></tr>"
        for row in result.per_type
    )
    per_type = f"""
<p class="note">Each defect type against all {n_good} good images; FNR at the threshold {result.threshold:.4f}.</p>
<table>
<tr><th>defect type</th><th>images</th><th>image AUROC</th><th>pixel AUROC</th><th>AUPRO</th><th>missed</th><th>FNR</th></tr>
{type_rows}
</table>"""

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation of {esc(result.model_version)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Evaluation of model {esc(result.model_version)}</h1>
<p class="note">Test set: {esc(result.test_folder)}. An image is flagged as defective when its score is at or above the threshold.</p>
<h2>Overall</h2>
{overall}
<h2>Per defect type</h2>
{per_type}
<h2>Curves</h2>
<div class="plots"><img src="{ROC_FILE}" alt="image-level ROC curve"> <img src="{PRO_FILE}" alt="PRO curve"></div>
<h2>Worst misses</h2>
<p class="note">Defective images with the lowest scores, lowest first. Magenta outlines the ground-truth defect;
the heat map runs from dark blue (normal) to dark red (most anomalous).</p>
{_gallery(misses, result.threshold, bad_when_flagged=False, bad_word="missed", good_word="caught")}
<h2>Worst false alarms</h2>
<p class="note">Good images with the highest scores, highest first.</p>
{_gallery(alarms, result.threshold, bad_when_flagged=True, bad_word="false alarm", good_word="passed")}
</body>
</html>
"""


def _gallery(examples: list[Example], threshold: float, bad_when_flagged: bool, bad_word: str, good_word: str) -> str:
    """Return a grid of captioned overlays; an example is an error when its flag equals ``bad_when_flagged``."""
    if not examples:
        return '<p class="note">None in this test set.</p>'
    figures = []
    for example in examples:
        is_bad = example.flagged == bad_when_flagged
        verdict = f'<span class="bad">{bad_word}</span>' if is_bad else f'<span class="ok">{good_word}</span>'
        figures.append(
            f'<figure><img src="{html.escape(example.overlay)}" alt="{html.escape(example.file)}">'
            f"<figcaption>{html.escape(example.file)}<br>type {html.escape(example.defect_type)} &middot; "
            f"score {example.score:.4f} &middot; threshold {threshold:.4f} &middot; {verdict}</figcaption></figure>"
        )
    return '<div class="gallery">\n' + "\n".join(figures) + "\n</div>"


def _text(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else "n/a"
