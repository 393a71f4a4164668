"""How much the tire metrics move when nothing but the coreset seed changes.

    .venv/bin/python benchmarks/study_metric_noise.py --model-dir /tmp/qbench-rgb64/fp32 --seeds 0,1,2,3,4

Refits the memory bank and threshold of a fitted RGB model with each coreset
seed (same backbone, same training frames) and prints image AUROC, pixel AUROC
and AUPRO on the test split for each. The spread is the resolution below which
a compressed model's change in these metrics cannot be distinguished from noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
from pathlib import Path

from qcstream.models import data as data_io
from qcstream.models.detector import PatchCoreDetector, load_detector
from qcstream.models.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="fitted float RGB model")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec3d_tire")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated coreset seeds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    source = load_detector(args.model_dir)
    train = [s.image_path for s in data_io.discover(args.data, "train")]
    validation = [s.image_path for s in data_io.discover(args.data, "validation")]
    rows = []
    print("| coreset seed | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|")
    for seed in [int(text) for text in args.seeds.split(",")]:
        detector = PatchCoreDetector(dataclasses.replace(source.config, seed=seed))
        detector._extractor = source.extractor
        detector.fit(train, validation, progress=False)
        result = evaluate(detector, args.data, progress=False)
        rows.append((result.image_auroc, result.pixel_auroc, result.aupro))
        print(f"| {seed} | {result.image_auroc:.3f} | {result.pixel_auroc:.3f} | {result.aupro:.3f} |", flush=True)
    for name, values in zip(("image AUROC", "pixel AUROC", "AUPRO"), zip(*rows)):
        print(f"{name}: min {min(values):.3f}, max {max(values):.3f}, standard deviation {statistics.stdev(values):.3f}")


if __name__ == "__main__":
    main()
