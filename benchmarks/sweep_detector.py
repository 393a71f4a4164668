"""Sweep detector settings on a developer split and print a Markdown table.

    .venv/bin/python benchmarks/sweep_detector.py --data ../shared/data/mvtec3d_tire \\
        --backbone dinov2_vits14 --image-sizes 224,336,448 --layers "5;8;3,5;5,8" \\
        --jsonl sweep.jsonl

The test split is cut in two halves of equal make-up: within each defect type
(``good`` included), images at even positions form the developer split and
images at odd positions the held-out split. Settings are chosen on the
developer split only; the held-out columns show how far that choice carries.

Each configuration is fitted on ``train/good`` (calibrated on
``validation/good``, or on every tenth ``train/good`` image when there is no
validation split), its test images are scored once, and the metrics are
computed on both halves. One JSON line per configuration is appended to
``--jsonl`` so that an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from qcstream.models import metrics
from qcstream.models.config import DetectorConfig
from qcstream.models.detector import PatchCoreDetector
from qcstream.models.evaluate import ScoredSet, score_test_set

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_detector_results import split_normal_images  # noqa: E402

logger = logging.getLogger(__name__)

HEADER = (
    "| backbone | input | layers | dev I-AUROC | dev P-AUROC | dev AUPRO | dev mean "
    "| held-out I-AUROC | held-out P-AUROC | held-out AUPRO | fit s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def developer_split(scored: ScoredSet) -> tuple[np.ndarray, np.ndarray]:
    """Return the indices of the developer and held-out halves of a scored test set.

    Within each defect type, samples at even positions (in discovery order) go to
    the developer half and samples at odd positions to the held-out half.
    """
    seen: dict[str, int] = {}
    developer, held_out = [], []
    for index, sample in enumerate(scored.samples):
        position = seen.get(sample.defect_type, 0)
        seen[sample.defect_type] = position + 1
        (developer if position % 2 == 0 else held_out).append(index)
    return np.array(developer), np.array(held_out)


def subset_metrics(scored: ScoredSet, indices: np.ndarray) -> dict[str, float]:
    """Image AUROC, pixel AUROC and AUPRO up to 30% FPR over the samples at ``indices``."""
    labels = scored.labels[indices]
    masks = [scored.masks[i] for i in indices]
    maps = [scored.maps[i] for i in indices]
    return {
        "image_auroc": metrics.image_auroc(labels, scored.scores[indices]),
        "pixel_auroc": metrics.pixel_auroc(masks, maps),
        "aupro": metrics.aupro(masks, maps, fpr_limit=0.3),
    }


def run_one(data: Path, config: DetectorConfig) -> dict:
    """Fit ``config``, score the test split once, and measure both halves."""
    train, validation, _ = split_normal_images(data)
    detector = PatchCoreDetector(config)

    started = time.perf_counter()
    detector.fit(train, validation, progress=False)
    fit_seconds = time.perf_counter() - started

    scored = score_test_set(detector, data, progress=False)
    developer, held_out = developer_split(scored)
    dev = subset_metrics(scored, developer)
    return {
        "data": data.name,
        "backbone": config.backbone,
        "image_size": list(config.image_size),
        "layers": list(config.layers),
        "coreset_ratio": config.coreset_ratio,
        "developer": dev,
        "developer_mean": float(np.mean(list(dev.values()))),
        "held_out": subset_metrics(scored, held_out),
        "all": subset_metrics(scored, np.arange(len(scored.samples))),
        "n_developer": int(developer.size),
        "n_held_out": int(held_out.size),
        "fit_seconds": fit_seconds,
        "memory_bank": list(detector.memory_bank_.shape),
    }


def format_row(row: dict) -> str:
    developer, held_out = row["developer"], row["held_out"]
    layers = ",".join(map(str, row["layers"])) if row["backbone"] != "efficientnet_lite0" else "stages 2,4"
    return (
        f"| {row['backbone']} | {row['image_size'][0]} | {layers} "
        f"| {developer['image_auroc']:.3f} | {developer['pixel_auroc']:.3f} | {developer['aupro']:.3f} "
        f"| {row['developer_mean']:.3f} "
        f"| {held_out['image_auroc']:.3f} | {held_out['pixel_auroc']:.3f} | {held_out['aupro']:.3f} | {row['fit_seconds']:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="data set root (MVTec AD or MVTec 3D-AD layout)")
    parser.add_argument("--backbone", default="dinov2_vits14", choices=("dinov2_vits14", "efficientnet_lite0"))
    parser.add_argument("--image-sizes", default="336", help="comma-separated square input sides, e.g. 224,336,448")
    parser.add_argument("--layers", default="5", help="semicolon-separated layer sets, e.g. '5;8;5,8' (ignored by efficientnet_lite0)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--jsonl", type=Path, help="append one JSON line per configuration to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    sizes = [int(side) for side in args.image_sizes.split(",")]
    layer_sets = [tuple(int(layer) for layer in group.split(",")) for group in args.layers.split(";")]
    if args.backbone == "efficientnet_lite0":
        layer_sets = [DetectorConfig().layers]

    print(HEADER, flush=True)
    for side in sizes:
        for layers in layer_sets:
            config = DetectorConfig(
                backbone=args.backbone, image_size=(side, side), layers=layers, coreset_ratio=args.coreset_ratio
            )
            row = run_one(args.data, config)
            print(format_row(row), flush=True)
            if args.jsonl:
                with args.jsonl.open("a") as jsonl:
                    jsonl.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
