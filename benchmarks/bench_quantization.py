"""Quantization results: accuracy of each method, speed and memory of each deployable form.

    .venv/bin/python benchmarks/bench_quantization.py rgb --data ../shared/data/mvtec3d_tire --work /tmp/qbench-rgb
    .venv/bin/python benchmarks/bench_quantization.py points --data /tmp/qcstream-scans/ring \\
        --point-checkpoint point_mae_ring.pth --work /tmp/qbench-points

``rgb`` fits the RGB detector with the DINOv2 ViT-S/14 backbone on the data set's
training split. ``points`` fits the multimodal detector in ``xyz`` mode, so the
Point-MAE transformer is the only feature network. Each compressed model is made
with :mod:`qcstream.models.compress` (the code behind ``qcstream compress``):

- accuracy rows: the float model, simulated quantization with each calibrator
  (every activation uniform, 8 bits) and with ``ptf-log2`` (power-of-two factor
  LayerNorm inputs, 4-bit log2 softmax), at 8-bit and 4-bit weights, and the
  three ONNX Runtime forms; image AUROC, pixel AUROC and AUPRO on the test split;
- speed: in one process, the float PyTorch backbone and each ONNX Runtime form
  are timed round-robin, one frame at a time, ``--repeats`` rounds over the same
  frames, after a warm-up; medians of the backbone alone (its input prepared
  beforehand: resized image, or background-free sampled cloud) and of the whole
  ``predict`` call;
- memory: each model is loaded and scores ``--rss-frames`` frames in a fresh
  process; its peak RSS (``VmHWM``) is reported.

Models and per-row results are cached under ``--work``; delete a row's folder to
redo it. The Markdown table is written to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qcstream.models import data as data_io
from qcstream.models.compress import CompressionPlan, compress_points, compress_rgb
from qcstream.models.detector import load_detector
from qcstream.models.evaluate import evaluate

logger = logging.getLogger("bench_quantization")

SIMULATED = [("minmax", 8), ("ema", 8), ("percentile", 8), ("omse", 8), ("ptf-log2", 8), ("minmax", 4), ("ptf-log2", 4)]
DEPLOYABLE = ["onnx-fp32", "onnx-int8", "onnx-int4"]


def split(args) -> tuple[list, list]:
    train = data_io.discover(args.data, "train")[: args.train_limit]
    validation = data_io.discover(args.data, "validation")
    return train, validation


def fit_float(args, train, validation) -> Path:
    target = args.work / "fp32"
    if (target / "config.json").is_file():
        return target
    if args.kind == "rgb":
        from qcstream.models.config import DetectorConfig
        from qcstream.models.detector import PatchCoreDetector

        config = DetectorConfig(backbone="dinov2_vits14", image_size=(336, 336), layers=(5,))
        PatchCoreDetector(config).fit([s.image_path for s in train], [s.image_path for s in validation]).save(target)
    else:
        from qcstream.models.multimodal import MultimodalDetector
        from qcstream.models.multimodal_config import MultimodalConfig

        config = MultimodalConfig(mode="xyz", point_features="point_mae", point_checkpoint=str(args.point_checkpoint), point_mae_points=args.point_mae_points)
        MultimodalDetector(config).fit(train, validation).save(target)
    return target


def compress_row(args, float_dir: Path, name: str, plan: CompressionPlan, train, validation) -> Path:
    target = args.work / name
    if (target / "config.json").is_file():
        return target
    detector = load_detector(float_dir)
    started = time.perf_counter()
    if args.kind == "rgb":
        compress_rgb(detector, plan, [s.image_path for s in train], [s.image_path for s in validation], target)
    else:
        compress_points(detector, plan, train, validation, target)
    seconds = time.perf_counter() - started
    (target / "bench_compress_seconds.txt").write_text(f"{seconds:.1f}\n")
    logger.info("Compressed %s in %.0f s", name, seconds)
    return target


def accuracy(args, model_dir: Path) -> dict:
    cached = model_dir / "bench_accuracy.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    result = evaluate(load_detector(model_dir), Path(args.data), progress=False)
    row = {"image_auroc": result.image_auroc, "pixel_auroc": result.pixel_auroc, "aupro": result.aupro}
    cached.write_text(json.dumps(row) + "\n")
    return row


def backbone_file(model_dir: Path) -> Path:
    for name in ("backbone.onnx", "point_encoder.onnx", "point_encoder_pruned.pt", "point_encoder.pt", "backbone.pt"):
        if (model_dir / name).is_file() and (name.startswith("point") or not any((model_dir / point).is_file() for point in ("point_encoder.pt", "point_encoder.onnx", "point_encoder_pruned.pt"))):
            return model_dir / name
    raise FileNotFoundError(f"no backbone file in {model_dir}")


def backbone_input(detector, kind: str, frame):
    """Prepare the backbone's input for ``frame`` outside the timed call."""
    if kind == "rgb":
        from qcstream.models.features import preprocess

        return preprocess([frame.rgb], detector.config.image_size)
    return detector.point_extractor.encoder_input(frame.xyz)


def backbone_call(detector, kind: str):
    """A function that runs only the transformer backbone on a prepared input."""
    network = detector.extractor if kind == "rgb" else detector.point_extractor.encoder

    def run(prepared):
        with torch.inference_mode():
            network(prepared)

    return run


