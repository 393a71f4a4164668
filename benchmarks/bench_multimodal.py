"""Fit the multimodal detector on generated scans and print one Markdown row per mode.

    .venv/bin/python benchmarks/bench_multimodal.py --parts ring,plate,bagel --output /tmp/qcstream-scans

For each part type the script writes a generated data set (unless it exists) and
fits one "rgb+xyz" model: RGB, point and fused memory banks with decision fusion.
It scores the whole test split once in every mode. For each mode it prints image
AUROC, pixel AUROC and AUPRO up to 30% FPR, over all defects and per defect
modality (3D-only, colour-only, both). ms per frame is the median of
``predict`` over ``--timed-frames`` test frames, after one warm-up call, in the
fused mode and RGB-only (the frame sent without its cloud). Peak RSS is the
whole process's ``ru_maxrss`` at the end.
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from qcstream.models import data as data_io
from qcstream.models.metrics import aupro, image_auroc, pixel_auroc
from qcstream.models.multimodal import MultimodalDetector
from qcstream.models.multimodal_config import MultimodalConfig
from qcstream.models.scan_generator import DEFECT_TYPES, write_dataset

logger = logging.getLogger(__name__)

MODALITY_NAMES = {"3d": "3D-only defects", "rgb": "colour-only defects", "both": "3D + colour defects"}


def metrics_row(samples: list[data_io.Sample], scores: np.ndarray, maps: list[np.ndarray], keep: set[str] | None) -> tuple[float, float, float]:
    """Image AUROC, pixel AUROC and AUPRO over good frames and the defect types in ``keep`` (all when None)."""
    chosen = [i for i, s in enumerate(samples) if s.label == 0 or keep is None or s.defect_type in keep]
    labels = np.array([samples[i].label for i in chosen])
    masks = [data_io.load_mask(samples[i].mask_path, maps[i].shape) for i in chosen]
    chosen_maps = [maps[i] for i in chosen]
    return image_auroc(labels, scores[chosen]), pixel_auroc(masks, chosen_maps), aupro(masks, chosen_maps, fpr_limit=0.3)


def median_ms(detector: MultimodalDetector, samples: list[data_io.Sample], with_cloud: bool) -> float:
    frames = [(data_io.load_rgb(s.image_path), data_io.load_xyz(s.xyz_path) if with_cloud else None) for s in samples]
    detector.predict(*frames[0])
    times = []
    for rgb, xyz in frames:
        started = time.perf_counter()
        detector.predict(rgb, xyz)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run_part(part: str, args: argparse.Namespace) -> list[str]:
    root = args.output / part
    if not root.is_dir():
        write_dataset(args.output, part, seed=args.seed, size=(args.size, args.size), progress=False)
    config = MultimodalConfig(
        point_features="point_mae" if args.point_checkpoint else "fpfh",
        point_checkpoint=args.point_checkpoint,
        point_mae_points=args.point_mae_points,
        image_size=(args.size, args.size),
        cloud_size=(args.size, args.size),
        feature_grid=(args.grid, args.grid),
        fpfh_scale=args.fpfh_scale,
        image_fusion=args.image_fusion,
    )
    started = time.perf_counter()
    detector = MultimodalDetector(config).fit(data_io.discover(root, "train"), data_io.discover(root, "validation"), progress=False)
    fit_seconds = time.perf_counter() - started

    test = data_io.discover(root, "test")
    outputs = detector.score_modes(test)
    timed = test[: args.timed_frames]
    fused_ms = median_ms(detector, timed, with_cloud=True)
    rgb_ms = median_ms(detector, timed, with_cloud=False)

    rows = []
    for mode, (scores, maps) in outputs.items():
        overall = metrics_row(test, scores, maps, None)
        per_modality = []
        for modality in ("3d", "rgb", "both"):
            keep = {name for name, shows in DEFECT_TYPES.items() if shows == modality}
            per_modality.append(metrics_row(test, scores, maps, keep))
        ms = {"rgb+xyz": f"{fused_ms:.0f}", "rgb": f"{rgb_ms:.0f}"}.get(mode, "-")
        cells = [f"{value:.3f}" for value in overall] + [f"{i:.2f} / {a:.2f}" for i, _, a in per_modality]
        features = "Point-MAE" if args.point_checkpoint else "FPFH"
        label = mode if mode == "rgb" else f"{mode} ({features})"
        rows.append(f"| {part} | {label} | " + " | ".join(cells) + f" | {ms} | {fit_seconds:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="ring,plate,bagel", help="comma-separated part types")
    parser.add_argument("--output", type=Path, default=Path("/tmp/qcstream-scans"), help="folder of the generated data sets")
    parser.add_argument("--size", type=int, default=224, help="scan side in pixels")
    parser.add_argument("--grid", type=int, default=28, help="feature grid side")
    parser.add_argument("--fpfh-scale", type=float, default=MultimodalConfig().fpfh_scale, help="FPFH radii in multiples of the point spacing")
    parser.add_argument("--image-fusion", default=MultimodalConfig().image_fusion, choices=("map_max", "svm"), help="how the fused image score is made")
    parser.add_argument("--point-checkpoint", help="Point-MAE checkpoint: use Point-MAE point features instead of FPFH")
    parser.add_argument("--point-mae-points", type=int, default=MultimodalConfig().point_mae_points, help="points per cloud for Point-MAE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timed-frames", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    print(
        "| part | mode | I-AUROC | P-AUROC | AUPRO@30% | 3D-only I / PRO | colour-only I / PRO | both I / PRO "
        "| ms / frame | fit s |\n|---|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    for part in args.parts.split(","):
        for row in run_part(part, args):
            print(row, flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
