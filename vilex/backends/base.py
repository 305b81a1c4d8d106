from __future__ import annotations

import collections
import time

import torch

from ..settings import MAX_SIDE
from ..stages import STAGE_NAMES, stage_modules


class StageBackend:
    """Runs the stages `vilex_encoder`, `text_encoder`, `unet` and `vae_decoder`."""

    name = "base"
    # Where the denoising loop keeps its tensors for this backend (GPU backends override it), so a step
    # does not copy latents between host and device.
    device = torch.device("cpu")

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")

    def side_range(self, side: str) -> tuple[int, int]:
        """The output heights (side "height") or widths ("width"), in pixels, that the stages take:
        `ViLexPipeline.generate` checks height and width against them before any stage runs. PyTorch modules
        take any size up to settings.MAX_SIDE; a backend of an export folder narrows it to the export's bounds."""
        return 1, MAX_SIDE

    def __call__(self, stage: str, **inputs: torch.Tensor) -> torch.Tensor:
        if stage not in STAGE_NAMES:
            raise KeyError(f"unknown stage {stage!r}; stages are {STAGE_NAMES}")
        return self.run(stage, inputs)


class TorchBackend(StageBackend):
    """The reference: the checkpoint's own PyTorch modules through the stage wrappers."""

    name = "torch"

    def __init__(self, pipeline):
        self.modules = stage_modules(pipeline)

    @property
    def device(self) -> torch.device:
        return next(self.modules["unet"].parameters()).device

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        module = self.modules[stage]
        parameter = next(module.parameters())
        inputs = {
            name: value.to(parameter.device, parameter.dtype if value.is_floating_point() else value.dtype)
            for name, value in inputs.items()
        }
        return module(**inputs)


class TimedBackend(StageBackend):
    """Wraps a backend and adds up wall time and calls per stage (for the demo and benchmarks)."""

    def __init__(self, inner: StageBackend):
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.seconds = collections.defaultdict(float)
        self.calls = collections.defaultdict(int)

    def side_range(self, side: str) -> tuple[int, int]:
        return self.inner.side_range(side)

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        output = self.inner.run(stage, inputs)
        self.seconds[stage] += time.perf_counter() - start
        self.calls[stage] += 1
        return output
