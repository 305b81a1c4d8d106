"""Training throughput: images/s and peak memory per optimizer step, for a preset (or CKPT) and batch size.

    python benchmarks/train_throughput.py --preset tiny --batch-size 4
    python benchmarks/train_throughput.py --preset sd15 --batch-size 8 --mixed-precision bf16 --gradient-checkpointing

It drives the real trainer (`vilex.training.Trainer.train_step`: data loader, VAE encoding, ViLex
encoder with TailDrop, text encoder, UNet, backward, AdamW) on synthetic images written to a
temporary folder, times each step (synchronising the GPU), and records the step's peak memory: GPU
memory (torch's allocator peak) on CUDA, the process's resident memory sampled every 20 ms otherwise.
The first --warmup steps (allocator and kernel warm-up) are printed but left out of the summary.
Results are printed and, with --json, saved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def synthetic_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """Smooth random colour fields (JPEG-sized work for the loader, not noise the VAE hates)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small", "sd15"))
    parser.add_argument("--ckpt", default=None, help="a ViLex checkpoint folder instead of --preset")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step (per process)")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and not counted")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--train-vision", action="store_true")
    parser.add_argument("--resolution", type=int, default=None, help="VAE input size (default: the UNet's)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from vilex.benchmarks.hardware import environment
    from vilex.benchmarks.measure import PeakMemory
    from vilex.presets import build_preset
    from vilex.training import TrainConfig, Trainer

    # 1. The model: a preset built in memory (no 5 GB save for sd15), or a checkpoint folder
    if args.ckpt:
        from vilex import ViLexPipeline

        pipeline, label = ViLexPipeline.from_pretrained(args.ckpt), args.ckpt
    else:
        pipeline, label = build_preset(args.preset), f"preset {args.preset}"
    resolution = args.resolution or pipeline.default_size

    with tempfile.TemporaryDirectory(prefix="vilex-train-bench-") as tmp:
        # 2. Synthetic data: enough images for two batches; the stream repeats them
        data = Path(tmp) / "data"
        data.mkdir()
        synthetic_images(data, max(2 * args.batch_size, 4), resolution)
        config = TrainConfig(checkpoint=label, data=str(data), out=str(Path(tmp) / "run"),
                             max_steps=args.warmup + args.steps, batch_size=args.batch_size, warmup_steps=0,
                             mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                             train_vision=args.train_vision, resolution=resolution, num_workers=args.num_workers,
                             holdout=0, progress=False, cpu=args.cpu)
        trainer = Trainer(config, pipeline=pipeline).setup()
        device = trainer.accelerator.device
        on_cuda = device.type == "cuda"
        print(f"train throughput: {label}, batch {args.batch_size}, {resolution}x{resolution}, "
              f"mixed precision {args.mixed_precision}, gradient checkpointing {args.gradient_checkpointing}, "
              f"vision {'trained' if args.train_vision else 'frozen'}, device {device}")
        trainable = sum(p.numel() for p in trainer.trainable)
        print(f"trainable parameters: {trainable / 1e6:.2f} M")

        # 3. Steps, each timed and with its own memory peak
        rows = []
        print(f"{'step':>5} {'seconds':>8} {'images/s':>9} {'peak MB':>9} {'loss':>8}")
        for i in range(args.warmup + args.steps):
            with PeakMemory() as memory:
                if on_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                figures = trainer.train_step()
                if on_cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            peak = (memory.peak_gpu if on_cuda else memory.peak_rss) / 2**20
            row = {"step": i + 1, "seconds": seconds, "images_per_s": figures["images"] / seconds, "peak_mb": peak,
                   "loss": figures["loss"], "warmup": i < args.warmup}
            rows.append(row)
            print(f"{row['step']:>5} {seconds:8.3f} {row['images_per_s']:9.2f} {peak:9.0f} {row['loss']:8.4f}"
                  f"{'  (warm-up)' if row['warmup'] else ''}")

    # 4. Summary over the measured steps
    measured = [r for r in rows if not r["warmup"]]
    total_images = sum(r["images_per_s"] * r["seconds"] for r in measured)
    summary = {
        "model": label, "batch_size": args.batch_size, "resolution": resolution, "device": str(device),
        "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
        "train_vision": args.train_vision, "trainable_parameters": trainable, "measured_steps": len(measured),
        "images_per_s": total_images / sum(r["seconds"] for r in measured),
        "median_step_s": statistics.median(r["seconds"] for r in measured),
        "peak_memory_mb": max(r["peak_mb"] for r in measured),
        "memory_kind": "GPU allocated (torch)" if on_cuda else "process RSS",
        "steps": rows, "environment": environment(),
    }
    print(f"\n{summary['images_per_s']:.2f} images/s over {len(measured)} steps "
          f"(median step {summary['median_step_s']:.3f} s); peak memory {summary['peak_memory_mb']:.0f} MB "
          f"({summary['memory_kind']})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
        print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
