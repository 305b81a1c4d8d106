"""Runs the measurements `vilex bench` asks for and writes the report.

1. the checkpoint (given, or a preset made in the cache) and, for non-PyTorch backends, its export
2. FLOPs per stage and batch, counted once on the fp32 PyTorch modules
3. per backend, one at a time: load it, every stage at every batch size, image -> image end to end, release it
4. Triton, once every in-process backend is released: the served pipeline over HTTP and gRPC at each
   concurrency, for each UNet placement (`unet`), each placement's server stopped before the next starts
5. results.json / results.md / plots, and the ratios with --compare

A backend that cannot run here, or fails while it runs, is listed under `skipped` with the reason; what the
other backends measured (and what the failing one finished before it failed) is still written.

Every row records what else of the run was alive while it was measured (benchmarks/isolation.py): nothing,
when the run kept to one backend at a time; a row measured beside another backend's sessions or a server is
marked unsound in the report.
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path

from vilex.stages import STAGE_NAMES

from . import hardware, report
from .isolation import Isolation, problems
from .runner import (BenchSettings, Unavailable, count_flops, load_backend, released, run_end_to_end, run_stage,
                     stage_contracts, stage_sizes)


def _peak(device: str, precision: str, env: dict) -> tuple[float | None, str]:
    if device == "cuda":
        return hardware.gpu_peak_flops(env["gpu"], precision)
    return hardware.cpu_peak_flops(env["cpu"])


def run_bench(ckpt, preset: str, cache: Path, backends: list[str], settings: BenchSettings, out: Path,
              engines: Path | None = None, precision: str = "fp32", concurrency=(1, 2, 4), compare: bool = False,
              command: str = "vilex bench", date: str = "", unet: tuple[str, ...] | None = None) -> dict:
    import torch

    from vilex.images import load_image
    from vilex.presets import ensure_preset_checkpoint
    from vilex.samples import sample_paths

    env = hardware.environment()
    started = time.perf_counter()

    # 1. Checkpoint and export
    ckpt = Path(ckpt) if ckpt else ensure_preset_checkpoint(cache, preset)
    needs_export = any(not b.startswith("torch") for b in backends)
    export_failure = None  # why the backends that run an export cannot run, when exporting failed
    if needs_export and engines is None:
        from vilex.engines.contract import ExportOptions
        from vilex.export.onnx_export import export_checkpoint

        engines = out / "engines"
        print(f"exporting {ckpt} -> {engines} ({precision}) ...")
        try:
            export_checkpoint(ckpt, engines, ExportOptions(precision=precision,
                                                           max_batch=max(max(settings.batch_sizes), settings.e2e_batch)),
                              replace=True)
        except Exception as error:  # the PyTorch backends still run; the others are skipped with this reason
            engines, export_failure = None, f"the export failed: {error}"
            print(f"export failed: {error}")
    if "tensorrt" in backends and engines is not None:
        try:
            from vilex.engines.folder import EngineFolder
            from vilex.export.tensorrt_build import build_engines

            build_engines(EngineFolder.open(engines), fp16=precision == "fp16")
        except Exception as error:  # reported as the reason tensorrt is skipped below
            print(f"tensorrt engines not built: {error}")

    # 2. FLOPs on the fp32 PyTorch modules
    contracts, dims, reference = stage_contracts(ckpt, settings.batch_sizes)
    from vilex.stages import stage_modules
    from vilex.export.validate import sample_inputs

    modules = stage_modules(reference)
    flops = {}
    wanted = {(stage, batch) for stage in settings.stages for batch in settings.batch_sizes}
    if settings.end_to_end:
        wanted |= {(stage, settings.e2e_batch) for stage in STAGE_NAMES}
    for stage, batch in sorted(wanted):
        inputs = sample_inputs(contracts[stage], stage_sizes(contracts, stage, batch), torch.Generator().manual_seed(0))
        flops[(stage, batch)] = count_flops(modules[stage], inputs)
    del reference, modules
    gc.collect()  # the reference pipeline is no backend: gone before the first one is measured
    images = [load_image(p) for p in sample_paths()]
    images = (images * settings.e2e_batch)[: settings.e2e_batch]

    results, skipped, peaks = [], {}, {}
    isolation = Isolation()

    def record(backend: str, kind: str, batch: int, stats, device: str, precision_: str, stage: str | None = None,
               call_flops: int | None = None, server: dict | None = None):
        peak, source = _peak(device, precision_, env)
        peaks[f"{device} {precision_}"] = source
        fraction = None
        if call_flops and peak:
            fraction = call_flops / (stats.p50_ms / 1000) / peak
        row = {"backend": backend, "kind": kind, "stage": stage, "batch": batch, "device": device,
               "precision": precision_, "steps": settings.steps, "num_tokens": settings.num_tokens,
               "flops": call_flops, "fraction_of_peak": fraction, "stats": stats.to_dict()}
        if server:
            row["server"] = server  # where the served request's time went (benchmarks/triton.py)
        results.append(row)
        what = stage or f"end-to-end {settings.steps} steps"
        print(f"  {backend:<16} {what:<22} batch {batch:>2} conc {stats.concurrency:>2}: p50 {stats.p50_ms:9.2f} ms  "
              f"{stats.throughput:8.2f} img/s" + (f"  {100 * fraction:5.1f}% of peak" if fraction else "")
              + (f"  server overhead {server['overhead_ms']:.1f} ms" if server else ""))
        for why in problems(stats.extra.get("alongside", {})):
            print(f"    unsound: {why}")

    def skip(name: str, reason: str):
        skipped[name] = reason
        print(f"skipped {name}: {reason}")

    def failed(name: str, error: Exception, rows_before: int):
        # One backend's failure (a server that does not start, an out-of-memory GPU) costs its own figures
        # only: the rows it finished stay, and the report is still written for the others.
        finished = len(results) - rows_before
        after = f" after {finished} measurement{'s' * (finished != 1)}" if finished else ""
        skip(name, f"failed{after}: {type(error).__name__}: {error}")

    # 3. Stage and end-to-end measurements per backend
    for name in (b for b in backends if b != "triton"):
        if export_failure and not name.startswith("torch"):
            skip(name, export_failure)
            continue
        rows_before = len(results)
        isolation.loading(name)
        try:
            bench = load_backend(name, ckpt, engines)
        except Unavailable as reason:
            skip(name, str(reason))
            continue
        except Exception as error:
            failed(name, error, rows_before)
            continue
        print(f"{name} ({bench.device}, {bench.precision}):")
        with released(bench, isolation):
            try:
                for stage in settings.stages:
                    for batch in settings.batch_sizes:
                        stats = run_stage(bench, contracts, stage, batch, settings, watch=isolation.watch(name))
                        record(name, "stage", batch, stats, bench.device, bench.precision, stage, flops[(stage, batch)])
                if settings.end_to_end:
                    e2e_flops = _end_to_end_flops(flops, settings)
                    stats = run_end_to_end(bench, images, settings, watch=isolation.watch(name))
                    record(name, "e2e", settings.e2e_batch, stats, bench.device, bench.precision, call_flops=e2e_flops)
            except Exception as error:
                failed(name, error, rows_before)

    # 4. Triton
    if "triton" in backends and export_failure:
        skip("triton", export_failure)
    elif "triton" in backends:
        from .triton import measure_triton

        rows_before = len(results)
        # closing(): the server stops when the run ends here for any reason (Ctrl-C, SIGTERM), not whenever the
        # suspended generator happens to be collected.
        sweep = measure_triton(engines, images, settings, concurrency, placements=unet, isolation=isolation)
        try:
            with contextlib.closing(sweep):
                for placement, protocol, stats, server in sweep:
                    # The server's processes hold the models: peak RSS here is the client's only.
                    record(f"triton-{placement}-{protocol}", "e2e", settings.e2e_batch, stats, "cpu", "fp32",
                           call_flops=_end_to_end_flops(flops, settings) if settings.end_to_end else None,
                           server=server)
        except Unavailable as reason:
            skip("triton", str(reason))
        except Exception as error:
            failed("triton", error, rows_before)

    # 5. Report
    data = {"date": date, "command": command, "checkpoint": str(ckpt), "engines": str(engines) if engines else None,
            "environment": env, "settings": {k: v for k, v in vars(settings).items()}, "peaks": peaks,
            "results": results, "skipped": skipped, "seconds": time.perf_counter() - started}
    # Every ratio, with `stable: false` where a row behind it is unsound (report.row_problems).
    data["comparisons"] = report.comparisons(data)
    files = report.write(data, out)
    print()
    print(report.markdown(data))
    if compare:
        print("ratios (p50 latency):")
        for line in report.ratios(data):
            print("  " + line)
    print(f"wrote {', '.join(str(p) for p in files.values())} in {data['seconds']:.0f} s")
    return data


def _end_to_end_flops(flops: dict, settings: BenchSettings) -> int:
    """FLOPs of one image -> image call: encoder, two text-encoder calls (cond, uncond), steps x UNet, VAE."""
    b = settings.e2e_batch
    return (flops[("vilex_encoder", b)] + 2 * flops[("text_encoder", b)] + settings.steps * flops[("unet", b)]
            + flops[("vae_decoder", b)])
