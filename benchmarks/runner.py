"""What `vilex bench` measures: each stage and image -> image end to end, on each available backend.

Backends (a name that cannot run here is skipped with the reason, never silently):
    torch             PyTorch eager, fp32, SDPA attention (diffusers' default processor); CPU or GPU
    torch-fp16/-bf16  PyTorch eager in half precision (GPU)
    torch-cudagraph   fp16 eager captured once per input shape into a CUDA graph and replayed (GPU)
    torch-compile     fp16 through torch.compile (GPU)
    onnxruntime       the exported graphs on onnxruntime's CPU provider
    onnxruntime-cuda  ... on the CUDA provider; onnxruntime-trt on the TensorRT provider (when present)
    tensorrt          the engines from `vilex build-engines`
    triton            the served pipeline over HTTP and gRPC, through a concurrency sweep (benchmarks/triton.py)

A UNet step at image batch B is one UNet call at batch 2B: the pipeline stacks the unconditional and
the conditional branch for classifier-free guidance (its default), so that is what one step costs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vilex.settings import DEFAULT_GUIDANCE, DEFAULT_STEPS
from vilex.engines.contract import DEFAULT_GUIDANCE_BRANCHES, ExportOptions, ModelDims, build_contracts
from vilex.export.validate import sample_inputs
from vilex.backends import StageBackend
from vilex.stages import STAGE_NAMES

from . import ALL_BACKENDS
from .measure import Stats, measure

ORT_PROVIDERS = {"onnxruntime": ["cpu"], "onnxruntime-cuda": ["cuda", "cpu"], "onnxruntime-trt": ["tensorrt", "cuda", "cpu"]}


class Unavailable(Exception):
    """A backend that cannot run on this machine; the message says why."""


@dataclass
class BenchBackend:
    name: str
    pipeline: object  # a ViLexPipeline whose backend runs the stages
    precision: str  # what the FLOP peak is looked up for: fp32, fp16, bf16
    sync: Callable[[], None] | None
    device: str


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    num_tokens: int = 16
    steps: int = DEFAULT_STEPS
    e2e_batch: int = 1
    guidance_scale: float = DEFAULT_GUIDANCE
    stages: tuple[str, ...] = STAGE_NAMES
    end_to_end: bool = True
    window_s: float = 0.5
    max_windows: int = 8
    stability: float = 0.10
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _gpu() -> bool:
    return torch.cuda.is_available()


def _sync():
    return torch.cuda.synchronize if _gpu() else None


class CudaGraphBackend(StageBackend):
    """Wraps a TorchBackend: the first call of a stage at a given input shape captures it into a CUDA
    graph with static input/output buffers; later calls copy inputs in and replay (no launch overhead)."""

    name = "torch-cudagraph"

    def __init__(self, inner):
        self.inner = inner
        self.device = inner.device
        self.graphs: dict = {}

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        key = (stage, tuple((n, tuple(v.shape)) for n, v in sorted(inputs.items())))
        if key not in self.graphs:
            module = self.inner.modules[stage]
            parameter = next(module.parameters())
            static = {n: v.to(parameter.device, parameter.dtype if v.is_floating_point() else v.dtype).clone()
                      for n, v in inputs.items()}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):  # warm up on a side stream, as CUDA graph capture requires
                    module(**static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                output = module(**static)
            self.graphs[key] = (graph, static, output)
        graph, static, output = self.graphs[key]
        for name, value in inputs.items():
            static[name].copy_(value)
        graph.replay()
        return output.clone()


def load_backend(name: str, ckpt: Path, engines: Path | None) -> BenchBackend:
    """Build the named backend around the checkpoint (or its export folder); Unavailable says why not."""
    from vilex import ViLexPipeline
    from vilex.backends import TorchBackend

    device = "cuda" if _gpu() else "cpu"
    if name.startswith("torch"):
        if name != "torch" and not _gpu():
            raise Unavailable(f"{name} needs a CUDA GPU")
        dtype = {"torch-bf16": torch.bfloat16, "torch": torch.float32}.get(name, torch.float16)
        pipeline = ViLexPipeline.from_pretrained(ckpt, torch_dtype=dtype).to(device)
        pipeline.set_progress_bar_config(disable=True)
        backend = TorchBackend(pipeline)
        if name == "torch-compile":
            backend.modules = {stage: torch.compile(module) for stage, module in backend.modules.items()}
        if name == "torch-cudagraph":
            backend = CudaGraphBackend(backend)
        pipeline.set_backend(backend)
        precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        return BenchBackend(name, pipeline, precision, _sync(), device)
    if engines is None:
        raise Unavailable(f"{name} needs an export folder (--engines, or let the benchmark export)")
    from vilex.engines.host import pipeline_from_engines

    from vilex.engines.folder import EngineFolder

    folder = EngineFolder.open(engines)
    if name.startswith("onnxruntime"):
        import onnxruntime as ort

        from vilex.backends.onnxruntime import PROVIDER_NAMES, OnnxRuntimeBackend

        wanted = ORT_PROVIDERS[name]
        if PROVIDER_NAMES[wanted[0]] not in ort.get_available_providers():
            raise Unavailable(f"{name}: this onnxruntime has no {PROVIDER_NAMES[wanted[0]]} "
                              f"(has {ort.get_available_providers()})")
        backend = OnnxRuntimeBackend(folder, providers=wanted)
        on_gpu = wanted[0] != "cpu"
    elif name == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise Unavailable("tensorrt: the TensorRT Python package is not installed") from None
        if not _gpu():
            raise Unavailable("tensorrt needs a CUDA GPU")
        from vilex.backends.tensorrt import TensorRTBackend

        backend = TensorRTBackend(folder)
        on_gpu = True
    else:
        raise Unavailable(f"unknown backend {name!r}; backends are {', '.join(ALL_BACKENDS)}")
    pipeline = pipeline_from_engines(folder, backend=backend)
    pipeline.set_progress_bar_config(disable=True)
    return BenchBackend(name, pipeline, folder.precision, _sync() if on_gpu else None, "cuda" if on_gpu else "cpu")


def stage_sizes(contracts: dict, stage: str, batch: int) -> dict[str, int]:
    sizes = {axis: bounds.opt for axis, bounds in contracts[stage].axes.items()}
    sizes["batch"] = batch * (DEFAULT_GUIDANCE_BRANCHES if stage == "unet" else 1)
    return sizes


def count_flops(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one call, counted by PyTorch's FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(module.parameters())
    inputs = {n: v.to(parameter.device, parameter.dtype) for n, v in inputs.items()}
    # FlopCounterMode's module tracker fails on parameters that require grad under no_grad
    # ("Expected gradient function to be set"); the counting copy never trains.
    module.requires_grad_(False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(**inputs)
    return int(counter.get_total_flops())


def stage_contracts(ckpt: Path, batch_sizes) -> tuple[dict, ModelDims, object]:
    """Contracts at the checkpoint's sizes, and an fp32 PyTorch pipeline for FLOP counting."""
    from vilex import ViLexPipeline

    pipeline = ViLexPipeline.from_pretrained(ckpt).to("cuda" if _gpu() else "cpu")
    dims = ModelDims.from_pipeline(pipeline)
    contracts = build_contracts(dims, ExportOptions(max_batch=max(batch_sizes)))
    return contracts, dims, pipeline


