"""config.pbtxt for every model of the repository, generated from the export contract.

Graph models (`vilex_encoder`, `text_encoder`, `unet`, `vae_decoder`) take their input and output names,
dtypes and dims from the graph's `GraphContract`, and their `max_batch_size` from its batch bound; the
pipeline models take theirs from `interface.py`. Each platform differs only in how the graph runs:

    python-ort   backend "python": 1/model.py holds an onnxruntime session (the CPU server in nvidia-pytriton)
    onnxruntime  platform "onnxruntime_onnx": Triton's onnxruntime backend (NVIDIA's container)
    tensorrt     platform "tensorrt_plan": a TensorRT engine from `vilex build-engines` (NVIDIA's container)

Every model has dynamic batching with a bounded queue (`default_queue_policy`; there is no
`max_queue_size` field of `dynamic_batching` itself) and an `instance_group`.

`python -m vilex.serving.config` rewrites the committed configs in triton_repo/ for the tiny preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vilex.errors import ViLexUsageError
from vilex.engines.contract import MAX_GUIDANCE_BRANCHES, GraphContract, TensorSpec

from .interface import NUMPY_TO_TRITON, Port, ServedModel


@dataclass(frozen=True)
class Platform:
    name: str
    kind: str  # instance kind of the graph models
    model_file: str  # the graph's file name in the version folder
    backend: str | None = None
    platform: str | None = None


PLATFORMS = {
    "python-ort": Platform("python-ort", "KIND_CPU", "model.onnx", backend="python"),
    "onnxruntime": Platform("onnxruntime", "KIND_GPU", "model.onnx", platform="onnxruntime_onnx"),
    "tensorrt": Platform("tensorrt", "KIND_GPU", "model.plan", platform="tensorrt_plan"),
}


@dataclass(frozen=True)
class QueuePolicy:
    """dynamic_batching settings of one model."""

    max_queue_delay_us: int  # how long a request may wait for others to fill a batch
    max_queue_size: int  # requests waiting beyond this are rejected at once (bounded memory)
    timeout_us: int  # a request queued longer than this is rejected
    allow_timeout_override: bool = False  # let a request's own timeout replace timeout_us


# Graph models are called by the pipeline models only; a UNet call takes tens of milliseconds or more,
# so 2 ms of waiting costs little and lets concurrent pipeline instances share a batch. The BLS passes
# its own per-stage timeout with every sub-request, hence the override.
STAGE_TIMEOUT_S = 120.0
GRAPH_QUEUE_DELAY_US = 2_000
# Pipeline models run a whole generation (many UNet calls), so waiting 20 ms to batch is cheap.
PIPELINE_QUEUE_DELAY_US = 20_000
PIPELINE_QUEUE_TIMEOUT_S = 300.0
QUEUE_PER_BATCH = 8  # default queue bound: this many full batches
DEFAULT_MAX_STEPS = 200  # a server bound on one request's work (the library allows 1000)


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


# ---- rendering ---------------------------------------------------------------------------------------
def _dims(dims) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]" if dims else "[ ]"


def _tensor(name: str, triton_dtype: str, dims, reshape=None, optional: bool = False) -> str:
    fields = [f'name: "{name}"', f"data_type: {triton_dtype}", f"dims: {_dims(dims)}"]
    if reshape is not None:
        fields.append(f"reshape: {{ shape: {_dims(reshape)} }}")
    if optional:
        fields.append("optional: true")
    return "  { " + " ".join(fields) + " }"


def _block(key: str, items: list[str]) -> str:
    return f"{key} [\n" + ",\n".join(items) + "\n]"


def _dynamic_batching(queue: QueuePolicy) -> str:
    override = "\n    allow_timeout_override: true" if queue.allow_timeout_override else ""
    return (
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {queue.max_queue_delay_us}\n"
        "  default_queue_policy {\n"
        f"    max_queue_size: {queue.max_queue_size}\n"
        "    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {queue.timeout_us}{override}\n"
        "  }\n"
        "}"
    )


def _instances(count: int, kind: str) -> str:
    return f"instance_group [ {{ count: {count} kind: {kind} }} ]"


def _parameters(parameters: dict[str, str]) -> list[str]:
    return [f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in parameters.items()]


def _header(what: str) -> str:
    return (f"# {what}\n"
            "# Generated by `vilex triton-repo` (vilex/serving/config.py) from the export contract; change the\n"
            "# export or the command's options rather than this file.\n")


def graph_config(contract: GraphContract, platform: str, max_batch: int, instances: int = 1,
                 max_queue: int | None = None) -> str:
    """config.pbtxt of one graph model."""
    spec = PLATFORMS[platform]
    batch = graph_max_batch(contract, max_batch)
    queue = QueuePolicy(GRAPH_QUEUE_DELAY_US, max_queue or QUEUE_PER_BATCH * batch, int(STAGE_TIMEOUT_S * 1e6),
                        allow_timeout_override=True)
    runner = f'backend: "{spec.backend}"' if spec.backend else f'platform: "{spec.platform}"'
    lines = [_header(f"{contract.name}: the exported graph, run by {platform}"),
             f'name: "{contract.name}"', runner, f"max_batch_size: {batch}"]
    if spec.platform:
        lines.append(f'default_model_filename: "{spec.model_file}"')
    inputs = [_tensor(s.name, NUMPY_TO_TRITON[s.dtype], *triton_dims(s)) for s in contract.inputs]
    outputs = [_tensor(s.name, NUMPY_TO_TRITON[s.dtype], *triton_dims(s)) for s in contract.outputs]
    lines += [_block("input", inputs), _block("output", outputs), _dynamic_batching(queue),
              _instances(instances, spec.kind)]
    if platform == "python-ort":
        # 0: onnxruntime's default (one thread per core); lower it when several instances share the cores.
        lines += _parameters({"graph_file": spec.model_file, "intra_op_num_threads": "0"})
    return "\n".join(lines) + "\n"


def pipeline_parameters(max_steps: int, default_steps: int, default_guidance: float,
                        stage_timeout_s: float = STAGE_TIMEOUT_S) -> dict[str, str]:
    """Parameters of the pipeline models; `PipelineModel` reads them in initialize()."""
    return {"engine_dir": "engine", "max_steps": str(max_steps), "default_steps": str(default_steps),
            "default_guidance": str(default_guidance), "stage_timeout_seconds": str(stage_timeout_s)}


def pipeline_config(model: ServedModel, max_batch: int, parameters: dict[str, str], instances: int = 1,
                    max_queue: int | None = None) -> str:
    """config.pbtxt of one pipeline (BLS) model."""
    queue = QueuePolicy(PIPELINE_QUEUE_DELAY_US, max_queue or QUEUE_PER_BATCH * max_batch,
                        int(PIPELINE_QUEUE_TIMEOUT_S * 1e6))

    def port(p: Port) -> str:
        return _tensor(p.name, p.triton_dtype, p.dims, optional=p.optional)

    lines = [_header(f"{model.name}: {model.doc} (a Python-backend BLS model over the graph models)"),
             f'name: "{model.name}"', 'backend: "python"', f"max_batch_size: {max_batch}",
             _block("input", [port(p) for p in model.inputs]), _block("output", [port(p) for p in model.outputs]),
             _dynamic_batching(queue), _instances(instances, "KIND_CPU"), *_parameters(parameters)]
    return "\n".join(lines) + "\n"


# ---- the committed source configs ---------------------------------------------------------------------
SOURCE_FILES = ("onnxruntime_model.py", "vilex_tokenize/1/model.py", "vilex_generate/1/model.py",
                "vilex_reconstruct/1/model.py")


def source_dir() -> Path:
    """The Triton repository's source files (the pipeline models' model.py, the python-ort graph model).

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
