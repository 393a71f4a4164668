"""Compress a fitted model's transformer and refit the model around it.

Structured pruning (``prune`` set, a FLOPs constraint) removes attention heads
and MLP neurons first; then the transformer stays a float torch model, or is
quantized in one of two kinds:

- simulated quantization (``quantize`` set): the backbone stays a torch model
  whose layers round weights and activations as integer kernels would; it
  measures accuracy, not speed (backbone form ``torch-simq``);
- a deployable ONNX Runtime graph (``export`` set): ``onnx-fp32``,
  ``onnx-int8`` (static QDQ, calibrated) or ``onnx-int4`` (MatMulNBits).

Either way the memory banks, score fusion and threshold are fitted again on the
compressed features, because the features shift with the backbone.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from qcstream.models import data as data_io
from qcstream.models.detector import PatchCoreDetector
from qcstream.models.features import PatchFeatureExtractor, preprocess
from qcstream.models.onnx_export import ONNX_FORMS, quantize_int4, quantize_int8
from qcstream.models.quantization import QuantSpec, build_quantized, calibrate

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CompressionPlan:
    """The compression to apply: pruning, then at most one of ``quantize`` and ``export``."""

    #: FLOPs constraint of structured pruning: the fraction of the prunable multiply-adds kept.
    prune: float | None = None

    #: Simulated quantization method: a calibrator name or "ptf-log2".
    quantize: str | None = None
    weight_bits: int = 8
    #: Calibrator of the Linear inputs for "ptf-log2".
    calibrator: str = "minmax"
    #: Deployable form: "onnx-fp32", "onnx-int8" or "onnx-int4".
    export: str | None = None
    calibration_frames: int = 64
    int4_block_size: int = 32

    def __post_init__(self) -> None:
        if self.quantize is not None and self.export is not None:
            raise ValueError("give either a simulated quantization method (--quantize) or a deployable form (--export), not both")
        if self.prune is None and self.quantize is None and self.export is None:
            raise ValueError("nothing to do: give --prune FLOPS, --quantize METHOD or --export FORM")
        if self.prune is not None and not 0.0 < self.prune < 1.0:
            raise ValueError(
                f"--prune {self.prune} is invalid: the FLOPs constraint must be greater than 0 and less than 1 "
                "(0.5 keeps half of the prunable multiply-adds; 1.0 would keep the model as it is)"
            )
        if self.prune is not None and self.quantize is not None:
            raise ValueError(f"--quantize {self.quantize} with --prune: simulated quantization of a pruned transformer is not supported; prune with --export onnx-int8 to quantize it for ONNX Runtime")
        if self.export is not None and self.export not in ONNX_FORMS:
            raise ValueError(f"unknown form {self.export!r}; choose one of {', '.join(ONNX_FORMS)}")
        if self.calibration_frames < 1:
            raise ValueError(f"calibration_frames is {self.calibration_frames}; calibration needs at least 1 normal frame")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec.for_method(self.quantize, self.weight_bits, self.calibrator)

    @property
    def form(self) -> str:
        if self.export is not None:
            return self.export
        return "torch-simq" if self.quantize is not None else "torch-fp32"

    @property
    def label(self) -> str:
        """What the plan does, for logs: for example "pruning to 0.5 FLOPs + onnx-int8"."""
        steps = [f"pruning to {self.prune:g} FLOPs"] if self.prune is not None else []
        if self.quantize is not None:
            steps.append(self.spec.label)
        elif self.export is not None:
            steps.append(self.export)
        return " + ".join(steps)


def calibration_subset(items: Sequence, count: int) -> list:
    """``count`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    picks = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in picks]


def _require_float(detector, part: str, form: str) -> None:
    if form != "torch-fp32":
        source = detector.fit_info_.get("compressed_from", "unknown")
        raise ValueError(f"the model's {part} is already {form}; compress the float model it came from (version {source})")


def compress_rgb(
    detector: PatchCoreDetector,
    plan: CompressionPlan,
    train_images: Sequence,
    validation_images: Sequence,
    output_dir: str | Path,
    progress: bool = True,
) -> PatchCoreDetector:
    """Compress the backbone of a fitted RGB detector, refit it, and save it to ``output_dir``."""
    _require_float(detector, "backbone", detector.backbone_form)
    _check_pruning(plan, detector.pruning, "backbone", detector)
    if plan.prune is not None and not isinstance(detector.extractor, PatchFeatureExtractor):
        raise ValueError(f"pruning removes attention heads and MLP neurons of a ViT; this model uses {detector.config.backbone}, which has none")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    extractor = detector.extractor
    size = detector.config.image_size
    calibration_images = calibration_subset(list(train_images), plan.calibration_frames)

    def calibration_batches():
        for start in range(0, len(calibration_images), detector.config.batch_size):
            chunk = calibration_images[start : start + detector.config.batch_size]
            yield preprocess([data_io.load_rgb(path) if not isinstance(path, np.ndarray) else path for path in chunk], size)

    batch_count = -(-len(calibration_images) // detector.config.batch_size)
    pruning = detector.pruning
    prepared = None
    if plan.prune is not None:
        prepared = list(calibration_batches())
        extractor, pruning = _prune_rgb(extractor, plan.prune, prepared, progress)

    def quantizer_batches():
        # Pruning already decoded the frames into a list; reuse it instead of decoding them again.
        return iter(prepared) if prepared is not None else calibration_batches()

    if plan.quantize is not None:
        if not isinstance(extractor, PatchFeatureExtractor):
            raise ValueError(f"simulated quantization needs a ViT backbone; this model uses {detector.config.backbone}")
        backbone = build_quantized(extractor.backbone, plan.spec)
        compressed = PatchFeatureExtractor(backbone, extractor.layers, extractor.feature_grid).eval()
        logger.info("Calibrating %s on %d normal frames", plan.spec.label, len(calibration_images))
        calibrate(backbone, compressed, quantizer_batches(), total=batch_count, progress=progress)
        quantization = dataclasses.asdict(plan.spec)
    elif plan.export is not None:
        compressed = _export_rgb(extractor, size, plan, output_dir, quantizer_batches(), batch_count, progress)
        quantization = None
    else:
        compressed, quantization = extractor, None

    result = PatchCoreDetector(detector.config)
    result._extractor = compressed
    result.backbone_form = plan.form
    result.quantization = quantization
    result.pruning = pruning
    return _refit_and_save(result, detector.version, train_images, validation_images, output_dir, progress)


def _check_pruning(plan: CompressionPlan, pruning: dict | None, part: str, detector) -> None:
    """Reject, before any work, pruning twice and simulated quantization of a pruned transformer."""
    source = detector.fit_info_.get("compressed_from", "unknown")
    if plan.prune is not None and pruning is not None:
        raise ValueError(f"the model's {part} is already pruned (to {pruning['flops']} FLOPs); prune the model it came from (version {source})")
    if plan.quantize is not None and pruning is not None:
        raise ValueError(
            f"--quantize {plan.quantize}: simulated quantization of a pruned transformer is not supported; "
            "export the pruned model with --export onnx-int8 instead"
        )


def _prune_rgb(extractor: PatchFeatureExtractor, flops: float, batches: list, progress: bool):
    from qcstream.models.pruning import prune_transformer

    logger.info("Pruning the ViT to %g of its prunable FLOPs with %d normal frames", flops, sum(len(batch) for batch in batches))
    backbone, report = prune_transformer(extractor.backbone, extractor.layers, batches, flops, progress=progress)
    return PatchFeatureExtractor(backbone, extractor.layers, extractor.feature_grid).eval(), report.layout()


def _export_rgb(extractor, size, plan: CompressionPlan, output_dir: Path, batches, batch_count: int, progress: bool):
    from qcstream.models.onnx_backbones import OnnxFeatureExtractor, export_feature_extractor

    target = output_dir / "backbone.onnx"
    inputs = ({"images": batch.numpy()} for batch in batches)
    _write_onnx(lambda path: export_feature_extractor(extractor, size, path), plan, target, inputs, batch_count, progress)
    return OnnxFeatureExtractor(target, extractor.feature_grid, extractor.feature_dim)


def compress_points(detector, plan: CompressionPlan, train: Sequence, validation: Sequence, output_dir: str | Path, progress: bool = True):
    """Compress the Point-MAE encoder of a fitted multimodal detector, refit it, and save it."""
    from qcstream.models.multimodal import MultimodalDetector
    from qcstream.models.point_features import PointFeatureExtractor

    if detector.config.point_features != "point_mae" or not detector.config.uses_points:
        raise ValueError("the model has no point transformer to compress: fit it with --point-features point_mae and a mode that uses xyz")
    _require_float(detector, "point encoder", detector.point_encoder_form)
    _check_pruning(plan, detector.point_pruning, "point encoder", detector)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    extractor = detector.point_extractor
    clouds = [data_io.load_xyz(sample.xyz_path) for sample in calibration_subset(list(train), plan.calibration_frames)]
    pruning = detector.point_pruning
    if plan.prune is not None:
        extractor, pruning = _prune_points(detector, extractor, plan.prune, clouds, progress)

    if plan.quantize is not None:
        encoder = build_quantized(extractor.encoder, plan.spec)
        quantized_extractor = PointFeatureExtractor(detector.config, encoder)
        logger.info("Calibrating %s on %d normal clouds", plan.spec.label, len(clouds))
        calibrate(encoder, quantized_extractor, clouds, total=len(clouds), progress=progress)
        quantization = dataclasses.asdict(plan.spec)
    elif plan.export is not None:
        encoder = _export_points(extractor, plan, output_dir, clouds, progress)
        quantization = None
    else:
        encoder, quantization = extractor.encoder, None

    result = MultimodalDetector(detector.config, point_encoder=encoder)
    result._rgb_extractor = detector._rgb_extractor
    result.backbone_form, result.quantization = detector.backbone_form, detector.quantization
    result.point_encoder_form = plan.form
    result.point_quantization = quantization
    result.point_pruning = pruning
    return _refit_and_save(result, detector.version, train, validation, output_dir, progress)


def _prune_points(detector, extractor, flops: float, clouds: list[np.ndarray], progress: bool):
    from qcstream.models.point_features import PointFeatureExtractor
    from qcstream.models.point_ops import group_points
    from qcstream.models.pruning import prune_transformer

    encoder = extractor.encoder
    batches = [group_points(extractor.encoder_input(xyz), encoder.num_groups, encoder.group_size) for xyz in clouds]
    logger.info("Pruning the Point-MAE encoder to %g of its prunable FLOPs with %d normal clouds", flops, len(batches))
    pruned, report = prune_transformer(encoder, encoder.feature_blocks, batches, flops, progress=progress)
    return PointFeatureExtractor(detector.config, pruned), report.layout()


def _export_points(extractor, plan: CompressionPlan, output_dir: Path, clouds: list[np.ndarray], progress: bool):
    from qcstream.models.onnx_backbones import OnnxPointEncoder, export_point_encoder
    from qcstream.models.point_ops import group_points

    encoder = extractor.encoder
    target = output_dir / "point_encoder.onnx"

    def batches():
        for xyz in clouds:
            neighborhoods, centers = group_points(extractor.encoder_input(xyz), encoder.num_groups, encoder.group_size)
            yield {"neighborhoods": neighborhoods.numpy(), "centers": centers.numpy()}

    _write_onnx(lambda path: export_point_encoder(encoder, path), plan, target, batches(), len(clouds), progress)
    return OnnxPointEncoder(target, encoder.num_groups, encoder.group_size, encoder.feature_dim)


def _write_onnx(export: Callable[[Path], Path], plan: CompressionPlan, target: Path, calibration: Iterable[dict], total: int, progress: bool) -> None:
    """Export the float graph with ``export(path)`` and write ``plan.export`` of it to ``target``."""
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = export(Path(scratch) / "fp32.onnx")
        if plan.export == "onnx-int8":
            quantize_int8(fp32, target, calibration, progress, total)
        elif plan.export == "onnx-int4":
            quantize_int4(fp32, target, plan.int4_block_size)
        else:
            target.write_bytes(fp32.read_bytes())


def _refit_and_save(result, source_version: str, train: Sequence, validation: Sequence, output_dir: Path, progress: bool):
    """Fit ``result``'s banks and threshold on the compressed features and save it."""
    result.fit(train, validation, progress=progress)
    result.fit_info_["compressed_from"] = source_version
    result.save(output_dir)
    return result
