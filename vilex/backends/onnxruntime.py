"""Stages as onnxruntime sessions over an export folder (`vilex export`).

Execution providers, best first among those this onnxruntime build has and this machine can use:
TensorRT, CUDA, CPU (or the `providers` you pass, or VILEX_ORT_PROVIDERS="cuda,cpu" for the CLI). On a GPU provider, inputs and outputs are bound to CUDA memory with IO binding,
so torch CUDA tensors go in and come out without a host round trip; outputs are allocated from the
contract's output shapes. On CPU, sessions run on numpy views of the tensors.

Inputs are checked against the graph's contract (names, fixed sizes, multiples) before they reach
onnxruntime, so a wrong shape is a ViLexUsageError naming the input instead of a kernel error. The image
sides are held to the export's bounds (`side_range`, which `ViLexPipeline.generate` checks height and width
against), the same bounds a server of this export keeps (vilex.serving.pipeline_requests.Limits), though the
graphs themselves are fully dynamic; the batch is not bounded here (the TensorRT backend, whose engines cannot
go past their profiles, bounds every axis).

Outputs come back on the device the inputs came from, so the pipeline's loop is the same for all backends.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ViLexUsageError
from .base import StageBackend

PROVIDER_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def default_providers() -> list[str]:
    """VILEX_ORT_PROVIDERS (e.g. "cuda,cpu") if set; else the installed providers that can run here, best
    first. onnxruntime-gpu lists its GPU providers even without a GPU or TensorRT libraries, so CUDA
    needs a GPU visible to torch (IO binding uses torch's CUDA memory) and TensorRT also the tensorrt
    package (its libraries)."""
    import importlib.util

    import onnxruntime as ort

    if os.environ.get("VILEX_ORT_PROVIDERS"):
        return [name.strip() for name in os.environ["VILEX_ORT_PROVIDERS"].split(",") if name.strip()]
    available = ort.get_available_providers()
    usable = {"CPUExecutionProvider": True, "CUDAExecutionProvider": torch.cuda.is_available(),
              "TensorrtExecutionProvider": torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None}
    return [p for p in PROVIDER_NAMES.values() if p in available and usable[p]]


class OnnxRuntimeBackend(StageBackend):
    """Runs each stage's graph from `engines` (a folder path or EngineFolder).

    variant: "onnx" (the portable graphs), "ort" (the onnxruntime-optimized ones, if exported with
    --optimize) or None: "ort" when present for every graph and compatible with the providers, else "onnx".
    providers: short names ("tensorrt", "cuda", "cpu") or onnxruntime's; default: all available, best first.
    """

    name = "onnxruntime"

    def __init__(self, engines, providers: list[str] | None = None, variant: str | None = None,
                 session_options=None, device_id: int = 0):
        import onnxruntime as ort

        from vilex.engines.folder import EngineFolder

        self.engines = engines if isinstance(engines, EngineFolder) else EngineFolder.open(engines)
        available = ort.get_available_providers()
        wanted = [PROVIDER_NAMES.get(p, p) for p in (providers or default_providers())]
        unknown = [p for p in wanted if p not in available]
        if unknown or not wanted:
            raise ViLexUsageError(f"onnxruntime providers {unknown or wanted} are not available in this onnxruntime "
                                  f"build; available: {available} (short names: {', '.join(PROVIDER_NAMES)})")
        if wanted[0] in GPU_PROVIDERS and not torch.cuda.is_available():
            raise ViLexUsageError(f"onnxruntime provider {wanted[0]} needs a CUDA GPU visible to PyTorch "
                                  f"(IO binding uses torch CUDA memory); none is")
        self.providers = wanted
        self.on_gpu = wanted[0] in GPU_PROVIDERS
        self.device = torch.device("cuda", device_id) if self.on_gpu else torch.device("cpu")
        self.device_id = device_id
        if variant is None:  # the optimized graphs are fused for one target: used where it matches
            variant = self.engines.onnxruntime_variant("gpu" if self.on_gpu else "cpu")
        self.variant = variant
        for graph in self.engines.graph_names:
            self.engines.graph_path(graph, variant)  # raises if this variant is missing
        self.session_options = session_options
        self.contracts = self.engines.contracts()
        self.sessions: dict = {}

    def side_range(self, side: str) -> tuple[int, int]:
        return self.engines.side_range(side)

    # ---- sessions --------------------------------------------------------------------------------------
    def _provider_options(self, provider: str, graph: str) -> dict:
        if provider == "CUDAExecutionProvider":
            return {"device_id": self.device_id}
        if provider == "TensorrtExecutionProvider":
            contract = self.contracts[graph]
            cache = Path(os.environ.get("VILEX_CACHE", Path.home() / ".cache" / "vilex")) / "ort-tensorrt"
            shapes = {point: ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in contract.input_shapes(point).items())
                      for point in ("min", "opt", "max")}
            # No trt_fp16_enable: the precision is in the graph (fp16 exports keep fragile parts fp32), and
            # without that flag onnxruntime builds a strongly typed TensorRT network that follows it.
            return {"device_id": self.device_id,
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True,
                    "trt_profile_min_shapes": shapes["min"], "trt_profile_opt_shapes": shapes["opt"],
                    "trt_profile_max_shapes": shapes["max"]}
        return {}

    def session(self, graph: str):
        """The graph's InferenceSession, created on first use."""
        if graph not in self.sessions:
            import onnxruntime as ort

            path = self.engines.graph_path(graph, self.variant)
            self.sessions[graph] = ort.InferenceSession(
                str(path), sess_options=self.session_options,
                providers=[(p, self._provider_options(p, graph)) for p in self.providers])
        return self.sessions[graph]

    # ---- running ---------------------------------------------------------------------------------------
    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        contract = self.contracts[stage]
        sizes = contract.axis_sizes({name: tuple(t.shape) for name, t in inputs.items()}, enforce_range=False)
        source_device = next(iter(inputs.values())).device
        dtypes = {spec.name: getattr(torch, spec.dtype) for spec in contract.inputs}
        for name, tensor in inputs.items():
            if tensor.is_floating_point() != dtypes[name].is_floating_point:
                raise ViLexUsageError(f"graph '{stage}' input '{name}' must be {dtypes[name]}, got {tensor.dtype}")
        session = self.session(stage)
        if self.on_gpu:
            output = self._run_io_binding(session, contract, sizes, inputs, dtypes)
        else:
            feeds = {name: inputs[name].detach().to("cpu", dtypes[name]).contiguous().numpy() for name in inputs}
            output = torch.from_numpy(session.run(contract.output_names[:1], feeds)[0])
        return output.to(source_device)

    def _run_io_binding(self, session, contract, sizes, inputs, dtypes) -> torch.Tensor:
        binding = session.io_binding()
        # Keep the converted tensors alive until the run is done: onnxruntime only holds their pointers.
        device_inputs = {name: inputs[name].detach().to(self.device, dtypes[name]).contiguous() for name in inputs}
        for name, tensor in device_inputs.items():
            binding.bind_input(name, "cuda", self.device_id, _numpy_dtype(tensor.dtype), tuple(tensor.shape),
                               tensor.data_ptr())
        output_name = contract.output_names[0]
        spec = contract.outputs[0]
        output = torch.empty(contract.output_shapes(sizes)[output_name], dtype=getattr(torch, spec.dtype),
                             device=self.device)
        binding.bind_output(output_name, "cuda", self.device_id, _numpy_dtype(output.dtype), tuple(output.shape),
                            output.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are complete
        session.run_with_iobinding(binding)
        return output


def _numpy_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]
