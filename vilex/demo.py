"""`vilex demo`: the main job on the shipped, trained toy checkpoint, deployed the way a user would deploy it.

1. the toy checkpoint shipped in the package (or, with --checkpoint tiny, the random tiny preset)
2. reconstruct 4 held-out toy scenes at 1, 4, 16 and all tokens with PyTorch (the reference), and make the
   caption-only baseline and an edit (ViLex + "blue" with text-free guidance)
3. export the checkpoint to ONNX (or reuse the export made from this very checkpoint), run the same
   reconstructions through onnxruntime in-process and print the PyTorch-vs-ONNX difference
4. serve it: a Triton model repository from the export, a real tritonserver on free local ports, the
   scenes reconstructed through it over HTTP (the per-request latency printed), then a burst of
   concurrent requests that the server batches; the server is stopped
5. measure fidelity on held-out scenes against the baselines (a small `vilex eval`) and print the table
6. write a PNG grid (rows: scenes; columns: input, the served reconstructions at each token count, the
   caption baseline, the edit) and print stage timings, in-process and on the server
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

EDIT_WORD = "blue"
EDIT_GUIDANCE = 7.5


def ensure_export(ckpt: Path, cache: Path, name: str | None = None) -> tuple[Path, bool]:
    """The ONNX export of `ckpt` under cache/engines/NAME; re-exported (atomically) unless it is of this checkpoint."""
    from .errors import ViLexUsageError
    from .engines.folder import EngineFolder
    from .export.onnx_export import export_checkpoint

    out = cache / "engines" / (name or ckpt.name)
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


def demo_inputs(out: Path, count: int = 4) -> list[Path]:
    """The first `count` held-out toy scenes (never trained on), written as PNGs: the served requests send
    these files' bytes, as a client would."""
    from .toyworld.scenes import SPLITS, make_scenes

    folder = out / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(make_scenes(count, SPLITS["heldout"])):
        path = folder / f"heldout-{i}.png"
        scene.render().save(path)
        (folder / f"heldout-{i}.txt").write_text(scene.caption + "\n")
        paths.append(path)
    return paths


def demo_checkpoint(cache: Path, checkpoint: str) -> Path:
    """'toy': the trained toy checkpoint shipped in the package; 'tiny': the random preset (fast, for tests)."""
    from .errors import ViLexUsageError
    from .toyworld.shipped import checkpoint_path

    if checkpoint == "toy":
        return checkpoint_path()
    if checkpoint == "tiny":
        return ensure_preset_checkpoint(cache, "tiny")
    raise ViLexUsageError(f"--checkpoint must be toy or tiny, got {checkpoint!r}")


