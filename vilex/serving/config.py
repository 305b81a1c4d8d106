"""config.pbtxt for every model of the repository, generated from the export contract.

Graph models (`vilex_encoder`, `text_encoder`, `unet`, `vae_decoder`) take their input and output names,
dtypes and dims from the graph's `GraphContract`, and their `max_batch_size` from its batch bound; the
pipeline models take theirs from `interface.py`. Each platform differs only in how the graph runs:

    python-ort   backend "python": 1/model.py holds an onnxruntime session (the CPU server in nvidia-pytriton)
    onnxruntime  platform "onnxruntime_onnx": Triton's onnxruntime backend (NVIDIA's container)
    tensorrt     platform "tensorrt_plan": a TensorRT engine from `vilex build-engines` (NVIDIA's container)

Instances are KIND_CPU on python-ort and KIND_GPU on onnxruntime and tensorrt, graph and pipeline models alike.
The denoising loop's UNet runs in the pipeline models' own process by default (`--unet local`), except on
tensorrt, where it is the `unet` model (`--unet bls`, the only placement there; `Platform.unet_placements`).

Every model has dynamic batching with a bounded queue (`default_queue_policy`; there is no
`max_queue_size` field of `dynamic_batching` itself) and an `instance_group`; graph models have a
`model_warmup` request at the contract's opt shapes. Configs are built as Triton's own `ModelConfig`
protobuf message (tritonclient ships its model_config.proto) and printed in text format, so a field
Triton does not know cannot be written.

`python -m vilex.serving.config` rewrites the committed configs in triton_repo/ for the tiny preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vilex import settings
from vilex.errors import ViLexUsageError
from vilex.engines.contract import MAX_GUIDANCE_BRANCHES, GraphContract, TensorSpec

from .interface import NUMPY_TO_TRITON, Port, ServedModel


# Where the pipeline models run the UNet: "bls" sends every denoising step to the `unet` graph model;
# "local" runs it in the pipeline model's own process (an onnxruntime session over the export's graph), so
# a step makes no inter-process hop. The per-request stages stay BLS calls either way.
UNET_PLACEMENTS = ("bls", "local")
DEFAULT_UNET = "local"  # measured: half the serving overhead per step of bls, the same end to end (README)


@dataclass(frozen=True)
class Platform:
    """How one `--platform` runs the graphs, and where its pipeline models may run the UNet.

    tensorrt allows `--unet bls` only. `local` runs the UNet's ONNX graph in an onnxruntime session, so on
    tensorrt every denoising step would skip the engine (on the CPU where the stub's onnxruntime has no CUDA)
    while the `unet` engine sat loaded and idle (issue 18). Running the engine locally instead (TensorRTBackend
    in the stub) was not chosen: it needs the `tensorrt` Python package in the Python backend's environment,
    at exactly the TensorRT version of the server that built and loads the plans, which no vilex extra can
    install (it comes from NVIDIA's index only); and it would load the UNet engine again in every instance of
    every loop model, beside the `unet` model's own copy. With bls the step is one BLS request whose tensors
    stay on the GPU (DLPack, `preferred_memory`), run by Triton's TensorRT backend, whose instances and
    batching `--instances` and `--graph-queue-delay` already set."""

    name: str
    kind: str  # instance kind of the graph models
    model_file: str  # the graph's file name in the version folder
    backend: str | None = None
    platform: str | None = None
    # Instance kind of the pipeline (BLS) models. KIND_GPU gives each instance a GPU (Triton passes it to
    # initialize() as model_instance_kind "GPU" and model_instance_device_id): the denoising loop keeps its
    # tensors there and hands them to the graph models by DLPack, with no host copy (vilex/serving/bls.py).
    pipeline_kind: str = "KIND_CPU"
    unet_placements: tuple[str, ...] = UNET_PLACEMENTS  # the --unet values this platform takes
    default_unet: str = DEFAULT_UNET  # `vilex triton-repo` without --unet

    @property
    def target(self) -> str:
        """Where its graphs run: "cpu" or "gpu" (which of an export's variants it serves)."""
        return "gpu" if self.kind == "KIND_GPU" else "cpu"


PLATFORMS = {
    # The CPU server (nvidia-pytriton's tritonserver has only the Python backend).
    "python-ort": Platform("python-ort", "KIND_CPU", "model.onnx", backend="python"),
    # GPU hosts (NVIDIA's container): graph and pipeline models on the GPU.
    "onnxruntime": Platform("onnxruntime", "KIND_GPU", "model.onnx", platform="onnxruntime_onnx",
                            pipeline_kind="KIND_GPU"),
    # The UNet as the `unet` engine for every step (bls): see Platform's docstring for why not local.
    "tensorrt": Platform("tensorrt", "KIND_GPU", "model.plan", platform="tensorrt_plan", pipeline_kind="KIND_GPU",
                         unet_placements=("bls",), default_unet="bls"),
}


@dataclass(frozen=True)
class QueuePolicy:
    """dynamic_batching settings of one model."""

    max_queue_delay_us: int  # how long a request may wait for others to fill a batch
    max_queue_size: int  # requests waiting beyond this are rejected at once (bounded memory)
    timeout_us: int  # a request queued longer than this is rejected
    allow_timeout_override: bool = False  # let a request's own timeout replace timeout_us


# Graph models are called by the pipeline models only. A pipeline instance sends one request per stage
# and waits for it, so a graph model's queue delay only helps when several pipeline instances run at once
# (their requests can then share a batch), and otherwise adds itself to every denoising step: 0 unless
# `vilex triton-repo --graph-queue-delay US` asks for batching across pipeline instances. (Requests that
# are already queued are still batched with a delay of 0.) The BLS passes its own per-stage timeout with
# every sub-request, hence the override.
STAGE_TIMEOUT_S = 120.0
GRAPH_QUEUE_DELAY_US = 0
MAX_QUEUE_DELAY_US = 1_000_000
# Pipeline models run a whole generation (many UNet calls), so waiting 20 ms to batch is cheap.
PIPELINE_QUEUE_DELAY_US = 20_000
PIPELINE_QUEUE_TIMEOUT_S = 300.0
QUEUE_PER_BATCH = 8  # default queue bound: this many full batches
DEFAULT_MAX_STEPS = settings.DEFAULT_SERVED_MAX_STEPS  # a server bound on one request's work (the library: MAX_STEPS)
# The pipeline models that run the denoising loop (vilex_tokenize only encodes images).
LOOP_MODELS = ("vilex_generate", "vilex_reconstruct", "vilex_generate_stream", "vilex_reconstruct_stream")


def triton_dims(spec: TensorSpec) -> tuple[list[int], list[int] | None]:
    """(dims, reshape) of a contract tensor whose first axis is the batch.

    A tensor that is only a batch, such as the UNet's timestep (batch,), cannot have empty dims in
    Triton: it is declared dims [1] with `reshape: { shape: [ ] }`, so callers send (n, 1) and the
    graph receives (n,)."""
    if not spec.shape or spec.shape[0] != "batch":
        raise ValueError(f"tensor '{spec.name}' has no leading batch axis: {spec.shape}")
    dims = [d if isinstance(d, int) else -1 for d in spec.shape[1:]]
    return (dims, None) if dims else ([1], [])


def graph_max_batch(contract: GraphContract, max_batch: int) -> int:
    """Requests per graph call for `max_batch` images: the UNet stacks up to three guidance branches."""
    return MAX_GUIDANCE_BRANCHES * max_batch if contract.name == "unet" else max_batch


def check_max_batch(contracts: dict[str, GraphContract], max_batch: int) -> None:
    """The graphs (TensorRT profiles, the contract) take at most their batch bound; refuse more."""
    allowed = contracts["vilex_encoder"].axes["batch"].max
    if not 1 <= max_batch <= allowed:
        raise ViLexUsageError(f"--max-batch must be in 1..{allowed} (the export's --max-batch), got {max_batch}; "
                              f"re-export with a larger --max-batch for more")
    for name, contract in contracts.items():
        need = graph_max_batch(contract, max_batch)
        if need > contract.axes["batch"].max:
            raise ViLexUsageError(f"--max-batch {max_batch} needs batch {need} in graph '{name}', whose contract "
                                  f"allows {contract.axes['batch'].max}; re-export with a larger --max-batch")


# ---- rendering: Triton's own ModelConfig message, printed in protobuf text format ----------------------
# tritonclient ships the model_config.proto of the server as a compiled module; a field or enum value that
# Triton does not know fails here, at `vilex triton-repo` time, instead of when the server loads the model.
# Imported where used: the pipeline models' processes import this module (triton_dims) without tritonclient.
def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _add_tensor(container, name: str, triton_dtype: str, dims, reshape=None, optional: bool = False):
    tensor = container.add()
    tensor.name = name
    tensor.data_type = _pb().DataType.Value(triton_dtype)
    tensor.dims.extend(dims)
    if reshape is not None:
        tensor.reshape.SetInParent()  # present even when empty: `reshape { }` makes (n, 1) arrive as (n,)
        tensor.reshape.shape.extend(reshape)
    if optional:
        tensor.optional = True
    return tensor


def _set_dynamic_batching(config, queue: QueuePolicy) -> None:
    batching = config.dynamic_batching
    batching.SetInParent()
    batching.max_queue_delay_microseconds = queue.max_queue_delay_us
    policy = batching.default_queue_policy
    policy.max_queue_size = queue.max_queue_size
    policy.timeout_action = _pb().ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = queue.timeout_us
    policy.allow_timeout_override = queue.allow_timeout_override


def _add_instances(config, count: int, kind: str) -> None:
    group = config.instance_group.add()
    group.count = count
    group.kind = _pb().ModelInstanceGroup.Kind.Value(kind)


def _add_warmup(config, contract: GraphContract) -> None:
    """One warm-up request at the contract's opt shapes (the size TensorRT tunes for and the default request
    runs at), zeros, run when the model loads: onnxruntime and TensorRT allocate and pick kernels on their
    first run, so without it the first real request pays for that."""
    shapes = contract.input_shapes("opt")  # {input: (batch, ...)}
    warmup = config.model_warmup.add()
    warmup.name = f"{contract.name} at its opt shapes"
    # A repository may take a smaller --max-batch than the export's opt batch: warm up within what it takes.
    warmup.batch_size = min(next(iter(shapes.values()))[0], config.max_batch_size)
    warmup.count = 1
    for spec in contract.inputs:
        tensor = warmup.inputs[spec.name]
        tensor.data_type = _pb().DataType.Value(NUMPY_TO_TRITON[spec.dtype])
        tensor.dims.extend(shapes[spec.name][1:] or [1])  # as a request sends it: timestep (n,) is (n, 1)
        tensor.zero_data = True


# Top-level fields in reading order (text format prints by field number, which puts `backend` near the end).
FIELD_ORDER = ("name", "backend", "platform", "default_model_filename", "max_batch_size", "input", "output",
               "dynamic_batching", "model_transaction_policy", "instance_group", "model_warmup", "parameters")


def _render(config, what: str) -> str:
    """The message in protobuf text format, one top-level field after another in FIELD_ORDER (each piece is
    that field alone; text format merges them back into the same message when parsed)."""
    from google.protobuf import text_format

    present = [field.name for field, _ in config.ListFields()]
    pieces = []
    for name in sorted(present, key=lambda n: FIELD_ORDER.index(n) if n in FIELD_ORDER else len(FIELD_ORDER)):
        piece = type(config)()
        piece.CopyFrom(config)
        for other in present:
            if other != name:
                piece.ClearField(other)
        pieces.append(text_format.MessageToString(piece))
    return _header(what) + "\n" + "".join(pieces)


def _header(what: str) -> str:
    return (f"# {what}\n"
            "# Generated by `vilex triton-repo` (vilex/serving/config.py) from the export contract, as Triton's\n"
            "# ModelConfig protobuf; change the export or the command's options rather than this file. Fields at\n"
            "# their protobuf default are not printed: timeout_action is REJECT, an absent delay is 0.\n")


def graph_config(contract: GraphContract, platform: str, max_batch: int, instances: int = 1,
                 max_queue: int | None = None, queue_delay_us: int = GRAPH_QUEUE_DELAY_US, warmup: bool = True) -> str:
    """config.pbtxt of one graph model."""
    spec = PLATFORMS[platform]
    config = _pb().ModelConfig(name=contract.name, max_batch_size=graph_max_batch(contract, max_batch))
    if spec.backend:
        config.backend = spec.backend
    else:
        config.platform = spec.platform
        config.default_model_filename = spec.model_file
    for specs, container in ((contract.inputs, config.input), (contract.outputs, config.output)):
        for tensor in specs:
            _add_tensor(container, tensor.name, NUMPY_TO_TRITON[tensor.dtype], *triton_dims(tensor))
    _set_dynamic_batching(config, QueuePolicy(queue_delay_us, max_queue or QUEUE_PER_BATCH * config.max_batch_size,
                                              int(STAGE_TIMEOUT_S * 1e6), allow_timeout_override=True))
    _add_instances(config, instances, spec.kind)
    if warmup:
        _add_warmup(config, contract)
    if platform == "python-ort":
        config.parameters["graph_file"].string_value = spec.model_file
        # 0: onnxruntime's default (one thread per core); lower it when several instances share the cores.
        config.parameters["intra_op_num_threads"].string_value = "0"
    return _render(config, f"{contract.name}: the exported graph, run by {platform}")


def pipeline_parameters(max_steps: int, default_steps: int, default_guidance: float,
                        stage_timeout_s: float = STAGE_TIMEOUT_S, unet: str = DEFAULT_UNET,
                        unet_variant: str = "onnx") -> dict[str, str]:
    """Parameters of the pipeline models; `PipelineModel` reads them in initialize(). unet_variant: the export's
    variant of the UNet graph a local UNet runs (the `unet` graph model's file)."""
    return {"engine_dir": "engine", "max_steps": str(max_steps), "default_steps": str(default_steps),
            "default_guidance": str(default_guidance), "stage_timeout_seconds": str(stage_timeout_s),
            "unet": unet, "unet_variant": unet_variant}


def pipeline_config(model: ServedModel, max_batch: int, parameters: dict[str, str], instances: int = 1,
                    max_queue: int | None = None, kind: str = "KIND_CPU") -> str:
    """config.pbtxt of one pipeline (BLS) model; `kind` is its instance kind (the platform's pipeline_kind).

    Its own inputs stay in host memory even on KIND_GPU (the Python backend's default,
    FORCE_CPU_ONLY_INPUT_TENSORS): they are request data (bytes, tokens, settings) read with as_numpy()."""
    config = _pb().ModelConfig(name=model.name, backend="python", max_batch_size=max_batch)
    for port in model.inputs:
        _add_tensor(config.input, port.name, port.triton_dtype, port.dims, optional=port.optional)
    for port in model.outputs:
        _add_tensor(config.output, port.name, port.triton_dtype, port.dims)
    _set_dynamic_batching(config, QueuePolicy(PIPELINE_QUEUE_DELAY_US, max_queue or QUEUE_PER_BATCH * max_batch,
                                              int(PIPELINE_QUEUE_TIMEOUT_S * 1e6)))
    _add_instances(config, instances, kind)
    if model.decoupled:  # a stream of responses per request (served over gRPC streaming)
        config.model_transaction_policy.decoupled = True
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return _render(config, f"{model.name}: {model.doc} (a Python-backend BLS model over the graph models)")


# ---- the committed source configs ---------------------------------------------------------------------
# The python-ort graph model, and the pipeline models' one model.py (the model's name selects what it does).
GRAPH_MODEL_SOURCE, PIPELINE_MODEL_SOURCE = "onnxruntime_model.py", "pipeline_model.py"
SOURCE_FILES = (GRAPH_MODEL_SOURCE, PIPELINE_MODEL_SOURCE)


def source_dir() -> Path:
    """The Triton repository's source files (the pipeline models' model.py and the python-ort graph model's).

    An installed wheel carries them as package data in vilex/triton_repo/ (pyproject.toml maps the
    checkout's top-level triton_repo/ there); a source checkout, editable install included, has them in
    triton_repo/ next to vilex/."""
    package = Path(__file__).resolve().parents[1]  # vilex/
    candidates = (package / "triton_repo", package.parent / "triton_repo")
    for path in candidates:
        if all((path / name).is_file() for name in SOURCE_FILES):
            return path
    raise ViLexUsageError(f"the Triton repository source ({', '.join(SOURCE_FILES)}) is in neither "
                          f"{candidates[0]} (an installed wheel) nor {candidates[1]} (a source checkout): "
                          f"reinstall vilex")


def checkout_source_dir() -> Path:
    """triton_repo/ of the source checkout, where the tiny preset's configs are committed."""
    path = Path(__file__).resolve().parents[2] / "triton_repo"
    if not (path / "README.md").is_file() or not (Path(__file__).resolve().parents[2] / "pyproject.toml").is_file():
        raise ViLexUsageError(f"{path} is not the triton_repo/ of a source checkout of vilex; the committed configs "
                              f"are rewritten there only")
    return path


def tiny_source_configs() -> dict[str, str]:
    """{relative path: text} of the configs committed in triton_repo/: the tiny preset, python-ort, defaults."""
    from vilex.settings import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from vilex.engines.contract import ExportOptions, ModelDims, build_contracts
    from vilex.presets import build_preset

    from .interface import pipeline_models

    dims = ModelDims.from_pipeline(build_preset("tiny", seed=0))
    options = ExportOptions()
    contracts = build_contracts(dims, options)
    configs = {f"{name}/config.pbtxt": graph_config(contract, "python-ort", options.max_batch)
               for name, contract in contracts.items()}
    parameters = pipeline_parameters(DEFAULT_MAX_STEPS, DEFAULT_STEPS, DEFAULT_GUIDANCE)
    for name, model in pipeline_models(dims.hidden_size, dims.num_queries).items():
        configs[f"{name}/config.pbtxt"] = pipeline_config(model, options.max_batch, parameters)
    return configs


if __name__ == "__main__":
    root = checkout_source_dir()
    for relative, text in tiny_source_configs().items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
        print(f"wrote {root / relative}")
