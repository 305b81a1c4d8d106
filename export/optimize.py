"""Graph optimization for onnxruntime, with onnxruntime's transformer optimizer.

What is used for what (the README's export section has the measured figures):

- Fusions (attention -> Attention/MultiHeadAttention, LayerNorm + residual -> SkipLayerNormalization,
  Gelu/QuickGelu + bias, and on GPU GroupNorm, NhwcConv, BiasSplitGelu): onnxruntime.transformers'
  `optimize_model` with the model types it knows ("clip", "unet", "vae"; "bert" for the ViT-style
  vision encoder). Its pattern matchers know the exact subgraphs PyTorch's exporter emits for these
  blocks; writing our own would duplicate them. The fused ops are onnxruntime contrib ops
  (com.microsoft domain): only onnxruntime runs them, so these graphs go to `ort/` and TensorRT,
  trtexec and Triton's tensorrt backend build from the plain graphs in `onnx/`.
- On CPU the CUDA-only fusions are switched off (GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu,
  BiasAdd and packed QKV/KV layouts have no CPU kernels).
- fp16: onnxruntime.transformers.float16 (in onnx_export.convert_to_fp16), run after the fusions so
  that the patterns still match, with the same keep-fp32 policy as the plain graphs.
- optimum: version 2 moved its ONNX exporter and ORTOptimizer (a wrapper around the same
  `optimize_model`) into the separate `optimum-onnx` package, which requires transformers < 4.58 and
  optimum 2.1; this project needs transformers 5, so optimum's ONNX parts cannot be installed and the
  optimizer is called directly.

`python -m vilex.export.optimize engines/NAME` measures what the `ort/` graphs of an export made with
`--optimize cpu` gain over the plain ones on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import onnx

from .graphs import fp32_nodes, save_graph

OPTIMIZE_TARGETS = ("cpu", "gpu")

# onnxruntime.transformers model type per graph.
MODEL_TYPES = {"vilex_encoder": "bert", "text_encoder": "clip", "unet": "unet", "vae_decoder": "vae"}

# Fusions whose fused operators exist only as CUDA kernels.
CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")


def fusion_options(graph: str, target: str):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(MODEL_TYPES[graph])
    if target == "cpu":
        for name in CUDA_ONLY_FUSIONS:
            if hasattr(options, name):
                setattr(options, name, False)
    return options


def optimize_model_proto(graph: str, src: Path, target: str):
    """The fused onnxruntime graph for `src` (an fp32 ONNX file) as an OnnxModel."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    # opt_level=0: only the Python fusions; onnxruntime's own graph optimizations still run when a
    # session loads the graph, for both variants alike, so the comparison isolates the fusions.
    # num_heads/hidden_size 0: detected from the graph.
    return optimize_model(str(src), model_type=MODEL_TYPES[graph], num_heads=0, hidden_size=0, opt_level=0,
                          optimization_options=fusion_options(graph, target), use_gpu=target == "gpu")


def optimize_for_onnxruntime(graph: str, src: Path, dst: Path, target: str, precision: str, policy,
                             external_data_threshold: int) -> dict[str, int]:
    """Write the fused (and, for fp16, converted) graph of the fp32 graph `src` to `dst`; return the
    fused-operator counts."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    optimized = optimize_model_proto(graph, src, target)
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    if precision == "fp16" and policy.convert:
        # onnx's shape inference does not know the fused contrib ops; onnxruntime's symbolic one does.
        optimized.convert_float_to_float16(
            use_symbolic_shape_infer=True, keep_io_types=True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(policy.op_block_list),
            node_block_list=fp32_nodes(optimized.model, policy))
        optimized.topological_sort()  # the converter appends its Casts at the end; onnx wants producers first
    save_graph(optimized.model, dst, external_data_threshold)
    return fused


# ---- measurement ---------------------------------------------------------------------------------------
def time_sessions(paths: dict[str, Path], feeds: dict, runs: int, threads: int) -> dict[str, float]:
    """Median wall time of one run in ms per graph file. Runs alternate between the files, so that
    load from other processes on the machine falls on both alike; one warm-up run each first."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for session in sessions.values():
        session.run(None, feeds)
    for _ in range(runs):
        for k, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[k].append(1000 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def measure(engines: str | Path, runs: int = 10, batch: int | None = None, threads: int = 1) -> list[dict]:
    """Time the plain (`onnx/`) and optimized (`ort/`) graphs on CPU at the contract's opt shapes."""
    import torch

    from vilex.engines.folder import EngineFolder
    from .validate import sample_inputs

    folder = EngineFolder.open(engines)
    rows = []
    for graph in folder.graph_names:
        contract = folder.contract(graph)
        sizes = {axis: bounds.opt for axis, bounds in contract.axes.items()}
        if batch:
            sizes["batch"] = batch
        feeds = {n: t.numpy() for n, t in sample_inputs(contract, sizes, torch.Generator().manual_seed(0)).items()}
        paths = {"onnx": folder.graph_path(graph, "onnx"), "ort": folder.graph_path(graph, "ort")}
        row = {"graph": graph, "sizes": sizes, "threads": threads,
               "nodes": {k: len(onnx.load(str(p), load_external_data=False).graph.node) for k, p in paths.items()},
               "ms": time_sessions(paths, feeds, runs, threads),
               "fused": folder.manifest["graphs"][graph].get("fused_operators", {})}
        row["speedup"] = row["ms"]["onnx"] / row["ms"]["ort"]
        rows.append(row)
    return rows


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vilex.export.optimize",
                                     description="time plain vs onnxruntime-optimized graphs of an export on CPU")
    parser.add_argument("engines", help="an export made with `vilex export ... --optimize cpu`")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the contract's opt)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1: steadier)")
    parser.add_argument("--json", default=None, help="also save the figures to this file")
    args = parser.parse_args(argv)
    rows = measure(args.engines, runs=args.runs, batch=args.batch, threads=args.threads)
    print(f"onnxruntime {onnxruntime_version()} CPU, {args.threads} thread(s), median of {args.runs} alternating runs")
    print(f"{'graph':<14} {'shape':<36} {'nodes':>11} {'plain ms':>9} {'fused ms':>9} {'speedup':>8}  fused operators")
    for row in rows:
        shape = ", ".join(f"{k} {v}" for k, v in row["sizes"].items())
        fused = ", ".join(f"{op} {n}" for op, n in row["fused"].items())
        print(f"{row['graph']:<14} {shape:<36} {row['nodes']['onnx']:>5}->{row['nodes']['ort']:<5} "
              f"{row['ms']['onnx']:9.2f} {row['ms']['ort']:9.2f} {row['speedup']:7.2f}x  {fused}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
