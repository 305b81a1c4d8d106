"""Stages as TensorRT engines from an export folder (`vilex build-engines`).

One `Engine` per graph, in explicit steps as in NVIDIA's diffusion demo: load (deserialize the plan),
activate (execution context), then per call: bind every tensor by name (`set_input_shape`,
`set_tensor_address` on torch CUDA memory), `execute_async_v3` on a CUDA stream. Output buffers are
allocated from the shapes TensorRT reports for the bound inputs.

CUDA graphs (`cuda_graph=True`): the first call at a new set of input shapes runs normally, the
second captures the enqueue into a CUDA graph over static input/output buffers, and later calls at
those shapes copy the inputs in and replay it. The UNet, called at one shape for every denoising
step, is what benefits. As in trtexec and NVIDIA's demo/Diffusion, the capture is preceded by one
`execute_async_v3` with the same bindings and a synchronize, so TensorRT's set-up for those shapes
happens outside the graph. A graph holds the shapes and addresses bound on its context when it was
captured, so each captured shape gets an execution context of its own (and its activation memory),
never rebound; other shapes run on the engine's first context.

`TensorRTBackend(device_id=N)` makes GPU N current (`torch.cuda.device`) around deserialization,
context creation and every run: TensorRT works on the current device, which is GPU 0 unless set.

Inputs are checked against the contract (names, fixed sizes, multiples) and against the engine's own
optimization profile (min..max per axis, read from the engine), with a ViLexUsageError naming the
input. Outputs come back on the device the inputs came from. TensorRT is imported only here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ViLexUsageError
from .base import StageBackend


class TensorRTUnavailableError(ViLexUsageError):
    """TensorRT or a CUDA GPU is missing on this machine."""


def import_tensorrt(purpose: str = "building engines"):
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed, which {purpose} needs: install the `tensorrt` Python package from "
            f"NVIDIA's index on a machine with an NVIDIA GPU, or use NVIDIA's TensorRT container") from None
    return tensorrt


def cuda_compute_capability(device: int = 0) -> str:
    """'90' for an H100/H200 (sm_90), '86' for an A10 ..."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); "
                                       "TensorRT engines are built and run on an NVIDIA GPU")
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def engine_file_name(graph: str, precision: str, trt_version: str, compute_capability: str) -> str:
    """What would make an engine stale is in its name: precision, TensorRT version, GPU architecture."""
    return f"{graph}.{precision}.trt{trt_version}.sm{compute_capability}.plan"


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    for name, torch_dtype in (("INT64", torch.int64), ("BF16", torch.bfloat16)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_dtype
    return table[dtype]


class Engine:
    """One TensorRT engine: load -> activate -> infer (see the module docstring)."""

    def __init__(self, trt, path: Path, contract, device: torch.device, cuda_graph: bool = False):
        self.trt = trt
        self.path = path
        self.contract = contract
        self.device = device
        self.cuda_graph = cuda_graph
        self.engine = None
        self.context = None
        # input shapes -> (CUDAGraph, its own execution context, static inputs, static outputs)
        self.graphs: dict[tuple, tuple] = {}
        self.calls_per_shape: dict[tuple, int] = {}

    def load(self, runtime) -> None:
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {self.path} (built by another TensorRT version "
                               f"or for another GPU? rebuild with `vilex build-engines`)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        if sorted(self.input_names) != sorted(self.contract.input_names) or \
                sorted(self.output_names) != sorted(self.contract.output_names):
            raise RuntimeError(f"{self.path} has inputs {self.input_names} and outputs {self.output_names}; the "
                               f"contract of '{self.contract.name}' says {self.contract.input_names} -> "
                               f"{self.contract.output_names}")

    def activate(self) -> None:
        self.context = self.engine.create_execution_context()

    def profile_bounds(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        return tuple(low), tuple(high)

    def check_profile(self, inputs: dict[str, torch.Tensor]) -> None:
        for name, tensor in inputs.items():
            low, high = self.profile_bounds(name)
            shape = tuple(tensor.shape)
            if any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                raise ViLexUsageError(f"graph '{self.contract.name}' input '{name}' has shape {shape}, outside the "
                                      f"engine's profile {low}..{high}; rebuild with larger bounds "
                                      f"(`vilex build-engines ... --max-batch/--max-size`)")

    def _bind(self, context, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise ViLexUsageError(f"TensorRT refused shape {tuple(tensor.shape)} for graph "
                                      f"'{self.contract.name}' input '{name}' ({self.path.name})")
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def _execute(self, context, stream: torch.cuda.Stream) -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run '{self.contract.name}' ({self.path.name})")

    def infer(self, inputs: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """inputs: contiguous CUDA tensors of the engine's input dtypes. Enqueued on `stream`."""
        key = tuple((name, tuple(t.shape)) for name, t in sorted(inputs.items()))
        if key in self.graphs:
            graph, _, static_inputs, static_outputs = self.graphs[key]
            for name, tensor in inputs.items():
                static_inputs[name].copy_(tensor)
            graph.replay()
            return {name: t.clone() for name, t in static_outputs.items()}
        count = self.calls_per_shape[key] = self.calls_per_shape.get(key, 0) + 1
        if self.cuda_graph and count >= 2:  # shapes seen before: worth a graph (one-off shapes get none)
            # 1. A context for these shapes alone: the graph replays its bindings, so nothing may rebind it.
            context = self.engine.create_execution_context()
            static_inputs = {name: t.clone() for name, t in inputs.items()}
            static_outputs = self._bind(context, static_inputs)
            # 2. One run with these very bindings, finished before capture (as trtexec and demo/Diffusion do):
            #    TensorRT's set-up after a shape change (shape inference, lazy allocations) must not be captured.
            self._execute(context, stream)
            stream.synchronize()
            # 3. Capture the enqueue, then replay it for this call's result.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._execute(context, stream)
            self.graphs[key] = (graph, context, static_inputs, static_outputs)
            graph.replay()
            return {name: t.clone() for name, t in static_outputs.items()}
        outputs = self._bind(self.context, inputs)
        self._execute(self.context, stream)
        return outputs


class TensorRTBackend(StageBackend):
    """Runs each stage's TensorRT engine from `engines` (a folder path or EngineFolder).

    The engine for a graph is the one built for this TensorRT version and GPU (by file name); with
    several precisions built, `precision` chooses (default: the most recently built). device_id: the GPU
    that loads and runs the engines, made current around each TensorRT call (see the module docstring).
    """

    name = "tensorrt"

    def __init__(self, engines, precision: str | None = None, cuda_graph: bool = False, device_id: int = 0):
        from vilex.engines.contract import PRECISIONS
        from vilex.engines.folder import EngineFolder

        self.trt = trt = import_tensorrt("the tensorrt backend")
        compute_capability = cuda_compute_capability(device_id)
        self.folder = engines if isinstance(engines, EngineFolder) else EngineFolder.open(engines)
        self.device_id = device_id
        self.device = torch.device("cuda", device_id)
        self.stream = torch.cuda.Stream(self.device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        recorded = self.folder.manifest.get("tensorrt", {}).get("engines", {})
        self.engines: dict[str, Engine] = {}
        for graph in self.folder.graph_names:
            candidates = []
            for candidate_precision in ((precision,) if precision else PRECISIONS):
                name = engine_file_name(graph, candidate_precision, trt.__version__, compute_capability)
                path = self.folder.root / "tensorrt" / name
                if path.is_file():
                    candidates.append((recorded.get(name, {}).get("built", ""), path))
            if not candidates:
                raise ViLexUsageError(
                    f"--engines '{self.folder.root}' has no {precision or ''} TensorRT engine for '{graph}' built with "
                    f"TensorRT {trt.__version__} for sm{compute_capability}; run `vilex build-engines {self.folder.root}`")
            path = max(candidates)[1]
            self.engines[graph] = Engine(trt, path, self.folder.contract(graph), self.device, cuda_graph)
        self.activated: set[str] = set()

    def side_range(self, side: str) -> tuple[int, int]:
        """The export's heights or widths (its engines are built within its contracts' bounds), so a size outside
        them is refused, naming the flag and the bounds, before any stage runs."""
        return self.folder.side_range(side)

    def engine(self, stage: str) -> Engine:
        engine = self.engines[stage]
        if stage not in self.activated:  # load on first use: a tokenize-only run never loads the UNet
            with self.on_device():
                engine.load(self.runtime)
                engine.activate()
            self.activated.add(stage)
        return engine

    def on_device(self):
        """GPU `device_id` made current: TensorRT deserializes, creates execution contexts and enqueues on
        the current CUDA device (cudaGetDevice), whatever device the stream or the tensors are on."""
        return torch.cuda.device(self.device_id)

    def run(self, stage: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        engine = self.engine(stage)
        engine.contract.axis_sizes({name: tuple(t.shape) for name, t in inputs.items()}, enforce_range=False)
        source_device = next(iter(inputs.values())).device
        device_inputs = {}
        for name, tensor in inputs.items():
            dtype = _torch_dtype(self.trt, engine.engine.get_tensor_dtype(name))
            device_inputs[name] = tensor.detach().to(self.device, dtype).contiguous()
        engine.check_profile(device_inputs)
        # Our stream waits for the copies above (on the current stream), and the caller's stream for us.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self.on_device(), torch.cuda.stream(self.stream):
            outputs = engine.infer(device_inputs, self.stream)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for tensor in (*device_inputs.values(), *outputs.values()):
            tensor.record_stream(self.stream)  # not reused by the allocator before the stream is done
        return outputs[engine.contract.output_names[0]].to(source_device)
