"""`vilex demo`: the main job on the built-in tiny checkpoint, deployed the way a user would deploy it.

1. make (or reuse) the tiny checkpoint in a cache folder
2. reconstruct the sample images at 1, 16 and all tokens with PyTorch (the reference)
3. export the checkpoint to ONNX (or reuse the export made from this very checkpoint), run the same
   reconstructions through onnxruntime in-process and print the PyTorch-vs-ONNX difference
4. serve it: a Triton model repository from the export, a real tritonserver on free local ports, the
   sample images reconstructed through it over HTTP (the per-request latency printed), then a burst of
   concurrent requests that the server batches; the server is stopped
5. write a PNG grid of the served reconstructions (rows: samples; columns: input, then each token
   count) and print stage timings, in-process and on the server
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .backends import TimedBackend, TorchBackend
from .images import load_image, make_grid
from .presets import ensure_preset_checkpoint
from .outputs import atomic_folder
from .samples import sample_paths


def ensure_export(ckpt: Path, cache: Path) -> tuple[Path, bool]:
    """The ONNX export of `ckpt` under cache/engines; re-exported (atomically) unless it is of this checkpoint."""
    from .errors import ViLexUsageError
    from .export.manifest import EngineFolder
    from .export.onnx_export import export_checkpoint

    out = cache / "engines" / ckpt.name
    replace = (out / "manifest.json").is_file()
    if replace:
        try:
            EngineFolder.open(out).check_source(ckpt)
            return out, False
        except ViLexUsageError:
            pass  # stale or damaged: export again below
    export_checkpoint(ckpt, out, replace=replace, log=lambda line: print(f"      {line.strip()}"))
    return out, True


def reconstruct_columns(pipeline, images, token_counts, steps, label: str) -> list[np.ndarray]:
    columns = []
    for k in token_counts:
        start = time.perf_counter()
        # One generator per image, all seeded 0: each image gets the noise it would get alone, which is
        # what the server does (its results must not depend on which requests share a batch).
        generators = [torch.Generator().manual_seed(0) for _ in images]
        columns.append(pipeline(images, num_tokens=k, num_inference_steps=steps, generator=generators,
                                output_type="np").images)
        print(f"      {label}: {len(images)} images at {k:>2} tokens in {time.perf_counter() - start:.2f} s")
    return columns  # each (B, H, W, 3) in [0, 1]


def to_uint8(array: np.ndarray) -> np.ndarray:
    return np.round(array * 255).astype(np.uint8)  # as the pipeline writes PNGs


def print_timings(title: str, backend: TimedBackend) -> None:
    print(title)
    for stage, seconds in backend.seconds.items():
        calls = backend.calls[stage]
        print(f"  {stage:<14} {calls:>4} calls  {seconds:7.3f} s total  {1000 * seconds / calls:8.2f} ms/call")


def serve_and_reconstruct(engines: Path, cache: Path, paths: list[Path], token_counts: list[int],
                          steps: int) -> tuple[list[np.ndarray], dict]:
    """Step 4: repository, server, requests (sequential, then concurrent), server stopped.

    Returns the served reconstructions per token count ((B, H, W, 3) uint8 each) and the server's
    statistics per model."""
    from .serving.client import TritonClient, map_concurrently
    from .serving.repository import build_repository
    from .serving.server import Ports, TritonServer

    # 4a. Model repository (rebuilt each run: it is a few hard links and small files)
    repository = build_repository(engines, cache / "triton" / engines.name, platform="python-ort", replace=True)
    print(f"      model repository at {repository} (python-ort: a Python-backend onnxruntime model per graph, "
          f"and the BLS models vilex_tokenize, vilex_generate, vilex_reconstruct)")

    # 4b. A real tritonserver; SIGTERM stops it the way Ctrl-C does
    start = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    server = TritonServer(repository, ports=Ports.free())
    try:
        server.start()
        print(f"      tritonserver (pid {server.pid}) ready on http {server.url('http')} and grpc {server.url('grpc')} "
              f"in {time.perf_counter() - start:.1f} s")
        encoded = [p.read_bytes() for p in paths]

        # 4c. One request per image and token count, one after another: the latency of each
        print("      request  image      tokens  latency")
        columns, latencies = [], []
        with TritonClient(server.url("http")) as client:
            for k in token_counts:
                column = []
                for path, image in zip(paths, encoded):
                    column.append(client.reconstruct([image], num_tokens=k, steps=steps, seed=0)[0])
                    latencies.append(client.last_latency_s)
                    print(f"      {len(latencies):>7}  {path.stem:<10} {k:>6}  {1000 * client.last_latency_s:7.0f} ms")
                columns.append(np.stack(column))
            print(f"      per request: median {1000 * float(np.median(latencies)):.0f} ms, "
                  f"max {1000 * max(latencies):.0f} ms ({steps} steps with classifier-free guidance, CPU)")

            # 4d. The same images all at once, each from its own client thread: the server batches them
            before = client.batch_sizes("vilex_reconstruct")
            start = time.perf_counter()
            burst = map_concurrently(server.url("http"), "http",
                                     lambda c, image: c.reconstruct([image], steps=steps, seed=0)[0],
                                     encoded, workers=len(encoded))
            wall = time.perf_counter() - start
            time.sleep(0.5)  # Triton records an execution's statistics just after sending its responses
            after = client.batch_sizes("vilex_reconstruct")
            batches = {size: after.get(size, 0) - before.get(size, 0) for size in after if after.get(size, 0) > before.get(size, 0)}
            same = all(np.array_equal(a, b) for a, b in zip(burst, columns[-1]))
            print(f"      {len(encoded)} concurrent requests in {wall:.2f} s; executions by batch size {batches}; "
                  f"{'identical to' if same else 'DIFFERENT from'} the requests sent one at a time")
            statistics = {model: client.statistics(model) for model in
                          ("vilex_reconstruct", "vilex_encoder", "text_encoder", "unet", "vae_decoder")}
    finally:
        # A second Ctrl-C or SIGTERM must not cut the shutdown short (stop() is bounded by its timeouts).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = server.stop()
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous)
    print(f"      tritonserver stopped (exit code {code})")
    return columns, statistics


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_demo(out: Path, cache: Path, steps: int = 25) -> Path:
    from .backends.onnxruntime import OnnxRuntimeBackend
    from .cli import load_pipeline

    # 1. Checkpoint
    start = time.perf_counter()
    ckpt = ensure_preset_checkpoint(cache, "tiny")
    pipeline = load_pipeline(str(ckpt))
    print(f"[1/5] tiny checkpoint at {ckpt} ({time.perf_counter() - start:.2f} s)")

    # 2. Reconstruct at 1, 16 and N tokens with PyTorch
    paths = sample_paths()
    images = [load_image(p) for p in paths]
    token_counts = [1, 16, pipeline.num_queries]
    torch_backend = TimedBackend(TorchBackend(pipeline))
    print("[2/5] reconstructing with PyTorch")
    torch_columns = reconstruct_columns(pipeline.set_backend(torch_backend), images, token_counts, steps, "PyTorch")

    # 3. ONNX export, and the same through onnxruntime in-process
    start = time.perf_counter()
    engines, exported = ensure_export(ckpt, cache)
    print(f"[3/5] ONNX graphs at {engines} ({'exported and validated' if exported else 'reused'} "
          f"in {time.perf_counter() - start:.2f} s)")
    ort_backend = TimedBackend(OnnxRuntimeBackend(engines))
    ort_columns = reconstruct_columns(pipeline.set_backend(ort_backend), images, token_counts, steps, "onnxruntime")
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(torch_columns, ort_columns))
    levels = max(int(np.abs(to_uint8(a).astype(int) - to_uint8(b)).max()) for a, b in zip(torch_columns, ort_columns))
    print(f"      PyTorch vs ONNX: max |diff| {max_diff:.2e} on images in [0, 1] ({levels} of 255 levels in the PNGs)")

    # 4. Serve: repository, tritonserver, requests over HTTP, stop
    print("[4/5] serving with Triton")
    served_columns, statistics = serve_and_reconstruct(engines, cache, paths, token_counts, steps)
    served_levels = max(int(np.abs(s.astype(int) - to_uint8(o)).max()) for s, o in zip(served_columns, ort_columns))
    print(f"      served vs in-process onnxruntime: max |diff| {served_levels} of 255 levels")

    # 5. Grid (the served reconstructions) and timings
    height, width = served_columns[0].shape[1:3]
    rows = [[image.resize((width, height))] + [PIL.Image.fromarray(column[i]) for column in served_columns]
            for i, image in enumerate(images)]
    with atomic_folder(out) as staging:
        make_grid(rows).save(staging / "grid.png")
    grid = out / "grid.png"
    print(f"[5/5] grid of the served reconstructions (rows: {', '.join(p.stem for p in paths)}; "
          f"columns: input, {', '.join(map(str, token_counts))} tokens)")
    print(f"      {grid.resolve()}")
    print_timings("stage timings (PyTorch, CPU):", torch_backend)
    print_timings("stage timings (onnxruntime, CPU):", ort_backend)
    print("server statistics (tritonserver, CPU; inferences count images or batch items; compute per execution, "
          "queue per request):")
    for model, stats in statistics.items():
        print(f"  {model:<17} {stats['inferences']:>4} inferences  {stats['executions']:>4} executions  "
              f"{stats['compute_ms']:8.2f} ms compute  {stats['queue_ms']:7.2f} ms queue  batch sizes {stats['batch_sizes']}")
    return grid
