"""ONNX export of the backbones and their ONNX Runtime quantization.

Three deployable forms, each one ``.onnx`` file run by ONNX Runtime on CPU:

- ``onnx-fp32``: the exported float graph;
- ``onnx-int8``: static QDQ quantization, int8 weights per output channel and
  uint8 activations, calibrated on normal frames;
- ``onnx-int4``: 4-bit block-wise weight-only quantization of every MatMul
  (``MatMulNBits``); activations stay float. It is the smallest file, not the
  fastest: the weights are unpacked for every product.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from qcstream.models.compression_options import ONNX_FORMS

logger = logging.getLogger(__name__)

__all__ = ["ONNX_FORMS", "export_onnx", "inference_session", "quantize_int4", "quantize_int8"]

OPSET = 17


def export_onnx(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str | Path, input_names: list[str], output_names: list[str]) -> Path:
    """Trace ``module`` into an ONNX file whose first axis (the batch) is dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names}
    with warnings.catch_warnings():
        # The traced shape checks are constants by design: the graph is built for one input size.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            example_inputs,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    logger.info("Exported %s to %s (%.1f MB)", type(module).__name__, path, path.stat().st_size / 1e6)
    return path


class _FrameReader:
    """ONNX Runtime calibration reader over ``{input name: array}`` batches."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]], progress: bool, total: int | None = None) -> None:
        from tqdm import tqdm

        self._batches: Iterator[dict[str, np.ndarray]] = iter(tqdm(batches, total=total, desc="calibration", unit="batch", disable=not progress))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        raise RuntimeError("calibration frames can be read once only")


def quantize_int8(
    fp32_path: str | Path,
    output_path: str | Path,
    calibration: Iterable[dict[str, np.ndarray]],
    progress: bool = True,
    total: int | None = None,
    calibration_method: str = "minmax",
) -> Path:
    """Static int8 QDQ quantization of an exported model, calibrated on ``calibration`` batches.

    Weights are int8 per output channel, activations uint8, as ONNX Runtime
    recommends for x86 CPUs with VNNI. Activation ranges come from
    ``calibration_method``: "minmax", "percentile" (99.999) or "entropy". MatMul, Gemm and Conv with
    constant weights are quantized. The attention products (query x key, weights
    x value), LayerNorm, Softmax and GELU stay float: quantizing the attention
    products cost more accuracy and time than it saved on ViT-S/14.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    output_path = Path(output_path)
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(output_path),
            _FrameReader(calibration, progress, total),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=_calibration_methods()[calibration_method],
            nodes_to_exclude=activation_products(prepared),
            # Float outputs let ONNX Runtime fuse each quantized MatMul with its bias (MatMulIntegerToFloat):
            # on ViT-S/14 at 336 px this was 10% faster and closer to float than requantizing every output.
            extra_options={"ActivationSymmetric": False, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Conv"]},
        )
    logger.info("Wrote int8 QDQ model %s (%.1f MB)", output_path, output_path.stat().st_size / 1e6)
    return output_path


def _calibration_methods() -> dict:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}


def activation_products(path: str | Path) -> list[str]:
    """Names of the MatMul nodes of ``path`` whose inputs are all computed (no constant weight)."""
    import onnx

    graph = onnx.load(str(path)).graph
    constants = {tensor.name for tensor in graph.initializer}
    constants |= {name for node in graph.node if node.op_type == "Constant" for name in node.output}
    return [node.name for node in graph.node if node.op_type == "MatMul" and not any(name in constants for name in node.input)]


def quantize_int4(fp32_path: str | Path, output_path: str | Path, block_size: int = 32) -> Path:
    """4-bit block-wise weight-only quantization of every MatMul with constant weights (``MatMulNBits``)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # The quantizer logs every node at INFO; its summary below is enough.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    output_path = Path(output_path)
    # No accuracy_level: level 4 would also round the activations to int8 inside MatMulNBits, which cost
    # 6 points of image AUROC on the tire test set, where float activations cost none.
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=4, block_size=block_size, is_symmetric=True)
    quantizer.process()
    store_large_weights_as_int8(quantizer.model.model)
    quantizer.model.save_model_to_file(str(output_path), False)
    logger.info("Wrote 4-bit MatMulNBits model %s (%.1f MB, blocks of %d)", output_path, output_path.stat().st_size / 1e6, block_size)
    return output_path


def store_large_weights_as_int8(model, min_elements: int = 65536) -> int:
    """Store the float weights MatMulNBits left (patch and position embeddings) as int8.

    Each becomes an int8 initializer with one symmetric scale, dequantized by a
    ``DequantizeLinear`` node under the original name, so the graph computes in
    float as before. Returns the number of weights converted.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    converted = 0
    for tensor in list(graph.initializer):
        if tensor.data_type != onnx.TensorProto.FLOAT or int(np.prod(tensor.dims)) < min_elements:
            continue
        values = numpy_helper.to_array(tensor)
        scale = np.float32(max(float(np.abs(values).max()), 1e-12) / 127.0)
        quantized = np.clip(np.round(values / scale), -127, 127).astype(np.int8)
        name = tensor.name
        graph.initializer.remove(tensor)
        graph.initializer.extend([numpy_helper.from_array(quantized, name + "_int8"), numpy_helper.from_array(np.array(scale, dtype=np.float32), name + "_scale")])
        graph.node.insert(0, helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale"], [name], name=name + "_dequantize"))
        converted += 1
    return converted


def inference_session(path: str | Path, threads: int | None = None):
    """Create an ONNX Runtime CPU session of ``path`` with all graph optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads would otherwise spin after each run and slow the memory-bank search that follows.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
