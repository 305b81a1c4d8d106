"""The 8-bit UNet: onnxruntime's static quantizer turns the validated fp32 UNet graph into QDQ graphs.

    1. choose the nodes: the policy's op types (vilex/engines/precision.py QUANT_POLICY), minus the layers it
       keeps in high precision and, for int8, the linear layers it leaves out
    2. onnxruntime.quantization.quantize_static in QDQ format, calibrated on the recorded UNet inputs
       (export/calibration.py), in one of two formats (FORMATS): where the Q/DQ nodes go and their types
    3. the record the manifest keeps: tool, version, mode, node counts, excluded layers

Two formats, because no one QDQ graph serves both runtimes (measured on the `small` UNet, docs/export.md):

    onnx/  for TensorRT (and any runtime): symmetric activations (zero points 0), float biases, Q/DQ on the
           inputs and weights of the quantized layers only, as NVIDIA's ModelOpt places them for demo/Diffusion.
           TensorRT's ONNX parser takes no other zero point and no int32 DequantizeLinear. onnxruntime's CPU
           runs it, but slower than fp32: without an int32 bias and an output QuantizeLinear it cannot fuse
           the layers into its integer kernels, so it dequantizes and runs them in float.
    ort/   for onnxruntime on CPU (`vilex export --precision int8 --optimize cpu`): uint8 activations, int8
           weights, int32 biases, and the layers' outputs quantized too, the format onnxruntime recommends for
           x86 and fuses into QLinearConv / QLinearMatMul (VNNI and AMX kernels where the CPU has them).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from vilex.engines.precision import QuantPolicy

from .graphs import EXTERNAL_DATA_THRESHOLD, initializer_bytes

TOOL = "onnxruntime.quantization"
# The calibration methods (vilex/engines/precision.py CALIBRATION_METHODS) by onnxruntime's CalibrationMethod name
ORT_CALIBRATION_METHODS = {"percentile": "Percentile", "minmax": "MinMax", "distribution": "Distribution"}


@dataclass(frozen=True)
class QDQFormat:
    """Where the Q/DQ nodes go and of which types (see the module docstring)."""

    runtime: str
    symmetric_activations: bool  # zero points 0 (TensorRT) or fitted to each tensor's range
    uint8_activations: bool  # int8: uint8 activations (onnxruntime's x86 kernels) instead of int8
    quantize_bias: bool  # int32 biases (onnxruntime's fused kernels) or float (TensorRT)
    quantize_outputs: bool  # a QuantizeLinear after each quantized layer too (onnxruntime fuses it in)

    def describe(self, policy: QuantPolicy, method: str) -> str:
        if policy.precision == "fp8":
            types = "float8 E4M3 activations and weights, symmetric"
        else:
            activations = "uint8 activations, asymmetric" if self.uint8_activations else "int8 activations, symmetric"
            types = f"{activations}, int8 weights, symmetric"
        types += f", {ORT_CALIBRATION_METHODS[method]} calibration"
        weights = "per output channel" if policy.per_channel_weights else "per tensor"
        return (f"static, QDQ for {self.runtime}: {types}; weight scales {weights}; biases "
                f"{'int32' if self.quantize_bias else 'float'}; Q/DQ on the quantized layers' inputs and weights"
                + (" and outputs" if self.quantize_outputs else " only"))


FORMATS = {
    "onnx": QDQFormat("TensorRT", symmetric_activations=True, uint8_activations=False, quantize_bias=False,
                      quantize_outputs=False),
    "ort": QDQFormat("onnxruntime CPU", symmetric_activations=False, uint8_activations=True, quantize_bias=True,
                     quantize_outputs=True),
}


@dataclass
class QuantizationRecord:
    tool: str
    version: str
    precision: str
    mode: str
    calibration: dict
    op_types: list[str]
    keep_high_precision: str
    linears: str | None
    quantized_nodes: list[str] = field(default_factory=list)
    excluded_nodes: list[str] = field(default_factory=list)  # layers of op_types kept float by the policy
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"tool": self.tool, "version": self.version, "precision": self.precision, "mode": self.mode,
                "calibration": self.calibration, "op_types": self.op_types,
                "keep_high_precision": self.keep_high_precision, "linears": self.linears,
                "quantized_nodes": len(self.quantized_nodes), "excluded_nodes": self.excluded_nodes,
                "seconds": round(self.seconds, 2)}


def split_nodes(model: onnx.ModelProto, policy: QuantPolicy) -> tuple[list[str], list[str]]:
    """(quantized, excluded): the names of the layers with weights (nodes of the policy's op types whose second
    input is a weight) that are quantized, and those kept float by its high-precision layers or, for linear
    layers, its `linears` pattern. A MatMul of two activations (attention scores, values) is neither."""
    weights = {init.name for init in model.graph.initializer}
    keep, linears = re.compile(policy.keep_high_precision), policy.linears and re.compile(policy.linears)
    quantized, excluded = [], []
    for node in model.graph.node:
        if node.op_type not in policy.op_types or len(node.input) < 2 or node.input[1] not in weights:
            continue
        if keep.search(node.name) or (node.op_type != "Conv" and linears and not linears.search(node.name)):
            excluded.append(node.name)
        else:
            quantized.append(node.name)
    return quantized, excluded


def quantize_unet(fp32_path: Path, out_path: Path, policy: QuantPolicy, qdq_format: QDQFormat,
                  calls: list[dict[str, np.ndarray]], calibration: dict) -> QuantizationRecord:
    """Quantize the fp32 UNet graph at `fp32_path` into a new QDQ graph at `out_path` (module docstring)."""
    import onnxruntime
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class RecordedUNetInputs(CalibrationDataReader):
        """The recorded UNet calls, each one calibration batch."""

        def __init__(self):
            self.iterator = iter(calls)

        def get_next(self):
            return next(self.iterator, None)

        def rewind(self):
            self.iterator = iter(calls)

    start = time.perf_counter()
    model = onnx.load(str(fp32_path))
    quantized, excluded = split_nodes(model, policy)
    large = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    del model
    if policy.precision == "fp8":
        activation_type = weight_type = QuantType.QFLOAT8E4M3FN
    else:
        activation_type = QuantType.QUInt8 if qdq_format.uint8_activations else QuantType.QInt8
        weight_type = QuantType.QInt8
    method = getattr(CalibrationMethod, ORT_CALIBRATION_METHODS[calibration["method"]])
    extra_options = {
        "ActivationSymmetric": qdq_format.symmetric_activations,
        "WeightSymmetric": True,
        "QuantizeBias": qdq_format.quantize_bias,
        "MatMulConstBOnly": True,  # linear layers only, never the attention's activation x activation products
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # MatMul weights are (K, N): N is the output channel
    }
    if not qdq_format.quantize_outputs:
        extra_options["OpTypesToExcludeOutputQuantization"] = list(policy.op_types)
    quantize_static(str(fp32_path), str(out_path), RecordedUNetInputs(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(policy.op_types), per_channel=policy.per_channel_weights,
                    activation_type=activation_type, weight_type=weight_type, nodes_to_quantize=quantized,
                    nodes_to_exclude=excluded, calibrate_method=method, use_external_data_format=large,
                    extra_options=extra_options)
    return QuantizationRecord(TOOL, onnxruntime.__version__, policy.precision,
                              qdq_format.describe(policy, calibration["method"]),
                              calibration, list(policy.op_types), policy.keep_high_precision, policy.linears,
                              quantized, excluded, time.perf_counter() - start)
