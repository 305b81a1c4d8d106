"""`vilex triton-repo`: an export folder -> a Triton model repository.

    DIR/
      repository.json                 what this is: platform, options, the export it came from (Triton ignores files here)
      vilex_encoder/ text_encoder/ unet/ vae_decoder/
        config.pbtxt                  from the export contract (config.py)
        1/model.onnx [+ .onnx.data]   the graph (python-ort, onnxruntime); 1/model.plan for tensorrt
        1/model.py                    python-ort only: triton_repo/onnxruntime_model.py
      vilex_tokenize/ vilex_generate/ vilex_reconstruct/
        config.pbtxt                  from interface.py
        1/model.py                    triton_repo/pipeline_model.py (thin; logic in vilex/serving/bls.py)
        1/engine/                     the export's manifest.json and host/ files (tokenizer, scheduler,
                                      configs, token embeddings): what the pipeline needs besides the graphs;
                                      with --unet local also the UNet's ONNX graph (generate, reconstruct;
                                      not on tensorrt, whose loop sends each step to the `unet` engine)

The repository is written to a temporary sibling and renamed into place, so a failure leaves nothing.
Large files are hard-linked from the export folder where the file system allows, else copied.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from vilex import settings
from vilex.errors import ViLexUsageError
from vilex.outputs import swap_folder_into_place

from .config import (DEFAULT_MAX_STEPS, GRAPH_MODEL_SOURCE, GRAPH_QUEUE_DELAY_US, LOOP_MODELS,
                     MAX_QUEUE_DELAY_US, PIPELINE_MODEL_SOURCE, PLATFORMS, UNET_PLACEMENTS, check_max_batch, graph_config, graph_max_batch, pipeline_config,
                     pipeline_parameters, source_dir)
from .interface import STREAM_MODELS, pipeline_models

REPOSITORY_FILE = "repository.json"


def build_repository(engines: str | os.PathLike, out: str | os.PathLike, platform: str = "python-ort",
                     max_batch: int | None = None, instances: int = 1, max_queue: int | None = None,
                     max_steps: int = DEFAULT_MAX_STEPS, replace: bool = False, pipeline_instances: int = 1,
                     graph_queue_delay_us: int = GRAPH_QUEUE_DELAY_US, unet: str | None = None,
                     streaming: bool = False) -> Path:
    """Write the model repository for export folder `engines` to `out`; return `out`.

    instances: of each graph model; pipeline_instances: of each pipeline model. graph_queue_delay_us: how
    long a graph model waits to fill a batch (0: never; more lets concurrent pipeline instances share one).
    unet: "bls" (each step a request to the `unet` model) or "local" (vilex_generate and vilex_reconstruct
    run the UNet's ONNX graph in their own process; the `unet` model stays servable on its own); None: the
    platform's default, local except on tensorrt, which takes bls only (its UNet is the engine; config.Platform
    says why). streaming:
    also the decoupled vilex_generate_stream and vilex_reconstruct_stream (progress per step over gRPC); off by
    default, since each is one more Python-backend process holding a pipeline (about 400 MB on tiny)."""
    from vilex.settings import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from vilex.engines.folder import MANIFEST, EngineFolder

    # 1. Check the options against the export
    if platform not in PLATFORMS:
        raise ViLexUsageError(f"--platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    folder = EngineFolder.open(engines, what="ENGINES")
    contracts = folder.contracts()
    max_batch = folder.options.max_batch if max_batch is None else max_batch
    check_max_batch(contracts, max_batch)
    for flag, count in (("--instances", instances), ("--pipeline-instances", pipeline_instances)):
        if not 1 <= count <= 64:
            raise ViLexUsageError(f"{flag} must be in 1..64, got {count}")
    if not 0 <= graph_queue_delay_us <= MAX_QUEUE_DELAY_US:
        raise ViLexUsageError(f"--graph-queue-delay must be in 0..{MAX_QUEUE_DELAY_US} microseconds, "
                              f"got {graph_queue_delay_us}")
    if max_queue is not None and not 1 <= max_queue <= 100_000:
        raise ViLexUsageError(f"--max-queue must be in 1..100000, got {max_queue}")
    settings.check_steps(max_steps, "--max-steps")
    spec = PLATFORMS[platform]
    unet = spec.default_unet if unet is None else unet
    if unet not in UNET_PLACEMENTS:
        raise ViLexUsageError(f"--unet must be one of {', '.join(UNET_PLACEMENTS)}, got {unet!r}")
    if unet not in spec.unet_placements:
        raise ViLexUsageError(f"--unet {unet} cannot be used with --platform {platform}: it would run the UNet in an "
                              f"onnxruntime session on the ONNX graph, not the TensorRT engine; use --unet "
                              f"{' or '.join(spec.unet_placements)} (each denoising step a request to the `unet` engine)")
    variant = "onnx"
    if platform == "tensorrt":
        graph_files = tensorrt_engines(folder, {name: graph_max_batch(c, max_batch) for name, c in contracts.items()})
    else:  # the variant onnxruntime runs in-process on the same target: `ort/` where the export fused for it
        variant = folder.onnxruntime_variant(spec.target)
        graph_files = {name: folder.graph_path(name, variant) for name in contracts}
    source = source_dir()
    out = Path(out)
    if out.exists() and not replace:
        raise ViLexUsageError(f"--out '{out}' already exists; choose a new folder or pass --replace")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the repository from the server's user (a container's)
    try:
        # 2. Graph models
        for name, contract in contracts.items():
            version = staging / name / "1"
            version.mkdir(parents=True)
            (staging / name / "config.pbtxt").write_text(
                graph_config(contract, platform, max_batch, instances, max_queue, queue_delay_us=graph_queue_delay_us))
            _link_or_copy(graph_files[name], version / spec.model_file)
            external = graph_files[name].with_name(graph_files[name].name + ".data")
            if platform != "tensorrt" and external.is_file():
                # The graph names its external weights by file name: keep that name next to model.onnx.
                _link_or_copy(external, version / external.name)
            if platform == "python-ort":
                shutil.copyfile(source / GRAPH_MODEL_SOURCE, version / "model.py")

        # 3. Pipeline (BLS) models, each with the export's host files
        parameters = pipeline_parameters(max_steps, DEFAULT_STEPS, DEFAULT_GUIDANCE, unet=unet, unet_variant=variant)
        dims = folder.dims
        served = {name: model for name, model in pipeline_models(dims.hidden_size, dims.num_queries).items()
                  if streaming or name not in STREAM_MODELS}
        for name, model in served.items():
            version = staging / name / "1"
            version.mkdir(parents=True)
            (staging / name / "config.pbtxt").write_text(
                pipeline_config(model, max_batch, parameters, pipeline_instances, max_queue, kind=spec.pipeline_kind))
            shutil.copyfile(source / PIPELINE_MODEL_SOURCE, version / "model.py")
            engine = version / parameters["engine_dir"]
            engine.mkdir()
            shutil.copyfile(folder.root / MANIFEST, engine / MANIFEST)
            for path in sorted(p for p in folder.host_dir.rglob("*") if p.is_file()):
                target = engine / "host" / path.relative_to(folder.host_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(path, target)
            if unet == "local" and name in LOOP_MODELS:
                # The UNet's graph model's file (and its external weights), where the manifest names it.
                graph = folder.graph_path("unet", variant)
                for path in (graph, graph.with_name(graph.name + ".data")):
                    if path.is_file():
                        target = engine / path.relative_to(folder.root)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        _link_or_copy(path, target)

        # 4. What this repository is
        (staging / REPOSITORY_FILE).write_text(json.dumps({
            "format": "vilex-triton-repository", "format_version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "platform": platform, "graph_variant": variant, "max_batch": max_batch, "instances": instances,
            "pipeline_instances": pipeline_instances, "graph_queue_delay_us": graph_queue_delay_us, "unet": unet,
            "max_queue": max_queue, "max_steps": max_steps,
            "models": {"graphs": list(contracts), "pipeline": list(served)},
            "graph_files": {name: path.relative_to(folder.root).as_posix() for name, path in graph_files.items()},
            "engines": {"path": str(folder.root.resolve()), "source": folder.manifest.get("source"),
                        "precision": folder.precision, "versions": folder.manifest.get("versions")},
        }, indent=2) + "\n")

        # 5. Into place
        swap_folder_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def tensorrt_engines(folder, batch_needed: dict[str, int]) -> dict[str, Path]:
    """The engine per graph that `vilex build-engines` recorded (the most recently built one), checked to
    take the batch the configs declare. It must match the TensorRT version and GPU of the server that
    loads it; the file name says which (`unet.fp16.trt10.3.0.sm90.plan`)."""
    recorded = folder.manifest.get("tensorrt", {}).get("engines", {})
    engines = {}
    for graph, batch in batch_needed.items():
        entries = sorted((entry for entry in recorded.values() if entry.get("graph") == graph),
                         key=lambda entry: entry.get("built", ""))
        if not entries:
            raise ViLexUsageError(f"ENGINES '{folder.root}' has no TensorRT engine for '{graph}'; build them with "
                                  f"`vilex build-engines {folder.root}` on the GPU host that will serve them")
        entry = entries[-1]
        first_input = next(iter(entry["profile"]["max"].values()))
        if first_input[0] < batch:
            raise ViLexUsageError(f"the TensorRT engine {entry['file']} takes batch <= {first_input[0]}, but the "
                                  f"'{graph}' model needs {batch}: lower --max-batch or rebuild the engines")
        engines[graph] = folder.root / entry["file"]
    return engines


def read_repository(path: str | os.PathLike) -> dict:
    """repository.json of a repository made by `vilex triton-repo`, with a usage error naming DIR otherwise."""
    path = Path(path)
    info = path / REPOSITORY_FILE
    if not info.is_file():
        raise ViLexUsageError(f"DIR '{path}' is not a model repository made by `vilex triton-repo` (no {REPOSITORY_FILE})")
    try:
        data = json.loads(info.read_text())
    except json.JSONDecodeError as error:
        raise ViLexUsageError(f"DIR '{path}': {REPOSITORY_FILE} is not valid JSON: {error}") from None
    missing = [m for m in (*data["models"]["graphs"], *data["models"]["pipeline"]) if not (path / m / "config.pbtxt").is_file()]
    if missing:
        raise ViLexUsageError(f"DIR '{path}' is incomplete: no config.pbtxt for {missing}; rebuild it with `vilex triton-repo`")
    return data


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)


