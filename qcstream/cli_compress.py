"""``qcstream compress``: prune and quantize a fitted model's transformer, simulated or for ONNX Runtime."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from qcstream.settings import Settings

logger = logging.getLogger("qcstream.cli")


def cmd_compress(args: argparse.Namespace) -> int:
    from qcstream.cli import _sibling_validation
    from qcstream.models import data as data_io
    from qcstream.models.compress import CompressionPlan, compress_points, compress_rgb
    from qcstream.models.detector import CONFIG_FILE, load_detector

    plan = CompressionPlan(
        prune=args.prune,
        quantize=args.quantize,
        weight_bits=args.weight_bits,
        calibrator=args.calibrator,
        export=args.export,
        calibration_frames=args.calibration_frames,
        int4_block_size=args.block_size,
    )
    model_dir = args.model_dir or Settings.from_env().model_dir
    if Path(args.output).resolve() == Path(model_dir).resolve():
        raise ValueError(f"--output {args.output} is the input model; write the compressed model to a new folder")
    validation_folder = args.validation or _sibling_validation(Path(args.train_folder))
    if validation_folder is None:
        raise ValueError(f"no validation folder for {args.train_folder}: the threshold is calibrated on held-out good frames; pass --validation DIR")

    detector = load_detector(model_dir)
    train = data_io.discover(args.train_folder, "train")
    validation = data_io.discover(validation_folder, "validation")
    method_label = plan.label
    if getattr(detector, "reads_point_clouds", False):
        logger.info("Compressing the point transformer of %s: %s", model_dir, method_label)
        result = compress_points(detector, plan, train, validation, args.output)
    else:
        logger.info("Compressing the backbone of %s: %s", model_dir, method_label)
        result = compress_rgb(detector, plan, [s.image_path for s in train], [s.image_path for s in validation], args.output)

    meta = json.loads((Path(args.output) / CONFIG_FILE).read_text())
    form = meta.get("point_encoder_form") if getattr(detector, "reads_point_clouds", False) else meta["backbone_form"]
    pruning = meta.get("point_pruning") if getattr(detector, "reads_point_clouds", False) else meta.get("pruning")
    pruned = f", {pruning['flops']:.3f} of the prunable FLOPs" if pruning else ""
    method = f", {method_label}" if plan.quantize else ""
    print(f"Model {result.version} ({form}{pruned}{method}) saved to {args.output}")
    return 0


def add_compress_command(commands) -> None:
    from qcstream.models.compression_options import CALIBRATORS, METHODS, ONNX_FORMS

    compress = commands.add_parser(
        "compress",
        help="prune and quantize the model's transformer (simulated, or as an ONNX Runtime graph) and refit",
        description="Prune (--prune), quantize (--quantize, simulated) or export (--export, ONNX Runtime) the transformer of a fitted model, "
        "then refit its memory banks and threshold. --prune combines with --export.",
    )
    compress.add_argument("train_folder", help="the good training images the model was fitted on; a sample calibrates the quantizers or drives pruning, and all rebuild the memory bank")
    compress.add_argument("--output", type=Path, required=True, help="folder for the compressed model (a new model directory)")
    compress.add_argument("--model-dir", type=Path, help="fitted float model to compress (default: $QCSTREAM_MODEL_DIR)")
    compress.add_argument("--validation", help="held-out good images for the threshold (default: <root>/validation/good when it exists)")
    compress.add_argument("--prune", type=float, metavar="FLOPS", help="structured pruning of attention heads and MLP neurons to this fraction (above 0, below 1) of the prunable multiply-adds, e.g. 0.5; ViT and Point-MAE only")
    form = compress.add_mutually_exclusive_group()
    form.add_argument("--quantize", choices=list(METHODS), help="simulated quantization, to measure accuracy: one calibrator for every activation, or ptf-log2 (power-of-two factor LayerNorm inputs, 4-bit log2 softmax)")
    compress.add_argument("--weight-bits", type=int, choices=[8, 4], default=8, help="bits of the Linear weights, per output channel; --quantize only, --export int4 sets its own (default: 8)")
    compress.add_argument("--calibrator", choices=list(CALIBRATORS), default="minmax", help="range calibrator of the Linear inputs; --quantize ptf-log2 only, the other methods are calibrators themselves (default: minmax)")
    form.add_argument("--export", choices=list(ONNX_FORMS), help="deployable ONNX Runtime form, to measure and gain speed: float, int8 static QDQ, or 4-bit MatMulNBits weights")
    compress.add_argument("--calibration-frames", type=int, default=64, help="normal frames, spread evenly over the training frames, that calibrate activation ranges and drive pruning (default: 64)")
    compress.add_argument("--block-size", type=int, default=32, help="weights per 4-bit block for --export onnx-int4 (default: 32)")
    compress.set_defaults(func=cmd_compress)
