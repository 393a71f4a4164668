"""Fit and evaluate the RGB detector on one data set and print one Markdown table row.

    .venv/bin/python benchmarks/bench_detector_results.py --data ../shared/data/mvtec3d_tire \\
        --backbone dinov2_vits14 --image-size 336 --layers 5 [--coreset-ratio 0.1]

Columns: data set, backbone, input size, layers or stages, image AUROC, pixel
AUROC, AUPRO up to 30% FPR, ms per frame, peak RSS in MB, fit time in s.

- The detector is fitted on ``train/good`` and calibrated on ``validation/good``.
  A data set without a validation split (MVTec AD layout) holds out every
  tenth ``train/good`` image for calibration instead and fits on the rest. The
  threshold does not enter the AUROC and AUPRO columns.
- ms per frame: the median wall time of ``PatchCoreDetector.predict`` on one
  decoded image at a time, after one warm-up call, over up to ``--timed-images``
  test images. Image decoding is not timed.
- Peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of this process at the
  end, so run each configuration in its own process.

Timings depend on the machine and on other load on it; the script prints the
load averages before and after the run to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from qcstream.models import data as data_io
from qcstream.models.config import DetectorConfig
from qcstream.models.detector import PatchCoreDetector
from qcstream.models.efficientnet import DEFAULT_FEATURE_STAGES
from qcstream.models.evaluate import evaluate

logger = logging.getLogger(__name__)

HEADER = (
    "| data set | backbone | input | layers / stages | I-AUROC | P-AUROC | AUPRO@30% "
    "| ms / frame | peak RSS MB | fit s |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)
HOLDOUT_EVERY = 10


def split_normal_images(root: Path) -> tuple[list[Path], list[Path], str]:
    """Return training and calibration image paths, and how the calibration set was chosen."""
    train = [sample.image_path for sample in data_io.discover(root, "train") if sample.label == 0]
    if (root / "validation").is_dir():
        validation = [sample.image_path for sample in data_io.discover(root, "validation") if sample.label == 0]
        return train, validation, "validation/good"

    held_out = train[HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY]
    kept = [path for i, path in enumerate(train) if (i + 1) % HOLDOUT_EVERY]
    return kept, held_out, f"every {HOLDOUT_EVERY}th train/good image"


def median_ms_per_frame(detector: PatchCoreDetector, root: Path, n_images: int) -> float:
    """Time ``predict`` on decoded test images one at a time, after one warm-up call."""
    paths = [sample.image_path for sample in data_io.discover(root, "test")][:n_images]
    images = [data_io.load_rgb(path) for path in paths]
    detector.predict(images[0])

    times = []
    for image in images:
        started = time.perf_counter()
        detector.predict(image)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def load_averages() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="data set root (MVTec AD or MVTec 3D-AD layout)")
    parser.add_argument("--backbone", default="dinov2_vits14", choices=("dinov2_vits14", "efficientnet_lite0"))
    parser.add_argument("--image-size", type=int, default=336, help="square network input side in pixels")
    parser.add_argument("--layers", default="5", help="comma-separated ViT blocks (ignored by efficientnet_lite0)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--timed-images", type=int, default=30, help="test images timed one at a time")
    parser.add_argument("--header", action="store_true", help="print the table header before the row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    print(f"load averages before: {load_averages()}", file=sys.stderr)
    layers = tuple(int(part) for part in args.layers.split(","))
    config = DetectorConfig(
        backbone=args.backbone,
        image_size=(args.image_size, args.image_size),
        layers=layers,
        coreset_ratio=args.coreset_ratio,
    )
    train, validation, calibration_set = split_normal_images(args.data)
    print(f"fitting on {len(train)} images, calibrating on {len(validation)} ({calibration_set})", file=sys.stderr)

    detector = PatchCoreDetector(config)
    started = time.perf_counter()
    detector.fit(train, validation, progress=False)
    fit_seconds = time.perf_counter() - started
    print(f"memory bank {tuple(detector.memory_bank_.shape)}", file=sys.stderr)

    result = evaluate(detector, args.data, progress=False)
    ms_per_frame = median_ms_per_frame(detector, args.data, args.timed_images)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(result.format(), file=sys.stderr)
    print(f"load averages after: {load_averages()}", file=sys.stderr)

    if args.backbone == "efficientnet_lite0":
        feature_source = "stages " + ",".join(str(stage) for stage in DEFAULT_FEATURE_STAGES)
    else:
        feature_source = "layers " + ",".join(str(layer) for layer in layers)
    if args.header:
        print(HEADER)
    print(
        f"| {args.data.name} | {args.backbone} | {args.image_size} | {feature_source} "
        f"| {result.image_auroc:.3f} | {result.pixel_auroc:.3f} | {result.aupro:.3f} "
        f"| {ms_per_frame:.0f} | {peak_rss_mb:.0f} | {fit_seconds:.0f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
