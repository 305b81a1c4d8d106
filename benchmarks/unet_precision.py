"""The UNet step and a whole reconstruction at several export precisions, side by side, on CPU (issue 20).

    python -m vilex.benchmarks.unet_precision engines/small-fp32 engines/small-int8 [--batches 1,2,4]
        [--runs 20] [--threads 2] [--dynamic] [--e2e 3] [--json FILE]

Each export's UNet graph (both files of an int8 export: onnx/ in TensorRT's QDQ format, ort/ in onnxruntime's CPU
format) runs in its own onnxruntime session (CPU) at the contract's opt latent size and each batch; the sessions
take turns run by run (export/optimize.py time_sessions), so load from other processes
falls on all of them alike, and each figure is the median. The first export is the baseline of the speed-up
column. `--dynamic` adds the first export's UNet quantized dynamically (onnxruntime's quantize_dynamic:
int8 weights, activations quantized at run time; what onnxruntime issues say often does not speed up
convolutions), to compare with static QDQ. `--e2e N` also times N whole reconstructions per export (one image,
25 steps, classifier-free guidance: the UNet at batch 2), again taking turns, each export through the
onnxruntime backend as it chooses its files on CPU (ort/ where the export has it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix instruction sets that 8-bit kernels use (AVX-512 VNNI, AVX-VNNI, AMX)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags.split(":", 1)[1].split() if f.startswith(("avx512", "avx_vnni", "amx")))


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def dynamic_unet(fp32_path: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def time_reconstructions(folders: dict, runs: int, steps: int = 25) -> dict[str, float]:
    """Median seconds of one reconstruction per export, taking turns."""
    from vilex.engines.host import pipeline_from_engines
    from vilex.toyworld.scenes import SPLITS, make_scenes, render

    image = render(make_scenes(1, SPLITS["heldout"])[0])
    pipelines = {}
    for label, folder in folders.items():
        pipelines[label] = pipeline_from_engines(folder)
        pipelines[label].set_progress_bar_config(disable=True)
        pipelines[label]([image], num_inference_steps=2, seed=0)  # sessions open, first-run costs paid
    times = {label: [] for label in folders}
    for _ in range(runs):
        for label, pipeline in pipelines.items():
            start = time.perf_counter()
            pipeline([image], num_inference_steps=steps, seed=0)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    import onnxruntime
    import torch

    from vilex.engines.folder import EngineFolder
    from vilex.export.optimize import time_sessions
    from vilex.export.validate import sample_inputs

    parser = argparse.ArgumentParser(prog="python -m vilex.benchmarks.unet_precision", description=__doc__.split("\n")[0])
    parser.add_argument("engines", nargs="+", help="export folders of one checkpoint (the first is the baseline)")
    parser.add_argument("--batches", default="1,2,4", help="UNet batch sizes (default 1,2,4)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per session and batch (default 20)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default 0: all cores)")
    parser.add_argument("--dynamic", action="store_true", help="also the first export's UNet, dynamically quantized")
    parser.add_argument("--e2e", type=int, default=0, help="also time this many reconstructions per export")
    parser.add_argument("--json", default=None, help="also save the figures to this file")
    args = parser.parse_args(argv)

    folders, paths = {}, {}
    for path in args.engines:
        folder = EngineFolder.open(path, what="ENGINES")
        folders[f"{Path(path).name} ({folder.graph_precision('unet')})"] = folder
        for variant in folder.manifest["graphs"]["unet"]["files"]:  # an int8 export: onnx/ TensorRT's, ort/ CPU's
            paths[f"{Path(path).name} {variant}/ ({folder.graph_precision('unet')})"] = folder.graph_path("unet", variant)
    contract = next(iter(folders.values())).contract("unet")
    with tempfile.TemporaryDirectory() as work:
        if args.dynamic:
            first = next(iter(folders.values()))
            paths["dynamic int8"] = dynamic_unet(first.graph_path("unet"), Path(work) / "unet.dynamic.onnx")
        rows = []
        for batch in (int(b) for b in args.batches.split(",")):
            sizes = {axis: bounds.opt for axis, bounds in contract.axes.items()}
            sizes["batch"] = batch
            feeds = {n: t.numpy() for n, t in sample_inputs(contract, sizes, torch.Generator().manual_seed(0)).items()}
            rows.append({"batch": batch, "sizes": sizes, "ms": time_sessions(paths, feeds, args.runs, args.threads)})

    baseline = next(iter(paths))
    print(f"CPU: {cpu_model()}; {', '.join(cpu_flags()) or 'no AVX-512/VNNI/AMX flags'}")
    print(f"onnxruntime {onnxruntime.__version__}, {args.threads or 'all'} intra-op threads, UNet at latent "
          f"{rows[0]['sizes']['latent_height']}x{rows[0]['sizes']['latent_width']}, median of {args.runs} alternating runs")
    width = max(len(label) for label in paths)
    for label in paths:
        cells = [f"batch {row['batch']}: {row['ms'][label]:8.2f} ms ({row['ms'][baseline] / row['ms'][label]:4.2f}x)"
                 for row in rows]
        print(f"{label:<{width}}  " + "  ".join(cells))
    result = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "onnxruntime": onnxruntime.__version__,
              "threads": args.threads, "runs": args.runs, "unet_step_ms": rows}
    if args.e2e:
        seconds = time_reconstructions(folders, args.e2e)
        first = next(iter(seconds))
        print(f"reconstruction, 25 steps, 1 image (median of {args.e2e}): "
              + ", ".join(f"{label} {s:.2f} s ({seconds[first] / s:.2f}x)" for label, s in seconds.items()))
        result["reconstruction_s"] = seconds
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
