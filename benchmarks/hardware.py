"""The machine a benchmark ran on, and the peak FLOP/s we compare achieved figures against.

GPU peaks are NVIDIA's datasheet figures for dense tensor-core math (no 2:4 sparsity), per precision.
CPU peaks are computed: cores x max clock x FLOPs per cycle per core for fp32 FMA (2 FMA units:
32 with AVX2, 64 with AVX-512), the textbook figure; the clock is the reported max (or current) MHz.
Both are stated in the report with their source, since "fraction of peak" means little without them.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from importlib import metadata

# name fragment -> {precision: dense TFLOP/s}; from NVIDIA's datasheets (SXM parts where both exist).
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
}
PACKAGES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
            "tritonclient", "nvidia-pytriton", "numpy", "vilex")


def cpu_info() -> dict:
    info = {"model": platform.processor() or platform.machine(), "cores": os.cpu_count(), "mhz": None, "flags": ""}
    try:
        text = open("/proc/cpuinfo").read()
        model = re.search(r"model name\s*:\s*(.+)", text)
        flags = re.search(r"flags\s*:\s*(.+)", text)
        mhz = re.findall(r"cpu MHz\s*:\s*([\d.]+)", text)
        info["model"] = model.group(1).strip() if model else info["model"]
        info["flags"] = flags.group(1) if flags else ""
        info["mhz"] = max(float(m) for m in mhz) if mhz else None
    except OSError:
        pass
    try:
        max_khz = int(open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read())
        info["mhz"] = max_khz / 1000
    except (OSError, ValueError):
        pass
    try:
        info["cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return info


def cpu_peak_flops(info: dict) -> tuple[float | None, str]:
    if not info.get("mhz"):
        return None, "unknown (no CPU clock reported)"
    flags = info.get("flags", "").split()
    per_cycle, isa = (64, "AVX-512") if "avx512f" in flags else (32, "AVX2+FMA") if "fma" in flags else (8, "SSE")
    peak = info["cores"] * info["mhz"] * 1e6 * per_cycle
    return peak, (f"computed fp32 peak: {info['cores']} cores x {info['mhz'] / 1000:.2f} GHz x {per_cycle} "
                  f"FLOP/cycle ({isa}, 2 FMA units) = {peak / 1e9:.0f} GFLOP/s")


def gpu_info() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info = {"name": props.name, "memory_gb": props.total_memory / 1e9,
            "compute_capability": f"{props.major}.{props.minor}", "driver": None}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def gpu_peak_flops(info: dict | None, precision: str) -> tuple[float | None, str]:
    if info is None:
        return None, "no GPU"
    for fragment, peaks in GPU_PEAK_TFLOPS.items():
        if fragment in info["name"]:
            key = precision if precision in peaks else "fp32"
            return peaks[key] * 1e12, f"NVIDIA datasheet, {fragment} dense {key}: {peaks[key]} TFLOP/s"
    return None, f"unknown GPU '{info['name']}' (add it to benchmarks/hardware.py GPU_PEAK_TFLOPS)"


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_info(),
            "gpu": gpu_info(), "packages": versions}


if __name__ == "__main__":
    print(json.dumps(environment(), indent=2))
