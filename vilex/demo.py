"""`vilex demo`: the main job on the built-in tiny checkpoint.

1. make (or reuse) the tiny checkpoint in a cache folder
2. reconstruct the sample images at 1, 16 and all tokens with PyTorch
3. export the checkpoint to ONNX (or reuse the export made from this very checkpoint)
4. reconstruct the same images through onnxruntime and print the PyTorch-vs-ONNX difference
5. write a PNG grid (rows: samples; columns: input, then each token count) and print stage timings
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import PIL.Image

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
        columns.append(pipeline(images, num_tokens=k, num_inference_steps=steps, seed=0, output_type="np").images)
        print(f"      {label}: {len(images)} images at {k:>2} tokens in {time.perf_counter() - start:.2f} s")
    return columns  # each (B, H, W, 3) in [0, 1]


def to_pil(array: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.round(array * 255).astype(np.uint8))


def print_timings(title: str, backend: TimedBackend) -> None:
    print(title)
    for stage, seconds in backend.seconds.items():
        calls = backend.calls[stage]
        print(f"  {stage:<14} {calls:>4} calls  {seconds:7.3f} s total  {1000 * seconds / calls:8.2f} ms/call")


def run_demo(out: Path, cache: Path, steps: int = 25) -> Path:
    from .backends.onnxruntime import OnnxRuntimeBackend
    from .cli import load_pipeline

    # 1. Checkpoint
    start = time.perf_counter()
    ckpt = ensure_tiny_checkpoint(cache)
    pipeline = load_pipeline(str(ckpt))
    print(f"[1/5] tiny checkpoint at {ckpt} ({time.perf_counter() - start:.2f} s)")

    # 2. Reconstruct at 1, 16 and N tokens with PyTorch
    paths = sample_paths()
    images = [load_image(p) for p in paths]
    token_counts = [1, 16, pipeline.num_queries]
    torch_backend = TimedBackend(TorchBackend(pipeline))
    print("[2/5] reconstructing with PyTorch")
    torch_columns = reconstruct_columns(pipeline.set_backend(torch_backend), images, token_counts, steps, "PyTorch")

    # 3. ONNX export
    start = time.perf_counter()
    engines, exported = ensure_export(ckpt, cache)
    print(f"[3/5] ONNX graphs at {engines} ({'exported and validated' if exported else 'reused'} "
          f"in {time.perf_counter() - start:.2f} s)")

    # 4. The same through onnxruntime
    ort_backend = TimedBackend(OnnxRuntimeBackend(engines))
    print("[4/5] reconstructing with onnxruntime (CPU)")
    ort_columns = reconstruct_columns(pipeline.set_backend(ort_backend), images, token_counts, steps, "onnxruntime")
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(torch_columns, ort_columns))
    levels = max(int(np.abs(np.round(a * 255) - np.round(b * 255)).max()) for a, b in zip(torch_columns, ort_columns))
    print(f"      PyTorch vs ONNX: max |diff| {max_diff:.2e} on images in [0, 1] ({levels} of 255 levels in the PNGs)")

    # 5. Grid and timings
    size = (torch_columns[0].shape[2], torch_columns[0].shape[1])
    rows = [[image.resize(size)] + [to_pil(column[i]) for column in torch_columns] for i, image in enumerate(images)]
    with atomic_folder(out) as staging:
        make_grid(rows).save(staging / "grid.png")
    grid = out / "grid.png"
    print(f"[5/5] grid (rows: {', '.join(p.stem for p in paths)}; columns: input, {', '.join(map(str, token_counts))} tokens)")
    print(f"      {grid.resolve()}")
    print_timings("stage timings (PyTorch, CPU):", torch_backend)
    print_timings("stage timings (onnxruntime, CPU):", ort_backend)
    return grid
