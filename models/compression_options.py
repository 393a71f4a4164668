"""Names of the compression methods and forms, importable without torch (for the CLI's parser)."""

#: Activation range calibrators of simulated quantization.
CALIBRATORS = ("minmax", "ema", "percentile", "omse")
#: ``--quantize`` methods: one per calibrator (everything uniform), and ``ptf-log2``.
METHODS = CALIBRATORS + ("ptf-log2",)
#: Deployable ONNX Runtime forms.
ONNX_FORMS = ("onnx-fp32", "onnx-int8", "onnx-int4")
