"""The precision policy of an export: which graphs `--precision fp16` converts and what stays fp32, and why;
what `--precision int8|fp8` quantizes in the UNet (QUANT_POLICY) and what stays float.

The export applies it (vilex.export.onnx_export, vilex.export.quantize), the TensorRT build reads it (which
graphs get the FP16 builder flag, which GPUs an 8-bit graph needs), and the manifest records each graph's
`keep_fp32` text for whoever runs the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fp16Policy:
    """How a graph is converted for `--precision fp16`. Inputs and outputs always stay fp32
    (keep_io_types), so callers and the contract do not change with the precision."""

    convert: bool
    keep_fp32: str  # what stays fp32 and why (written to the manifest)
    node_prefixes: tuple[str, ...] = ()  # nodes whose name starts with one of these stay fp32 ...
    with_ancestors: bool = False  # ... together with every node that feeds them
    op_block_list: tuple[str, ...] = ()  # extra op types kept fp32 (onnxruntime's default list always applies)


FP16_POLICY: dict[str, Fp16Policy] = {
    "vilex_encoder": Fp16Policy(True, "inputs/outputs only"),
    "text_encoder": Fp16Policy(True, "inputs/outputs only"),
    "unet": Fp16Policy(
        True,
        "the timestep path (timestep input -> sinusoidal projection -> time-embedding MLP): timesteps up to "
        "999, some fractional, times the projection's frequencies need more than fp16's 11 significant bits "
        "before sin/cos",
        node_prefixes=("/unet/time_proj/", "/unet/time_embedding/"), with_ancestors=True),
    "vae_decoder": Fp16Policy(
        False,
        "the whole graph: Stable Diffusion VAE decoders overflow fp16 in their last up-blocks (why diffusers "
        "has `force_upcast`); it runs once per image, so fp32 costs little next to the UNet's steps"),
}


# ---- 8-bit: the UNet quantized (`--precision int8|fp8`) -------------------------------------------------
# Calibration images (export/calibration.py): 8 x 25 steps x 2 guidance branches = 400 UNet samples by default
# (demo/Diffusion uses 32 prompts x its steps; 8 keeps a CPU export of the `small` preset within minutes).
DEFAULT_CALIBRATION_COUNT = 8
MAX_CALIBRATION_COUNT = 1024
# How activation ranges are calibrated, per precision, by onnxruntime.quantization.CalibrationMethod
# (export/quantize.py maps the names; the first is the default). int8: Percentile cuts each tensor's range at
# onnxruntime's default 99.999th percentile; MinMax takes the whole range, so its ranges only widen with more
# images. Percentile is the default since it was measured (docs/export.md, 2026-12-07): a lower UNet error than
# MinMax in both int8 formats on the tiny, small and toy checkpoints, and the toy checkpoint's int8 images closer
# to fp32's, for a longer quantization (toy: 139 s against 43 s). Entropy is not offered: onnxruntime's
# quantize_static runs its entropy calibrator at 128 histogram bins and 128 quantized bins, where the search has
# one candidate, the whole range (its scales were MinMax's, bit for bit), and passes no option to change them.
# fp8: onnxruntime's only method for float8.
CALIBRATION_METHODS = {"int8": ("percentile", "minmax"), "fp8": ("distribution",)}
# The UNet is 80-95% of a request's compute, so it alone is quantized; the other graphs follow FP16_POLICY
# (the encoders fp16, the VAE decoder fp32), as NVIDIA's TensorRT demo/Diffusion does.
QUANTIZED_GRAPH = "unet"
# Layers kept in high precision, as demo/Diffusion's `filter_func` (utils_modelopt.py) keeps them: the
# time embedding and every resnet's time projection, the first and last convolutions, the shortcut
# convolutions, the output normalization and every transformer's output projection. A node is kept when
# its name (the module path, e.g. /unet/down_blocks.0/resnets.0/conv_shortcut/Conv) has one of these parts.
KEEP_HIGH_PRECISION = (r"/(time_emb_proj|time_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding"
                       r"|conv_norm_out|norm_out|proj_out)/")


@dataclass(frozen=True)
class QuantPolicy:
    """What `--precision int8|fp8` quantizes in the UNet graph, and what stays float and why.

    Only the inputs and weights of `op_types` get QuantizeLinear/DequantizeLinear nodes, so normalizations
    (GroupNorm, LayerNorm, and their decomposed forms), softmax, activations and residual additions are never
    quantized. MatMuls are quantized only where their second input is a weight (linear layers): the attention
    score and value products (two activations) stay float."""

    precision: str
    op_types: tuple[str, ...]
    linears: str | None  # regex: which linear layers (MatMul/Gemm with a weight) are quantized; None: all
    keep_high_precision: str  # regex over node names (KEEP_HIGH_PRECISION)
    per_channel_weights: bool  # one scale per output channel (else one per tensor)
    min_opset: int  # the first opset whose QuantizeLinear/DequantizeLinear take this type
    cpu_kernels: bool  # onnxruntime's CPU has integer kernels for it (an `ort/` variant for CPU is worth writing)
    min_compute_capability: int | None  # TensorRT builds this precision from this GPU architecture on (sm)
    # End to end: the held-out reconstructions through onnxruntime, their mean PSNR from the fp32 PyTorch ones
    # at least this (export/validate.py). A gate against broken quantization, not a fidelity target (`vilex eval`
    # measures that). The mean, not the minimum: a denoising trajectory can fork on a small difference and end
    # on another image (int8, toy, 16 held-out scenes at all tokens: mean 34.6 dB, one scene 19.1 dB). Measured
    # on the toy checkpoint's held-out pair: int8 33.1 dB (28.8 and 37.4), fp8 22.6 dB (22.2 and 23.0).
    end_to_end_psnr_db: float
    keep_float: str  # what stays float and why (written to the manifest)


QUANT_POLICY: dict[str, QuantPolicy] = {
    # INT8 as demo/Diffusion's quantization level 2.5: every convolution; of the linear layers, the
    # feed-forward ones and the attention's query/key/value projections.
    "int8": QuantPolicy(
        "int8", ("Conv", "MatMul", "Gemm"), linears=r"/(ff/net\.\d+|attn\d+/to_[qkv])/",
        keep_high_precision=KEEP_HIGH_PRECISION, per_channel_weights=True, min_opset=13, cpu_kernels=True,
        min_compute_capability=None, end_to_end_psnr_db=25.0,
        keep_float="the UNet's time embedding, conv_in, conv_out, shortcut convolutions, norm_out and proj_out "
                   "(demo/Diffusion's exclusions), the linear layers but the feed-forward ones and to_q/to_k/to_v "
                   "(its level 2.5), every normalization, softmax and activation; the other graphs as in an fp16 "
                   "export"),
    # FP8 (E4M3) as demo/Diffusion's SD FP8 config: every convolution and linear layer but the exclusions, one
    # scale per tensor. QuantizeLinear/DequantizeLinear take float8 from opset 19; TensorRT runs FP8 on Ada and
    # Hopper (sm89+); onnxruntime's CPU runs the graph by dequantizing (no FP8 kernels: for validation only).
    "fp8": QuantPolicy(
        "fp8", ("Conv", "MatMul", "Gemm"), linears=None,
        keep_high_precision=KEEP_HIGH_PRECISION, per_channel_weights=False, min_opset=19, cpu_kernels=False,
        min_compute_capability=89, end_to_end_psnr_db=18.0,
        keep_float="the UNet's time embedding, conv_in, conv_out, shortcut convolutions, norm_out and proj_out "
                   "(demo/Diffusion's exclusions), every normalization, softmax and activation; the other graphs "
                   "as in an fp16 export"),
}


def graph_precision(graph: str, precision: str) -> str:
    """The precision an export of `precision` gives `graph`: 8-bit for the UNet of an int8/fp8 export, fp16
    for the graphs FP16_POLICY converts (in fp16 and 8-bit exports), else fp32."""
    if precision in QUANT_POLICY and graph == QUANTIZED_GRAPH:
        return precision
    if precision in ("fp16", *QUANT_POLICY) and FP16_POLICY[graph].convert:
        return "fp16"
    return "fp32"
