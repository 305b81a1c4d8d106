"""`vilex demo`: the main job on the built-in tiny checkpoint.

1. make (or reuse) the tiny checkpoint in a cache folder
2. reconstruct the sample images at 1, 16 and all tokens
3. write a PNG grid (rows: samples; columns: input, then each token count) and print stage timings
"""

from __future__ import annotations

import time
from pathlib import Path

from .backends import TimedBackend, TorchBackend
from .images import load_image, make_grid
from .outputs import atomic_folder
from .samples import sample_paths


def ensure_tiny_checkpoint(cache: Path, seed: int = 0) -> Path:
    from .presets import tiny

    ckpt = cache / f"tiny-seed{seed}"
    if not (ckpt / "model_index.json").is_file():
        with atomic_folder(ckpt, must_be_new=True) as staging:
            tiny(seed).save_pretrained(staging, safe_serialization=True)
    return ckpt


def run_demo(out: Path, cache: Path, steps: int = 25) -> Path:
    from .cli import load_pipeline

    # 1. Checkpoint
    start = time.perf_counter()
    ckpt = ensure_tiny_checkpoint(cache)
    pipeline = load_pipeline(str(ckpt))
    print(f"[1/3] tiny checkpoint at {ckpt} ({time.perf_counter() - start:.2f} s)")

    # 2. Reconstruct at 1, 16 and N tokens
    backend = TimedBackend(TorchBackend(pipeline))
    pipeline.set_backend(backend)
    paths = sample_paths()
    images = [load_image(p) for p in paths]
    token_counts = [1, 16, pipeline.num_queries]
    columns = []
    for k in token_counts:
        start = time.perf_counter()
        columns.append(pipeline(images, num_tokens=k, num_inference_steps=steps, seed=0).images)
        print(f"[2/3] reconstructed {len(images)} images at {k:>2} tokens in {time.perf_counter() - start:.2f} s")

    # 3. Grid and timings
    size = columns[0][0].size
    rows = [[image.resize(size)] + [column[i] for column in columns] for i, image in enumerate(images)]
    with atomic_folder(out) as staging:
        make_grid(rows).save(staging / "grid.png")
    grid = out / "grid.png"
    print(f"[3/3] grid (rows: {', '.join(p.stem for p in paths)}; columns: input, {', '.join(map(str, token_counts))} tokens)")
    print(f"      {grid.resolve()}")
    print("stage timings (PyTorch, CPU):")
    for stage, seconds in backend.seconds.items():
        calls = backend.calls[stage]
        print(f"  {stage:<14} {calls:>4} calls  {seconds:7.3f} s total  {1000 * seconds / calls:8.2f} ms/call")
    return grid