def run_stage(bench: BenchBackend, contracts: dict, stage: str, batch: int, settings: BenchSettings,
              watch=None) -> Stats:
    inputs = sample_inputs(contracts[stage], stage_sizes(contracts, stage, batch),
                           torch.Generator().manual_seed(settings.seed))
    if bench.device == "cuda":
        inputs = {n: v.cuda() for n, v in inputs.items()}
    backend = bench.pipeline.backend

    def make_call():
        def call():
            with torch.no_grad():
                return backend(stage, **inputs)
        return call

    return measure(make_call, items_per_call=batch, window_s=settings.window_s, max_windows=settings.max_windows,
                   stability=settings.stability, sync=bench.sync, watch=watch)


def run_end_to_end(bench: BenchBackend, images, settings: BenchSettings, watch=None) -> Stats:
    batch = list(images[: settings.e2e_batch])

    def make_call():
        def call():
            return bench.pipeline(batch, num_tokens=settings.num_tokens, num_inference_steps=settings.steps,
                                  guidance_scale=settings.guidance_scale, seed=settings.seed, progress=False)
        return call

    # End to end is long: windows of two calls, at most five of them.
    return measure(make_call, items_per_call=len(batch), warmup_calls=1, window_s=0.0, min_calls=2,
                   max_windows=min(settings.max_windows, 5), stability=settings.stability, sync=bench.sync, watch=watch)


@contextlib.contextmanager
def released(bench: BenchBackend, isolation=None):
    """Free a backend before the next one loads: its memory (sd15 backends are several GB each), and its
    onnxruntime sessions with their intra-op thread pools, none of which may be left beside the next backend.
    With an isolation.Isolation, what of it survives the release is printed, and every row measured while it
    is alive is marked unsound."""
    try:
        yield bench
    finally:
        if isolation is not None:
            survivors = isolation.release(bench.name, bench)
            if survivors:
                print(f"  {bench.name}: still alive after its release: {', '.join(survivors)}")
        bench.pipeline = None
        import gc

        gc.collect()
        if _gpu():
            torch.cuda.empty_cache()