def run_demo(out: Path, cache: Path, steps: int = 25, checkpoint: str = "toy", eval_images: int = 32) -> Path:
    from .backends.onnxruntime import OnnxRuntimeBackend
    from .runtime import load_pipeline
    from .evaluation.evaluate import EvalConfig, Evaluation, markdown

    # 1. Checkpoint
    start = time.perf_counter()
    ckpt = demo_checkpoint(cache, checkpoint)
    pipeline = load_pipeline(str(ckpt))
    print(f"[1/6] {checkpoint} checkpoint at {ckpt} ({time.perf_counter() - start:.2f} s)")

    # 2. Reconstruct held-out scenes at 1, 4, 16 and all tokens with PyTorch; the caption baseline and an edit
    out.mkdir(parents=True, exist_ok=True)
    paths = demo_inputs(out)
    images = [load_image(p) for p in paths]
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    token_counts = [k for k in (1, 4, 16) if k < pipeline.num_queries] + [pipeline.num_queries]
    torch_backend = TimedBackend(TorchBackend(pipeline))
    print(f"[2/6] reconstructing {len(images)} held-out scenes with PyTorch")
    torch_columns = reconstruct_columns(pipeline.set_backend(torch_backend), images, token_counts, steps, "PyTorch")
    generators = [torch.Generator().manual_seed(0) for _ in images]
    caption_column = pipeline.generate(None, prompt=captions, num_inference_steps=steps, generator=generators,
                                       output_type="np", progress=False).images
    generators = [torch.Generator().manual_seed(0) for _ in images]
    edit_tokens = min(pipeline.num_queries, pipeline.prompt_builder.max_vilex_tokens(EDIT_WORD))  # tiny: 75 + 1 > 75
    edit_column = pipeline(images, num_tokens=edit_tokens, prompt=EDIT_WORD, text_guidance_scale=EDIT_GUIDANCE,
                           num_inference_steps=steps, generator=generators, output_type="np", progress=False).images
    print(f"      PyTorch: the captions alone, and ViLex + {EDIT_WORD!r} with text-free guidance {EDIT_GUIDANCE}")

    # 3. ONNX export, and the same through onnxruntime in-process
    start = time.perf_counter()
    engines, exported = ensure_export(ckpt, cache, name=checkpoint)
    print(f"[3/6] ONNX graphs at {engines} ({'exported and validated' if exported else 'reused'} "
          f"in {time.perf_counter() - start:.2f} s)")
    ort_backend = TimedBackend(OnnxRuntimeBackend(engines))
    ort_columns = reconstruct_columns(pipeline.set_backend(ort_backend), images, token_counts, steps, "onnxruntime")
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(torch_columns, ort_columns))
    levels = max(int(np.abs(to_uint8(a).astype(int) - to_uint8(b)).max()) for a, b in zip(torch_columns, ort_columns))
    print(f"      PyTorch vs ONNX: max |diff| {max_diff:.2e} on images in [0, 1] ({levels} of 255 levels in the PNGs)")

    # 4. Serve: repository, tritonserver, requests over HTTP, stop
    print("[4/6] serving with Triton")
    served_columns, statistics = serve_and_reconstruct(engines, cache, paths, token_counts, steps)
    served_levels = max(int(np.abs(s.astype(int) - to_uint8(o)).max()) for s, o in zip(served_columns, ort_columns))
    print(f"      served vs in-process onnxruntime: max |diff| {served_levels} of 255 levels")

    # 5. Fidelity on held-out scenes (PyTorch), against the baselines
    print(f"[5/6] fidelity on {eval_images} held-out scenes (PyTorch, {steps} steps; the full table for the shipped "
          f"checkpoint, on 200 scenes, is in vilex/toyworld/weights/MODEL_CARD.md)")
    pipeline.set_backend(TorchBackend(pipeline))
    evaluation = Evaluation(EvalConfig(checkpoint=str(ckpt), out=str(out), n=eval_images, steps=steps, sweep_n=0,
                                       batch_size=eval_images), pipeline=pipeline)
    print(markdown(evaluation.run(log=lambda line: None)))

    # 6. Grid (the served reconstructions, then the in-process caption baseline and edit) and timings
    height, width = served_columns[0].shape[1:3]
    rows = [[image.resize((width, height))] + [PIL.Image.fromarray(column[i]) for column in served_columns]
            + [PIL.Image.fromarray(to_uint8(caption_column[i])), PIL.Image.fromarray(to_uint8(edit_column[i]))]
            for i, image in enumerate(images)]
    labels = ["input"] + [f"served {k} tok" for k in token_counts] + ["caption only", f"+ '{EDIT_WORD}'"]
    with atomic_folder(out) as staging:
        make_grid(rows, labels=labels, scale=2).save(staging / "grid.png")
    grid = out / "grid.png"
    print(f"[6/6] grid (rows: held-out scenes; columns: {', '.join(labels)})")
    print(f"      {grid.resolve()}")
    print_timings("stage timings (PyTorch, CPU):", torch_backend)
    print_timings("stage timings (onnxruntime, CPU):", ort_backend)
    print("server statistics (tritonserver, CPU; inferences count images or batch items; compute per execution, "
          "queue per request):")
    for model, stats in statistics.items():
        print(f"  {model:<17} {stats['inferences']:>4} inferences  {stats['executions']:>4} executions  "
              f"{stats['compute_ms']:8.2f} ms compute  {stats['queue_ms']:7.2f} ms queue  batch sizes {stats['batch_sizes']}")
    return grid
