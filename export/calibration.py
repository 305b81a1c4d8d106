"""Calibration data for an 8-bit UNet: the UNet's inputs over real denoising trajectories of the checkpoint.

    1. images: toy-world scenes from the `train` split (never the `heldout` split `vilex eval` measures, nor
       the probe's `test` split), or the first images of `--calibration-images DIR`
    2. reconstruct them with the checkpoint's own PyTorch pipeline (fp32), through `ViLexPipeline.__call__`
       (the one denoising loop), seeded, with a backend wrapper that keeps a copy of every UNet call's inputs
       (sample, timestep, encoder_hidden_states) over all steps: each call is one calibration batch
    3. the same for a few more images, kept apart: the 8-bit graph is validated on their UNet inputs, and
       their fp32 reconstructions are the reference of the end-to-end check (export/onnx_export.py)

Token counts cycle through CALIBRATION_TOKENS (clipped to the checkpoint's N), so the text-encoder states the
UNet is calibrated on include short prefixes as well as all tokens, as deployments use them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vilex import settings
from vilex.backends import StageBackend
from vilex.errors import ViLexUsageError

from vilex.engines.precision import CALIBRATION_METHODS, DEFAULT_CALIBRATION_COUNT, MAX_CALIBRATION_COUNT

DEFAULT_HELDOUT_COUNT = 2  # held-out images: 50 UNet calls at 25 steps
CALIBRATION_SEED = 0
CALIBRATION_TOKENS = (None, 1, 4, 16)  # None: all N; each image takes the next (the eval's token counts)
TOY_SPLIT = "train"


@dataclass
class Trajectories:
    """The UNet calls of some reconstructions, and the reconstructions themselves (float, [0, 1])."""

    calls: list[dict[str, np.ndarray]] = field(default_factory=list)  # one dict of float32 inputs per UNet call
    images: torch.Tensor | None = None  # (n, 3, H, W) the fp32 PyTorch reconstructions
    token_counts: list[int] = field(default_factory=list)  # per image

    @property
    def samples(self) -> int:
        return sum(int(call["sample"].shape[0]) for call in self.calls)


@dataclass
class CalibrationSet:
    source: str  # "toyworld:train" or the folder
    images: list  # PIL images: calibration first, then held-out
    count: int  # calibration images; the rest are held out
    steps: int = settings.DEFAULT_STEPS
    method: str = CALIBRATION_METHODS["int8"][0]  # one of CALIBRATION_METHODS[precision]
    guidance: float = settings.DEFAULT_GUIDANCE
    seed: int = CALIBRATION_SEED

    def describe(self, num_queries: int) -> dict:
        return {"source": self.source, "images": self.count, "heldout_images": len(self.images) - self.count,
                "steps": self.steps, "method": self.method, "guidance": self.guidance, "seed": self.seed,
                "token_counts": sorted({token_count(i, num_queries) for i in range(len(self.images))})}


class UNetInputRecorder(StageBackend):
    """Wraps a backend and keeps a float32 copy of every UNet call's inputs; stages run unchanged."""

    def __init__(self, inner: StageBackend):
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if stage == "unet":
            self.calls.append({name: tensor.detach().to("cpu", torch.float32).numpy().copy()
                               for name, tensor in inputs.items()})
        return self.inner.run(stage, inputs)


def token_count(index: int, num_queries: int) -> int:
    k = CALIBRATION_TOKENS[index % len(CALIBRATION_TOKENS)]
    return num_queries if k is None else min(k, num_queries)


def check_count(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_CALIBRATION_COUNT:
        raise ViLexUsageError(f"--calibration-count must be an integer in 1..{MAX_CALIBRATION_COUNT}, got {count!r}")
    return count


def resolve_method(method: str | None, precision: str) -> str:
    """The precision's default method for None; else `method`, if it is one of the precision's."""
    allowed = CALIBRATION_METHODS[precision]
    if method is None:
        return allowed[0]
    if method not in allowed:
        raise ViLexUsageError(f"--calibration-method for --precision {precision} must be one of {', '.join(allowed)}"
                              + (" (onnxruntime's only method for float8)" if precision == "fp8" else "")
                              + f", got {method!r}")
    return method


def calibration_set(images_dir: str | os.PathLike | None, count: int = DEFAULT_CALIBRATION_COUNT,
                    heldout: int = DEFAULT_HELDOUT_COUNT, steps: int = settings.DEFAULT_STEPS,
                    method: str = CALIBRATION_METHODS["int8"][0]) -> CalibrationSet:
    """`count` calibration images and `heldout` more, reconstructed at `steps` steps, to calibrate by `method`
    (`resolve_method`): from `images_dir` (sorted, recursive; it must hold count + heldout readable images),
    else toy-world scenes of the `train` split."""
    check_count(count)
    settings.check_steps(steps, "--calibration-steps")
    if images_dir is None:
        from vilex.toyworld.scenes import SPLITS, make_scenes, render

        scenes = make_scenes(count + heldout, SPLITS[TOY_SPLIT])
        return CalibrationSet(f"toyworld:{TOY_SPLIT}", [render(scene) for scene in scenes], count, steps, method)

    from vilex.errors import ImageInputError
    from vilex.images import load_image
    from vilex.training.data import IMAGE_SUFFIXES

    root = Path(images_dir)
    if not root.is_dir():
        raise ViLexUsageError(f"--calibration-images '{root}' is not a folder")
    images = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        try:
            images.append(load_image(path))
        except ImageInputError:
            continue  # unreadable files are skipped; the count below says whether enough are left
        if len(images) == count + heldout:
            break
    if len(images) < count + heldout:
        raise ViLexUsageError(f"--calibration-images '{root}' holds {len(images)} readable images "
                              f"({', '.join(IMAGE_SUFFIXES)}); --calibration-count {count} needs {count + heldout} "
                              f"({heldout} more are held out to validate the quantized graph)")
    return CalibrationSet(str(root.resolve()), images, count, steps, method)


def record_trajectories(pipeline, images: list, first_index: int, steps: int, guidance: float, seed: int,
                        batch_size: int = 4, log=print) -> Trajectories:
    """Reconstruct `images` with `pipeline` (its own backend, wrapped) and record every UNet call.

    Image i (counted from first_index) uses token_count(i) tokens and its own generator seeded with seed + i
    (`seeded_generators`), so its trajectory does not depend on what it is batched with; images with the same
    token count run together, up to batch_size per call."""
    from vilex.pipeline import seeded_generators

    indices = {}
    for i in range(len(images)):
        indices.setdefault(token_count(first_index + i, pipeline.num_queries), []).append(i)
    inner = pipeline.backend
    recorder = UNetInputRecorder(inner)
    pipeline.set_backend(recorder)
    outputs: dict[int, torch.Tensor] = {}
    try:
        for k, members in indices.items():
            for start in range(0, len(members), batch_size):
                batch = members[start:start + batch_size]
                result = pipeline([images[i] for i in batch], num_tokens=k, num_inference_steps=steps,
                                  guidance_scale=guidance, output_type="pt", progress=False,
                                  generator=seeded_generators([seed + first_index + i for i in batch]))
                outputs.update(zip(batch, result.images))
    finally:
        pipeline.set_backend(inner)
    trajectories = Trajectories(calls=recorder.calls, images=torch.stack([outputs[i] for i in range(len(images))]),
                                token_counts=[token_count(first_index + i, pipeline.num_queries)
                                              for i in range(len(images))])
    log(f"  recorded {len(trajectories.calls)} UNet calls ({trajectories.samples} samples) from {len(images)} "
        f"reconstructions at {steps} steps")
    return trajectories
