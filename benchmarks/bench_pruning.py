"""Pruning results: the FLOPs sweep, and pruning combined with ONNX Runtime int8 quantization.

    .venv/bin/python benchmarks/bench_pruning.py rgb --data ../shared/data/mvtec3d_tire --work /tmp/pbench-rgb \\
        --output docs/pruning-rgb.md --chart docs/images/pruning-rgb.png
    .venv/bin/python benchmarks/bench_pruning.py points --data /tmp/qcstream-scans/ring \\
        --point-checkpoint point_mae_ring.pth --train-limit 20 --work /tmp/pbench-points \\
        --output docs/pruning-points.md --chart docs/images/pruning-points.png

The float model is fitted as in ``bench_quantization.py``: DINOv2 ViT-S/14 at
336 px, block 5, for ``rgb``, and the multimodal detector in ``xyz`` mode with
Point-MAE for ``points``. For each FLOPs constraint of ``--flops`` the float
model is pruned with :mod:`qcstream.models.compress` (the code behind
``qcstream compress --prune``), and the pruned model is exported to ONNX
Runtime int8; constraint 1.0 is the float model itself and its int8 export
(quantization alone). Every model is refitted on its own features.

Accuracy: image AUROC, pixel AUROC and AUPRO on the test split. Speed: all
models timed round-robin in one process, one frame at a time, medians of the
backbone alone and of the whole ``predict`` call. Memory: peak RSS of a fresh
process that loads the model and scores frames. Models and accuracy are cached
under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantization import accuracy, backbone_file, compress_row, fit_float, peak_rss_mb, split, timing  # noqa: E402

from qcstream.models.compress import CompressionPlan  # noqa: E402

logger = logging.getLogger("bench_pruning")

DEFAULT_FLOPS = (0.9, 0.8, 0.7, 0.6, 0.5)


def pruning_layout(model_dir: Path) -> dict | None:
    meta = json.loads((model_dir / "config.json").read_text())
    return meta.get("pruning") or meta.get("point_pruning")


def build_models(args, train, validation) -> dict[float, dict[str, Path]]:
    """``{flops: {"torch": dir, "int8": dir}}``; flops 1.0 is the unpruned model."""
    float_dir = fit_float(args, train, validation)
    int8 = CompressionPlan(export="onnx-int8", calibration_frames=args.calibration_frames)
    models = {1.0: {"torch": float_dir, "int8": compress_row(args, float_dir, "onnx-int8", int8, train, validation)}}
    for flops in args.flops:
        pruned = compress_row(args, float_dir, f"prune-{flops:g}", CompressionPlan(prune=flops, calibration_frames=args.calibration_frames), train, validation)
        models[flops] = {"torch": pruned, "int8": compress_row(args, pruned, f"prune-{flops:g}-int8", int8, train, validation)}
    return models


def chart(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy and backbone time against the FLOPs constraint, for PyTorch and ONNX Runtime int8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for form, style in (("torch", "o-"), ("int8", "s--")):
        series = sorted((row for row in rows if row["form"] == form), key=lambda row: row["flops"])
        flops = [row["flops"] for row in series]
        label = "PyTorch FP32" if form == "torch" else "ONNX Runtime int8"
        left.plot(flops, [row["aupro"] for row in series], style, label=f"AU PRO, {label}")
        left.plot(flops, [row["image_auroc"] for row in series], style, alpha=0.5, label=f"image AUROC, {label}")
        if all("backbone_ms" in row for row in series):
            right.plot(flops, [row["backbone_ms"] for row in series], style, label=label)
    left.set_xlabel("FLOPs constraint")
    left.set_ylabel("score")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    right.set_xlabel("FLOPs constraint")
    right.set_ylabel("backbone ms / frame (median)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["rgb", "points"])
    parser.add_argument("--data", type=Path, required=True, help="MVTec 3D-AD layout data set root")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pbench"), help="folder for models and cached rows")
    parser.add_argument("--flops", type=float, nargs="+", default=list(DEFAULT_FLOPS), help="FLOPs constraints below 1.0 to prune to")
    parser.add_argument("--output", type=Path, help="Markdown file to write the table to (default: print only)")
    parser.add_argument("--chart", type=Path, help="PNG file for the trend chart")
    parser.add_argument("--point-checkpoint", type=Path, help="Point-MAE checkpoint for `points`")
    parser.add_argument("--point-mae-points", type=int, default=8192)
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training frames")
    parser.add_argument("--calibration-frames", type=int, default=64, help="normal frames that drive pruning and calibrate int8")
    parser.add_argument("--timed-frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-frames", type=int, default=8)
    parser.add_argument("--skip-speed", action="store_true", help="accuracy only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")

    args.work.mkdir(parents=True, exist_ok=True)
    train, validation = split(args)
    models = build_models(args, train, validation)
    named = {f"{form}@{flops:g}": path for flops, forms in models.items() for form, path in forms.items()}
    load = os.getloadavg()[0]
    speed = {} if args.skip_speed else timing(args, named)
    memory = {} if args.skip_speed else {name: peak_rss_mb(args, path) for name, path in named.items()}

    rows = []
    for flops, forms in sorted(models.items(), reverse=True):
        for form, path in forms.items():
            name = f"{form}@{flops:g}"
            row = {"flops": flops, "form": form, **accuracy(args, path)}
            layout = pruning_layout(path)
            row["achieved"] = layout["flops"] if layout else 1.0
            row["heads"] = sum(layout["heads"]) if layout else None
            row["neurons"] = sum(layout["neurons"]) if layout else None
            seconds = path / "bench_compress_seconds.txt"
            row["compress_s"] = float(seconds.read_text()) if seconds.is_file() else None
            row["size_mb"] = backbone_file(path).stat().st_size / 1e6
            if name in speed:
                row.update(speed[name])
                row["rss_mb"] = memory[name]
            rows.append(row)

    reference = next(row for row in rows if row["flops"] == 1.0 and row["form"] == "torch")
    lines = [
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/bench_pruning.py'] + sys.argv[1:])}`",
        f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before timing {load:.2f}",
        "",
        "| FLOPs | form | kept FLOPs | heads | neurons | AU PRO | image AUROC | pixel AUROC | backbone ms | detector ms | backbone speed-up | backbone file | peak RSS | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        form = "PyTorch FP32" if row["form"] == "torch" else "ONNX Runtime int8"
        timed = "backbone_ms" in row
        lines.append(
            f"| {row['flops']:.1f} | {form} | {row['achieved']:.3f} | {row['heads'] if row['heads'] is not None else '-'} | "
            f"{row['neurons'] if row['neurons'] is not None else '-'} | {row['aupro']:.3f} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | "
            + (f"{row['backbone_ms']:.0f} | {row['detector_ms']:.0f} | {reference['backbone_ms'] / row['backbone_ms']:.2f}x | " if timed else "- | - | - | ")
            + f"{row['size_mb']:.1f} MB | " + (f"{row['rss_mb']:.0f} MB | " if timed else "- | ")
            + (f"{row['compress_s']:.0f} |" if row["compress_s"] is not None else "- |")
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
        (args.work / "bench_rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.chart:
        chart(rows, args.chart, f"Pruning sweep, {'DINOv2 ViT-S/14 on tire' if args.kind == 'rgb' else 'Point-MAE on generated ring scans'}")


if __name__ == "__main__":
    main()