def timing(args, model_dirs: dict[str, Path]) -> dict[str, dict]:
    """Median ms per frame of the backbone and of ``predict``, all models round-robin in this process."""
    from qcstream.models.multimodal import Frame

    test = data_io.discover(args.data, "test")
    picks = np.linspace(0, len(test) - 1, args.timed_frames).round().astype(int)
    frames = [Frame.from_sample(test[i]) for i in picks]
    detectors = {name: load_detector(path) for name, path in model_dirs.items()}
    calls = {name: backbone_call(detector, args.kind) for name, detector in detectors.items()}
    backbone_ms = {name: [] for name in detectors}
    predict_ms = {name: [] for name in detectors}

    inputs = {name: [backbone_input(detector, args.kind, frame) for frame in frames] for name, detector in detectors.items()}

    for name in detectors:  # warm-up
        calls[name](inputs[name][0])
        detectors[name].predict(frames[0].rgb, frames[0].xyz)
    for _ in range(args.repeats):
        for index, frame in enumerate(frames):
            for name, detector in detectors.items():
                started = time.perf_counter()
                calls[name](inputs[name][index])
                backbone_ms[name].append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                detector.predict(frame.rgb, frame.xyz)
                predict_ms[name].append((time.perf_counter() - started) * 1000)
    return {name: {"backbone_ms": statistics.median(backbone_ms[name]), "detector_ms": statistics.median(predict_ms[name])} for name in detectors}


def peak_rss_mb(args, model_dir: Path) -> float:
    """Peak RSS of a fresh process that loads ``model_dir`` and scores ``--rss-frames`` test frames."""
    command = [sys.executable, __file__, "rss-child", "--data", str(args.data), "--model", str(model_dir), "--rss-frames", str(args.rss_frames)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def rss_child(args) -> None:
    from qcstream.models.multimodal import Frame

    detector = load_detector(args.model)
    for sample in data_io.discover(args.data, "test")[: args.rss_frames]:
        frame = Frame.from_sample(sample)
        detector.predict(frame.rgb, frame.xyz)
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child of a large parent would report the parent's peak.
    peak_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(peak_kb / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["rgb", "points", "rss-child"])
    parser.add_argument("--data", type=Path, required=True, help="MVTec 3D-AD layout data set root")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qbench"), help="folder for models and cached rows")
    parser.add_argument("--output", type=Path, help="Markdown file to write the table to (default: print only)")
    parser.add_argument("--point-checkpoint", type=Path, help="Point-MAE checkpoint for `points`")
    parser.add_argument("--point-mae-points", type=int, default=8192)
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training frames")
    parser.add_argument("--calibration-frames", type=int, default=64, help="normal frames that calibrate each quantized model")
    parser.add_argument("--timed-frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-frames", type=int, default=8)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--skip-speed", action="store_true", help="accuracy rows only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.kind == "rss-child":
        rss_child(args)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    train, validation = split(args)
    float_dir = fit_float(args, train, validation)
    rows: dict[str, Path] = {"full precision (PyTorch FP32)": float_dir}
    for method, bits in SIMULATED:
        plan = CompressionPlan(quantize=method, weight_bits=bits, calibration_frames=args.calibration_frames)
        rows[f"simulated {plan.spec.label}"] = compress_row(args, float_dir, f"simq-{method}-w{bits}", plan, train, validation)
    for form in DEPLOYABLE:
        rows[f"ONNX Runtime {form[5:]}"] = compress_row(args, float_dir, form, CompressionPlan(export=form, calibration_frames=args.calibration_frames), train, validation)

    results = {name: accuracy(args, path) for name, path in rows.items()}
    deployable = {name: path for name, path in rows.items() if not name.startswith("simulated")}
    speed = {} if args.skip_speed else timing(args, deployable)
    memory = {} if args.skip_speed else {name: peak_rss_mb(args, path) for name, path in deployable.items()}

    reference = speed.get("full precision (PyTorch FP32)")
    float_size = backbone_file(float_dir).stat().st_size
    lines = [
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/bench_quantization.py'] + sys.argv[1:])}`",
        f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before timing {os.getloadavg()[0]:.2f}",
        "",
        "| method | AU PRO | image AUROC | pixel AUROC | backbone ms / frame | detector ms / frame | speed-up | backbone file | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, path in rows.items():
        row = results[name]
        timed = speed.get(name)
        ratio = f"{reference['backbone_ms'] / timed['backbone_ms']:.2f}x" if timed and reference else "-"
        size = backbone_file(path).stat().st_size
        size_text = f"{size / 1e6:.1f} MB ({size / float_size:.3f})" if not name.startswith("simulated") else "-"
        lines.append(
            f"| {name} | {row['aupro']:.3f} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | "
            f"{timed['backbone_ms']:.0f} | {timed['detector_ms']:.0f} | {ratio} | {size_text} | "
            f"{memory[name]:.0f} MB |" if timed else
            f"| {name} | {row['aupro']:.3f} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | - | - | - | {size_text} | - |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        args.output.write_text(table)


if __name__ == "__main__":
    main()
